"""Residual-stream activations of a policy model on prompts, for the harmful-intent probe.

A prompt is the conversation up to and including its last user turn, rendered with the
model's chat template and the generation prompt, i.e. exactly the tokens the model has seen
when it starts to answer. Forward hooks on chosen decoder layers read the residual stream
after each layer, and every prompt is pooled to one vector per layer (its last token, or the
mean over its tokens) in float32.

Two paths compute the same numbers:

* `TransformersActivationExtractor`: the reference. Batched forward passes of a transformers
  model with `register_forward_hook` on `model.model.layers[i]`.
* `VLLMActivationExtractor`: the same hooks inside a vLLM engine. vLLM runs the model in its
  worker, so the hooks live in `ActivationWorkerExtension`, mixed into the worker with
  `LLM(worker_extension_cls=...)` and driven by `collective_rpc` with plain arguments only
  (layer indices, a pooling name); the worker sends back raw float32 bytes. Hooks only fire
  in eager mode, and only whole prompts give whole-prompt activations: prefix caching and
  chunked prefill must be off (`data.engines` starts such an engine for the role
  "activations"). This is what annotate's probe uses wherever vLLM is installed.

The output of decoder layer `i` equals transformers' `output_hidden_states[i + 1]` for every
layer except the last one, whose `hidden_states` entry has the final norm applied: the hooks
read the un-normalised residual stream for all layers alike, in both paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Pooling = Literal["last", "mean"]
POOLINGS: tuple[str, ...] = ("last", "mean")
ALL_LAYERS = "all"

# Rows of the input embedding hashed into a model's fingerprint: enough to tell two
# checkpoints apart, cheap to read inside a vLLM worker.
_FINGERPRINT_ROWS = 256


class ActivationError(ValueError):
    """A bad activation request: unknown layer, empty prompt, unusable engine settings."""


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ActivationSpec:
    """Which decoder layers to read and how to pool a prompt's tokens.

    `layers` holds layer indices (negative ones count from the end, as in Python) or the
    string "all": the mean over every decoder layer's output, the reference code's choice.
    Several layers are concatenated in the order given.
    """

    layers: tuple[int, ...] | Literal["all"] = (-1,)
    pooling: Pooling = "last"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ActivationError(f"pooling={self.pooling!r}: expected one of {list(POOLINGS)}")
        if isinstance(self.layers, str):
            if self.layers != ALL_LAYERS:
                raise ActivationError(
                    f"layers={self.layers!r}: expected a list of layer indices or {ALL_LAYERS!r}"
                )
            return
        layers = tuple(self.layers)
        if not layers:
            raise ActivationError("layers: the list is empty; give at least one layer index")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ActivationError(f"layers: {layer!r} is not an integer layer index")
        object.__setattr__(self, "layers", layers)

    @property
    def averages_layers(self) -> bool:
        return self.layers == ALL_LAYERS

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The non-negative indices of the layers to read, for a model with `num_layers`."""
        if self.averages_layers:
            return list(range(num_layers))
        resolved = []
        for layer in self.layers:
            if not -num_layers <= layer < num_layers:
                raise ActivationError(
                    f"layer {layer} is out of range: the model has {num_layers} decoder layers "
                    f"(valid indices {-num_layers}..{num_layers - 1})"
                )
            resolved.append(layer % num_layers)
        if len(set(resolved)) != len(resolved):
            raise ActivationError(
                f"layers {list(self.layers)} name the same layer twice "
                f"(resolved against {num_layers} layers: {resolved})"
            )
        return resolved

    def feature_dim(self, hidden_size: int, num_layers: int) -> int:
        """Length of one prompt's feature vector."""
        return hidden_size if self.averages_layers else hidden_size * len(
            self.resolve_layers(num_layers)
        )

    def to_dict(self) -> dict[str, Any]:
        layers = self.layers if self.averages_layers else list(self.layers)
        return {"layers": layers, "pooling": self.pooling}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActivationSpec:
        layers = data["layers"]
        return cls(layers=layers if isinstance(layers, str) else tuple(layers),
                   pooling=data["pooling"])


