"""The Arrow schema of a shard: fixed columns, the original corpus columns, the risk columns.

The risk columns, their types and which of them go together come from their declarations in
`safekeel.data.risk_columns`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa

from safekeel.data.risk_columns import (
    BY_NAME,
    RISK_COLUMN_NAMES,
    RISK_COLUMNS,
    producer_columns,
)

# Version of the shard layout and of the JSON stored in it; readers refuse newer versions.
SHARD_FORMAT_VERSION = 1

ID_COLUMN = "id"
MESSAGES_COLUMN = "messages"
MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

# Canonical order of the risk columns in a shard, with their Arrow types.
RISK_COLUMN_TYPES: dict[str, pa.DataType] = {c.name: c.arrow_type for c in RISK_COLUMNS}


class ShardError(ValueError):
    """A shard (set) is malformed or does not fit its use; the message says what and where."""

    def __init__(
        self,
        message: str,
        *,
        shard: str | None = None,
        column: str | None = None,
        row: int | None = None,
        row_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.shard = shard
        self.column = column
        self.row = row
        self.row_id = row_id


class ManifestError(ShardError):
    """A manifest is missing, unreadable, or disagrees with another manifest or with the run."""


def _partners_missing(present: set[str]) -> tuple[str, list[str]] | None:
    """(a present column, its producer's columns that are absent), for the first such column."""
    for name in RISK_COLUMN_NAMES:
        if name in present:
            group = [c.name for c in producer_columns(BY_NAME[name].producer)]
            absent = [c for c in group if c not in present]
            if absent:
                return name, absent
    return None


def shard_schema(original_fields: Sequence[pa.Field], risk_columns: Iterable[str]) -> pa.Schema:
    """The Arrow schema of a shard: id, messages, original columns, then risk columns.

    Risk columns come in their declared order and with their declared types; the columns of
    one producer only come together (STAR's segment values are meaningless without their
    token ends and vice versa).
    """
    risk = set(risk_columns)
    unknown = sorted(risk - set(RISK_COLUMN_NAMES))
    if unknown:
        raise ShardError(
            f"unknown risk column {unknown[0]!r}; known risk columns: "
            + ", ".join(RISK_COLUMN_NAMES)
        )
    split = _partners_missing(risk)
    if split is not None:
        name, absent = split
        producer = BY_NAME[name].producer
        raise ShardError(
            f"risk columns {sorted(risk)}: {name} and {', '.join(absent)} go together "
            f"(one {producer} annotation writes them all)"
        )
    reserved = {ID_COLUMN, MESSAGES_COLUMN, *RISK_COLUMN_NAMES}
    seen: set[str] = set()
    for f in original_fields:
        if f.name in reserved:
            raise ShardError(
                f"original column {f.name!r} collides with a column the shard format defines "
                f"({', '.join(sorted(reserved))}); rename it in the corpus column mapping"
            )
        if f.name in seen:
            raise ShardError(f"original column {f.name!r} appears twice")
        seen.add(f.name)
    fields = [
        pa.field(ID_COLUMN, pa.string(), nullable=False),
        pa.field(MESSAGES_COLUMN, pa.list_(MESSAGE_TYPE)),
        *original_fields,
        *(pa.field(c.name, c.arrow_type) for c in RISK_COLUMNS if c.name in risk),
    ]
    return pa.schema(fields)


def _same_type_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that tolerates string/large_string and list/large_list (polars writes large)."""
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(expected):
        # fixed-size lists too: the reference's top-k rows are written k wide
        is_list = (pa.types.is_list(actual) or pa.types.is_large_list(actual)
                   or pa.types.is_fixed_size_list(actual))
        return is_list and _same_type_kind(
            actual.value_type, expected.value_type
        )
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual) or actual.num_fields != expected.num_fields:
            return False
        return all(
            actual.field(i).name == expected.field(i).name
            and _same_type_kind(actual.field(i).type, expected.field(i).type)
            for i in range(expected.num_fields)
        )
    return actual.equals(expected)


def check_shard_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a schema whose id, messages or risk columns do not have the contract's types."""
    expected = {
        ID_COLUMN: pa.string(),
        MESSAGES_COLUMN: pa.list_(MESSAGE_TYPE),
    }
    for name in expected:
        if name not in schema.names:
            raise ShardError(f"{where}: column {name!r} is missing", shard=where, column=name)
    for name, expected_type in {**expected, **RISK_COLUMN_TYPES}.items():
        if name in schema.names:
            actual = schema.field(name).type
            if not _same_type_kind(actual, expected_type):
                raise ShardError(
                    f"{where}: column {name!r} has type {actual}, expected {expected_type}",
                    shard=where,
                    column=name,
                )
    split = _partners_missing(set(schema.names))
    if split is not None:
        name, absent = split
        raise ShardError(
            f"{where}: column {name!r} without its partner(s) {', '.join(map(repr, absent))}",
            shard=where,
            column=name,
        )


def risk_columns_of(schema: pa.Schema) -> set[str]:
    """The names of the declared risk columns a schema holds."""
    return set(schema.names) & set(RISK_COLUMN_NAMES)
