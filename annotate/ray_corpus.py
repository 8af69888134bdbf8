"""The corpus as a Ray Dataset, with the ids the local reader gives, however the read is split.

The local reader (`data.corpus.iter_indexed_examples`) numbers repeated conversations in
corpus order (hash, hash-2, hash-3, ...) and refuses an id column's duplicates across the
whole corpus, so one process has to see every row before it. Here that global view costs
16 bytes a row, not a read of the corpus per worker:

1. `scan_sources`: one Ray task per source normalises its rows and returns, for each valid
   row, an 8-byte digest of its base id (the id column's value, or the conversation's
   content hash) and, for each bad row, why it is bad;
2. `plan_ids` (on the driver): sorting the digests by (digest, corpus row) numbers every
   repeat and finds every duplicate id, exactly as the local reader does in one pass;
3. `read_dataset`: a Ray Data read, one task per source, gives each row of the shards still
   to do its final id from that plan (a suffix for repeats, a drop for bad rows).

So the ids are the local engine's ids, byte for byte: existing shard sets keep theirs, and a
run may be resumed by either engine. A source is read by one task (a corpus of many files
reads in parallel; the guard, not the read, is what needs many machines).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from safekeel.data.corpus import (
    CorpusConfig,
    CorpusError,
    LoadReport,
    Source,
    _digest,
    _example_id,
    _RowError,
    _stream_source,
    detect_shape,
    row_to_messages,
)
from safekeel.data.shards import ID_COLUMN, MESSAGES_COLUMN

ROW_COLUMN = "_row"  # global corpus row: orders a shard's rows and names its shard
ISSUE_COLUMN = "_tokenization_issue"  # why the trainer cannot use the row as it is, or null


@dataclass
class SourceScan:
    """What the first pass learnt about one source (rows counted from 0 within it)."""

    rows: int
    valid_rows: np.ndarray  # int64 rows whose example is valid
    digests: np.ndarray  # uint64 digest of each valid row's base id
    explicit: np.ndarray  # bool: the base id came from an id column
    bad: list[tuple[int, str | None, str]] = field(default_factory=list)  # (row, field, why)


def detect_corpus_shape(cfg: CorpusConfig, sources: list[Source]) -> str:
    """The shape the local reader would use: the configured one, or the first row's."""
    if cfg.shape != "auto":
        return cfg.shape
    for source in sources:
        for row in _stream_source(source, cfg):
            try:
                return detect_shape(row.keys())
            except ValueError as err:
                raise CorpusError(source.name, str(err)) from None
    return "prompt_response"  # an empty corpus: nothing will be read


def _id_column(cfg: CorpusConfig) -> str | None:
    return cfg.id_column or cfg.columns.get("id")


def _normalise(row: dict[str, Any], shape: str, cfg: CorpusConfig) -> tuple[list, str, bool]:
    """(messages, base id, whether the id came from a column); raises _RowError."""
    messages = row_to_messages(row, shape, cfg)
    column = _id_column(cfg) or ("id" if "id" in row else None)
    base = _example_id(row, messages, _id_column(cfg), taken=lambda _: False)
    return messages, base, column is not None


def scan_source(source: Source, cfg: CorpusConfig, shape: str) -> SourceScan:
    """First pass over one source (runs as a Ray task)."""
    valid, digests, explicit, bad = [], [], [], []
    rows = 0
    for row_index, row in enumerate(_stream_source(source, cfg)):
        if cfg.max_rows is not None and row_index >= cfg.max_rows:
            break  # no source contributes more rows than the whole corpus may have
        rows += 1
        try:
            _, base, from_column = _normalise(row, shape, cfg)
        except _RowError as err:
            bad.append((row_index, err.field, err.message))
            continue
        valid.append(row_index)
        digests.append(_digest(base))
        explicit.append(from_column)
    return SourceScan(rows, np.asarray(valid, dtype=np.int64),
                      np.asarray(digests, dtype=np.uint64), np.asarray(explicit, dtype=bool), bad)


