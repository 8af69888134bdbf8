"""The precomputed reference inside stage one: `safekeel annotate --reference.enabled true`.

The reference is the starting policy (`cfg.policy`): the weights the train stage would
freeze, or reach by disabling a LoRA adapter. `ReferenceAnnotator` scores every row with
`annotate.reference_logprobs` (vLLM prompt log-probs wherever vLLM is installed, else
transformers) and hands annotate's driver the three token columns plus a
`ReferenceProvenance` for the shard provenance's `extra`; the driver's manifest makes it
resumable like the other scorers (a rerun redoes only unfinished shards, and refuses shards
whose provenance, k or dtype included, differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from safekeel.annotate.reference_logprobs import (
    DEFAULT_TOP_K,
    REF_TARGET_COLUMN,
    REF_TOPK_IDS_COLUMN,
    REF_TOPK_LOGPROBS_COLUMN,
    REFERENCE_COLUMNS,
    REFERENCE_METADATA_KEY,
    ReferenceProvenance,
    score_conversations,
    tokenization_settings,
)
from safekeel.data.config import ConfigError, option
from safekeel.data.precision import DTYPE_CHOICES
from safekeel.data.shards import MESSAGES_COLUMN, Provenance, tokenizer_fingerprint
from safekeel.data.tokenization import TokenizationConfig


@dataclass
class ReferenceConfig:
    enabled: bool = option(False, help="Store the reference's log-probs of every response "
                           "token (and its top-k) for `safekeel train --reference "
                           "precomputed`; the reference is the policy as it starts.")
    backend: Literal["auto", "vllm", "transformers"] = option(
        "auto", help="auto: a vLLM engine (prompt log-probs) wherever vllm is installed, else "
        "transformers.")
    top_k: int = option(DEFAULT_TOP_K, help="Reference top-k stored per token (forward KL "
                        "uses it plus one bucket for the rest; k1/k2/k3 need only the target "
                        "log-prob, which is always stored). About 4 + 8k bytes a token "
                        "before compression.")
    dtype: Literal[DTYPE_CHOICES] = option(
        "float32", help="The reference's weights while scoring. float32 matches the live "
        "float32 reference of training exactly (training refuses shards made in another "
        "dtype); bfloat16 (auto picks it only where native) halves the weights' memory but "
        "moves log-probs by ~1e-2 and is 15-80x slower on CPUs that only emulate it.")
    batch_size: int = option(8, help="Conversations per forward pass (transformers; vLLM "
                             "schedules its own batches).")
    attn_implementation: Literal["auto", "eager", "sdpa"] = option(
        "auto", help="The reference's attention kernel (transformers backend; vLLM uses its "
        "own). auto is training's auto on a CPU (eager). Set it to training's "
        "attn_implementation when that is not auto: the stored log-probs then equal the live "
        "reference's bit for bit (another kernel agrees only to float noise; training warns).")
    enforce_eager: Literal["auto", True, False] = option(
        "auto", help="vLLM: true skips compiling (the engine starts ~5 min sooner on a "
        "2-core CPU; compiled scoring is ~1.2x faster there, which pays only past ~300k "
        "prompt tokens); auto: vLLM's default, as the rows are not counted before it starts.")

    def validate(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0, got {self.top_k}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {self.batch_size}")


def resolve_reference_backend(backend: str) -> str:
    """'vllm' or 'transformers': auto picks vLLM wherever it is installed."""
    from safekeel.data.engines import VLLM_INSTALL_HINT, vllm_available

    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise ConfigError(f"reference.backend: 'vllm' but vllm is not installed: "
                          f"{VLLM_INSTALL_HINT} (or set reference.backend: transformers)")
    return backend


def reference_provenance_of(provenance: Provenance) -> ReferenceProvenance | None:
    """The `ReferenceProvenance` a shard's provenance carries, or None."""
    stored = provenance.extra.get(REFERENCE_METADATA_KEY)
    return None if stored is None else ReferenceProvenance(**stored)


