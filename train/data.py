"""Stream annotated shards into padded training micro-batches, split across processes.

Flow per epoch (`TrainingStream.iter_batches`):

1. The row groups of the whole shard set are put in a seeded order that depends on
   (seed, epoch) only, so every process computes the same order without talking.
2. Rank r of w takes the row groups at positions i with i % w == r: every row group, and so
   every row, goes to exactly one process per epoch. No other split may be applied on top
   (do not hand these batches to a DataLoader that Accelerate re-shards).
3. The rank's rows pass through a shuffle buffer seeded by (seed, epoch, rank), so rows of
   neighbouring row groups mix while memory stays bounded by one row group plus the buffer.
4. Each row is tokenised with the policy tokenizer. Rows that cannot be trained on
   (`TokenizationIssue`) are skipped and counted by reason in `issues`; rows whose
   response was cut are kept and counted in `truncated_examples`. Nothing is dropped silently.
5. With `group_by_length`, the examples are length-grouped before they are cut into
   micro-batches (`group_by_length`, below); otherwise they are cut in the buffer's order.
6. `collate` right-pads the examples of a micro-batch.

Length grouping (the idea of Hugging Face's `group_by_length`, done on a stream): a window
of `group_window` optimizer steps' worth of examples (`batch_size x accumulation_steps`
rows a step) is sorted by length and cut into step groups of that many rows; the full
groups are put in an order seeded by (seed, epoch, rank) and each group is cut into
micro-batches. Rows of like length share a micro-batch, so right padding costs little
(on the SST-2 mix at batch 8: 1.48x the real tokens in buffer order, about 1.01x grouped).
What is kept: every row of the rank exactly once per epoch; the same order for the same
seed (so a resumed run, which replays the stream up to its checkpoint, gets the same
remaining micro-batches); `batches_per_epoch` (only the very last group of an epoch can be
short, and it stays last, so the count is ceil(rows / batch_size) as before). The rows of
an optimizer step do not depend on how they are split into micro-batches: the same
`batch_size x accumulation_steps` gives the same step groups, which keeps accumulated and
single-batch runs comparable. A window holds at most `group_window` steps of tokenised rows.

Padding, not packing: packing would put several examples into one sequence, which breaks
two things this project relies on: per-example risk (adaptive_example, filter and
downweight weight whole examples) and the per-micro-batch decisions (the batch risk of
`adaptive`, skipping the reference forward when b = 0 for the whole micro-batch). Right
padding keeps one example per row; padded positions carry no label and no loss.

Equal batch counts across processes: in a multi-process loop every rank must run the same
number of forward/backward passes, or the gradient all-reduce waits forever. The row counts
of each rank's row groups are known from the Parquet footers, so every rank computes the
same `batches_per_epoch(epoch)` = ceil(max over ranks of rows / batch_size), and a rank that
runs out early (fewer rows, or rows skipped by tokenisation) yields empty batches: one
padding row without response tokens, which contributes a zero loss but still runs the
backward pass.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safekeel.data.risk_columns import (
    EXAMPLE_COLUMNS,
    REF_TARGET,
    RISK_COLUMN_NAMES,
    RISK_COLUMNS,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
)
from safekeel.data.shards import ID_COLUMN, MESSAGES_COLUMN, RowGroupRef, ShardReader
from safekeel.data.tokenization import (
    IGNORE_INDEX,
    TokenizationConfig,
    TokenizationIssue,
    tokenize_example,
)
from safekeel.train.objective import PrecomputedReference, stack_precomputed
from safekeel.train.weights import star_tokens_for_batch

# Every declared risk column can be streamed; `TrainingExample` has a field of the same name
# for each (a test holds them equal).
RISK_COLUMNS_READ: tuple[str, ...] = RISK_COLUMN_NAMES


class StreamConfigError(ValueError):
    """The stream was asked for something impossible (bad rank, batch size, column)."""


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised row and its risk annotations (None where the shard has no such column)."""

    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the response
    critic_p_unsafe: float | None = None
    probe_p_harmful: float | None = None
    star_v_safe: list[float] | None = None
    star_token_ends: list[int] | None = None
    # the precomputed reference (`--reference precomputed`): one entry per trained token
    ref_target_logprob: list[float] | None = None
    ref_topk_ids: list[list[int]] | None = None
    ref_topk_logprobs: list[list[float]] | None = None


def _precomputed_row(example: TrainingExample) -> PrecomputedReference:
    """One row's stored reference values as tensors (top-k [n, k]; k may be 0)."""
    target = torch.tensor(example.ref_target_logprob, dtype=torch.float32)
    if not example.ref_topk_ids or not example.ref_topk_ids[0]:  # no tokens, or top-0
        return PrecomputedReference(target)
    ids = torch.tensor(example.ref_topk_ids, dtype=torch.int64)
    logprobs = torch.tensor(example.ref_topk_logprobs, dtype=torch.float32)
    return PrecomputedReference(target, ids, logprobs)


