"""The safe reference model q of the KL term: which model it is, and when it runs at all.

* Full fine-tuning: a frozen copy of the initial model, in eval mode (`build_reference`).
* LoRA: the trained model itself with its adapter switched off, i.e. the base model
  (`AdapterDisabledReference`); no second copy of the weights exists.
* `--reference precomputed`: no model at all; `StoredReference` hands the objective the
  log-probs annotate stored in the shards (`TrainingBatch.reference`), after
  `check_stored_reference` has compared every shard's `ReferenceProvenance` with this run.
* `SkippingReference` is what the training loop calls: it runs the reference forward only
  when some b(t) != 0 in the micro-batch, and counts the forwards it ran and skipped.

Both reference kinds return logits of the response positions lazily (hidden states + the
output head), without gradient. They run on the *unwrapped* model, never through DDP:
whether a forward runs is decided per process, and a wrapped forward could start
collectives the other processes never join.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from safekeel.train.data import TrainingBatch
from safekeel.train.objective import LazyLogits, PrecomputedReference, lazy_masked_logits
from safekeel.train.weights import TokenWeights, needs_reference


class MissingReferenceError(RuntimeError):
    """A weight policy set a KL weight although the run built no reference model."""


class ReferenceModel(Protocol):
    """Logits of the reference q for the response positions of a batch, without gradient."""

    def response_logits(self, batch: TrainingBatch) -> LazyLogits: ...


def _base_hidden(causal_lm: torch.nn.Module, batch: TrainingBatch) -> Tensor:
    """Final-norm hidden states [B, T-1, H] from the transformer body, without the head."""
    return causal_lm.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state[:, :-1]


@dataclass
class FrozenCopyReference:
    """Full fine-tuning: a frozen copy of the initial model, in eval mode."""

    model: torch.nn.Module

    def response_logits(self, batch: TrainingBatch) -> LazyLogits:
        with torch.no_grad():
            hidden = _base_hidden(self.model, batch)
        return lazy_masked_logits(hidden, self.model.get_output_embeddings(), batch.response_mask)


@dataclass
class AdapterDisabledReference:
    """LoRA: the trained model itself with its adapter switched off, i.e. the base model.

    Only the body runs inside `disable_adapter()`; the head is applied later, lazily, which
    is exact because the head never carries an adapter (`LoraConfig.validate` refuses it).
    The body runs in eval mode so that the reference is deterministic.
    """

    peft_model: Any  # peft.PeftModel, unwrapped (not the DDP/FSDP wrapper)

    def response_logits(self, batch: TrainingBatch) -> LazyLogits:
        causal_lm = self.peft_model.get_base_model()
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            with torch.no_grad(), self.peft_model.disable_adapter():
                hidden = _base_hidden(causal_lm, batch)
        finally:
            causal_lm.train(was_training)
        return lazy_masked_logits(hidden, causal_lm.get_output_embeddings(), batch.response_mask)


@dataclass
class StoredReference:
    """`--reference precomputed`: the reference's stored log-probs, read with the batch."""

    def response_logits(self, batch: TrainingBatch) -> PrecomputedReference:
        if batch.reference is None:
            raise MissingReferenceError(
                "a micro-batch without precomputed reference values (the shards lack the "
                "ref_* columns); annotate with reference.enabled, or use --reference live"
            )
        return batch.reference


def expected_reference_provenance(
    model: torch.nn.Module, tokenizer: Any, tokenization: Any, name: str, *, min_top_k: int,
    on_cpu: bool,
) -> Any:
    """This run's reference as annotate would have recorded it: the starting policy (before
    any adapter), the policy tokenizer, the tokenisation, the weights' dtype and, for a run
    on the CPU, the attention kernel."""
    from safekeel.annotate.activations import fingerprint_transformers_model
    from safekeel.annotate.reference_logprobs import ReferenceProvenance, tokenization_settings
    from safekeel.data.models import attention_of
    from safekeel.data.shards import tokenizer_fingerprint

    return ReferenceProvenance(
        reference=fingerprint_transformers_model(model, tokenizer, name=name).to_dict(),
        tokenizer=tokenizer_fingerprint(tokenizer),
        tokenization=tokenization_settings(tokenization),
        top_k=min_top_k,
        compute_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        # annotate scores on the CPU: only a CPU run can match its kernel bit for bit
        attn_implementation=attention_of(model) if on_cpu else "",
    )


def check_stored_reference(files: Any, expected: Any, *, estimator: str) -> None:
    """Refuse any shard whose stored reference is not this run's (one line naming it); warn
    once when the shards were computed with another attention kernel."""
    from safekeel.annotate.reference_logprobs import (
        REFERENCE_METADATA_KEY,
        ReferenceKernelWarning,
        ReferenceProvenance,
        check_reference_provenance,
        kernel_mismatch,
    )
    from safekeel.data.shards import read_shard_metadata

    warned = False

    for path in files:
        _, provenance = read_shard_metadata(path)
        stored = provenance.extra.get(REFERENCE_METADATA_KEY)
        if stored is None:
            raise MissingReferenceError(
                f"{path.name}: no precomputed reference provenance; annotate with "
                "reference.enabled, or use --reference live"
            )
        stored = ReferenceProvenance(**stored)
        check_reference_provenance(stored, expected, estimator=estimator, where=path.name)
        mismatch = kernel_mismatch(stored, expected)
        if mismatch is not None and not warned:
            warnings.warn(f"{path.name}: {mismatch}", ReferenceKernelWarning, stacklevel=2)
            warned = True


def build_reference(model: torch.nn.Module, device: torch.device) -> FrozenCopyReference:
    """A frozen copy of the (not yet trained) model in eval mode: the safe reference."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    return FrozenCopyReference(reference.to(device))


@dataclass
class SkippingReference:
    """The reference as the loop uses it: run only where needed, and counted.

    `model` is None for methods whose KL weight is always 0 (no reference was built).
    `forwards_run` / `forwards_skipped` count this process's micro-batches since creation.
    """

    model: ReferenceModel | None
    method: str
    forwards_run: int = 0
    forwards_skipped: int = 0

    def logits_if_needed(self, batch: TrainingBatch, weights: TokenWeights) -> LazyLogits | None:
        """The reference's logits, or None (forward skipped) when b(t) = 0 for every token."""
        if not needs_reference(weights):
            self.forwards_skipped += 1
            return None
        if self.model is None:
            raise MissingReferenceError(
                f"method {self.method!r} set a KL weight but has no reference"
            )
        self.forwards_run += 1
        return self.model.response_logits(batch)
