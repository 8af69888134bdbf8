"""The reference model's log-probs on every response token, computed once in stage one.

With these stored, the train stage needs no reference model and no reference forward
(`train.objective.PrecomputedReference`): the target-token KL estimators (k1, k2, k3) are
exact, and forward KL is taken over the stored top-k plus one bucket for the rest.

What is stored, per response token (one list entry per trained label, in order):

* `ref_target_logprob`: log q(y_t) of the token the data has there, float32;
* `ref_topk_ids`, `ref_topk_logprobs`: the reference's k most likely tokens at that
  position (descending) and their log q, int32 and float32.

All log-probs are the float32 log-softmax of the reference's logits. Positions are
exactly training's: the row is tokenised by `data.tokenization.tokenize_example` (same
chat template, response mask and truncation), and the entry for token t comes from the
logits at position t - 1, i.e. `log_softmax(reference(input_ids))[t - 1, input_ids[t]]`,
for every t >= 1 with a label; the train stage's `response_mask` picks the same positions
in the same order.

Two backends compute the same numbers:

* `TransformersReferenceScorer`: batched forwards of the model body; the head runs only on
  response positions, a chunk of rows at a time, so fp32 [B, T, V] logits never exist.
* `VLLMReferenceScorer`: vLLM's prompt log-probs over the whole conversation
  (`SamplingParams(max_tokens=1, prompt_logprobs=k)`), which give, for every prompt
  position, the actual token's log-prob and the top-k. The engine needs `max_logprobs >= k`
  and a log-prob (not logit) `logprobs_mode`; `reference_engine_kwargs` has both. Prompt
  tokens skip the sampling processors, so raw and processed log-probs agree there.

Provenance (`ReferenceProvenance`) records the reference model's fingerprint, the policy
tokenizer's fingerprint, the tokenisation settings, k and the dtypes; training refuses
stored values whose provenance differs from its own (`check_reference_provenance`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from safekeel.data.risk_columns import (
    REF_TARGET,
    REF_TOPK_IDS,
    REF_TOPK_LOGPROBS,
    REFERENCE_COLUMN_NAMES,
)
from safekeel.data.tokenization import (
    IGNORE_INDEX,
    TokenizationConfig,
    TokenizedExample,
    tokenize_example,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Column names (declared in data.risk_columns) and the key of `ReferenceProvenance` in the
# shard provenance's `extra`.
REF_TARGET_COLUMN = REF_TARGET.name
REF_TOPK_IDS_COLUMN = REF_TOPK_IDS.name
REF_TOPK_LOGPROBS_COLUMN = REF_TOPK_LOGPROBS.name
REFERENCE_COLUMNS: tuple[str, ...] = REFERENCE_COLUMN_NAMES
REFERENCE_METADATA_KEY = "safekeel.reference"

DEFAULT_TOP_K = 16
LOGPROB_DTYPE = "float32"  # what is stored; the log-softmax is always taken in float32
# vLLM log-prob modes that return log-softmax values (the logit modes do not).
_VLLM_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")


class ReferenceLogprobError(ValueError):
    """A reference log-prob request or stored value that cannot be used."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ReferenceRow:
    """One row's stored values: n response tokens, top-k of size k (k may be 0)."""

    target_logprob: np.ndarray  # [n] float32
    topk_ids: np.ndarray  # [n, k] int32
    topk_logprobs: np.ndarray  # [n, k] float32

    def __post_init__(self) -> None:
        n = self.target_logprob.shape[0]
        if self.target_logprob.ndim != 1 or self.topk_ids.ndim != 2 or self.topk_ids.shape[0] != n:
            raise ReferenceLogprobError(
                f"shapes: target {self.target_logprob.shape}, top-k ids {self.topk_ids.shape}"
            )
        if self.topk_logprobs.shape != self.topk_ids.shape:
            raise ReferenceLogprobError(
                f"top-k log-probs {self.topk_logprobs.shape} differ from ids {self.topk_ids.shape}"
            )

    @property
    def tokens(self) -> int:
        return int(self.target_logprob.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


def response_positions(example: TokenizedExample) -> list[int]:
    """Indices t of the tokens training learns (labels[t] set, t >= 1), in order.

    Training's shifted view predicts labels[t] from position t - 1, so a label at t = 0 has
    no predicting position and is never trained on; it gets no stored value either.
    """
    return [t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX]


def storage_bytes_per_token(k: int) -> int:
    """Uncompressed bytes per response token: one float32 target, k int32 ids, k float32."""
    return 4 + 8 * k


# --------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class ReferenceProvenance:
    """What decides the stored values; training compares it with its own run.

    reference: the reference model's fingerprint (`annotate.activations.ModelFingerprint`
        as a dict: shape and a hash of its embedding weights).
    tokenizer: `data.shards.tokenizer_fingerprint` of the policy tokenizer.
    tokenization: max_length, min_response_tokens, mask_method used to find the positions.
    top_k, logprob_dtype: what was stored; compute_dtype: the reference's weights' dtype.
    backend: transformers or vllm (informational; the two agree to ~1e-4 in float32).
    attn_implementation: the transformers attention kernel the values were computed with
        (empty for vLLM's own kernels, and in shards written before it was recorded).
        Another kernel than the live policy's agrees only to float noise: training warns,
        it does not refuse.
    """

    reference: Mapping[str, Any]
    tokenizer: str
    tokenization: Mapping[str, Any]
    top_k: int
    compute_dtype: str
    logprob_dtype: str = LOGPROB_DTYPE
    backend: str = "transformers"
    attn_implementation: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ReferenceProvenance:
        data = json.loads(text)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class ReferenceKernelWarning(UserWarning):
    """Stored reference values from another attention kernel than the policy's."""


def kernel_mismatch(stored: ReferenceProvenance, expected: ReferenceProvenance) -> str | None:
    """Why stored values are not bit for bit what the live reference would compute, or None.

    Only a transformers-made shard with a recorded kernel is compared (vLLM's kernels, like
    its backend, always differ to ~1e-4). `expected` is a run on the CPU, where annotate
    scores too; on a GPU the two never match bit for bit whatever the kernel.
    """
    if not stored.attn_implementation or not expected.attn_implementation:
        return None
    if stored.attn_implementation == expected.attn_implementation:
        return None
    return (f"the precomputed reference was computed with {stored.attn_implementation} "
            f"attention, this run's policy uses {expected.attn_implementation}: the values "
            "agree only to float noise; annotate with reference.attn_implementation: "
            f"{expected.attn_implementation} for an exact match")


def tokenization_settings(cfg: TokenizationConfig) -> dict[str, Any]:
    return {
        "max_length": cfg.max_length,
        "min_response_tokens": cfg.min_response_tokens,
        "mask_method": cfg.mask_method,
    }


def check_reference_provenance(
    stored: ReferenceProvenance,
    expected: ReferenceProvenance,
    *,
    estimator: str,
    where: str = "the shard",
) -> None:
    """Refuse stored reference values that do not describe this run's reference.

    `expected.top_k` is the smallest top-k the run accepts (0: any, e.g. for k2); the
    backend is not compared, nor the attention kernel (float noise: `kernel_mismatch`).
    """
    from safekeel.annotate.activations import ModelFingerprint

    reason = ModelFingerprint.from_dict(expected.reference).mismatch(
        ModelFingerprint.from_dict(stored.reference)
    )
    if reason is not None:
        raise ReferenceLogprobError(
            f"{where}: the precomputed reference comes from another model ({reason}); "
            "annotate again with this run's reference, or use a live reference"
        )
    if stored.tokenizer != expected.tokenizer:
        raise ReferenceLogprobError(
            f"{where}: the precomputed reference was computed in another tokenizer's tokens "
            "(tokenizer fingerprints differ); annotate again with the policy tokenizer"
        )
    if dict(stored.tokenization) != dict(expected.tokenization):
        raise ReferenceLogprobError(
            f"{where}: the precomputed reference used tokenisation {dict(stored.tokenization)}, "
            f"this run uses {dict(expected.tokenization)}; positions would not line up"
        )
    if stored.logprob_dtype != expected.logprob_dtype or stored.compute_dtype != expected.compute_dtype:
        raise ReferenceLogprobError(
            f"{where}: the precomputed reference was computed in {stored.compute_dtype} and "
            f"stored as {stored.logprob_dtype}; this run expects {expected.compute_dtype} / "
            f"{expected.logprob_dtype}"
        )
    if estimator == "forward" and stored.top_k < max(expected.top_k, 1):
        raise ReferenceLogprobError(
            f"{where}: forward KL needs the reference's top-k; the shard stores top-"
            f"{stored.top_k}, this run asks for at least {max(expected.top_k, 1)}"
        )


# --------------------------------------------------------------------------- arrow


def reference_fields(k: int) -> list[pa.Field]:
    """Arrow fields of the stored values (null for rows that were not tokenised)."""
    return [
        pa.field(REF_TARGET_COLUMN, pa.list_(pa.float32())),
        pa.field(REF_TOPK_IDS_COLUMN, pa.list_(pa.list_(pa.int32(), k))),
        pa.field(REF_TOPK_LOGPROBS_COLUMN, pa.list_(pa.list_(pa.float32(), k))),
    ]


def reference_arrays(rows: Sequence[ReferenceRow | None], k: int) -> dict[str, pa.Array]:
    """Arrow columns for a batch of rows (None: a row without response tokens to score)."""
    for row in rows:
        if row is not None and row.k != k:
            raise ReferenceLogprobError(f"a row has top-{row.k}, the columns are top-{k}")
    fields = {field.name: field.type for field in reference_fields(k)}
    target = [None if r is None else r.target_logprob.tolist() for r in rows]
    ids = [None if r is None else r.topk_ids.tolist() for r in rows]
    logprobs = [None if r is None else r.topk_logprobs.tolist() for r in rows]
    return {
        REF_TARGET_COLUMN: pa.array(target, fields[REF_TARGET_COLUMN]),
        REF_TOPK_IDS_COLUMN: pa.array(ids, fields[REF_TOPK_IDS_COLUMN]),
        REF_TOPK_LOGPROBS_COLUMN: pa.array(logprobs, fields[REF_TOPK_LOGPROBS_COLUMN]),
    }


def reference_row(target: Sequence[float] | None, ids: Any, logprobs: Any) -> ReferenceRow | None:
    """One row back from the Python values of the three columns (None stays None)."""
    if target is None:
        return None
    n = len(target)
    return ReferenceRow(
        np.asarray(target, dtype=np.float32),
        np.asarray(ids, dtype=np.int32).reshape(n, -1),
        np.asarray(logprobs, dtype=np.float32).reshape(n, -1),
    )


# --------------------------------------------------------------------------- scoring


class ReferenceScorer(Protocol):
    backend: str
    compute_dtype: str

    def score(self, examples: Sequence[TokenizedExample]) -> list[ReferenceRow]: ...


def score_conversations(
    scorer: ReferenceScorer,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    cfg: TokenizationConfig,
) -> list[ReferenceRow | None]:
    """Stored values for each conversation, tokenised exactly as training will.

    None for a conversation training will not use (a `TokenizationIssue`: prompt too long,
    no response tokens, template mismatch); training skips those rows too.
    """
    tokenized = [tokenize_example(tokenizer, list(messages), cfg) for messages in conversations]
    usable = [t for t in tokenized if isinstance(t, TokenizedExample)]
    scored = iter(scorer.score(usable) if usable else [])
    return [next(scored) if isinstance(t, TokenizedExample) else None for t in tokenized]


# --------------------------------------------------------------------------- transformers


def _check_top_k(top_k: int, vocab: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= vocab:
        raise ReferenceLogprobError(f"top_k must be an int in [0, {vocab}], got {top_k!r}")


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(target log-prob [n], top-k ids [n, k], top-k log-probs [n, k]) from logits [n, V]."""
    logp = logits.float().log_softmax(-1)
    target = logp.gather(-1, targets[:, None]).squeeze(-1)
    top_logp, top_ids = logp.topk(top_k, dim=-1) if top_k else (logp[:, :0], targets[:, None][:, :0])
    return target, top_ids, top_logp


class TransformersReferenceScorer:
    """Reference log-probs from a transformers causal LM, batched and chunked.

    The body runs on right-padded batches of `batch_size` rows; the head and the float32
    log-softmax run on `chunk_size` response positions at a time.
    """

    backend = "transformers"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        top_k: int = DEFAULT_TOP_K,
        batch_size: int = 8,
        chunk_size: int = 1024,
        pad_token_id: int = 0,
    ):
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        _check_top_k(top_k, self.vocab_size)
        if batch_size < 1 or chunk_size < 1:
            raise ReferenceLogprobError("batch_size and chunk_size must be >= 1")
        self.model = model.eval()
        self.top_k, self.batch_size, self.chunk_size = top_k, batch_size, chunk_size
        self.pad_token_id = pad_token_id

    @property
    def compute_dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def score(self, examples: Sequence[TokenizedExample]) -> list[ReferenceRow]:
        rows: list[ReferenceRow] = []
        for start in range(0, len(examples), self.batch_size):
            rows.extend(self._score_batch(examples[start:start + self.batch_size]))
        return rows

    @torch.no_grad()
    def _score_batch(self, examples: Sequence[TokenizedExample]) -> list[ReferenceRow]:
        device = self.model.get_output_embeddings().weight.device
        length = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        # mask over the shifted positions [B, T-1]: True where the logit predicts a label
        mask = torch.zeros((len(examples), length - 1), dtype=torch.bool)
        for i, example in enumerate(examples):
            input_ids[i, :len(example.input_ids)] = torch.tensor(example.input_ids)
            attention[i, :len(example.input_ids)] = 1
            for t in response_positions(example):
                mask[i, t - 1] = True
        input_ids, attention, mask = input_ids.to(device), attention.to(device), mask.to(device)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention
        ).last_hidden_state[:, :-1][mask]
        targets = input_ids[:, 1:][mask]
        head = self.model.get_output_embeddings()
        parts = [
            logprobs_from_logits(head(hidden[s:s + self.chunk_size]), targets[s:s + self.chunk_size],
                                 self.top_k)
            for s in range(0, hidden.shape[0], self.chunk_size)
        ]
        target = torch.cat([p[0] for p in parts]).cpu().numpy()
        ids = torch.cat([p[1] for p in parts]).to(torch.int32).cpu().numpy()
        logprobs = torch.cat([p[2] for p in parts]).cpu().numpy()
        counts = mask.sum(1).tolist()
        rows, offset = [], 0
        for count in counts:
            end = offset + count
            rows.append(ReferenceRow(target[offset:end], ids[offset:end], logprobs[offset:end]))
            offset = end
        return rows


# --------------------------------------------------------------------------- vLLM


def reference_engine_kwargs(top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """The `vllm.LLM` arguments the vLLM scorer needs on top of the usual ones."""
    return {"max_logprobs": max(top_k, 1), "logprobs_mode": "raw_logprobs"}


class VLLMReferenceScorer:
    """Reference log-probs from a vLLM engine's prompt log-probs over whole conversations."""

    backend = "vllm"

    def __init__(self, llm: Any, *, top_k: int = DEFAULT_TOP_K):
        model_config = llm.llm_engine.vllm_config.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        _check_top_k(top_k, self.vocab_size)
        max_logprobs = model_config.max_logprobs
        max_logprobs = self.vocab_size if max_logprobs == -1 else max_logprobs
        problems = []
        if max_logprobs < top_k:
            problems.append(f"max_logprobs >= {top_k} (it is {max_logprobs})")
        if model_config.logprobs_mode not in _VLLM_LOGPROB_MODES:
            problems.append(f"logprobs_mode in {_VLLM_LOGPROB_MODES} (it is {model_config.logprobs_mode!r})")
        if problems:
            raise ReferenceLogprobError(
                "the vLLM engine cannot return the reference's top-k log-probs; build it with "
                + "; ".join(problems) + " (see reference_engine_kwargs)"
            )
        self.llm, self.top_k = llm, top_k
        self.max_model_len = int(model_config.max_model_len)
        self.compute_dtype = str(model_config.dtype).removeprefix("torch.")

    def score(self, examples: Sequence[TokenizedExample]) -> list[ReferenceRow]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for example in examples:
            # the engine also generates one token after the conversation
            if len(example.input_ids) + 1 > self.max_model_len:
                raise ReferenceLogprobError(
                    f"a conversation of {len(example.input_ids)} tokens does not fit the "
                    f"engine's max_model_len of {self.max_model_len} (it needs one more)"
                )
        # at least one prompt log-prob per position, so the target's value always comes back
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=self.top_k, flat_logprobs=True,
            detokenize=False,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(e.input_ids)) for e in examples], params,
            use_tqdm=False,
        )
        return [self._row(e, out.prompt_logprobs) for e, out in zip(examples, outputs, strict=True)]

    def _row(self, example: TokenizedExample, flat: Any) -> ReferenceRow:
        positions = response_positions(example)
        k = self.top_k
        target = np.empty(len(positions), dtype=np.float32)
        ids = np.empty((len(positions), k), dtype=np.int32)
        logprobs = np.empty((len(positions), k), dtype=np.float32)
        for row, t in enumerate(positions):
            # FlatLogprobs entry for token t (predicted at t - 1): the actual token first,
            # then the top-k in descending order
            start, end = flat.start_indices[t], flat.end_indices[t]
            if end - start != k + 1 or flat.token_ids[start] != example.input_ids[t]:
                raise ReferenceLogprobError(
                    f"vLLM returned {end - start} prompt log-probs at position {t} "
                    f"(expected {k + 1}, the actual token first)"
                )
            target[row] = flat.logprobs[start]
            ids[row] = flat.token_ids[start + 1:end]
            logprobs[row] = flat.logprobs[start + 1:end]
        return ReferenceRow(target, ids, logprobs)