@dataclass
class TrainingBatch:
    """A right-padded micro-batch.

    input_ids, attention_mask, labels: [B, T].
    response_mask: [B, T-1] bool, True where the logit at position t predicts a response
        token (labels[:, t+1]); i.e. the loss mask aligned to the shifted logits.
    target_ids: [B, T-1] the labels those logits predict (IGNORE_INDEX where not trained).
    critic_p_unsafe, probe_p_harmful: [B] float32 or None; star_v_safe_tokens: [B, T-1]
        STAR's P(safe) placed on the response positions, or None.
    reference: the precomputed reference's values of the N response positions in mask
        order (`train.objective.stack_precomputed`), or None when the rows carry none.
    ids: example ids, in row order ("" for a padding row).
    """

    ids: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    response_mask: Tensor
    target_ids: Tensor
    critic_p_unsafe: Tensor | None = None
    probe_p_harmful: Tensor | None = None
    star_v_safe_tokens: Tensor | None = None
    reference: PrecomputedReference | None = None

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def is_empty(self) -> bool:
        """True for a batch without any response token (a filler batch)."""
        return not bool(self.response_mask.any())

    def to(self, device: torch.device | str) -> TrainingBatch:
        moved: dict[str, Any] = {}
        for name in (f.name for f in fields(self) if f.name not in ("ids", "reference")):
            value = getattr(self, name)  # every tensor
            moved[name] = None if value is None else value.to(device)
        ref = self.reference
        if ref is not None:
            moved["reference"] = PrecomputedReference(*(
                None if t is None else t.to(device)
                for t in (ref.target_logprob, ref.topk_ids, ref.topk_logprobs)))
        return replace(self, **moved)


def collate(examples: Sequence[TrainingExample], pad_token_id: int) -> TrainingBatch:
    """Right-pad examples into a `TrainingBatch` (see the module docstring for why not pack)."""
    if not examples:
        raise StreamConfigError("collate needs at least one example")
    # At least 2 positions, so that the shifted view [B, T-1] is never empty.
    length = max(2, max(len(e.input_ids) for e in examples))
    rows = len(examples)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    target_ids = labels[:, 1:].clone()
    response_mask = target_ids != IGNORE_INDEX

    def per_example(name: str) -> Tensor | None:
        values = [getattr(e, name) for e in examples]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise StreamConfigError(f"column {name!r} is set for some examples but not others")
        return torch.tensor(values, dtype=torch.float32)

    star = None  # the one segment producer so far: STAR's values spread over the tokens
    v_rows = [getattr(e, STAR_VALUES_COLUMN) for e in examples]
    end_rows = [getattr(e, STAR_ENDS_COLUMN) for e in examples]
    if any(v is not None for v in v_rows):
        if any(v is None for v in v_rows) or any(e is None for e in end_rows):
            raise StreamConfigError("STAR columns are set for some examples but not others")
        star = star_tokens_for_batch(v_rows, end_rows, response_mask)
    reference = None
    ref_rows = [getattr(e, REF_TARGET.name) for e in examples]
    if any(r is not None for r in ref_rows):
        if any(r is None for r in ref_rows):
            raise StreamConfigError(
                "precomputed reference values are set for some examples but not others")
        # refuses rows whose stored token count differs from this tokenisation's
        reference = stack_precomputed([_precomputed_row(e) for e in examples], response_mask)
    return TrainingBatch(
        ids=[e.id for e in examples],
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        response_mask=response_mask,
        target_ids=target_ids,
        star_v_safe_tokens=star,
        reference=reference,
        **{column.name: per_example(column.name) for column in EXAMPLE_COLUMNS},
    )


