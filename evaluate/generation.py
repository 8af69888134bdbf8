"""Responses of a checkpoint to a prompt set: vLLM or transformers, cached as Parquet.

Checkpoints. `resolve_checkpoint` accepts an HF model directory, a LoRA adapter directory
(`adapter_config.json`, its base possibly another adapter; generation loads the chain's
merged checkpoint from `data.adapters`' cache), a hub name, or the alias
`smollm2-135m-instruct`. Each gets an *identity*: a hash of its
config and tokenizer files and of its weight files' names, sizes and modification times,
so a retrained checkpoint at the same path is not mistaken for the old one.

Generation. Prompts are rendered with the evaluated model's own chat template and the
generation prompt, tokenised once, and the same token ids go to either backend:

* `VLLMGenerator` (default wherever vLLM is installed): `vllm.LLM` started by
  `data.engines` (in this process, memory share, context sized from the prompts and
  `max_new_tokens`); `close()` shuts it down.
* `TransformersGenerator`, the fallback and reference: left-padded batches through
  `model.generate`.

Greedy decoding of a float32 model in float32 gives the same tokens on both (tested).
`dtype="auto"` is bfloat16 where the hardware has it natively (GPU with bf16; CPU with
AVX512-BF16 or AMX) and float32 elsewhere (`data.precision`), on both backends; vLLM's own
"auto" would run a float32 checkpoint in bfloat16 even where bfloat16 is emulated.

Cache. `generations.parquet` holds one row per prompt (prompt id, prompt, messages,
response, category, token counts, finish reason); its metadata holds a key made of the
checkpoint identity, the prompt set's fingerprint and every setting that changes the
output. A rerun with the same key reads the file instead of generating, so re-judging and
re-scoring never regenerate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from safekeel.data import precision
from safekeel.data.adapters import adapter_chain, is_adapter_dir, read_adapter_base
from safekeel.data.engines import (
    VLLM_INSTALL_HINT,
    EngineSpec,
    EngineWork,
    engine_context,
    engine_kwargs,
    shutdown_engine,
    start_engine,
    vllm_available,
)
from safekeel.data.files import atomic_file, file_sha256
from safekeel.data.models import (
    ModelNotFoundError,
    load_causal_lm,
    load_tokenizer,
    locate_model,
    resolve_model_path,
)
from safekeel.evaluate.prompts import PromptSet

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.parquet"
CACHE_FORMAT = 1  # bump when the stored columns or the key's meaning change

_CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
# Folder names that say nothing about the run: the display name keeps their parent too.
_GENERIC_DIR_NAMES = re.compile(r"final|merged|adapter|model|checkpoint[-_]?\d*|step[-_]?\d+")


class CheckpointError(ValueError):
    """A checkpoint cannot be found or loaded; the message names it and what is missing."""


class GenerationError(RuntimeError):
    """Generation cannot run as configured (a prompt too long, a backend missing)."""


# ------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A model to evaluate, resolved."""

    spec: str  # as the user wrote it
    name: str  # display name in reports
    kind: Literal["hf_dir", "lora_adapter", "hub"]
    path: str  # model directory or hub id; for LoRA the adapter directory
    base_model: str | None  # LoRA only: the base model's directory or hub id
    identity: str  # changes whenever the weights, config or tokenizer change
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """File-system-safe, unique folder name for this checkpoint's outputs."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "model"
        return f"{readable[:60]}-{hashlib.sha256(self.spec.encode()).hexdigest()[:8]}"


def resolve_checkpoint(spec: str, name: str | None = None) -> Checkpoint:
    """Resolve a checkpoint spec; raises `CheckpointError` naming it when it cannot be used."""
    if not spec or not spec.strip():
        raise CheckpointError("checkpoint: empty name")
    try:
        resolved = locate_model(spec)  # adapters unmerged: they are merged when loaded
    except (ModelNotFoundError, ImportError) as error:
        raise CheckpointError(f"checkpoint {spec!r}: {error}") from None
    path = Path(resolved)
    display = name or default_checkpoint_name(spec)
    if not path.is_dir():  # a hub id: nothing to inspect offline
        provenance = {"spec": spec, "kind": "hub", "path": resolved}
        return Checkpoint(spec, display, "hub", resolved, None, f"hub:{resolved}", provenance)

    if is_adapter_dir(path):
        try:
            chain = adapter_chain(path)  # refuses loops and missing bases before recursing
        except (ModelNotFoundError, ImportError) as error:
            raise CheckpointError(f"checkpoint {spec!r}: {error}") from None
        base_checkpoint = resolve_checkpoint(read_adapter_base(path))
        identity = _hash_parts([_directory_identity(path), base_checkpoint.identity])
        provenance = {
            "spec": spec,
            "kind": "lora_adapter",
            "path": str(path.resolve()),
            "base_model": base_checkpoint.path,
            "chain": [*(str(a) for a in chain.adapters), chain.base_path],
            "adapter_parameters": _safetensors_parameters(path),
            "base": base_checkpoint.provenance,
            **_run_files(path),
        }
        return Checkpoint(spec, display, "lora_adapter", str(path.resolve()),
                          base_checkpoint.path, identity, provenance)

    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint {spec!r}: {path} has neither config.json (an HF model directory) nor "
            "adapter_config.json (a LoRA adapter)"
        )
    config = _read_json(path / "config.json", spec)
    provenance = {
        "spec": spec,
        "kind": "hf_dir",
        "path": str(path.resolve()),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "parameters": _safetensors_parameters(path),
        **_run_files(path),
    }
    return Checkpoint(spec, display, "hf_dir", str(path.resolve()), None,
                      _directory_identity(path), provenance)


def default_checkpoint_name(spec: str) -> str:
    """'runs/sft/final' -> 'sft/final'; 'runs/tiny' -> 'tiny'; hub ids stay as they are."""
    path = Path(spec.rstrip("/"))
    if len(path.parts) >= 2 and _GENERIC_DIR_NAMES.fullmatch(path.name):
        return f"{path.parent.name}/{path.name}"
    return path.name if path.exists() else spec


def find_training_log(checkpoint: Checkpoint, filename: str = "train_log.jsonl") -> Path | None:
    """The training log next to the checkpoint or one level above (<run>/final -> <run>)."""
    if checkpoint.kind == "hub":
        return None
    directory = Path(checkpoint.path)
    for candidate in (directory / filename, directory.parent / filename):
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path, spec: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {spec!r}: cannot read {path.name} ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint {spec!r}: {path.name} is not a JSON object")
    return value


def _directory_identity(directory: Path) -> str:
    parts = []
    for name in _CONFIG_FILES:
        file = directory / name
        if file.is_file():
            parts.append(f"{name}:{file_sha256(file)}")
    # Weights are not hashed (gigabytes); name, size and mtime change whenever they are
    # rewritten, which is what a cache must notice.
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    if not any(part.split(":")[0].endswith(_WEIGHT_SUFFIXES) for part in parts):
        raise CheckpointError(f"checkpoint {directory}: no weight files (*.safetensors, *.bin)")
    return _hash_parts(parts)


def _hash_parts(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _safetensors_parameters(directory: Path) -> int | None:
    """Parameter count from the safetensors headers (no tensor is read)."""
    total, found = 0, False
    for file in directory.glob("*.safetensors"):
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > file.stat().st_size - 8:  # not a safetensors file: do not trust it
                    return None
                header = json.loads(handle.read(length))
            for key, entry in header.items():
                if key != "__metadata__":
                    total += math.prod(entry["shape"])
        except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
            return None  # only provenance: an unreadable header must not stop the evaluation
        found = True
    return total if found else None


def _run_files(directory: Path) -> dict[str, Any]:
    """What the training stage left next to the checkpoint (config, log), by path."""
    facts: dict[str, Any] = {}
    for folder in (directory, directory.parent):
        config = folder / "train_config.yaml"
        if "train_config" not in facts and config.is_file():
            facts["train_config"] = str(config.resolve())
            method = _yaml_key(config, "method")
            if method is not None:
                facts["train_method"] = method
    return facts


def _yaml_key(path: Path, key: str) -> Any:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def loadable_model(checkpoint: Checkpoint) -> str:
    """A path or hub id that `from_pretrained` and vLLM load: for a LoRA adapter (chain) its
    merged checkpoint, made once in `data.adapters`' cache."""
    if checkpoint.kind != "lora_adapter":
        return checkpoint.path
    try:
        return resolve_model_path(checkpoint.path)
    except (ModelNotFoundError, ImportError) as error:
        raise CheckpointError(f"checkpoint {checkpoint.spec!r}: {error}") from error


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate; `cache_fields` lists those that change what is generated."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 16  # transformers only
    max_model_len: int | None = None  # vLLM only
    gpu_memory_utilization: float | None = None  # vLLM only
    enforce_eager: Literal["auto", True, False] = "auto"  # vLLM only (data.engines)
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> GenerationSettings:
        """Take the fields of this class from an `EvaluateConfig`."""
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def cache_fields(self, backend: str, dtype: str, max_new_tokens: int) -> dict[str, Any]:
        """Everything that changes the generated text, with backend and dtype resolved."""
        fields: dict[str, Any] = {
            "backend": backend,
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "temperature": self.temperature,
        }
        if not self.greedy:  # sampling settings do not matter to greedy decoding
            fields.update(top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        return fields


def resolve_backend(backend: str) -> Literal["vllm", "transformers"]:
    """'auto' picks vLLM wherever it is installed."""
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise GenerationError(
            f"backend 'vllm' but vllm is not installed: {VLLM_INSTALL_HINT} (or set backend: "
            "transformers)"
        )
    if backend not in ("vllm", "transformers"):
        raise GenerationError(f"unknown backend {backend!r}; use auto, vllm or transformers")
    return backend  # type: ignore[return-value]


def resolve_dtype(dtype: str, backend: str) -> str:
    """The dtype to generate in: 'auto' is bfloat16 where `backend`'s device has it natively,
    else float32 (`data.precision`); an explicit bfloat16 on a CPU that emulates it warns."""
    # the transformers generator runs on the CPU; vLLM on the GPU wherever there is one
    return precision.resolve_dtype(dtype, device="cpu" if backend == "transformers" else None)


# ----------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class Generation:
    """One response: decoded text, its token ids (stop token excluded), why it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: Literal["stop", "length"]


class Generator(Protocol):
    backend_name: str
    tokenizer: Any
    context_length: int

    def generate_tokens(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[Generation]: ...

    def close(self) -> None: ...


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted messages plus the generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                         tokenize=False)
    # The template writes BOS and other special tokens itself: add none twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, model_path: str) -> list[int]:
    """The tokenizer's eos plus every eos id of the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(resolve_model_path(model_path)).eos_token_id
    except (OSError, ValueError):
        eos = None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(i) for i in eos)
    if not ids:
        raise GenerationError(f"{model_path}: neither the tokenizer nor the model names an eos")
    return sorted(ids)