# --------------------------------------------------------------------------- prompts


def prompt_messages(
    messages: Sequence[Mapping[str, str]], *, source: str = "prompt"
) -> list[dict[str, str]]:
    """The conversation up to and including its last user turn (the prompt a model answers).

    Raises `ActivationError` naming `source` when there is no user turn or it is empty.
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ActivationError(f"{source}: no user turn, so there is no prompt to read")
    content = messages[last_user].get("content")
    if not isinstance(content, str) or not content.strip():
        raise ActivationError(f"{source}: empty prompt (the last user turn has no text)")
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    source: str = "prompt",
) -> list[int]:
    """Token ids of the prompt as the model sees it just before it generates its answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ActivationError(
            f"{source}: the tokenizer has no chat template, so the prompt cannot be rendered "
            "as the model sees it"
        )
    ids = tokenizer.apply_chat_template(
        prompt_messages(messages, source=source),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return [int(i) for i in ids]


# --------------------------------------------------------------------------- fingerprints


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model for a probe: its name, shape, and a hash of its weights.

    `embedding_sha256` hashes the first input-embedding rows rounded to bfloat16, so the
    same checkpoint loaded in float32 or bfloat16, by transformers or by vLLM, from any
    path, gives the same value. `chat_template_sha256` changes when the prompt rendering
    changes, which changes the activations too.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    embedding_sha256: str | None = None
    chat_template_sha256: str | None = None
    # A merged LoRA chain's `data.adapters.adapters_sha256` (None: no adapter). An adapter
    # seldom touches the embedding rows hashed above; this tells its model from the base.
    adapters_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFingerprint:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """Why `other` is a different model than `self`, or None when they match.

        Shapes must agree; the weight hash decides when both sides have it (so a model
        moved to another path still matches), otherwise the name does.
        """
        for field_name in ("model_type", "hidden_size", "num_layers", "vocab_size"):
            mine, theirs = getattr(self, field_name), getattr(other, field_name)
            if mine != theirs:
                return f"{field_name}: {mine!r} here, {theirs!r} in the other model"
        if self.embedding_sha256 and other.embedding_sha256:
            if self.embedding_sha256 != other.embedding_sha256:
                return (
                    f"embedding_sha256: the weights differ ({self.embedding_sha256[:12]}... vs "
                    f"{other.embedding_sha256[:12]}...; {self.name!r} vs {other.name!r})"
                )
        elif self.name != other.name:
            return f"name: {self.name!r} here, {other.name!r} in the other model"
        if self.adapters_sha256 != other.adapters_sha256:
            mine, theirs = (str(v)[:12] if v else "none"
                            for v in (self.adapters_sha256, other.adapters_sha256))
            return (f"adapters_sha256: the LoRA adapters differ ({mine} here, {theirs} in the "
                    f"other model; {self.name!r} vs {other.name!r})")
        templates = (self.chat_template_sha256, other.chat_template_sha256)
        if all(templates) and templates[0] != templates[1]:
            return "chat_template_sha256: the chat templates differ"
        return None


def embedding_sha256(weight: torch.Tensor, rows: int = _FINGERPRINT_ROWS) -> str:
    """sha256 of the first `rows` embedding rows, rounded to bfloat16 (dtype-independent)."""
    block = weight.detach()[:rows].to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(block.view(torch.int16).numpy().tobytes()).hexdigest()


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not isinstance(template, str):
        return None
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def fingerprint_transformers_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
    name: str | None = None,
) -> ModelFingerprint:
    from safekeel.data.adapters import merged_adapters_sha256

    config = model.config
    return ModelFingerprint(
        name=name or str(getattr(config, "name_or_path", "") or ""),
        model_type=str(config.model_type),
        hidden_size=int(config.hidden_size),
        num_layers=len(decoder_layers(model)),
        vocab_size=int(config.vocab_size),
        embedding_sha256=embedding_sha256(model.get_input_embeddings().weight),
        chat_template_sha256=chat_template_sha256(tokenizer),
        adapters_sha256=merged_adapters_sha256(str(getattr(config, "name_or_path", "") or "")),
    )


