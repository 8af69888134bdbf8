"""The per-token objective shared by every method: sum_t [ a(t) * CE_t + b(t) * KL_t ].

Conventions
-----------
* p = pi_theta is the policy being trained, q = pi_ref the frozen safe reference.
* Positions: the caller picks the N response positions with a [B, T] bool mask aligned to
  the *shifted* logits (logits at position t predict `labels[t]`, the token at t + 1).
  Everything here works on those N rows, in the mask's row-major order.
* CE_t = -log p(y_t), the label token's negative log-likelihood.
* KL_t, by estimator (y_t is the label token, from the data, not sampled from p):

  | estimator | KL_t                                   | notes                                   |
  | --------- | -------------------------------------- | --------------------------------------- |
  | forward   | KL(q || p) = sum_v q(v) log(q(v)/p(v)) | full vocabulary; the adaptive paper's   |
  | reverse   | KL(p || q) = sum_v p(v) log(p(v)/q(v)) | full vocabulary; mode-seeking           |
  | k1        | log p(y) - log q(y)                    | signed; see below                       |
  | k2        | 0.5 * (log p(y) - log q(y))^2          | STAR-DSS's choice; >= 0                 |
  | k3        | q(y)/p(y) - 1 - log(q(y)/p(y))         | >= 0                                    |

  forward and reverse are exact and >= 0, zero iff p = q at that position, and their
  gradient vanishes at p = q. k2 and k3 only see the label token: zero with zero gradient
  when p(y) = q(y). k1 is the plain log-ratio: it can be negative and its gradient is
  -grad CE_t whatever q is, so b * k1 cancels imitation rather than anchoring to q; it
  is offered for completeness, use k2 or k3 for a target-token anchor. `log_ratio_clamp`
  bounds |log p(y) - log q(y)| for the target-token estimators (tokens beyond the bound
  stop receiving a KL gradient), as STAR-DSS's reference code clamps its estimator.
  The reference is always treated as a constant (no gradient flows into it).

Precomputed reference
---------------------
Instead of reference logits, `ref` can be a `PrecomputedReference`: what annotate stored
per response token (the reference's log-prob of the target token, and its top-k ids and
log-probs). Then no reference model runs at all:

* k1, k2, k3 read only log q(y): exact, the same values and gradients as with live logits.
* forward: let S be the k stored tokens plus the label token when it is not among them
  (its log q is stored anyway); every token outside S goes into one bucket:
  KL_t ~= sum_{v in S} q(v) log(q(v)/p(v)) + q_rest log(q_rest / p_rest), with
  q_rest = 1 - sum_S q(v) and p_rest = 1 - sum_S p(v) (taken as a logsumexp of the
  policy's log-probs outside S, which is the same number without cancellation).
  This is a lower bound of the exact forward KL (merging outcomes never raises a KL, by the
  log-sum inequality), equal to it when S covers the vocabulary. Giving the label its own
  term tightens the bound where it matters: training moves the policy's mass onto the
  label, and inside the bucket that mass would hide the policy's drop on the reference's
  tail. The error left is measured in benchmarks/bench_ref_topk.py. Gradients flow
  through p only.
* reverse needs q on every token the policy puts mass on: refused.

Memory
------
fp32 logits for [B, T, V] are never built. The caller passes either the [N, V] logits of
the response positions (`masked_logits`, model dtype) or, cheaper still, a `LazyLogits`
(the [N, H] hidden states plus the head), and `token_objective` works through the rows in
chunks of `chunk_size`: per chunk it projects (lazy case), upcasts to fp32 and takes the
log-softmax. With gradients on, each chunk runs under activation checkpointing, so its
fp32 log-probabilities are freed after the forward and recomputed in backward: at most
one chunk of fp32 [chunk_size, V] is alive at a time, in forward and in backward.

Hidden states come from the model's base (`model.model(...).last_hidden_state` for
transformers' causal LMs) or, when the model is wrapped (DDP, Accelerate) and its own
forward must run, from `model(..., output_hidden_states=True, logits_to_keep=1)
.hidden_states[-1]`: the final-norm output, with logits for one position only.

Normalisation (gradient accumulation and several processes)
-----------------------------------------------------------
The loss of one optimizer step is the sum of a*CE + b*KL over *all* response tokens of
the step (every micro-batch, every process) divided by the number of those tokens.
Averaging per-micro-batch means instead would give a 10-token micro-batch the same say as
a 1000-token one. Recipe:

1. Fetch the micro-batches of the whole accumulation window first and count their
   response tokens: `n = count_step_tokens(masks)` (all-reduced over processes when
   torch.distributed is initialised, so every process gets the same n).
2. For each micro-batch: `parts = token_objective(...)`, then
   `loss = normalise(parts.numerator, n, world_size=W, accumulation_steps=K)` and
   backward. `world_size`: DDP (and Accelerate) *average* gradients over W processes, so
   the loss is multiplied by W to undo it. `accumulation_steps`: pass K only if your
   backward divides the loss by K (`accelerator.backward` does when the Accelerator was
   built with `gradient_accumulation_steps=K`); 1 for a plain `loss.backward()`.

The accumulated gradient is then exactly grad(sum of all numerators / n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

KL_ESTIMATORS: tuple[str, ...] = ("forward", "reverse", "k1", "k2", "k3")
FULL_VOCAB_ESTIMATORS: tuple[str, ...] = ("forward", "reverse")
TARGET_TOKEN_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
PRECOMPUTED_ESTIMATORS: tuple[str, ...] = ("forward", "k1", "k2", "k3")
DEFAULT_CHUNK_SIZE = 1024


class ObjectiveInputError(ValueError):
    """Inputs to the objective have the wrong shape, dtype or values."""


# --------------------------------------------------------------------------- logits


@dataclass(frozen=True)
class LazyLogits:
    """Logits of N positions, computed on demand: `head(hidden[rows])`.

    hidden: [N, H] final hidden states of the response positions (after the final norm).
    head: the output projection, usually `model.lm_head` (any callable [n, H] -> [n, V]).

    The head runs inside the loss and again in backward (recompute). For the reference
    that means outside any `disable_adapter()` context: if the head itself carries a LoRA
    adapter, pass the reference's logits as a tensor computed inside the context instead.
    """

    hidden: Tensor
    head: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        if self.hidden.dim() != 2:
            raise ObjectiveInputError(
                f"LazyLogits.hidden must be [N, H], got shape {list(self.hidden.shape)}"
            )


Logits = Tensor | LazyLogits


def _rows(logits: Logits) -> int:
    return (logits.hidden if isinstance(logits, LazyLogits) else logits).shape[0]


def _logits_chunk(logits: Logits, start: int, end: int) -> Tensor:
    if isinstance(logits, LazyLogits):
        return logits.head(logits.hidden[start:end])
    return logits[start:end]


def masked_hidden(hidden: Tensor, mask: Tensor) -> Tensor:
    """The [N, H] rows of `hidden` [B, T, H] where `mask` [B, T] is True, row-major."""
    if hidden.dim() != 3:
        raise ObjectiveInputError(f"hidden must be [B, T, H], got shape {list(hidden.shape)}")
    if mask.dtype != torch.bool or mask.shape != hidden.shape[:2]:
        raise ObjectiveInputError(
            f"mask must be bool with shape {list(hidden.shape[:2])}, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    return hidden[mask]


def masked_logits(hidden: Tensor, lm_head: Callable[[Tensor], Tensor], mask: Tensor) -> Tensor:
    """The [N, V] logits of the N masked positions, in the model's dtype.

    Only response positions are projected; fp32 happens later, chunk by chunk.
    """
    return lm_head(masked_hidden(hidden, mask))


def lazy_masked_logits(
    hidden: Tensor, lm_head: Callable[[Tensor], Tensor], mask: Tensor
) -> LazyLogits:
    """Like `masked_logits`, but projects chunk by chunk inside the loss: no [N, V] at all."""
    return LazyLogits(masked_hidden(hidden, mask), lm_head)


# --------------------------------------------------------------------------- per token


def token_cross_entropy(policy_logp: Tensor, labels: Tensor) -> Tensor:
    """CE_t = -log p(y_t): [N] from log-probabilities [N, V] and labels [N]."""
    return -token_log_prob(policy_logp, labels)


def token_kl(
    policy_logp: Tensor,
    ref_logp: Tensor,
    labels: Tensor,
    estimator: str,
    log_ratio_clamp: float | None = None,
) -> Tensor:
    """Per-token KL_t [N] between policy p and reference q (see the module docstring).

    policy_logp, ref_logp: [N, V] log-probabilities; labels [N] (read by k1/k2/k3 only).
    """
    _check_estimator(estimator, log_ratio_clamp)
    if estimator == "forward":
        # kl_div(input, target) = sum target * (target - input) in log space: KL(q || p).
        return F.kl_div(policy_logp, ref_logp, reduction="none", log_target=True).sum(-1)
    if estimator == "reverse":
        return F.kl_div(ref_logp, policy_logp, reduction="none", log_target=True).sum(-1)
    ref_target = ref_logp.gather(-1, labels[:, None]).squeeze(-1)
    return target_token_kl(
        token_log_prob(policy_logp, labels), ref_target, estimator, log_ratio_clamp
    )


def token_log_prob(logp: Tensor, labels: Tensor) -> Tensor:
    """log p(y_t) [N] from log-probabilities [N, V] and labels [N]."""
    return logp.gather(-1, labels[:, None]).squeeze(-1)


def target_token_kl(
    policy_target_logp: Tensor,
    ref_target_logp: Tensor,
    estimator: str,
    log_ratio_clamp: float | None = None,
) -> Tensor:
    """k1, k2 or k3 [N] from log p(y_t) and log q(y_t) alone (see the module docstring)."""
    if estimator not in TARGET_TOKEN_ESTIMATORS:
        raise ObjectiveInputError(
            f"{estimator!r} is not a target-token estimator ({', '.join(TARGET_TOKEN_ESTIMATORS)})"
        )
    log_ratio = policy_target_logp - ref_target_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # k3 with r = q(y) / p(y) = exp(-log_ratio): r - 1 - log r.
    return torch.expm1(-log_ratio) + log_ratio


def _check_estimator(estimator: str, log_ratio_clamp: float | None) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ObjectiveInputError(
            f"unknown KL estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}"
        )
    if log_ratio_clamp is None:
        return
    if estimator in FULL_VOCAB_ESTIMATORS:
        raise ObjectiveInputError(
            f"log_ratio_clamp applies to target-token estimators (k1, k2, k3), not to {estimator!r}"
        )
    if not log_ratio_clamp > 0:
        raise ObjectiveInputError(f"log_ratio_clamp must be > 0, got {log_ratio_clamp}")


# --------------------------------------------------------------------------- precomputed


@dataclass(frozen=True)
class PrecomputedReference:
    """The reference's stored log-probs for N response positions, in the mask's row order.

    target_logprob: [N] float32, log q(y_t) of the label token.
    topk_ids: [N, k] integer ids of the reference's k most likely tokens (distinct per row),
        or None when only the target was stored (then only k1, k2, k3 can be computed).
    topk_logprobs: [N, k] float32 log q of those ids, or None with topk_ids.
    """

    target_logprob: Tensor
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.target_logprob.dim() != 1 or not self.target_logprob.is_floating_point():
            raise ObjectiveInputError(
                "PrecomputedReference.target_logprob must be a float [N] tensor, got "
                f"{self.target_logprob.dtype} {list(self.target_logprob.shape)}"
            )
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ObjectiveInputError("give both topk_ids and topk_logprobs, or neither")
        if self.topk_ids is None or self.topk_logprobs is None:
            return
        n = self.target_logprob.shape[0]
        if self.topk_ids.dim() != 2 or self.topk_ids.shape[0] != n or self.topk_ids.is_floating_point():
            raise ObjectiveInputError(
                f"topk_ids must be an integer [{n}, k] tensor, got "
                f"{self.topk_ids.dtype} {list(self.topk_ids.shape)}"
            )
        if self.topk_logprobs.shape != self.topk_ids.shape or not self.topk_logprobs.is_floating_point():
            raise ObjectiveInputError(
                f"topk_logprobs must be a float tensor shaped like topk_ids {list(self.topk_ids.shape)}, "
                f"got {self.topk_logprobs.dtype} {list(self.topk_logprobs.shape)}"
            )

    @property
    def rows(self) -> int:
        return self.target_logprob.shape[0]

    @property
    def k(self) -> int:
        return 0 if self.topk_ids is None else self.topk_ids.shape[1]

    def slice(self, start: int, end: int) -> PrecomputedReference:
        return PrecomputedReference(
            self.target_logprob[start:end],
            None if self.topk_ids is None else self.topk_ids[start:end],
            None if self.topk_logprobs is None else self.topk_logprobs[start:end],
        )


def stack_precomputed(
    examples: Sequence[PrecomputedReference], response_mask: Tensor
) -> PrecomputedReference:
    """One micro-batch's PrecomputedReference from its rows' stored values, in mask order.

    Row i's values must cover exactly the response positions of row i of `response_mask`
    ([B, T-1], aligned to the shifted logits); a count that differs means the shard was
    tokenised differently from this run (another tokenizer, template or max_length).
    """
    if response_mask.dim() != 2 or len(examples) != response_mask.shape[0]:
        raise ObjectiveInputError(
            f"{len(examples)} rows of reference values for a mask of shape "
            f"{list(response_mask.shape)}"
        )
    counts = response_mask.sum(1).tolist()
    for i, (example, count) in enumerate(zip(examples, counts, strict=True)):
        if example.rows != count:
            raise ObjectiveInputError(
                f"row {i}: the precomputed reference covers {example.rows} response tokens, "
                f"this tokenisation has {count}; the shard was annotated with another "
                "tokenizer, chat template or max_length"
            )
    ks = {example.k for example in examples}
    if len(ks) != 1:
        raise ObjectiveInputError(f"rows carry different top-k sizes: {sorted(ks)}")
    device = response_mask.device
    target = torch.cat([e.target_logprob for e in examples]).to(device, torch.float32)
    if ks == {0}:
        return PrecomputedReference(target)
    ids = torch.cat([e.topk_ids for e in examples]).to(device, torch.int64)  # type: ignore[misc]
    logprobs = torch.cat([e.topk_logprobs for e in examples]).to(device, torch.float32)  # type: ignore[misc]
    return PrecomputedReference(target, ids, logprobs)


def topk_forward_kl(
    policy_logp: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target_ids: Tensor | None = None,
    target_logprobs: Tensor | None = None,
) -> Tensor:
    """Forward KL(q || p) [N] over the reference's top-k plus one bucket for the rest.

    policy_logp [N, V] (carries the gradient); topk_ids [N, k] distinct ids per row and
    topk_logprobs [N, k] the reference's log q at those ids (constants). With target_ids
    [N] and target_logprobs [N] (log q of the label token, stored anyway), a label outside
    the top-k gets its own term instead of joining the rest bucket: a finer split, so a
    tighter lower bound, at no storage cost. It matters because training moves the
    policy's mass onto the label: left in the bucket, that mass hides the policy's drop
    on the rest of the reference's tail.
    """
    vocab = policy_logp.shape[-1]
    k = topk_ids.shape[-1]
    if k > vocab:
        raise ObjectiveInputError(f"top-k of {k} ids for a vocabulary of {vocab}")
    if (target_ids is None) != (target_logprobs is None):
        raise ObjectiveInputError("give both target_ids and target_logprobs, or neither")
    ref_logq = topk_logprobs.detach().to(policy_logp.dtype)
    ref_q = ref_logq.exp()
    # ids with their own term: the top-k, and the label where it is not among them
    ids, weight = topk_ids, torch.ones_like(ref_q)
    if target_ids is not None and target_logprobs is not None:
        outside = (topk_ids != target_ids[:, None]).all(-1)
        ids = torch.cat([topk_ids, target_ids[:, None]], -1)
        ref_logq = torch.cat([ref_logq, target_logprobs.detach().to(ref_logq.dtype)[:, None]], -1)
        ref_q = ref_logq.exp()
        weight = torch.cat([weight, outside[:, None].to(weight.dtype)], -1)
    ref_q = ref_q * weight  # a label inside the top-k is not counted twice
    policy_own = policy_logp.gather(-1, ids)
    kl = (ref_q * (ref_logq - policy_own)).sum(-1)
    covered = weight.sum(-1)  # distinct ids with their own term
    rest_empty = covered >= vocab
    if bool(rest_empty.all()):
        return kl
    # rounding can leave the stored mass a hair above 1; a negative rest means none
    ref_rest = (1.0 - ref_q.sum(-1)).clamp(min=0.0)
    policy_rest = _log_policy_rest(policy_logp, ids, policy_own, weight)
    rest = torch.xlogy(ref_rest, ref_rest) - ref_rest * policy_rest
    return kl + torch.where(rest_empty, torch.zeros_like(rest), rest)


# Below this policy mass outside the stored ids, log(1 - mass inside) loses digits to
# cancellation (float32 sums of k probabilities are good to ~1e-7), so such rows sum the
# mass outside directly.
DIRECT_REST_BELOW = 1e-2


def _log_policy_rest(policy_logp: Tensor, ids: Tensor, policy_own: Tensor, weight: Tensor
                     ) -> Tensor:
    """log of the policy's mass outside `ids` [N].

    From the gathered [N, k] values where that mass is not small: summing it directly takes
    two more [N, V] tensors forward and two in backward (~330 MB a 470-token SmolLM2 step,
    10% of its peak). Rows where it is small (below DIRECT_REST_BELOW) sum it directly."""
    inside = (policy_own.exp() * weight).sum(-1)  # weight 0: a repeated id counts once
    policy_rest = torch.log1p(-inside.clamp(max=1.0 - DIRECT_REST_BELOW))
    direct = (inside > 1.0 - DIRECT_REST_BELOW).nonzero().squeeze(-1)
    if direct.numel():
        # a finite floor (not -inf) keeps the gradient of an empty rest at zero, not NaN
        floor = torch.finfo(policy_logp.dtype).min
        summed = policy_logp[direct].scatter(-1, ids[direct], floor).logsumexp(-1)
        policy_rest = policy_rest.index_put((direct,), summed)
    return policy_rest


def precomputed_token_kl(
    policy_logp: Tensor,
    ref: PrecomputedReference,
    labels: Tensor,
    estimator: str,
    log_ratio_clamp: float | None = None,
) -> Tensor:
    """Per-token KL_t [N] against stored reference values (see "Precomputed reference")."""
    _check_estimator(estimator, log_ratio_clamp)
    _check_precomputed_estimator(estimator, ref)
    if estimator == "forward":
        return topk_forward_kl(
            policy_logp, ref.topk_ids, ref.topk_logprobs,  # type: ignore[arg-type]
            labels, ref.target_logprob,
        )
    return target_token_kl(
        token_log_prob(policy_logp, labels), ref.target_logprob.detach().to(policy_logp.dtype),
        estimator, log_ratio_clamp,
    )


def _check_precomputed_estimator(estimator: str, ref: PrecomputedReference) -> None:
    if estimator not in PRECOMPUTED_ESTIMATORS:  # reverse
        raise ObjectiveInputError(
            "reverse KL sums over the policy's whole distribution and needs the reference's "
            "log-prob of every token; a precomputed reference stores only the target token and "
            "its top-k. Use kl estimator forward (top-k plus rest), k2 or k3, or a live "
            "reference model for reverse"
        )
    if estimator == "forward" and ref.k == 0:
        raise ObjectiveInputError(
            "forward KL from a precomputed reference needs its top-k log-probs; these were "
            "stored without them (k = 0): annotate with top-k, or use k1, k2 or k3"
        )


# --------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class LossParts:
    """One micro-batch's share of the loss, before normalisation.

    numerator: sum_t [a(t) CE_t + b(t) KL_t], fp32 scalar carrying the gradient.
    ce_sum: sum_t CE_t over all response tokens, unweighted, detached (for logging).
    kl_sum: sum_t KL_t likewise, or None when no reference was given.
    n_tokens: N, the number of response tokens in this micro-batch.
    """

    numerator: Tensor
    ce_sum: Tensor
    kl_sum: Tensor | None
    n_tokens: int


def token_objective(
    policy: Logits,
    labels: Tensor,
    ce_weight: Tensor,
    kl_weight: Tensor,
    ref: Logits | PrecomputedReference | None = None,
    *,
    kl_estimator: str = "forward",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    log_ratio_clamp: float | None = None,
    recompute: bool | None = None,
) -> LossParts:
    """sum_t [a CE_t + b KL_t] over the N response tokens, computed in chunks of rows.

    policy: [N, V] logits or LazyLogits of the response positions (with gradient).
    labels: [N] label token ids. ce_weight, kl_weight: [N] a(t) and b(t), e.g.
        `weights.a[mask]`, `weights.b[mask]` from `train.weights`.
    ref: the reference's logits for the same positions, or its stored values
        (`PrecomputedReference`, see the module docstring), or None. None is allowed only
        when kl_weight is 0 everywhere (then no reference forward is needed).
    recompute: checkpoint each chunk (default: whenever gradients are enabled).
    Divide `numerator` by the step's token count with `normalise`.
    """
    _check_estimator(kl_estimator, log_ratio_clamp)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ObjectiveInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n = _rows(policy)
    if labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ObjectiveInputError(
            f"labels must be integer with shape [{n}], got {labels.dtype} {list(labels.shape)}"
        )
    for name, weight in (("ce_weight", ce_weight), ("kl_weight", kl_weight)):
        if weight.shape != (n,):
            raise ObjectiveInputError(f"{name} must have shape [{n}], got {list(weight.shape)}")
    if ref is None:
        if bool((kl_weight != 0).any()):
            raise ObjectiveInputError(
                "kl_weight is non-zero for some tokens but no reference logits were given"
            )
    elif isinstance(ref, PrecomputedReference):
        _check_precomputed_estimator(kl_estimator, ref)
        if ref.rows != n:
            raise ObjectiveInputError(f"precomputed ref has {ref.rows} rows, policy has {n}")
    elif _rows(ref) != n:
        raise ObjectiveInputError(f"ref has {_rows(ref)} rows, policy has {n}")
    # The label range is read once per call (one host sync on a GPU), not once per chunk
    # and again in each chunk's recompute.
    label_min, label_max = torch.stack([labels.min(), labels.max()]).tolist() if n else (0, 0)
    if label_min < 0:
        raise ObjectiveInputError(f"labels must be >= 0, got {label_min}")
    labels = labels.long()
    ce_weight = ce_weight.float()
    kl_weight = kl_weight.float()

    def chunk_terms(start: int, end: int) -> tuple[Tensor, Tensor, Tensor | None]:
        policy_logits = _logits_chunk(policy, start, end)
        vocab = policy_logits.shape[-1]
        chunk_labels = labels[start:end]
        if label_max >= vocab:
            raise ObjectiveInputError(f"label id {label_max} is outside the vocabulary of {vocab}")
        policy_logp = policy_logits.float().log_softmax(-1)
        ce = token_cross_entropy(policy_logp, chunk_labels)
        weighted = ce_weight[start:end] * ce
        kl = None
        if isinstance(ref, PrecomputedReference):
            stored = ref.slice(start, end)
            if stored.k and int(stored.topk_ids.max()) >= vocab:  # type: ignore[union-attr]
                raise ObjectiveInputError(
                    f"precomputed top-k id {int(stored.topk_ids.max())} is outside the "  # type: ignore[union-attr]
                    f"vocabulary of {vocab}"
                )
            kl = precomputed_token_kl(
                policy_logp, stored, chunk_labels, kl_estimator, log_ratio_clamp
            )
            weighted = weighted + kl_weight[start:end] * kl
        elif ref is not None:
            with torch.no_grad():
                ref_logits = _logits_chunk(ref, start, end)
            if ref_logits.shape[-1] != vocab:
                raise ObjectiveInputError(
                    f"ref vocabulary ({ref_logits.shape[-1]}) differs from policy's ({vocab})"
                )
            ref_logp = ref_logits.detach().float().log_softmax(-1)
            kl = token_kl(policy_logp, ref_logp, chunk_labels, kl_estimator, log_ratio_clamp)
            weighted = weighted + kl_weight[start:end] * kl
        return weighted.sum(), ce.detach(), None if kl is None else kl.detach()

    if recompute is None:
        recompute = torch.is_grad_enabled()
    if n == 0:
        # An empty micro-batch still returns a graph-connected zero, so that every process
        # runs the same backward (DDP waits for all of them).
        empty = _logits_chunk(policy, 0, 0).float().sum()
        zero = torch.zeros((), device=empty.device)
        return LossParts(empty, zero, None if ref is None else zero, 0)

    numerator = torch.zeros((), device=labels.device)
    ce_parts: list[Tensor] = []
    kl_parts: list[Tensor] = []
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if recompute:
            # The fp32 log-probs of this chunk are not kept for backward; they are
            # recomputed from the (model-dtype) logits or hidden states when needed.
            chunk_sum, ce, kl = checkpoint(
                chunk_terms, start, end, use_reentrant=False, preserve_rng_state=False
            )
        else:
            chunk_sum, ce, kl = chunk_terms(start, end)
        numerator = numerator + chunk_sum
        ce_parts.append(ce)
        if kl is not None:
            kl_parts.append(kl)
    return LossParts(
        numerator=numerator,
        ce_sum=torch.cat(ce_parts).sum(),
        kl_sum=torch.cat(kl_parts).sum() if kl_parts else None,
        n_tokens=n,
    )


# --------------------------------------------------------------------------- normalisation


def count_step_tokens(response_masks: Iterable[Tensor], *, sync_processes: bool = True) -> Tensor:
    """Response tokens of one optimizer step: summed over its micro-batches' masks and,
    when torch.distributed is initialised and `sync_processes`, over all processes.

    Returns an int64 scalar on the masks' device (NCCL needs it on the GPU).
    """
    masks = list(response_masks)
    if not masks:
        raise ObjectiveInputError("count_step_tokens needs at least one response mask")
    total = torch.stack([mask.sum().to(torch.int64) for mask in masks]).sum()
    if sync_processes and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def normalise(
    numerator: Tensor,
    global_tokens: int | Tensor,
    *,
    world_size: int = 1,
    accumulation_steps: int = 1,
) -> Tensor:
    """numerator * world_size * accumulation_steps / global_tokens (see module docstring).

    A step without any response token gives a zero loss (and gradient) rather than NaN.
    """
    for name, value in (("world_size", world_size), ("accumulation_steps", accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ObjectiveInputError(f"{name} must be a positive int, got {value!r}")
    if isinstance(global_tokens, Tensor):
        if global_tokens.numel() != 1:
            raise ObjectiveInputError("global_tokens must be a scalar")
        denominator = global_tokens.to(numerator.dtype).clamp(min=1)
    else:
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int):
            raise ObjectiveInputError(f"global_tokens must be an int, got {global_tokens!r}")
        if global_tokens < 0:
            raise ObjectiveInputError(f"global_tokens must be >= 0, got {global_tokens}")
        denominator = max(global_tokens, 1)
    return numerator * (world_size * accumulation_steps) / denominator