class ReferenceAnnotator:
    """Writes the precomputed reference's three token columns (annotate's Annotator)."""

    columns: tuple[str, ...] = REFERENCE_COLUMNS

    def __init__(self, cfg: ReferenceConfig, policy: str, tokenizer: Any,
                 tokenization: TokenizationConfig, trust_remote_code: bool = False):
        from safekeel.annotate.activations import fingerprint_transformers_model
        from safekeel.data.models import attention_kernel, attention_of, load_causal_lm
        from safekeel.data.precision import resolve_dtype

        self.cfg, self.tokenizer, self.tokenization = cfg, tokenizer, tokenization
        dtype = resolve_dtype(cfg.dtype)
        backend = resolve_reference_backend(cfg.backend)
        self._engine = None
        # the kernel training's live reference uses (as chosen for a CPU: it loads there), so
        # the stored log-probs equal the live ones, not just come close
        model = load_causal_lm(policy, dtype=dtype, trust_remote_code=trust_remote_code,
                               attn_implementation=attention_kernel(cfg.attn_implementation,
                                                                    "cpu"))
        fingerprint = fingerprint_transformers_model(model, tokenizer, name=policy)
        if backend == "vllm":
            del model  # only its fingerprint was needed; the engine loads its own weights
            self.scorer = self._vllm_scorer(policy, dtype, trust_remote_code)
        else:
            from safekeel.annotate.reference_logprobs import TransformersReferenceScorer

            pad = tokenizer.pad_token_id
            self.scorer = TransformersReferenceScorer(
                model, top_k=cfg.top_k, batch_size=cfg.batch_size,
                pad_token_id=int(pad if pad is not None else tokenizer.eos_token_id))
        self.reference_provenance = ReferenceProvenance(
            reference=fingerprint.to_dict(),
            tokenizer=tokenizer_fingerprint(tokenizer),
            tokenization=tokenization_settings(tokenization),
            top_k=cfg.top_k,
            compute_dtype=self.scorer.compute_dtype,
            backend=self.scorer.backend,
            attn_implementation="" if backend == "vllm" else attention_of(model),
        )

    def _vllm_scorer(self, policy: str, dtype: str, trust_remote_code: bool) -> Any:
        from safekeel.annotate.reference_logprobs import (
            VLLMReferenceScorer,
            reference_engine_kwargs,
        )
        from safekeel.data.engines import EngineSpec, shutdown_engine, start_engine

        # prompt log-probs over the whole conversation; the engine generates one token more
        self._engine = start_engine(EngineSpec(
            model=policy, role="generation", dtype=dtype,
            needed_tokens=self.tokenization.max_length + 1, enforce_eager=self.cfg.enforce_eager,
            trust_remote_code=trust_remote_code, extra=reference_engine_kwargs(self.cfg.top_k)))
        try:
            return VLLMReferenceScorer(self._engine, top_k=self.cfg.top_k)
        except Exception:
            shutdown_engine(self._engine)
            raise

    def provenance(self) -> dict[str, Any]:
        return {"extra": {REFERENCE_METADATA_KEY: asdict(self.reference_provenance)}}

    def annotate(self, examples: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        rows = score_conversations(self.scorer, self.tokenizer,
                                   [e[MESSAGES_COLUMN] for e in examples], self.tokenization)
        return {
            REF_TARGET_COLUMN: [None if r is None else r.target_logprob.tolist() for r in rows],
            REF_TOPK_IDS_COLUMN: [None if r is None else r.topk_ids.tolist() for r in rows],
            REF_TOPK_LOGPROBS_COLUMN: [None if r is None else r.topk_logprobs.tolist()
                                       for r in rows],
        }

    def close(self) -> None:
        if self._engine is not None:
            from safekeel.data.engines import shutdown_engine

            shutdown_engine(self._engine)
        self._engine = None