def scan_sources(cfg: CorpusConfig, sources: list[Source], shape: str) -> list[SourceScan]:
    """`scan_source` on every source, in parallel on the cluster."""
    import ray

    task = ray.remote(num_cpus=1)(scan_source)
    return ray.get([task.remote(source, cfg, shape) for source in sources])


@dataclass
class SourcePlan:
    """What the read of one source needs: where it starts, what to drop, which ids to number."""

    start: int  # global row of its first row
    rows: int  # rows of it inside the corpus (max_rows applied)
    dropped: np.ndarray  # int64 rows (within the source) that are bad: never read
    repeat_rows: np.ndarray  # int64 rows whose content id is a repeat ...
    repeat_numbers: np.ndarray  # ... and its number: 2 for the second copy, ...


@dataclass
class IdPlan:
    total_rows: int
    sources: list[SourcePlan]

    def dropped_rows(self) -> np.ndarray:
        """Global rows that are bad (in skip mode: left out of the shards)."""
        parts = [p.start + p.dropped for p in self.sources]
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def plan_ids(
    cfg: CorpusConfig,
    sources: list[Source],
    scans: list[SourceScan],
    shape: str,
    pending_shards: frozenset[int],
    rows_per_shard: int,
    report: LoadReport,
) -> IdPlan:
    """Number repeats and find duplicate ids over the whole corpus, in corpus order.

    Bad rows in the `pending_shards` (the shards still to do) are
    raised (on_bad_row=error, the first in corpus order, as the local reader does) or counted
    in `report` by reason (skip); `report` also counts the rows read and kept there.
    """
    starts = np.cumsum([0] + [s.rows for s in scans])[:-1].astype(np.int64)
    total = int(sum(s.rows for s in scans))
    if cfg.max_rows is not None:
        total = min(total, cfg.max_rows)
    rows = np.concatenate([start + s.valid_rows for start, s in zip(starts, scans, strict=True)]
                          or [np.empty(0, np.int64)])
    digests = np.concatenate([s.digests for s in scans] or [np.empty(0, np.uint64)])
    explicit = np.concatenate([s.explicit for s in scans] or [np.empty(0, bool)])
    keep = rows < total
    rows, digests, explicit = rows[keep], digests[keep], explicit[keep]

    order = np.lexsort((rows, digests))
    sorted_digests = digests[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = sorted_digests[1:] != sorted_digests[:-1]
    positions = np.arange(len(order))
    group_first = np.maximum.accumulate(np.where(new_group, positions, 0))
    number = positions - group_first + 1  # 1 for the first copy in corpus order
    first_row = rows[order][group_first]
    repeat = number > 1
    is_explicit = explicit[order]
    duplicate_rows = rows[order][repeat & is_explicit]
    duplicate_firsts = first_row[repeat & is_explicit]
    repeat_rows = rows[order][repeat & ~is_explicit]
    repeat_numbers = number[repeat & ~is_explicit]

    # Every bad row, in corpus order: (global row, source, row in source, field, message).
    bad: list[tuple[int, int, int, str | None, str]] = []
    for i, (start, scan) in enumerate(zip(starts, scans, strict=True)):
        bad += [(int(start) + r, i, r, f, m) for r, f, m in scan.bad if start + r < total]
    for row, first in zip(duplicate_rows.tolist(), duplicate_firsts.tolist(), strict=True):
        i = int(np.searchsorted(starts, row, side="right")) - 1
        bad.append((row, i, row - int(starts[i]), None, f"@first {first}"))
    bad.sort()

    pending_bad = [b for b in bad if b[0] // rows_per_shard in pending_shards]
    for _, i, row, fld, message in pending_bad:
        if message.startswith("@first "):
            if cfg.on_bad_row == "skip" and len(report.examples) >= 20:
                report.skipped["duplicate id"] += 1  # its text would not be kept: no re-read
                continue
            message, fld = _duplicate_message(cfg, sources, starts, shape, i, row,
                                              int(message.split()[1]))
        err = CorpusError(sources[i].name, message, row=row, field=fld)
        if cfg.on_bad_row == "error":
            raise err
        report.skip(err)
    pending_rows = sum(min((k + 1) * rows_per_shard, total) - k * rows_per_shard
                       for k in pending_shards if k * rows_per_shard < total)
    report.rows_read += pending_rows
    report.rows_kept += pending_rows - len(pending_bad)

    plans = []
    bad_rows = np.asarray([b[0] for b in bad], dtype=np.int64)
    for i, (start, scan) in enumerate(zip(starts, scans, strict=True)):
        stop = min(int(start) + scan.rows, total)
        in_source = (repeat_rows >= start) & (repeat_rows < stop)
        dropped = bad_rows[(bad_rows >= start) & (bad_rows < stop)] - start
        plans.append(SourcePlan(int(start), max(stop - int(start), 0), dropped,
                                repeat_rows[in_source] - start, repeat_numbers[in_source]))
    return IdPlan(total, plans)


def _duplicate_message(cfg, sources, starts, shape, i, row, first) -> tuple[str, str]:
    """The local reader's message for a duplicate id (re-reads the one row to name its id)."""
    for index, raw in enumerate(_stream_source(sources[i], cfg)):
        if index == row:
            _, example_id, _ = _normalise(raw, shape, cfg)
            break
    first_source = int(np.searchsorted(starts, first, side="right")) - 1
    return (f"duplicate id: {example_id!r} was first seen at {sources[first_source].name}, "
            f"row {first - int(starts[first_source])}"), _id_column(cfg) or "id"


def read_source(
    batch: dict[str, np.ndarray],
    *,
    cfg: CorpusConfig,
    sources: list[Source],
    plans: list[SourcePlan],
    shape: str,
    schema: pa.Schema,
    rows_per_shard: int,
    pending_shards: frozenset[int],
    policy: str,
    tokenization: Any,
    trust_remote_code: bool,
    block_rows: int,
) -> Iterator[pa.Table]:
    """Ray Data read task: the kept rows of the pending shards of the sources in `batch`.

    Yields tables of `schema` (the shard's columns without risk scores, plus the global row
    and the row's tokenization issue) of up to `block_rows` rows.
    """
    from safekeel.annotate.run import tokenization_issue
    from safekeel.data.models import load_tokenizer

    tokenizer = load_tokenizer(policy, trust_remote_code=trust_remote_code)
    for i in batch["source"].tolist():
        plan = plans[i]
        dropped = set(plan.dropped.tolist())
        numbers = dict(zip(plan.repeat_rows.tolist(), plan.repeat_numbers.tolist(), strict=True))
        chunk: list[dict[str, Any]] = []
        for row_index, raw in enumerate(_stream_source(sources[i], cfg)):
            if row_index >= plan.rows:
                break
            global_row = plan.start + row_index
            if global_row // rows_per_shard not in pending_shards or row_index in dropped:
                continue
            messages, base, _ = _normalise(raw, shape, cfg)
            example = {k: v for k, v in raw.items() if k not in (ID_COLUMN, MESSAGES_COLUMN)}
            number = numbers.get(row_index)
            example[ID_COLUMN] = base if number is None else f"{base}-{number}"
            example[MESSAGES_COLUMN] = messages
            example[ISSUE_COLUMN] = tokenization_issue(tokenizer, example, tokenization)
            example[ROW_COLUMN] = global_row
            chunk.append(example)
            if len(chunk) >= block_rows:
                yield pa.Table.from_pylist(chunk, schema=schema)
                chunk = []
        if chunk:
            yield pa.Table.from_pylist(chunk, schema=schema)


def with_read_columns(schema: pa.Schema) -> pa.Schema:
    """A shard schema plus the two columns the Ray pipeline carries to the driver."""
    return schema.append(pa.field(ISSUE_COLUMN, pa.string())).append(
        pa.field(ROW_COLUMN, pa.int64()))