# --------------------------------------------------------------------------- pooling


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM (Llama, Qwen, Mistral, ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ActivationError(
            f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList "
            "at model.model.layers"
        )
    return layers


def layer_stream(output: Any) -> torch.Tensor:
    """The residual stream from a decoder layer's output (a tensor, or a tuple starting with it)."""
    return output[0] if isinstance(output, tuple) else output


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool `hidden` [batch, tokens, H] over the tokens where `mask` is true, in float32.

    Works for left and right padding alike. Padded positions are selected away, never
    multiplied by zero: their states may be NaN when a row is fully masked.
    """
    mask = mask.bool()
    hidden = hidden.float()
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        summed = torch.where(mask[..., None], hidden, 0.0).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).float()
    raise ActivationError(f"pooling={pooling!r}: expected one of {list(POOLINGS)}")


class _EnoughLayers(Exception):
    """Raised by the deepest hook: the layers after it (and the LM head) are not needed."""


@contextmanager
def _capture_hooks(
    layers: nn.ModuleList, indices: Sequence[int], stop_after_last: bool
) -> Iterator[dict[int, torch.Tensor]]:
    captured: dict[int, torch.Tensor] = {}
    deepest = max(indices)

    def make_hook(index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[index] = layer_stream(output)
            if stop_after_last and index == deepest:
                raise _EnoughLayers

        return hook

    handles = [layers[i].register_forward_hook(make_hook(i)) for i in indices]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def capture_layer_outputs(
    model: nn.Module,
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    stop_after_last: bool = True,
    **forward_kwargs: Any,
) -> dict[int, torch.Tensor]:
    """Outputs of the given decoder layers for one batch, read with forward hooks.

    `layers` are non-negative indices. Position ids follow the attention mask, so a
    left-padded prompt gets the same positions as an unpadded one. With
    `stop_after_last`, the forward pass ends at the deepest requested layer.
    """
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with _capture_hooks(decoder_layers(model), layers, stop_after_last) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False, **forward_kwargs)
        except _EnoughLayers:
            pass
    return captured


def _combine_layers(per_layer: list[torch.Tensor], average: bool) -> torch.Tensor:
    """[batch, H] per layer -> [batch, n_layers * H] (concatenated) or [batch, H] (mean)."""
    stacked = torch.stack(per_layer, dim=1)
    return stacked.mean(dim=1) if average else stacked.flatten(start_dim=1)


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for index, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ActivationError(f"prompt {index}: empty (no tokens)")


# --------------------------------------------------------------------------- transformers


class TransformersActivationExtractor:
    """Pooled layer activations from a transformers causal LM (the reference path)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: ActivationSpec,
        *,
        batch_size: int = 16,
        padding_side: Literal["left", "right"] = "right",
        name: str | None = None,
    ):
        if batch_size < 1:
            raise ActivationError(f"batch_size must be at least 1, got {batch_size}")
        if padding_side not in ("left", "right"):
            raise ActivationError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.batch_size, self.padding_side = batch_size, padding_side
        self.num_layers = len(decoder_layers(model))
        self.layers = spec.resolve_layers(self.num_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.feature_dim = spec.feature_dim(self.hidden_size, self.num_layers)
        self._name = name
        self._fingerprint: ModelFingerprint | None = None
        # the policy's compute dtype: a probe is applied in the dtype it was fitted in
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    @property
    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_transformers_model(
                self.model, self.tokenizer, self._name
            )
        return self._fingerprint

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], source: str = "prompt") -> list[int]:
        return prompt_token_ids(self.tokenizer, messages, source=source)

    def extract(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled activations [N, feature_dim] (float32) for token-id prompts, in input order."""
        _check_prompts(prompts)
        features = np.zeros((len(prompts), self.feature_dim), dtype=np.float32)
        # Batches of similar length waste little compute on padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            input_ids, mask = self._pad([prompts[i] for i in chunk], device)
            captured = capture_layer_outputs(self.model, self.layers, input_ids, mask)
            pooled = [pool_tokens(captured[i], mask, self.spec.pooling) for i in self.layers]
            combined = _combine_layers(pooled, self.spec.averages_layers)
            features[chunk] = combined.cpu().numpy()
        return features

    def extract_messages(
        self, conversations: Sequence[Sequence[Mapping[str, str]]], sources: Sequence[str] | None = None
    ) -> np.ndarray:
        sources = sources or [f"prompt {i}" for i in range(len(conversations))]
        return self.extract([self.prompt_ids(c, s) for c, s in zip(conversations, sources)])

    def close(self) -> None:
        self.model = None

    def _pad(self, batch: list[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else (self.tokenizer.eos_token_id or 0)
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            span = slice(0, len(ids)) if self.padding_side == "right" else slice(width - len(ids), width)
            input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, span] = 1
        return input_ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- vLLM


class ActivationWorkerExtension:
    """Methods mixed into vLLM's worker (`worker_extension_cls`), called via `collective_rpc`.

    Arguments and results are plain data: lists of ints, strings, bytes. The hooks read the
    flattened batch: request `r` owns tokens `query_start_loc[r]:query_start_loc[r + 1]`, and
    `input_batch.req_ids[r]` names it. Llama-style vLLM layers return `(hidden, residual)`;
    the residual stream after the layer is their sum, taken at once because the next layer's
    fused add-norm overwrites both in place.
    """

    def safekeel_model_info(self) -> dict[str, Any]:
        model = self.model_runner.get_model()
        return {
            "num_layers": len(model.model.layers),
            "embedding_sha256": embedding_sha256(model.model.embed_tokens.weight),
        }

    def safekeel_start_capture(self, layers: list[int], pooling: str) -> None:
        self.safekeel_stop_capture()
        if pooling not in POOLINGS:
            raise ActivationError(f"pooling={pooling!r}: expected one of {list(POOLINGS)}")
        runner = self.model_runner
        if not hasattr(runner, "input_batch"):
            raise ActivationError(
                f"{type(runner).__name__} has no input_batch: activation capture supports vLLM's "
                "V1 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)"
            )
        model_layers = runner.get_model().model.layers
        self._safekeel_results: dict[str, dict[int, torch.Tensor]] = {}
        self._safekeel_lengths: dict[str, int] = {}
        self._safekeel_errors: list[str] = []
        self._safekeel_handles = [
            model_layers[index].register_forward_hook(self._safekeel_hook(index, pooling))
            for index in layers
        ]

    def safekeel_collect(self) -> dict[str, Any]:
        """Pooled activations captured so far, as float32 bytes per request, then forget them."""
        results = getattr(self, "_safekeel_results", {})
        payload = {
            "activations": {
                req_id: {str(layer): t.numpy().tobytes() for layer, t in by_layer.items()}
                for req_id, by_layer in results.items()
            },
            "lengths": dict(getattr(self, "_safekeel_lengths", {})),
            "errors": list(getattr(self, "_safekeel_errors", [])),
        }
        self._safekeel_results, self._safekeel_lengths, self._safekeel_errors = {}, {}, []
        return payload

    def safekeel_stop_capture(self) -> None:
        for handle in getattr(self, "_safekeel_handles", []):
            handle.remove()
        self._safekeel_handles = []

    def _safekeel_hook(self, layer: int, pooling: str):
        from vllm.forward_context import get_forward_context, is_forward_context_available

        runner = self.model_runner

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not is_forward_context_available():
                return
            metadata = get_forward_context().attn_metadata
            if not metadata:  # profiling and warm-up runs carry no requests
                return
            if not isinstance(metadata, dict):
                self._safekeel_errors.append("micro-batched forward passes are not supported")
                return
            query_start_loc = next(iter(metadata.values())).query_start_loc
            num_reqs = runner.input_batch.num_reqs
            starts = query_start_loc[: num_reqs + 1].tolist()
            hidden, residual = output
            stream = hidden + residual  # a new tensor: safe from the next layer's in-place norm
            for row, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
                start, end = starts[row], starts[row + 1]
                state = runner.requests[req_id]
                prompt_len = len(state.prompt_token_ids or ())
                if state.num_computed_tokens >= prompt_len:
                    continue  # a decode step: not part of the prompt
                if state.num_computed_tokens != 0 or end - start != prompt_len:
                    self._safekeel_errors.append(
                        f"request {req_id}: its {prompt_len}-token prompt ran as tokens "
                        f"{state.num_computed_tokens}..{state.num_computed_tokens + end - start} "
                        "of one step, not whole (prefix caching or chunked prefill is on)"
                    )
                    continue
                tokens = stream[start:end].float()
                pooled = tokens[-1] if pooling == "last" else tokens.mean(dim=0)
                self._safekeel_results.setdefault(req_id, {})[layer] = pooled.cpu().clone()
                self._safekeel_lengths[req_id] = end - start

        return hook


WORKER_EXTENSION = f"{__name__}.{ActivationWorkerExtension.__qualname__}"


class VLLMActivationExtractor:
    """Pooled layer activations computed inside a vLLM engine (worker extension + hooks).

    The engine must have been built for the "activations" role of `data.engines` (or with
    the same settings); `start` builds one. The extractor shuts down on `close` only an
    engine it started (`owns_engine`).
    """

    def __init__(
        self,
        llm: Any,
        spec: ActivationSpec,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        name: str | None = None,
        owns_engine: bool = False,
    ):
        self.llm, self.spec, self.owns_engine = llm, spec, owns_engine
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        config = llm.llm_engine.vllm_config
        self._check_engine(config)
        hf_config = config.model_config.hf_config
        text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
        info = llm.collective_rpc("safekeel_model_info")[0]
        self.num_layers = int(info["num_layers"])
        self.layers = spec.resolve_layers(self.num_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.feature_dim = spec.feature_dim(self.hidden_size, self.num_layers)
        self.dtype = str(config.model_config.dtype).removeprefix("torch.")
        self.max_prompt_tokens = min(
            config.scheduler_config.max_num_batched_tokens, config.model_config.max_model_len - 1
        )
        from safekeel.data.adapters import merged_adapters_sha256

        self.fingerprint = ModelFingerprint(
            name=name or str(config.model_config.model),
            model_type=str(text_config.model_type),
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            vocab_size=int(text_config.vocab_size),
            embedding_sha256=info["embedding_sha256"],
            chat_template_sha256=chat_template_sha256(self.tokenizer),
            adapters_sha256=merged_adapters_sha256(str(config.model_config.model)),
        )

    @classmethod
    def start(
        cls,
        model: str,
        spec: ActivationSpec,
        *,
        dtype: str = "float32",
        needed_tokens: int | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
    ) -> VLLMActivationExtractor:
        """Start an activation engine for `model` (`data.engines`, role "activations") and
        serve it; `needed_tokens` (longest prompt + 1) sizes its context."""
        from safekeel.data.engines import EngineSpec, start_engine

        llm = start_engine(EngineSpec(model=model, role="activations", dtype=dtype,
                                      needed_tokens=needed_tokens,
                                      trust_remote_code=trust_remote_code))
        try:
            return cls(llm, spec, name=name or model, owns_engine=True)
        except Exception:
            from safekeel.data.engines import shutdown_engine

            shutdown_engine(llm)
            raise

    def close(self) -> None:
        """Shut the engine down if this extractor started it (see `data.engines` on order)."""
        if self.owns_engine and self.llm is not None:
            from safekeel.data.engines import shutdown_engine

            shutdown_engine(self.llm)
        self.llm = None

    @staticmethod
    def _check_engine(config: Any) -> None:
        problems = []
        if config.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            problems.append(f"worker_extension_cls={WORKER_EXTENSION!r}")
        if not config.model_config.enforce_eager:
            problems.append("enforce_eager=True (hooks do not fire in compiled graphs)")
        if config.cache_config.enable_prefix_caching:
            problems.append("enable_prefix_caching=False (cached tokens are never recomputed)")
        if config.scheduler_config.enable_chunked_prefill:
            problems.append("enable_chunked_prefill=False (prompts must run whole)")
        if config.parallel_config.world_size != 1:
            problems.append("a single worker (tensor/pipeline parallel size 1)")
        if problems:
            raise ActivationError(
                "the vLLM engine cannot capture activations; build it with "
                + "; ".join(problems) + " (data.engines, role 'activations')"
            )

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], source: str = "prompt") -> list[int]:
        return prompt_token_ids(self.tokenizer, messages, source=source)

    def extract(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled activations [N, feature_dim] (float32) for token-id prompts, in input order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        _check_prompts(prompts)
        for index, ids in enumerate(prompts):
            if len(ids) > self.max_prompt_tokens:
                raise ActivationError(
                    f"prompt {index}: {len(ids)} tokens, more than this engine runs in one step "
                    f"({self.max_prompt_tokens}); start it with a longer context"
                )
        if not prompts:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        self.llm.collective_rpc("safekeel_start_capture", args=(self.layers, self.spec.pooling))
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompts],
                SamplingParams(max_tokens=1, temperature=0.0),
                use_tqdm=False,
            )
            payload = self.llm.collective_rpc("safekeel_collect")[0]
        finally:
            self.llm.collective_rpc("safekeel_stop_capture")
        if payload["errors"]:
            raise ActivationError("vLLM activation capture failed: " + "; ".join(payload["errors"]))
        return self._assemble(outputs, prompts, payload)

    def _assemble(
        self, outputs: list[Any], prompts: Sequence[Sequence[int]], payload: dict[str, Any]
    ) -> np.ndarray:
        # The engine names a request `<external id>-<random suffix>`; outputs carry the
        # external id, which `generate` hands out per prompt in order.
        by_external = {req_id.rsplit("-", 1)[0]: req_id for req_id in payload["activations"]}
        features = np.zeros((len(prompts), self.feature_dim), dtype=np.float32)
        for index, output in enumerate(outputs):
            internal = by_external.get(output.request_id)
            if internal is None:
                raise ActivationError(
                    f"prompt {index}: no activations came back for request {output.request_id}"
                )
            if payload["lengths"][internal] != len(prompts[index]):
                raise ActivationError(
                    f"prompt {index}: {len(prompts[index])} tokens sent, "
                    f"{payload['lengths'][internal]} captured"
                )
            by_layer = payload["activations"][internal]
            per_layer = [
                torch.from_numpy(np.frombuffer(by_layer[str(layer)], dtype=np.float32).copy())
                for layer in self.layers
            ]
            features[index] = _combine_layers([t[None] for t in per_layer],
                                              self.spec.averages_layers)[0].numpy()
        return features

    def extract_messages(
        self, conversations: Sequence[Sequence[Mapping[str, str]]], sources: Sequence[str] | None = None
    ) -> np.ndarray:
        sources = sources or [f"prompt {i}" for i in range(len(conversations))]
        return self.extract([self.prompt_ids(c, s) for c, s in zip(conversations, sources)])

