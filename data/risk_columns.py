"""The risk columns, declared once: what each is, who writes it, and what values it may hold.

Stage one's annotators write these columns into the shards; the shard schema and its value
checks, the provenance a column needs, the training stream's column list, the collate step
and the weight policies' risk signals are all read from `RISK_COLUMNS`. Adding a scorer
means adding its declaration here (and its annotator).

Granularity says how a column is shaped:

* `example`: one number per row (a probability for the whole conversation);
* `segment`: one list per row, one item per segment of the response. The segment columns of
  one producer come together and have equal lengths per row (STAR's values and their token
  ends); the trainer spreads them over the response tokens.
* `token`: one list per row, one item per trained response token, in training's order
  (the precomputed reference's log-probs). These are not risk signals: the weight policies
  never read them; `safekeel train --reference precomputed` uses them instead of a
  reference model. A row training will skip (a `TokenizationIssue`) holds null.

Columns of one producer are written by one annotator in one pass, so a shard holds all of
them or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

Granularity = Literal["example", "segment", "token"]


@dataclass(frozen=True)
class RiskColumn:
    """One risk column of the shard format.

    name: the shard column. producer: the annotator that writes it (per-example columns
    double as the name of the risk signal they give to the weight policies).
    arrow_type: its Arrow type (for segment columns a list type).
    low, high: the closed range of every value (of every item for segment columns); None is
    unbounded. integer: values are whole numbers (checked by the type). increasing: items of
    one row must grow strictly. provenance: the provenance fields the column cannot be
    trusted without. meaning: one line for messages and docs.
    """

    name: str
    producer: str
    arrow_type: pa.DataType
    granularity: Granularity
    low: float | None
    high: float | None
    provenance: tuple[str, ...]
    meaning: str
    increasing: bool = False

    def __post_init__(self) -> None:
        is_list = pa.types.is_list(self.arrow_type)
        if is_list != (self.granularity in ("segment", "token")):
            raise ValueError(
                f"{self.name}: segment columns are lists (token columns too), example columns are not"
            )

    @property
    def value_type(self) -> pa.DataType:
        """Type of one value: the column type, or the item type of a segment list."""
        return self.arrow_type.value_type if self.granularity == "segment" else self.arrow_type

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"[{_number(self.low)}, {_number(self.high)}]"
        if self.low is not None:
            return f">= {_number(self.low)}"
        return f"<= {_number(self.high)}" if self.high is not None else "any value"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


CRITIC = RiskColumn(
    name="critic_p_unsafe",
    producer="critic",
    arrow_type=pa.float32(),
    granularity="example",
    low=0.0,
    high=1.0,
    provenance=("critic_model",),
    meaning="the guard model's P(unsafe) of the whole conversation",
)
PROBE = RiskColumn(
    name="probe_p_harmful",
    producer="probe",
    arrow_type=pa.float32(),
    granularity="example",
    low=0.0,
    high=1.0,
    provenance=("probe_file_sha256", "probe_layers"),
    meaning="the activation probe's P(harmful intent) of the prompt",
)
# STAR ends are positions in the policy tokenizer's response tokens, so both STAR columns
# mean nothing without its fingerprint and the segment size.
STAR_VALUES = RiskColumn(
    name="star_v_safe",
    producer="star",
    arrow_type=pa.list_(pa.float32()),
    granularity="segment",
    low=0.0,
    high=1.0,
    provenance=("critic_model", "policy_tokenizer_fingerprint", "star_segment_size"),
    meaning="STAR: the guard's P(safe) of each response prefix ending a segment",
)
STAR_ENDS = RiskColumn(
    name="star_token_ends",
    producer="star",
    arrow_type=pa.list_(pa.int32()),
    granularity="segment",
    low=1,
    high=None,
    provenance=("policy_tokenizer_fingerprint", "star_segment_size"),
    meaning="STAR: where each segment ends, in policy response tokens (exclusive)",
    increasing=True,
)

# The precomputed reference (annotate.reference_logprobs): one entry per trained response
# token. Its provenance (`ReferenceProvenance`: model fingerprint, tokenisation, top-k,
# dtype) sits in the provenance's `extra` under "safekeel.reference"; the top-k width is
# per shard, so the declared item type is a plain list (writers may hand fixed-size lists).
REF_TARGET = RiskColumn(
    name="ref_target_logprob",
    producer="reference",
    arrow_type=pa.list_(pa.float32()),
    granularity="token",
    low=None,
    high=0.0,
    provenance=("policy_tokenizer_fingerprint",),
    meaning="the reference's log-prob of each trained response token",
)
REF_TOPK_IDS = RiskColumn(
    name="ref_topk_ids",
    producer="reference",
    arrow_type=pa.list_(pa.list_(pa.int32())),
    granularity="token",
    low=0,
    high=None,
    provenance=("policy_tokenizer_fingerprint",),
    meaning="the reference's top-k token ids at each trained response token",
)
REF_TOPK_LOGPROBS = RiskColumn(
    name="ref_topk_logprobs",
    producer="reference",
    arrow_type=pa.list_(pa.list_(pa.float32())),
    granularity="token",
    low=None,
    high=0.0,
    provenance=("policy_tokenizer_fingerprint",),
    meaning="the reference's log-probs of its top-k tokens at each trained response token",
)

# Canonical order: the order of the risk columns in a shard.
RISK_COLUMNS: tuple[RiskColumn, ...] = (
    CRITIC, PROBE, STAR_VALUES, STAR_ENDS, REF_TARGET, REF_TOPK_IDS, REF_TOPK_LOGPROBS,
)
BY_NAME: dict[str, RiskColumn] = {column.name: column for column in RISK_COLUMNS}
RISK_COLUMN_NAMES: tuple[str, ...] = tuple(BY_NAME)
EXAMPLE_COLUMNS: tuple[RiskColumn, ...] = tuple(
    c for c in RISK_COLUMNS if c.granularity == "example"
)
SEGMENT_COLUMNS: tuple[RiskColumn, ...] = tuple(
    c for c in RISK_COLUMNS if c.granularity == "segment"
)
TOKEN_COLUMNS: tuple[RiskColumn, ...] = tuple(c for c in RISK_COLUMNS if c.granularity == "token")
REFERENCE_PRODUCER = "reference"
REFERENCE_COLUMN_NAMES: tuple[str, ...] = tuple(
    c.name for c in RISK_COLUMNS if c.producer == REFERENCE_PRODUCER
)

CRITIC_COLUMN = CRITIC.name
PROBE_COLUMN = PROBE.name
STAR_VALUES_COLUMN = STAR_VALUES.name
STAR_ENDS_COLUMN = STAR_ENDS.name


def producer_columns(producer: str) -> tuple[RiskColumn, ...]:
    """The columns one annotator writes together, in canonical order."""
    return tuple(c for c in RISK_COLUMNS if c.producer == producer)


def column(name: str) -> RiskColumn:
    """The declaration of risk column `name`; ValueError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown risk column {name!r}; known risk columns: {', '.join(RISK_COLUMN_NAMES)}"
        ) from None


# The risk signals a weight policy can act on: each per-example column by its producer's
# name, and their elementwise max or mean.
COMBINED_SIGNALS: tuple[str, ...] = ("max", "mean")
RISK_SIGNALS: tuple[str, ...] = (*(c.producer for c in EXAMPLE_COLUMNS), *COMBINED_SIGNALS)


def signal_columns(signal: str) -> tuple[str, ...]:
    """The per-example columns a risk signal reads (all of them for max and mean)."""
    if signal in COMBINED_SIGNALS:
        return tuple(c.name for c in EXAMPLE_COLUMNS)
    for c in EXAMPLE_COLUMNS:
        if c.producer == signal:
            return (c.name,)
    raise ValueError(f"unknown risk signal {signal!r}; allowed: {', '.join(RISK_SIGNALS)}")