def _finish(ids: Sequence[int], stop_ids: set[int], tokenizer: Any) -> Generation:
    """Cut at the first stop token and decode; both backends share this, so texts match."""
    ids = list(ids)
    for position, token in enumerate(ids):
        if token in stop_ids:
            kept = ids[:position]
            return Generation(_decode(tokenizer, kept), tuple(kept), "stop")
    return Generation(_decode(tokenizer, ids), tuple(ids), "length")


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class TransformersGenerator:
    """`model.generate` on left-padded batches of similar length."""

    backend_name = "transformers"

    def __init__(
        self, model_path: str, settings: GenerationSettings, *, dtype: str | None = None
    ) -> None:
        self.settings = settings
        self.dtype = dtype or resolve_dtype(settings.dtype, self.backend_name)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=settings.trust_remote_code)
        self.model = load_causal_lm(model_path, dtype=self.dtype,  # type: ignore[arg-type]
                                    trust_remote_code=settings.trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.stop_ids[0])
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0)
                                  or 10**9)

    def generate_tokens(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[Generation]:
        from transformers import GenerationConfig

        settings = self.settings
        sampling = {} if settings.greedy else {
            "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k or None,
        }
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not settings.greedy,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **sampling,
        )
        stop = set(self.stop_ids)
        results: list[Generation | None] = [None] * len(prompts)
        # Batches of similar length waste little compute on padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        # a bar: a few hundred answers of a 135M model take minutes on a CPU
        bar = tqdm(total=len(prompts), desc="generate (transformers)", unit="row",
                   disable=not prompts, leave=False)
        with bar, torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(settings.seed)
            for start in range(0, len(order), settings.batch_size):
                rows = order[start : start + settings.batch_size]
                width = max(len(prompts[i]) for i in rows)
                input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(rows), width), dtype=torch.long)
                for slot, i in enumerate(rows):
                    ids = torch.tensor(list(prompts[i]), dtype=torch.long)
                    input_ids[slot, width - len(ids):] = ids
                    attention[slot, width - len(ids):] = 1
                output = self.model.generate(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=attention.to(self.model.device),
                    generation_config=config,
                )
                for slot, i in enumerate(rows):
                    results[i] = _finish(output[slot, width:].tolist(), stop, self.tokenizer)
                bar.update(len(rows))
        assert all(result is not None for result in results)  # every row was in a batch
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None