def shuffle_buffer(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Approximate shuffle with a buffer of `size` items: yields each item exactly once."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        yield buffer[j]
        buffer[j] = item
    order = rng.permutation(len(buffer))
    for j in order:
        yield buffer[int(j)]


@dataclass
class TrainingStream:
    """The training rows of one process, epoch by epoch (see the module docstring).

    reader: a validated `ShardReader`; risk_columns: the risk columns to attach (those the
    weight policy needs; others are not read). All ranks must use the same seed, batch size
    and shard set.
    """

    reader: ShardReader
    tokenizer: Any
    tokenization: TokenizationConfig
    batch_size: int
    risk_columns: Sequence[str] = ()
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    buffer_size: int = 256
    group_by_length: bool = False
    accumulation_steps: int = 1  # micro-batches per optimizer step (length grouping's unit)
    group_window: int = 64  # optimizer steps' worth of rows sorted together
    issues: Counter[str] = field(default_factory=Counter)
    truncated_examples: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise StreamConfigError(
                f"rank must be in [0, world_size={self.world_size}), got {self.rank}"
            )
        if self.batch_size < 1:
            raise StreamConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.buffer_size < 1:
            raise StreamConfigError(f"buffer_size must be >= 1, got {self.buffer_size}")
        for name in ("accumulation_steps", "group_window"):
            if getattr(self, name) < 1:
                raise StreamConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [c for c in self.risk_columns if c not in RISK_COLUMNS_READ]
        if unknown:
            raise StreamConfigError(
                f"unknown risk column {unknown[0]!r}; known: {', '.join(RISK_COLUMNS_READ)}"
            )
        self.risk_columns = tuple(self.risk_columns)
        self._row_groups = self.reader.row_groups()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    # -- assignment

    def epoch_order(self, epoch: int) -> list[RowGroupRef]:
        """All row groups in this epoch's order; identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        return [self._row_groups[int(i)] for i in rng.permutation(len(self._row_groups))]

    def row_groups_for_rank(self, epoch: int, rank: int | None = None) -> list[RowGroupRef]:
        rank = self.rank if rank is None else rank
        return self.epoch_order(epoch)[rank :: self.world_size]

    def batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches every rank yields in `epoch` (the same on all ranks, from footers)."""
        most_rows = max(
            sum(ref.num_rows for ref in self.row_groups_for_rank(epoch, r))
            for r in range(self.world_size)
        )
        return math.ceil(most_rows / self.batch_size)

    # -- rows

    def _columns(self) -> list[str]:
        return [ID_COLUMN, MESSAGES_COLUMN, *self.risk_columns]

    def _raw_rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        for ref in self.row_groups_for_rank(epoch):
            yield from self.reader.read_row_group(ref, self._columns()).to_pylist()

    def _tokenise(self, row: dict[str, Any]) -> TrainingExample | None:
        tokenized = tokenize_example(self.tokenizer, row[MESSAGES_COLUMN], self.tokenization)
        if isinstance(tokenized, TokenizationIssue):
            self.issues[tokenized.reason] += 1
            return None
        if tokenized.truncated_tokens:
            self.truncated_examples += 1
        return TrainingExample(
            id=row[ID_COLUMN],
            input_ids=tokenized.input_ids,
            labels=tokenized.labels,
            **{name: row.get(name) for name in RISK_COLUMNS_READ},
        )

    def iter_examples(self, epoch: int) -> Iterator[TrainingExample]:
        """This rank's trainable examples of `epoch`, buffer-shuffled."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        for row in shuffle_buffer(self._raw_rows(epoch), self.buffer_size, rng):
            example = self._tokenise(row)
            if example is not None:
                yield example

    # -- batches

    def empty_batch(self) -> TrainingBatch:
        """A filler micro-batch: one padding row, no response token, zero loss."""
        filler = TrainingExample(
            id="",
            input_ids=[self.pad_token_id, self.pad_token_id],
            labels=[IGNORE_INDEX, IGNORE_INDEX],
            **{c.name: (0.0 if c.granularity == "example" else [])
               for c in RISK_COLUMNS if c.name in self.risk_columns},
        )
        batch = collate([filler], self.pad_token_id)
        # Attend to the padding so no attention row is fully masked (which can give NaN).
        batch.attention_mask.fill_(1)
        return batch

    def iter_batch_examples(self, epoch: int) -> Iterator[list[TrainingExample]]:
        """The examples of each non-empty micro-batch of `epoch`, in training order."""
        examples = self.iter_examples(epoch)
        if self.group_by_length:
            rng = np.random.default_rng([self.seed, epoch, self.rank, _GROUPING_STREAM])
            examples = group_by_length(
                examples, self.batch_size * self.accumulation_steps, self.group_window, rng)
        pending: list[TrainingExample] = []
        for example in examples:
            pending.append(example)
            if len(pending) == self.batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def iter_batches(self, epoch: int) -> Iterator[TrainingBatch]:
        """Exactly `batches_per_epoch(epoch)` micro-batches, topped up with empty ones."""
        expected = self.batches_per_epoch(epoch)
        produced = 0
        for examples in self.iter_batch_examples(epoch):
            yield collate(examples, self.pad_token_id)
            produced += 1
        for _ in range(expected - produced):
            yield self.empty_batch()


# Seeds the order of length-grouped step groups apart from the shuffle buffer's generator.
_GROUPING_STREAM = 1


def group_by_length(
    examples: Iterable[TrainingExample], group_size: int, window: int,
    rng: np.random.Generator,
) -> Iterator[TrainingExample]:
    """Yield every example once, ordered so that consecutive runs of `group_size` have
    like lengths (see "Length grouping" in the module docstring).

    Per window of `window * group_size` examples: sort by length (stable, so ties keep the
    input order), cut into groups of `group_size`, and yield the groups in an order drawn
    from `rng`. A short group (only the last window's last one can be) is yielded last, so
    group boundaries stay at multiples of `group_size` from the start of the stream.
    """
    if group_size < 1 or window < 1:
        raise StreamConfigError(f"group_size and window must be >= 1, got {group_size}, {window}")
    iterator = iter(examples)
    while chunk := list(itertools.islice(iterator, window * group_size)):
        chunk.sort(key=lambda e: len(e.input_ids))
        groups = [chunk[i:i + group_size] for i in range(0, len(chunk), group_size)]
        short = groups.pop() if len(groups[-1]) < group_size else None
        for k in rng.permutation(len(groups)):
            yield from groups[int(k)]
        if short is not None:
            yield from short
