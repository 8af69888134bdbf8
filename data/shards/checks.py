"""Value checks of a shard batch: what the writer refuses to write and the reader to hand on.

The rules for the risk columns are read from their declarations (`safekeel.data.risk_columns`):
range, granularity, which segment columns go together, strictly increasing items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from safekeel.data.risk_columns import (
    EXAMPLE_COLUMNS,
    SEGMENT_COLUMNS,
    TOKEN_COLUMNS,
    RiskColumn,
    producer_columns,
)
from safekeel.data.shards.schema import ID_COLUMN, MESSAGES_COLUMN, ShardError


def _fail(
    shard: str, column: str, row_offset: int, ids: pa.Array | None, i: int, problem: str
) -> NoReturn:
    """Raise the ShardError for row `i` of a batch that starts at `row_offset` in its shard."""
    row = row_offset + i
    row_id = None
    if ids is not None and ids[i].is_valid:
        row_id = ids[i].as_py()
    where = f"row {row}" + (f" (id {row_id!r})" if row_id is not None else "")
    raise ShardError(
        f"{shard}: column {column!r}, {where}: {problem}",
        shard=shard,
        column=column,
        row=row,
        row_id=row_id,
    )


def _first(mask: pa.Array) -> int:
    """Index of the first True in a boolean array (nulls count as False), or -1."""
    return pc.index(pc.fill_null(mask, False), True).as_py()


def _check_range(values: pa.Array, spec: RiskColumn) -> tuple[int, str] | None:
    """First (position, problem) among values: null, NaN, or outside the declared range."""
    if values.null_count:
        return _first(pc.is_null(values)), "is null (every row needs a score)"
    if pa.types.is_floating(values.type):
        nan = _first(pc.is_nan(values))
        if nan >= 0:
            return nan, "is NaN"
    low = pc.less(values, spec.low) if spec.low is not None else None
    high = pc.greater(values, spec.high) if spec.high is not None else None
    outside = _first(low if high is None else high if low is None else pc.or_(low, high))
    if outside < 0:
        return None
    value = values[outside].as_py()
    if spec.low is not None and spec.high is not None:
        return outside, f"value {value!r} is outside {spec.range_text()}"
    bound = f"below {spec.low:g}" if spec.low is not None else f"above {spec.high:g}"
    return outside, f"value {value!r} is {bound}"


def check_batch_values(batch: pa.RecordBatch | pa.Table, shard: str, row_offset: int = 0) -> None:
    """Validate the id/messages and risk columns present in `batch`; raise ShardError on the first bad row.

    Rules: ids and messages are not null; per-example risk columns (`critic_p_unsafe`,
    `probe_p_harmful`) hold a value in their declared range ([0, 1]) on every row, not NaN
    and not null (a row without a score is an annotation bug, not "unscored"); segment
    columns (STAR) are not null or empty, the segment columns of one producer have equal
    lengths per row, and every item is in its declared range (P(safe) in [0, 1], token ends
    >= 1) and, where declared, strictly increasing within the row. Token columns (the
    precomputed reference) of one producer have equal lengths per row and are null together.
    """
    names = set(batch.schema.names)
    ids = batch.column(ID_COLUMN) if ID_COLUMN in names else None
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()

    def column(name: str) -> pa.Array:
        col = batch.column(name)
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col

    for name in (ID_COLUMN, MESSAGES_COLUMN):
        if name in names and batch.column(name).null_count:
            _fail(shard, name, row_offset, ids, _first(pc.is_null(column(name))), "is null")

    for spec in EXAMPLE_COLUMNS:
        if spec.name in names:
            bad = _check_range(column(spec.name), spec)
            if bad is not None:
                _fail(shard, spec.name, row_offset, ids, bad[0], bad[1])

    segments = [spec for spec in SEGMENT_COLUMNS if spec.name in names]
    # Null or empty lists are reported before anything that reads their items.
    for spec in sorted(segments, key=lambda s: s.name):
        lists = column(spec.name)
        if lists.null_count:
            _fail(shard, spec.name, row_offset, ids, _first(pc.is_null(lists)), "is null")
        empty = _first(pc.equal(pc.list_value_length(lists), 0))
        if empty >= 0:
            problem = "is empty (every response has a segment)"
            _fail(shard, spec.name, row_offset, ids, empty, problem)
    _check_equal_lengths(segments, column, shard, row_offset, ids)
    for spec in segments:
        _check_segment_items(spec, column(spec.name), shard, row_offset, ids)
    _check_token_columns([s for s in TOKEN_COLUMNS if s.name in names], column, shard,
                         row_offset, ids)


def _check_token_columns(
    tokens: list[RiskColumn],
    column: Callable[[str], pa.Array],
    shard: str,
    row_offset: int,
    ids: pa.Array | None,
) -> None:
    """Token columns of one producer: one item per response token each, so equal lengths
    per row, and null together (a row training skips). Values are not scanned: the
    reference's top-k is large and its provenance is checked where it is used."""
    if not tokens:
        return
    first = tokens[0]
    first_len = pc.list_value_length(column(first.name))
    for other in tokens[1:]:
        other_len = pc.list_value_length(column(other.name))
        nulls_differ = _first(pc.not_equal(pc.is_null(first_len), pc.is_null(other_len)))
        unequal = _first(pc.not_equal(first_len, other_len))
        bad = nulls_differ if nulls_differ >= 0 else unequal
        if bad >= 0:
            _fail(shard, first.name, row_offset, ids, bad,
                  f"has {first_len[bad].as_py()} token values but {other.name} has "
                  f"{other_len[bad].as_py()}")


def _check_equal_lengths(
    segments: list[RiskColumn],
    column: Callable[[str], pa.Array],
    shard: str,
    row_offset: int,
    ids: pa.Array | None,
) -> None:
    """The segment columns of one producer have one item per segment: equal lengths per row."""
    for spec in segments:
        partners = [p for p in producer_columns(spec.producer)
                    if p.granularity == "segment" and p in segments]
        if partners[0] is not spec:
            continue  # each group is checked once, from its first column
        first_len = pc.list_value_length(column(spec.name))
        for other in partners[1:]:
            other_len = pc.list_value_length(column(other.name))
            unequal = _first(pc.not_equal(first_len, other_len))
            if unequal >= 0:
                _fail(
                    shard,
                    spec.name,
                    row_offset,
                    ids,
                    unequal,
                    f"has {first_len[unequal].as_py()} segment values but {other.name} has "
                    f"{other_len[unequal].as_py()}",
                )


def _check_segment_items(
    spec: RiskColumn, lists: pa.Array, shard: str, row_offset: int, ids: pa.Array | None
) -> None:
    """Every item of a segment column in its declared range, and growing where declared."""
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy()
    bad = _check_range(flat, spec)
    if bad is not None:
        pos, problem = bad
        _fail(shard, spec.name, row_offset, ids, int(parents[pos]), f"segment {problem}")
    if spec.increasing:
        values = flat.to_numpy()
        # Consecutive items inside one row must grow; pairs across a row boundary do not count.
        same_row = parents[1:] == parents[:-1]
        not_growing = np.flatnonzero(same_row & (values[1:] <= values[:-1]))
        if not_growing.size:
            pos = int(not_growing[0]) + 1
            _fail(
                shard,
                spec.name,
                row_offset,
                ids,
                int(parents[pos]),
                f"segment values are not strictly increasing ({values[pos - 1]} then "
                f"{values[pos]})",
            )