EngineFactory = Callable[..., Any]


class VLLMGenerator:
    """`vllm.LLM.generate` on token-id prompts; detokenised here, as transformers' output is.

    The engine follows `data.engines`'s policy; its context is `settings.max_model_len`,
    else `needed_tokens` (longest prompt plus new tokens) within the model's limit.
    `engine_factory(model, **llm_kwargs)` builds it instead of `data.engines.start_engine`
    (tests pass their shared fixture). In-process engines share vLLM's process-wide state:
    close one before building the next.
    """

    backend_name = "vllm"

    def __init__(
        self,
        model_path: str,
        settings: GenerationSettings,
        *,
        dtype: str | None = None,
        engine_factory: EngineFactory | None = None,
        needed_tokens: int | None = None,
        work: EngineWork | None = None,
    ) -> None:
        if not vllm_available():
            raise GenerationError(f"backend 'vllm' needs the vllm package: {VLLM_INSTALL_HINT}")
        self.settings = settings
        self.dtype = dtype or resolve_dtype(settings.dtype, self.backend_name)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=settings.trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        spec = EngineSpec(
            model=model_path, role="generation", dtype=self.dtype,
            max_model_len=settings.max_model_len, needed_tokens=needed_tokens,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager, work=work,
            trust_remote_code=settings.trust_remote_code, seed=settings.seed,
        )
        if engine_factory is None:
            self.llm = start_engine(spec)
        else:
            kwargs = engine_kwargs(spec)
            self.llm = engine_factory(kwargs.pop("model"), **kwargs)
        self.context_length = engine_context(self.llm)

    def generate_tokens(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[Generation]:
        import vllm
        from vllm.inputs import TokensPrompt

        settings = self.settings
        common: dict[str, Any] = {
            "max_tokens": max_new_tokens,
            "temperature": settings.temperature,
            "stop_token_ids": self.stop_ids,
            "detokenize": False,  # decoded by `_finish`, exactly as the transformers backend
        }
        if not settings.greedy:
            common.update(top_p=settings.top_p, top_k=settings.top_k)
        # One seed per prompt position: sampled outputs do not depend on batching.
        params = [
            vllm.SamplingParams(**common, seed=None if settings.greedy else settings.seed + i)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params, use_tqdm=False
        )
        stop = set(self.stop_ids)
        return [_finish(output.outputs[0].token_ids, stop, self.tokenizer) for output in outputs]

    def close(self) -> None:
        """Shut the engine down (an in-process engine must go before the next one starts)."""
        shutdown_engine(self.llm)
        self.llm = None


def make_generator(
    model_path: str,
    settings: GenerationSettings,
    *,
    engine_factory: EngineFactory | None = None,
    needed_tokens: int | None = None,
    work: EngineWork | None = None,
) -> TransformersGenerator | VLLMGenerator:
    """The generator of the configured backend for a loadable model path; `needed_tokens`
    (longest prompt plus new tokens) sizes a vLLM engine's context, `work` (all it will
    generate) decides its `enforce_eager: auto`."""
    if resolve_backend(settings.backend) == "vllm":
        return VLLMGenerator(model_path, settings, engine_factory=engine_factory,
                             needed_tokens=needed_tokens, work=work)
    return TransformersGenerator(model_path, settings)


@dataclass
class SetGenerations:
    """The responses to one prompt set, in the set's order, and how they were made."""

    prompt_ids: list[str]
    prompts: list[str]
    messages: list[list[dict[str, str]]]
    responses: list[str]
    categories: list[str | None]
    prompt_tokens: list[int]
    response_tokens: list[int]
    finish_reasons: list[str]
    seconds: float
    backend: str
    cached: bool = False
    key: str = ""
    key_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float | None:
        """Generated tokens per second of the run that made them (not of a cache read)."""
        total = sum(self.response_tokens)
        return total / self.seconds if self.seconds > 0 else None


def generate_for_set(
    generator: Generator, prompt_set: PromptSet, max_new_tokens: int
) -> SetGenerations:
    """Render, check lengths (naming the prompt that does not fit), generate, time it."""
    prompts = [render_prompt(generator.tokenizer, prompt.messages) for prompt in prompt_set.prompts]
    for prompt, ids in zip(prompt_set.prompts, prompts, strict=True):
        if len(ids) + max_new_tokens > generator.context_length:
            raise GenerationError(
                f"prompt {prompt.id!r} of set {prompt_set.name!r} has {len(ids)} tokens; with "
                f"max_new_tokens={max_new_tokens} it exceeds the context of "
                f"{generator.context_length} (raise max_model_len or lower max_new_tokens)"
            )
    start = time.perf_counter()
    generations = generator.generate_tokens(prompts, max_new_tokens)
    seconds = time.perf_counter() - start
    return SetGenerations(
        prompt_ids=[prompt.id for prompt in prompt_set.prompts],
        prompts=[prompt.prompt for prompt in prompt_set.prompts],
        messages=[prompt.messages for prompt in prompt_set.prompts],
        responses=[generation.text for generation in generations],
        categories=[prompt.category for prompt in prompt_set.prompts],
        prompt_tokens=[len(ids) for ids in prompts],
        response_tokens=[len(generation.token_ids) for generation in generations],
        finish_reasons=[generation.finish_reason for generation in generations],
        seconds=seconds,
        backend=generator.backend_name,
    )


# ---------------------------------------------------------------------------------- cache


def generation_key(
    checkpoint: Checkpoint, prompt_set: PromptSet, generation_fields: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The cache key of one (checkpoint, prompt set, settings) and what went into it."""
    fields = {
        "format": CACHE_FORMAT,
        "checkpoint": checkpoint.identity,
        "prompt_set": prompt_set.fingerprint(),
        "generation": generation_fields,
    }
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], fields


_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("messages", pa.string()),  # JSON list of {role, content}, as the model was asked
    ("response", pa.string()),
    ("category", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),
    ("finish_reason", pa.string()),
])


def write_generations(
    path: str | Path,
    generations: SetGenerations,
    *,
    key: str,
    key_fields: dict[str, Any],
    about: dict[str, Any] | None = None,
) -> Path:
    """Write the responses with their cache key; atomic (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "prompt_id": generations.prompt_ids,
            "prompt": generations.prompts,
            "messages": [json.dumps(m, ensure_ascii=False) for m in generations.messages],
            "response": generations.responses,
            "category": generations.categories,
            "prompt_tokens": generations.prompt_tokens,
            "response_tokens": generations.response_tokens,
            "finish_reason": generations.finish_reasons,
        },
        schema=_SCHEMA,
    )
    metadata = {
        "safekeel.generation_key": key,
        "safekeel.generation_key_fields": json.dumps(key_fields, sort_keys=True),
        "safekeel.generation_seconds": repr(generations.seconds),
        "safekeel.generation_backend": generations.backend,
        "safekeel.created": datetime.now(UTC).isoformat(timespec="seconds"),
        "safekeel.about": json.dumps(about or {}, sort_keys=True, default=str),
    }
    table = table.replace_schema_metadata({k: v.encode() for k, v in metadata.items()})
    with atomic_file(path) as partial:
        pq.write_table(table, partial, compression="zstd")
    return path


def read_generations(path: str | Path, expected_key: str | None = None) -> SetGenerations | None:
    """Stored responses, or None if the file is missing or was made under another key."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        log.warning("ignoring unreadable generation cache %s (%s)", path, error)
        return None
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    key = metadata.get("safekeel.generation_key", "")
    if expected_key is not None and key != expected_key:
        return None
    columns = table.to_pydict()
    return SetGenerations(
        prompt_ids=columns["prompt_id"],
        prompts=columns["prompt"],
        messages=[json.loads(m) for m in columns["messages"]],
        responses=columns["response"],
        categories=columns["category"],
        prompt_tokens=columns["prompt_tokens"],
        response_tokens=columns["response_tokens"],
        finish_reasons=columns["finish_reason"],
        seconds=float(metadata.get("safekeel.generation_seconds", "nan")),
        backend=metadata.get("safekeel.generation_backend", ""),
        cached=True,
        key=key,
        key_fields=json.loads(metadata.get("safekeel.generation_key_fields", "{}")),
    )
