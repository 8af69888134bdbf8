"""Weight policies: turn an example's risk columns into per-token loss weights a(t), b(t).

Every training method of this project is one per-token objective (see `train.objective`):

    L = sum_t [ a(t) * CE_t + b(t) * KL_t ] / n_response_tokens

A *weight policy* decides a and b for one micro-batch from the annotated risk columns:

| policy             | a(t)                         | b(t)                 | granularity |
| ------------------ | ---------------------------- | -------------------- | ----------- |
| `sft`              | 1                            | 0                    | -           |
| `constant_kl`      | 1                            | beta                 | -           |
| `filter`           | 0 if flagged else 1          | 0                    | example     |
| `downweight`       | factor if flagged else 1     | 0                    | example     |
| `adaptive`         | 1 - w(r_batch)               | w(r_batch)           | micro-batch |
| `adaptive_example` | 1 - w(r_i)                   | w(r_i)               | example     |
| `star_dss`         | V(t)                         | lam * (1 - V(t))     | token       |

"Flagged" means risk >= threshold. Risks are probabilities on [0, 1] (P(unsafe) from the
critic, P(harmful intent) from the probe); w is a `Schedule` from risk to KL weight.

Policies are plain frozen dataclasses; `make_weight_policy(name, **params)` builds one
from a name and keyword parameters (what a config file holds) and names the allowed
values when something is wrong. Each policy also states which shard columns it needs
(`required_columns`), so the data layer can refuse shards that lack them before training.

"Per batch" means the micro-batch handed to the policy: under gradient accumulation or
on several processes, each micro-batch gets its own batch risk, as in the paper's code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
from torch import Tensor

# Shard columns (named in safekeel.data.shards). The policies read the per-example ones
# directly; STAR's per-segment lists arrive already expanded to tokens.
CRITIC_COLUMN = "critic_p_unsafe"
PROBE_COLUMN = "probe_p_harmful"
STAR_VALUE_COLUMN = "star_v_safe"
STAR_ENDS_COLUMN = "star_token_ends"

RiskSignal = Literal["critic", "probe", "max", "mean"]
BatchAggregate = Literal["mean", "max"]
RISK_SIGNALS: tuple[str, ...] = get_args(RiskSignal)
BATCH_AGGREGATES: tuple[str, ...] = get_args(BatchAggregate)

_SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "critic": (CRITIC_COLUMN,),
    "probe": (PROBE_COLUMN,),
    "max": (CRITIC_COLUMN, PROBE_COLUMN),
    "mean": (CRITIC_COLUMN, PROBE_COLUMN),
}


class WeightPolicyConfigError(ValueError):
    """A policy or schedule name is unknown, or one of its parameters is not allowed."""


class RiskInputError(ValueError):
    """A micro-batch's risk inputs are missing, misshapen, NaN or outside [0, 1]."""


# --------------------------------------------------------------------------- validation


def _check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """Raise WeightPolicyConfigError unless `value` is a finite real within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightPolicyConfigError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise WeightPolicyConfigError(f"{owner}: {name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise WeightPolicyConfigError(f"{owner}: {name} must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise WeightPolicyConfigError(f"{owner}: {name} must be <= {high}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise WeightPolicyConfigError(
            f"{owner}: unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}"
        )


def _check_probability_tensor(name: str, values: Tensor) -> None:
    """Raise RiskInputError if any value is NaN/inf or outside [0, 1]."""
    if values.numel() == 0:
        return
    if not torch.isfinite(values).all():
        raise RiskInputError(f"{name} holds NaN or infinite values")
    if (values < 0).any() or (values > 1).any():
        low, high = values.min().item(), values.max().item()
        raise RiskInputError(f"{name} must lie in [0, 1]; found values in [{low}, {high}]")


def _example_column(name: str, values: Tensor | None, mask: Tensor) -> Tensor:
    """Validate one per-example risk column [B] and return it as float32 on mask's device."""
    if values is None:
        raise RiskInputError(f"this policy needs column {name!r}, which the batch lacks")
    values = torch.as_tensor(values).to(device=mask.device, dtype=torch.float32)
    if values.shape != (mask.shape[0],):
        raise RiskInputError(
            f"{name} must have shape [batch] = [{mask.shape[0]}], got {list(values.shape)}"
        )
    _check_probability_tensor(name, values)
    return values


def _check_mask(response_mask: Tensor) -> Tensor:
    if not isinstance(response_mask, Tensor) or response_mask.dim() != 2:
        raise RiskInputError("response_mask must be a [batch, seq] tensor")
    if response_mask.dtype != torch.bool:
        raise RiskInputError(f"response_mask must be bool, got {response_mask.dtype}")
    return response_mask


# --------------------------------------------------------------------------- schedules


def paper_weight_from_rating(rating: float | Tensor) -> float | Tensor:
    """The paper's preset on its 1..5 judge scale: w = clip((r - 2) / 3, 0.1, 0.9).

    r = 1 -> 0.1, r = 3.5 -> 0.5, r = 5 -> 0.9. Ratings outside [1, 5] are an error.
    """
    is_tensor = isinstance(rating, Tensor)
    r = rating.to(torch.float32) if is_tensor else torch.tensor(float(rating), dtype=torch.float64)
    if not torch.isfinite(r).all() or (r < 1).any() or (r > 5).any():
        raise RiskInputError(f"judge rating must lie in [1, 5], got {rating!r}")
    w = ((r - 2.0) / 3.0).clamp(0.1, 0.9)
    return w if is_tensor else w.item()


class Schedule(Protocol):
    """Maps risks in [0, 1] (any shape) to KL weights w in [0, 1] (same shape)."""

    kind: ClassVar[str]

    def __call__(self, risk: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class PaperSchedule:
    """The paper's preset on a probability: r = 1 + 4p, then w = clip((r - 2) / 3, 0.1, 0.9).

    p = 0 -> 0.1, p = 0.625 -> 0.5, p = 1 -> 0.9: never pure SFT, never pure KL.
    """

    kind: ClassVar[str] = "paper"

    def __call__(self, risk: Tensor) -> Tensor:
        return paper_weight_from_rating(1.0 + 4.0 * risk.to(torch.float32))


@dataclass(frozen=True)
class LinearSchedule:
    """Clipped linear ramp: w_min up to risk `low`, w_max from risk `high`, linear between."""

    low: float = 0.0
    high: float = 1.0
    w_min: float = 0.0
    w_max: float = 1.0
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_number("linear schedule", "low", self.low, low=0.0, high=1.0)
        _check_number("linear schedule", "high", self.high, low=0.0, high=1.0)
        if not self.low < self.high:
            raise WeightPolicyConfigError(
                f"linear schedule: low ({self.low}) must be below high ({self.high})"
            )
        _check_weight_range("linear schedule", self.w_min, self.w_max)

    def __call__(self, risk: Tensor) -> Tensor:
        fraction = ((risk.to(torch.float32) - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
        return self.w_min + (self.w_max - self.w_min) * fraction


@dataclass(frozen=True)
class StepSchedule:
    """w_high for risk >= threshold, w_low below it."""

    threshold: float = 0.5
    w_low: float = 0.0
    w_high: float = 1.0
    kind: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        _check_number("step schedule", "threshold", self.threshold, low=0.0, high=1.0)
        _check_weight_range("step schedule", self.w_low, self.w_high)

    def __call__(self, risk: Tensor) -> Tensor:
        high = torch.full_like(risk, self.w_high, dtype=torch.float32)
        return torch.where(risk >= self.threshold, high, torch.full_like(high, self.w_low))


@dataclass(frozen=True)
class SigmoidSchedule:
    """Smooth step: w = w_min + (w_max - w_min) * sigmoid((risk - center) / temperature)."""

    center: float = 0.5
    temperature: float = 0.1
    w_min: float = 0.0
    w_max: float = 1.0
    kind: ClassVar[str] = "sigmoid"

    def __post_init__(self) -> None:
        _check_number("sigmoid schedule", "center", self.center, low=0.0, high=1.0)
        _check_number("sigmoid schedule", "temperature", self.temperature, low=0.0, low_open=True)
        _check_weight_range("sigmoid schedule", self.w_min, self.w_max)

    def __call__(self, risk: Tensor) -> Tensor:
        gate = torch.sigmoid((risk.to(torch.float32) - self.center) / self.temperature)
        return self.w_min + (self.w_max - self.w_min) * gate


def _check_weight_range(owner: str, w_min: float, w_max: float) -> None:
    # Weights stay in [0, 1] so that a = 1 - w is a weight too, and they rise with risk:
    # the method's principle is that riskier data is pulled harder to the reference.
    _check_number(owner, "minimum weight", w_min, low=0.0, high=1.0)
    _check_number(owner, "maximum weight", w_max, low=0.0, high=1.0)
    if w_min > w_max:
        raise WeightPolicyConfigError(
            f"{owner}: minimum weight ({w_min}) must not exceed maximum weight ({w_max})"
        )


SCHEDULES: dict[str, type] = {
    cls.kind: cls for cls in (PaperSchedule, LinearSchedule, StepSchedule, SigmoidSchedule)
}


def make_schedule(kind: str, **params: Any) -> Schedule:
    """Build a schedule by kind (`paper`, `linear`, `step`, `sigmoid`) and its parameters."""
    _check_choice("schedule", "kind", kind, tuple(SCHEDULES))
    cls = SCHEDULES[kind]
    _check_params(f"{kind} schedule", cls, params)
    return cls(**params)


def _as_schedule(value: Schedule | str | Mapping[str, Any]) -> Schedule:
    """Accept a schedule object, a kind name, or a mapping {"kind": ..., **params}."""
    if isinstance(value, str):
        return make_schedule(value)
    if isinstance(value, Mapping):
        params = dict(value)
        if "kind" not in params:
            raise WeightPolicyConfigError(
                f"schedule mapping needs a 'kind' key; allowed kinds: {', '.join(SCHEDULES)}"
            )
        return make_schedule(params.pop("kind"), **params)
    if callable(value):
        return value
    raise WeightPolicyConfigError(
        f"schedule must be a kind name, a mapping or a schedule object, got {value!r}"
    )


# --------------------------------------------------------------------------- inputs, outputs


@dataclass(frozen=True)
class RiskInputs:
    """The risk inputs of one micro-batch; any may be missing (None)."""

    critic_p_unsafe: Tensor | None = None
    probe_p_harmful: Tensor | None = None
    star_v_safe_tokens: Tensor | None = None


@dataclass(frozen=True)
class TokenWeights:
    """Per-token weights of one micro-batch and scalars to log.

    a, b: [batch, seq] float32, the CE and KL weights; zero outside the response mask.
    batch_risk: the risk the policy acted on (aggregated over the batch; for token-level
        STAR-DSS the mean of 1 - V over response tokens), or None if it reads no risk.
    mean_ce_weight, mean_kl_weight: means of a and b over response tokens (0 if none).
    Scalars stay 0-dim tensors so that logging decides when to sync (`.item()`).
    """

    a: Tensor
    b: Tensor
    batch_risk: Tensor | None
    mean_ce_weight: Tensor
    mean_kl_weight: Tensor


def needs_reference(weights: TokenWeights) -> bool:
    """False when b is zero for every token: the reference forward can then be skipped."""
    return bool((weights.b != 0).any())


def _finish(
    mask: Tensor, a: Tensor | float, b: Tensor | float, batch_risk: Tensor | None
) -> TokenWeights:
    """Broadcast a and b to [B, T], zero them outside the mask, and compute diagnostics."""
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    a_full = torch.where(mask, zeros + a, zeros)
    b_full = torch.where(mask, zeros + b, zeros)
    n_tokens = mask.sum().clamp(min=1)
    return TokenWeights(
        a=a_full,
        b=b_full,
        batch_risk=None if batch_risk is None else batch_risk.detach(),
        mean_ce_weight=a_full.sum() / n_tokens,
        mean_kl_weight=b_full.sum() / n_tokens,
    )


def example_risk(signal: str, mask: Tensor, risks: RiskInputs) -> Tensor:
    """Per-example risk [B] from the chosen signal: critic, probe, or their max or mean."""
    _check_choice("risk", "signal", signal, RISK_SIGNALS)
    if signal == "critic":
        return _example_column(CRITIC_COLUMN, risks.critic_p_unsafe, mask)
    if signal == "probe":
        return _example_column(PROBE_COLUMN, risks.probe_p_harmful, mask)
    critic = _example_column(CRITIC_COLUMN, risks.critic_p_unsafe, mask)
    probe = _example_column(PROBE_COLUMN, risks.probe_p_harmful, mask)
    return torch.maximum(critic, probe) if signal == "max" else (critic + probe) / 2


def aggregate_batch_risk(risk: Tensor, mask: Tensor, how: str) -> Tensor:
    """Mean or max of example risks over rows that have response tokens.

    Rows without any response token (padding rows of a short last batch) do not count;
    if no row has one, every row counts, so the result is always defined.
    """
    _check_choice("risk", "batch aggregate", how, BATCH_AGGREGATES)
    has_tokens = mask.any(dim=1)
    rows = risk[has_tokens] if bool(has_tokens.any()) else risk
    if rows.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=risk.device)
    return rows.mean() if how == "mean" else rows.max()


# --------------------------------------------------------------------------- policies


class WeightPolicy(Protocol):
    """What the trainer calls once per micro-batch."""

    name: ClassVar[str]
    uses_reference: ClassVar[bool]

    @property
    def required_columns(self) -> tuple[str, ...]: ...

    def __call__(
        self,
        response_mask: Tensor,
        *,
        critic_p_unsafe: Tensor | None = None,
        probe_p_harmful: Tensor | None = None,
        star_v_safe_tokens: Tensor | None = None,
    ) -> TokenWeights: ...


class _Policy:
    """Shared call path: validate the mask, then let the subclass compute the weights.

    Inputs: response_mask [B, T] bool marks positions whose *label* is a response token
    (already aligned to the shifted logits); critic_p_unsafe, probe_p_harmful [B] in [0, 1];
    star_v_safe_tokens [B, T], STAR's P(safe) per token (only masked positions are read).
    `uses_reference` is False for policies whose b is always 0: the trainer need not even
    build a reference model for them.
    """

    name: ClassVar[str]
    uses_reference: ClassVar[bool] = True

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ()

    def __call__(
        self,
        response_mask: Tensor,
        *,
        critic_p_unsafe: Tensor | None = None,
        probe_p_harmful: Tensor | None = None,
        star_v_safe_tokens: Tensor | None = None,
    ) -> TokenWeights:
        mask = _check_mask(response_mask)
        risks = RiskInputs(critic_p_unsafe, probe_p_harmful, star_v_safe_tokens)
        return self._weights(mask, risks)

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        raise NotImplementedError


@dataclass(frozen=True)
class SFTPolicy(_Policy):
    """Plain supervised fine-tuning: a = 1, b = 0."""

    name: ClassVar[str] = "sft"
    uses_reference: ClassVar[bool] = False

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        return _finish(mask, 1.0, 0.0, None)


@dataclass(frozen=True)
class ConstantKLPolicy(_Policy):
    """SFT plus a constant pull to the reference: a = 1, b = beta."""

    beta: float = 0.1
    name: ClassVar[str] = "constant_kl"

    def __post_init__(self) -> None:
        _check_number("constant_kl", "beta", self.beta, low=0.0)

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        return _finish(mask, 1.0, float(self.beta), None)


@dataclass(frozen=True)
class FilterPolicy(_Policy):
    """Static filtering: examples with risk >= threshold get a = 0 (dropped); b = 0."""

    threshold: float = 0.5
    signal: RiskSignal = "critic"
    name: ClassVar[str] = "filter"
    uses_reference: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_number(self.name, "threshold", self.threshold, low=0.0, high=1.0)
        _check_choice(self.name, "signal", self.signal, RISK_SIGNALS)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return _SIGNAL_COLUMNS[self.signal]

    def _flagged_weight(self) -> float:
        return 0.0

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        risk = example_risk(self.signal, mask, risks)
        a = torch.where(risk >= self.threshold, self._flagged_weight(), 1.0)
        return _finish(mask, a[:, None], 0.0, aggregate_batch_risk(risk, mask, "mean"))


@dataclass(frozen=True)
class DownweightPolicy(FilterPolicy):
    """Static down-weighting: examples with risk >= threshold get a = factor; b = 0."""

    factor: float = 0.1
    name: ClassVar[str] = "downweight"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self.name, "factor", self.factor, low=0.0, high=1.0)

    def _flagged_weight(self) -> float:
        return float(self.factor)


@dataclass(frozen=True)
class AdaptiveBatchPolicy(_Policy):
    """The paper's method: one KL weight w per micro-batch; a = 1 - w, b = w.

    Example risks come from `signal`, are aggregated over the micro-batch by `aggregate`
    (mean as in the paper's critic; max is the cautious choice), then mapped by `schedule`.
    """

    schedule: Schedule = dataclasses.field(default_factory=PaperSchedule)
    signal: RiskSignal = "critic"
    aggregate: BatchAggregate = "mean"
    name: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", _as_schedule(self.schedule))
        _check_choice(self.name, "signal", self.signal, RISK_SIGNALS)
        _check_choice(self.name, "aggregate", self.aggregate, BATCH_AGGREGATES)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return _SIGNAL_COLUMNS[self.signal]

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        risk = aggregate_batch_risk(example_risk(self.signal, mask, risks), mask, self.aggregate)
        w = self.schedule(risk)
        return _finish(mask, 1.0 - w, w, risk)


@dataclass(frozen=True)
class AdaptiveExamplePolicy(_Policy):
    """Adaptive per example: w_i = schedule(risk_i); a = 1 - w_i, b = w_i on i's tokens."""

    schedule: Schedule = dataclasses.field(default_factory=PaperSchedule)
    signal: RiskSignal = "critic"
    name: ClassVar[str] = "adaptive_example"

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", _as_schedule(self.schedule))
        _check_choice(self.name, "signal", self.signal, RISK_SIGNALS)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return _SIGNAL_COLUMNS[self.signal]

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        risk = example_risk(self.signal, mask, risks)
        w = self.schedule(risk)[:, None]
        return _finish(mask, 1.0 - w, w, aggregate_batch_risk(risk, mask, "mean"))


@dataclass(frozen=True)
class StarDSSPolicy(_Policy):
    """STAR-DSS: a = V(t), b = lam * (1 - V(t)), V(t) = STAR's P(safe) of t's segment."""

    lam: float = 1.0
    name: ClassVar[str] = "star_dss"

    def __post_init__(self) -> None:
        _check_number(self.name, "lam", self.lam, low=0.0)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (STAR_VALUE_COLUMN, STAR_ENDS_COLUMN)

    def _weights(self, mask: Tensor, risks: RiskInputs) -> TokenWeights:
        star = risks.star_v_safe_tokens
        if star is None:
            raise RiskInputError(
                "star_dss needs per-token STAR values (star_v_safe_tokens, built from columns "
                f"{STAR_VALUE_COLUMN!r} and {STAR_ENDS_COLUMN!r}), which the batch lacks"
            )
        star = torch.as_tensor(star).to(device=mask.device, dtype=torch.float32)
        if star.shape != mask.shape:
            raise RiskInputError(
                f"star_v_safe_tokens must have the mask's shape {list(mask.shape)}, "
                f"got {list(star.shape)}"
            )
        # Only response positions carry STAR values; padding elsewhere may hold anything.
        _check_probability_tensor("star_v_safe_tokens (at response tokens)", star[mask])
        v = torch.where(mask, star, torch.zeros_like(star))
        n_tokens = mask.sum().clamp(min=1)
        token_risk = ((1.0 - v) * mask).sum() / n_tokens
        return _finish(mask, v, float(self.lam) * (1.0 - v), token_risk)


POLICIES: dict[str, type] = {
    cls.name: cls
    for cls in (
        SFTPolicy,
        ConstantKLPolicy,
        FilterPolicy,
        DownweightPolicy,
        AdaptiveBatchPolicy,
        AdaptiveExamplePolicy,
        StarDSSPolicy,
    )
}


def _check_params(owner: str, cls: type, params: Mapping[str, Any]) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        allowed_text = ", ".join(allowed) if allowed else "none"
        raise WeightPolicyConfigError(
            f"{owner}: unknown parameter(s) {', '.join(unknown)}; allowed: {allowed_text}"
        )


def make_weight_policy(name: str, **params: Any) -> WeightPolicy:
    """Build a weight policy by name, e.g. `make_weight_policy("adaptive", signal="max")`.

    `schedule` (adaptive policies) may be a kind name, a mapping {"kind": ..., **params}
    or a schedule object. Unknown names and parameters raise WeightPolicyConfigError
    listing what is allowed.
    """
    _check_choice("weight policy", "name", name, tuple(POLICIES))
    cls = POLICIES[name]
    _check_params(f"weight policy {name!r}", cls, params)
    return cls(**params)


# --------------------------------------------------------------------------- STAR tokens


def expand_star_to_tokens(
    v_safe: Sequence[float], token_ends: Sequence[int], n_response_tokens: int
) -> Tensor:
    """Per-token STAR values [n_response_tokens] from per-segment values.

    Segment k covers response tokens [ends[k-1], ends[k]) (ends[-1] taken as 0) and each of
    its tokens gets v_safe[k]. Tokens past the last end get the last value; ends past
    n_response_tokens are cut (the trainer may truncate a long response).
    """
    if len(v_safe) != len(token_ends):
        raise RiskInputError(
            f"{STAR_VALUE_COLUMN} has {len(v_safe)} values but {STAR_ENDS_COLUMN} has "
            f"{len(token_ends)} ends"
        )
    if n_response_tokens < 0:
        raise RiskInputError(f"n_response_tokens must be >= 0, got {n_response_tokens}")
    if n_response_tokens > 0 and not v_safe:
        raise RiskInputError(f"{STAR_VALUE_COLUMN} is empty but the response has tokens")
    ends = [int(e) for e in token_ends]
    if ends and ends[0] < 1:
        raise RiskInputError(f"{STAR_ENDS_COLUMN} must start at >= 1, got {ends[0]}")
    for k in range(1, len(ends)):
        if ends[k] <= ends[k - 1]:
            raise RiskInputError(
                f"{STAR_ENDS_COLUMN} must be strictly increasing; position {k} has "
                f"{ends[k]} after {ends[k - 1]}"
            )
    values = torch.tensor([float(v) for v in v_safe], dtype=torch.float32)
    _check_probability_tensor(STAR_VALUE_COLUMN, values)
    if n_response_tokens == 0:
        return torch.zeros(0, dtype=torch.float32)
    # Segment of token i = number of ends <= i; tokens past the last end stay in the last.
    positions = torch.arange(n_response_tokens)
    segment = torch.searchsorted(torch.tensor(ends), positions, right=True)
    return values[segment.clamp(max=len(ends) - 1)]


def star_tokens_for_batch(
    v_safe: Sequence[Sequence[float]],
    token_ends: Sequence[Sequence[int]],
    response_mask: Tensor,
) -> Tensor:
    """[B, T] STAR values placed on each row's response positions (in order), 0 elsewhere.

    The k-th True position of row i is response token k of example i.
    """
    mask = _check_mask(response_mask)
    if len(v_safe) != mask.shape[0] or len(token_ends) != mask.shape[0]:
        raise RiskInputError(
            f"STAR columns have {len(v_safe)} / {len(token_ends)} rows, batch has {mask.shape[0]}"
        )
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, (values, ends) in enumerate(zip(v_safe, token_ends, strict=True)):
        row_mask = mask[row].cpu()
        try:
            out[row, row_mask] = expand_star_to_tokens(values, ends, int(row_mask.sum()))
        except RiskInputError as error:
            raise RiskInputError(f"row {row}: {error}") from None
    return out.to(mask.device)
