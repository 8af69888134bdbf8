"""Annotated Parquet shards: the hand-over between annotation (stage one) and training (stage two).

A shard set is a directory of `shard-00000.parquet`, `shard-00001.parquet`, ... plus a
manifest `_manifest.json` that lists the *finished* shards. Each shard holds the normalised
examples (`id`, `messages`), the original corpus columns carried through, and the risk
columns of the annotators that ran (DESIGN.md section 2). The provenance of the scores (guard
model, probe file, policy tokenizer, ...) is stored twice: in every shard's Parquet key-value
metadata under `safekeel` (so a lone file still says how it was made) and in the manifest.

File naming is chosen so that plain readers see only finished data: the manifest starts with
`_` and unfinished shards are written as hidden `.shard-*.parquet.tmp` files, both of which
pyarrow's dataset discovery (and so `pandas.read_parquet(dir)`) skips; `polars.scan_parquet`
over `dir/shard-*.parquet` matches neither. A shard becomes visible only through an atomic
rename once it is complete.

Resuming and splitting (stage one):

* shard k always holds rows [k*S, (k+1)*S) of the corpus, so its content does not depend on
  which worker or which run produced it;
* worker i of n owns the shards with k % n == i (`plan_shards`) and keeps its own manifest
  `_manifest.worker-{i}-of-{n}.json`; `merge_manifests` joins them into `_manifest.json`;
* a rerun skips shards listed in the manifest and rewrites any other, so a crash between
  the rename and the manifest update only costs redoing that shard.

The reader trusts the manifest only: a shard file that is not listed (left by a crashed run)
is ignored with a warning; a listed file that is missing, unreadable, has another row count,
provenance or schema (or, with `verify_hashes`, another sha256) is an error. Polars reads a
set with `pl.scan_parquet(dir / "shard-*.parquet")` (a bare directory path makes it refuse the
manifest file); pandas and pyarrow read the directory itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Version of the shard layout and of the JSON stored in it; readers refuse newer versions.
SHARD_FORMAT_VERSION = 1
METADATA_KEY = b"safekeel"
MANIFEST_NAME = "_manifest.json"
DEFAULT_ROW_GROUP_SIZE = 2048

ID_COLUMN = "id"
MESSAGES_COLUMN = "messages"
MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

CRITIC_COLUMN = "critic_p_unsafe"
PROBE_COLUMN = "probe_p_harmful"
STAR_VALUES_COLUMN = "star_v_safe"
STAR_ENDS_COLUMN = "star_token_ends"
# Canonical order of the risk columns in a shard, with their Arrow types.
RISK_COLUMN_TYPES: dict[str, pa.DataType] = {
    CRITIC_COLUMN: pa.float32(),
    PROBE_COLUMN: pa.float32(),
    STAR_VALUES_COLUMN: pa.list_(pa.float32()),
    STAR_ENDS_COLUMN: pa.list_(pa.int32()),
}
RISK_COLUMNS = frozenset(RISK_COLUMN_TYPES)
STAR_COLUMNS = frozenset({STAR_VALUES_COLUMN, STAR_ENDS_COLUMN})

_SHARD_RE = re.compile(r"^shard-(\d+)\.parquet$")
_WORKER_MANIFEST_RE = re.compile(r"^_manifest\.worker-(\d+)-of-(\d+)\.json$")


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


# --------------------------------------------------------------------------- naming


def shard_filename(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def manifest_filename(num_workers: int = 1, worker_index: int = 0) -> str:
    """`_manifest.json` for a single worker, `_manifest.worker-{i}-of-{n}.json` otherwise."""
    if num_workers == 1:
        return MANIFEST_NAME
    return f"_manifest.worker-{worker_index}-of-{num_workers}.json"


def _temporary_path(path: Path) -> Path:
    # Hidden and not ending in .parquet: no dataset reader or glob picks up a half-written file.
    return path.with_name(f".{path.name}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave the old file, not a partial temporary one
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- provenance


# Which provenance fields a risk column cannot be trusted without: STAR ends are positions in
# the policy tokenizer's tokens, so they mean nothing without its fingerprint.
PROVENANCE_NEEDED_BY: dict[str, tuple[str, ...]] = {
    CRITIC_COLUMN: ("critic_model",),
    PROBE_COLUMN: ("probe_file_sha256", "probe_layers"),
    STAR_VALUES_COLUMN: ("critic_model", "policy_tokenizer_fingerprint", "star_segment_size"),
    STAR_ENDS_COLUMN: ("policy_tokenizer_fingerprint", "star_segment_size"),
}


@dataclass
class Provenance:
    """How the risk columns were made. Fields of annotators that did not run stay None.

    Two shard sets with equal provenance are interchangeable; stage two compares
    `policy_tokenizer_fingerprint` with its own tokenizer because STAR token ends are
    positions in the policy tokenizer's response tokens.
    """

    policy_tokenizer: str | None = None
    policy_tokenizer_fingerprint: str | None = None
    critic_model: str | None = None
    critic_revision: str | None = None
    critic_template: str | None = None
    probe_file_sha256: str | None = None
    probe_layers: list[int] | None = None
    probe_pooling: str | None = None
    star_segment_size: int | None = None
    code_version: str | None = None
    config_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON has no tuples: keep a list so a round trip through metadata compares equal.
        if isinstance(self.probe_layers, tuple):
            self.probe_layers = list(self.probe_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "provenance") -> Provenance:
        if not isinstance(values, Mapping):
            raise ShardError(f"{where}: provenance must be a JSON object, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ShardError(
                f"{where}: unknown provenance field {unknown[0]!r}; known fields: "
                + ", ".join(sorted(known))
            )
        out = cls(**values)
        out._check_types(where)
        return out

    def _check_types(self, where: str) -> None:
        for name in (
            "policy_tokenizer",
            "policy_tokenizer_fingerprint",
            "critic_model",
            "critic_revision",
            "critic_template",
            "probe_file_sha256",
            "probe_pooling",
            "code_version",
            "config_hash",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ShardError(
                    f"{where}: provenance field {name!r} must be a string, got {value!r}"
                )
        if self.probe_layers is not None and not (
            isinstance(self.probe_layers, list)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in self.probe_layers)
        ):
            raise ShardError(
                f"{where}: provenance field 'probe_layers' must be a list of integers, "
                f"got {self.probe_layers!r}"
            )
        size = self.star_segment_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ShardError(
                f"{where}: provenance field 'star_segment_size' must be a positive integer, "
                f"got {size!r}"
            )
        if not isinstance(self.extra, dict):
            raise ShardError(f"{where}: provenance field 'extra' must be an object")

    def missing_for(self, risk_columns: Iterable[str]) -> list[str]:
        """Provenance fields that are None but needed to trust the given risk columns."""
        missing: list[str] = []
        for column in sorted(risk_columns):
            for name in PROVENANCE_NEEDED_BY.get(column, ()):
                if getattr(self, name) is None and name not in missing:
                    missing.append(name)
        return missing

    def normalised(self) -> Provenance:
        """A copy as it reads back from JSON (tuples become lists), for comparing with a file."""
        return Provenance.from_dict(json.loads(json.dumps(self.to_dict())))

    def differences(self, other: Provenance) -> list[str]:
        """`field: a != b` for every field that differs, to put in error messages."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what decides a tokenizer's token ids for a chat: vocabulary, specials, template.

    Hashes the vocabulary as a list of tokens sorted by id, the special-token map (name ->
    token) and the chat template. Runtime settings (padding side, truncation) are left out, so
    the value is stable across `save_pretrained` / `from_pretrained` of the same tokenizer.
    """
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    specials = {}
    for name, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items():
        specials[name] = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
    payload = {
        "vocab": [[token_id, token] for token, token_id in by_id],
        "special_tokens": specials,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- schema


def shard_schema(original_fields: Sequence[pa.Field], risk_columns: Iterable[str]) -> pa.Schema:
    """The Arrow schema of a shard: id, messages, original columns, then risk columns.

    Risk columns come in a fixed order; the two STAR columns only come together (segment
    values are meaningless without their token ends and vice versa).
    """
    risk = set(risk_columns)
    unknown = sorted(risk - RISK_COLUMNS)
    if unknown:
        raise ShardError(
            f"unknown risk column {unknown[0]!r}; known risk columns: "
            + ", ".join(RISK_COLUMN_TYPES)
        )
    if len(risk & STAR_COLUMNS) == 1:
        raise ShardError(
            f"risk columns {sorted(risk)}: {STAR_VALUES_COLUMN} and {STAR_ENDS_COLUMN} "
            "go together (one STAR annotation writes both)"
        )
    reserved = {ID_COLUMN, MESSAGES_COLUMN, *RISK_COLUMNS}
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
        *(pa.field(name, t) for name, t in RISK_COLUMN_TYPES.items() if name in risk),
    ]
    return pa.schema(fields)


def _same_type_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that tolerates string/large_string and list/large_list (polars writes large)."""
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _same_type_kind(
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
    present = set(schema.names) & STAR_COLUMNS
    if len(present) == 1:
        (only,) = present
        raise ShardError(
            f"{where}: column {only!r} without its partner {(STAR_COLUMNS - present).pop()!r}",
            shard=where,
            column=only,
        )


def risk_columns_of(schema: pa.Schema) -> set[str]:
    return set(schema.names) & RISK_COLUMNS


# --------------------------------------------------------------------------- value checks


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


def _check_probabilities(values: pa.Array) -> tuple[int, str] | None:
    """First (position, problem) among probability values: null, NaN, or outside [0, 1]."""
    if values.null_count:
        return _first(pc.is_null(values)), "is null (every row needs a score)"
    nan = _first(pc.is_nan(values))
    if nan >= 0:
        return nan, "is NaN"
    outside = _first(pc.or_(pc.less(values, 0), pc.greater(values, 1)))
    if outside >= 0:
        return outside, f"value {values[outside].as_py()!r} is outside [0, 1]"
    return None


def check_batch_values(batch: pa.RecordBatch | pa.Table, shard: str, row_offset: int = 0) -> None:
    """Validate the id/messages and risk columns present in `batch`; raise ShardError on the first bad row.

    Rules: ids and messages are not null; `critic_p_unsafe` and `probe_p_harmful` are in
    [0, 1], not NaN and not null (a row without a score is an annotation bug, not "unscored");
    STAR lists are not null or empty, have equal lengths, hold P(safe) values in [0, 1] and
    token ends that are >= 1 and strictly increasing.
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

    for name in (CRITIC_COLUMN, PROBE_COLUMN):
        if name in names:
            bad = _check_probabilities(column(name))
            if bad is not None:
                _fail(shard, name, row_offset, ids, bad[0], bad[1])

    star = names & STAR_COLUMNS
    if not star:
        return
    for name in sorted(star):
        lists = column(name)
        if lists.null_count:
            _fail(shard, name, row_offset, ids, _first(pc.is_null(lists)), "is null")
        lengths = pc.list_value_length(lists)
        empty = _first(pc.equal(lengths, 0))
        if empty >= 0:
            _fail(shard, name, row_offset, ids, empty, "is empty (every response has a segment)")
    if star == STAR_COLUMNS:
        v_len = pc.list_value_length(column(STAR_VALUES_COLUMN))
        e_len = pc.list_value_length(column(STAR_ENDS_COLUMN))
        unequal = _first(pc.not_equal(v_len, e_len))
        if unequal >= 0:
            _fail(
                shard,
                STAR_VALUES_COLUMN,
                row_offset,
                ids,
                unequal,
                f"has {v_len[unequal].as_py()} segment values but {STAR_ENDS_COLUMN} has "
                f"{e_len[unequal].as_py()} ends",
            )
    if STAR_VALUES_COLUMN in star:
        lists = column(STAR_VALUES_COLUMN)
        flat = pc.list_flatten(lists)
        bad = _check_probabilities(flat)
        if bad is not None:
            row = pc.list_parent_indices(lists)[bad[0]].as_py()
            _fail(shard, STAR_VALUES_COLUMN, row_offset, ids, row, "segment " + bad[1])
    if STAR_ENDS_COLUMN in star:
        lists = column(STAR_ENDS_COLUMN)
        flat = pc.list_flatten(lists)
        parents = pc.list_parent_indices(lists).to_numpy()
        if flat.null_count:
            pos = _first(pc.is_null(flat))
            _fail(shard, STAR_ENDS_COLUMN, row_offset, ids, int(parents[pos]), "holds a null end")
        ends = flat.to_numpy()
        below = np.flatnonzero(ends < 1)
        if below.size:
            pos = int(below[0])
            _fail(
                shard,
                STAR_ENDS_COLUMN,
                row_offset,
                ids,
                int(parents[pos]),
                f"token end {int(ends[pos])} is below 1",
            )
        # Consecutive ends inside one row must grow; pairs across a row boundary do not count.
        same_row = parents[1:] == parents[:-1]
        not_growing = np.flatnonzero(same_row & (ends[1:] <= ends[:-1]))
        if not_growing.size:
            pos = int(not_growing[0]) + 1
            _fail(
                shard,
                STAR_ENDS_COLUMN,
                row_offset,
                ids,
                int(parents[pos]),
                f"token ends are not strictly increasing ({int(ends[pos - 1])} then "
                f"{int(ends[pos])})",
            )


# --------------------------------------------------------------------------- shard metadata


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard as the manifest lists it."""

    index: int
    file: str
    num_rows: int
    sha256: str
    num_bytes: int
    first_id: str | None
    last_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> ShardInfo:
        try:
            info = cls(**values)
        except TypeError as err:
            raise ManifestError(f"{where}: malformed shard entry {dict(values)!r}: {err}") from None
        if not isinstance(info.index, int) or info.index < 0 or not isinstance(info.num_rows, int):
            raise ManifestError(f"{where}: malformed shard entry {dict(values)!r}")
        return info


def _shard_metadata(index: int, provenance: Provenance) -> dict[bytes, bytes]:
    value = {
        "schema_version": SHARD_FORMAT_VERSION,
        "shard_index": index,
        "provenance": provenance.to_dict(),
    }
    return {METADATA_KEY: json.dumps(value, sort_keys=True).encode("utf-8")}


def read_shard_metadata(path: str | Path) -> tuple[int, Provenance]:
    """(shard index, provenance) from a shard's key-value metadata; reads the footer only."""
    path = Path(path)
    try:
        kv = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ShardError(
            f"{path.name}: not a readable Parquet file: {err}", shard=path.name
        ) from None
    return _parse_shard_metadata(kv, path.name)


def _parse_shard_metadata(kv: Mapping[bytes, bytes], name: str) -> tuple[int, Provenance]:
    raw = kv.get(METADATA_KEY)
    if raw is None:
        raise ShardError(
            f"{name}: no provenance (key-value metadata {METADATA_KEY.decode()!r} is missing); "
            "not a safekeel shard or written by a tool that dropped the metadata",
            shard=name,
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ShardError(
            f"{name}: provenance metadata is not valid JSON: {err}", shard=name
        ) from None
    if not isinstance(value, dict):
        raise ShardError(f"{name}: provenance metadata must be a JSON object", shard=name)
    version = value.get("schema_version")
    if version != SHARD_FORMAT_VERSION:
        raise ShardError(
            f"{name}: shard format version {version!r}, this reader understands "
            f"{SHARD_FORMAT_VERSION}",
            shard=name,
        )
    index = value.get("shard_index")
    if not isinstance(index, int):
        raise ShardError(f"{name}: metadata has no integer 'shard_index'", shard=name)
    return index, Provenance.from_dict(value.get("provenance"), where=name)


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Write one shard through a hidden temporary file; `close()` renames it into place.

    Rows are buffered up to `row_group_size`, so every row group but the last has exactly
    that many rows and memory stays bounded by one row group. Values are checked as they
    arrive (`check_values`), so a finished shard never holds a score the reader would refuse.
    Used as a context manager, an exception discards the temporary file.
    """

    def __init__(
        self,
        out_dir: str | Path,
        index: int,
        schema: pa.Schema,
        provenance: Provenance,
        *,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        compression_level: int | None = None,
        check_values: bool = True,
    ) -> None:
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"shard index must be a non-negative integer, got {index!r}")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.out_dir = Path(out_dir)
        self.index = index
        self.path = self.out_dir / shard_filename(index)
        name = self.path.name
        check_shard_schema(schema, name)
        missing = provenance.missing_for(risk_columns_of(schema))
        if missing:
            raise ShardError(
                f"{name}: risk columns {sorted(risk_columns_of(schema))} need provenance "
                f"field(s) {', '.join(missing)}",
                shard=name,
            )
        self.schema = schema.with_metadata(
            {**(schema.metadata or {}), **_shard_metadata(index, provenance)}
        )
        self.provenance = provenance
        self.row_group_size = row_group_size
        self.check_values = check_values
        self.info: ShardInfo | None = None
        self._tmp = _temporary_path(self.path)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self._tmp, self.schema, compression="zstd", compression_level=compression_level
        )
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._rows = 0
        self._first_id: str | None = None
        self._last_id: str | None = None

    # -- input

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows given as dicts keyed by column name; keys outside the schema are refused."""
        allowed = set(self.schema.names)
        for i, row in enumerate(rows):
            extra = set(row) - allowed
            if extra:
                raise ShardError(
                    f"{self.path.name}: row {self._rows + i} has column(s) "
                    f"{sorted(extra)} that the shard schema does not define",
                    shard=self.path.name,
                    column=min(extra),
                    row=self._rows + i,
                )
        if rows:
            self.write_table(pa.Table.from_pylist(list(rows), schema=self.schema))

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append a RecordBatch or Table whose columns match the schema (order may differ)."""
        self.write_table(batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch]))

    def write_table(self, table: pa.Table) -> None:
        if self._writer is None:
            raise ShardError(f"{self.path.name}: writer is already closed", shard=self.path.name)
        table = self._conform(table)
        if table.num_rows == 0:
            return
        if self.check_values:
            check_batch_values(table, self.path.name, row_offset=self._rows)
        ids = table.column(ID_COLUMN)
        if self._first_id is None:
            self._first_id = ids[0].as_py()
        self._last_id = ids[-1].as_py()
        self._rows += table.num_rows
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_size:
            self._flush(final=False)

    def _conform(self, table: pa.Table) -> pa.Table:
        names = set(table.schema.names)
        missing = [n for n in self.schema.names if n not in names]
        extra = sorted(names - set(self.schema.names))
        if missing or extra:
            raise ShardError(
                f"{self.path.name}: batch columns do not match the shard schema"
                + (f"; missing {missing}" if missing else "")
                + (f"; not in schema {extra}" if extra else ""),
                shard=self.path.name,
                column=(missing or extra)[0],
            )
        table = table.select(self.schema.names)
        if not table.schema.equals(self.schema, check_metadata=False):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ShardError(
                    f"{self.path.name}: batch does not fit the shard schema: {err}",
                    shard=self.path.name,
                ) from None
        return table.replace_schema_metadata(self.schema.metadata)

    def _flush(self, final: bool) -> None:
        """Write whole row groups out of the buffer (and the remainder when `final`)."""
        assert self._writer is not None
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        keep = 0 if final else table.num_rows % self.row_group_size
        out = table.slice(0, table.num_rows - keep)
        if out.num_rows:
            self._writer.write_table(out, row_group_size=self.row_group_size)
        rest = table.slice(table.num_rows - keep)
        self._buffer = [rest] if keep else []
        self._buffered = keep

    # -- finishing

    def close(self) -> ShardInfo:
        """Finish the file, fsync it and rename it into place; returns what the manifest records."""
        if self.info is not None:
            return self.info
        if self._writer is None:
            raise ShardError(f"{self.path.name}: writer was aborted", shard=self.path.name)
        if self._buffer:
            self._flush(final=True)
        self._writer.close()
        self._writer = None
        with open(self._tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        info = ShardInfo(
            index=self.index,
            file=self.path.name,
            num_rows=self._rows,
            sha256=file_sha256(self._tmp),
            num_bytes=self._tmp.stat().st_size,
            first_id=self._first_id,
            last_id=self._last_id,
        )
        os.replace(self._tmp, self.path)
        _fsync_directory(self.out_dir)
        self.info = info
        return info

    def abort(self) -> None:
        """Drop the unfinished file; nothing of this shard remains visible."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._writer = None
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:  # e.g. a full disk while finishing: drop the partial file
                self.abort()
                raise
        else:
            self.abort()


# --------------------------------------------------------------------------- plan + manifest


@dataclass(frozen=True)
class ShardPlan:
    """How a corpus is cut into shards and which of them one worker owns.

    Shard k holds corpus rows [k*S, (k+1)*S); worker i of n owns the shards with
    k % n == i. With `total_rows` None (a corpus streamed without a known length) the
    worker's indices go on until the caller runs out of rows.
    """

    rows_per_shard: int
    total_rows: int | None = None
    num_workers: int = 1
    worker_index: int = 0

    def __post_init__(self) -> None:
        for name in ("rows_per_shard", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.worker_index, int) or not 0 <= self.worker_index < self.num_workers:
            raise ValueError(
                f"worker_index must be in [0, {self.num_workers}) for {self.num_workers} "
                f"worker(s), got {self.worker_index!r}"
            )
        if self.total_rows is not None and (
            not isinstance(self.total_rows, int) or self.total_rows < 0
        ):
            raise ValueError(
                f"total_rows must be a non-negative integer or None, got {self.total_rows!r}"
            )

    @property
    def total_shards(self) -> int | None:
        if self.total_rows is None:
            return None
        return math.ceil(self.total_rows / self.rows_per_shard)

    def owns(self, index: int) -> bool:
        return index % self.num_workers == self.worker_index

    def indices(self) -> Iterator[int]:
        """This worker's shard indices in increasing order (unbounded if the length is unknown)."""
        k = self.worker_index
        while self.total_shards is None or k < self.total_shards:
            yield k
            k += self.num_workers

    __iter__ = indices

    def pending(self, finished: Iterable[int]) -> Iterator[int]:
        """This worker's indices not yet finished: what a (re)run still has to write."""
        done = set(finished)
        return (k for k in self.indices() if k not in done)

    def row_range(self, index: int) -> tuple[int, int]:
        """Corpus rows [start, stop) of shard `index`."""
        start = index * self.rows_per_shard
        stop = start + self.rows_per_shard
        if self.total_rows is not None:
            if start >= self.total_rows:
                raise ValueError(
                    f"shard {index} starts at row {start}, past the corpus end ({self.total_rows})"
                )
            stop = min(stop, self.total_rows)
        return start, stop

    def whole(self) -> ShardPlan:
        """The same cut seen by a single worker: the plan of a merged manifest."""
        return ShardPlan(self.rows_per_shard, self.total_rows)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_shards": self.total_shards}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> ShardPlan:
        try:
            return cls(
                rows_per_shard=values["rows_per_shard"],
                total_rows=values.get("total_rows"),
                num_workers=values.get("num_workers", 1),
                worker_index=values.get("worker_index", 0),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{where}: malformed plan {dict(values)!r}: {err}") from None


def plan_shards(
    n_rows: int | None, rows_per_shard: int, num_workers: int = 1, worker_index: int = 0
) -> ShardPlan:
    """The plan for worker `worker_index` of `num_workers`; iterate it for the owned shard indices."""
    return ShardPlan(rows_per_shard, n_rows, num_workers, worker_index)


class Manifest:
    """The list of finished shards of one worker (or of a merged run), with plan and provenance.

    Written atomically on every change, so it always describes shards that are complete on disk.
    """

    def __init__(
        self,
        plan: ShardPlan,
        provenance: Provenance,
        shards: Iterable[ShardInfo] = (),
        path: str | Path | None = None,
    ) -> None:
        self.plan = plan
        self.provenance = provenance.normalised()
        self.shards: dict[int, ShardInfo] = {}
        self.path = Path(path) if path is not None else None
        for info in shards:
            if info.index in self.shards:
                raise ManifestError(f"{self._where}: shard {info.index} is listed twice")
            self.shards[info.index] = info

    @property
    def _where(self) -> str:
        return self.path.name if self.path is not None else "manifest"

    # -- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "safekeel-shard-manifest",
            "schema_version": SHARD_FORMAT_VERSION,
            "plan": self.plan.to_dict(),
            "provenance": self.provenance.to_dict(),
            "num_rows": self.num_rows,
            "shards": [self.shards[k].to_dict() for k in sorted(self.shards)],
        }

    def save(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("manifest has no path: pass one to save()")
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{path}: manifest does not exist") from None
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path.name}: manifest is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != "safekeel-shard-manifest":
            raise ManifestError(f"{path.name}: not a safekeel shard manifest")
        if data.get("schema_version") != SHARD_FORMAT_VERSION:
            raise ManifestError(
                f"{path.name}: manifest version {data.get('schema_version')!r}, this reader "
                f"understands {SHARD_FORMAT_VERSION}"
            )
        plan = ShardPlan.from_dict(data.get("plan") or {}, path.name)
        provenance = Provenance.from_dict(data.get("provenance") or {}, where=path.name)
        shards = [ShardInfo.from_dict(s, path.name) for s in data.get("shards") or []]
        return cls(plan, provenance, shards, path=path)

    @classmethod
    def open(cls, directory: str | Path, plan: ShardPlan, provenance: Provenance) -> Manifest:
        """Load this worker's manifest to resume, or start an empty one.

        A manifest left by a run with another plan or provenance is refused: mixing its
        shards with new ones would give a set whose rows disagree on how they were scored.
        """
        path = Path(directory) / manifest_filename(plan.num_workers, plan.worker_index)
        if not path.exists():
            return cls(plan, provenance, path=path)
        existing = cls.load(path)
        if existing.plan != plan:
            raise ManifestError(
                f"{path}: written for plan {existing.plan.to_dict()}, this run has "
                f"{plan.to_dict()}; use a new output directory or remove the old one"
            )
        provenance = provenance.normalised()
        if existing.provenance != provenance:
            raise ManifestError(
                f"{path}: written with different provenance ("
                + "; ".join(existing.provenance.differences(provenance))
                + "); use a new output directory or remove the old one"
            )
        return existing

    # -- content

    def record(self, info: ShardInfo) -> None:
        """Add a finished shard and rewrite the manifest file at once."""
        if not self.plan.owns(info.index):
            raise ManifestError(
                f"{self._where}: shard {info.index} belongs to worker "
                f"{info.index % self.plan.num_workers}, not {self.plan.worker_index}"
            )
        self.shards[info.index] = info
        if self.path is not None:
            self.save()

    def finished_indices(self) -> set[int]:
        return set(self.shards)

    def missing_indices(self) -> list[int] | None:
        """Owned shards not finished yet, or None when the corpus length is unknown."""
        if self.plan.total_rows is None:
            return None
        return list(self.plan.pending(self.shards))

    @property
    def num_rows(self) -> int:
        return sum(info.num_rows for info in self.shards.values())


def merge_manifests(directory: str | Path, *, write: bool = False) -> Manifest:
    """Join the per-worker manifests in `directory` into one (written to `_manifest.json` if `write`).

    Refuses, naming the files: a missing worker manifest, workers that disagree on the plan or
    the provenance, a shard listed by two workers, a shard listed by a worker that does not own it.
    """
    directory = Path(directory)
    workers = [
        (int(m[1]), int(m[2]), path)
        for path in sorted(directory.iterdir())
        if (m := _WORKER_MANIFEST_RE.match(path.name))
    ]
    if not workers:
        raise ManifestError(f"{directory}: no per-worker manifests (_manifest.worker-*-of-*.json)")
    counts = {n for _, n, _ in workers}
    if len(counts) > 1:
        raise ManifestError(
            f"{directory}: worker manifests disagree on the number of workers: "
            + ", ".join(path.name for _, _, path in workers)
        )
    (n,) = counts
    found = {i: path for i, _, path in workers}
    missing = [manifest_filename(n, i) for i in range(n) if i not in found]
    if missing:
        raise ManifestError(f"{directory}: missing worker manifest(s): {', '.join(missing)}")

    manifests = [Manifest.load(found[i]) for i in range(n)]
    first = manifests[0]
    owner: dict[int, str] = {}
    shards: list[ShardInfo] = []
    for i, manifest in enumerate(manifests):
        name = manifest._where
        if manifest.plan.whole() != first.plan.whole() or manifest.plan.num_workers != n:
            raise ManifestError(
                f"{first._where} and {name} disagree on the plan: "
                f"{first.plan.to_dict()} vs {manifest.plan.to_dict()}"
            )
        if manifest.plan.worker_index != i:
            raise ManifestError(f"{name}: records worker_index {manifest.plan.worker_index}")
        if manifest.provenance != first.provenance:
            raise ManifestError(
                f"{first._where} and {name} have different provenance: "
                + "; ".join(first.provenance.differences(manifest.provenance))
            )
        for index, info in sorted(manifest.shards.items()):
            if index in owner:
                raise ManifestError(
                    f"shard {index} ({info.file}) is listed by both {owner[index]} and {name}"
                )
            owner[index] = name
            shards.append(info)
    # Ownership is checked after overlaps so that a shard claimed twice is reported as such.
    for manifest in manifests:
        for index in sorted(manifest.shards):
            if not manifest.plan.owns(index):
                raise ManifestError(
                    f"{manifest._where}: lists shard {index}, which worker {index % n} of {n} owns"
                )
    merged = Manifest(first.plan.whole(), first.provenance, shards, path=directory / MANIFEST_NAME)
    if write:
        merged.save()
    return merged


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class RowGroupRef:
    """One row group of one shard: the unit a data loader can hand to a rank."""

    shard_index: int
    path: Path
    row_group: int
    num_rows: int
    first_row: int  # row within the shard


class ShardReader:
    """Validated, streaming access to a finished shard set.

    `path` is a shard directory, a manifest file, or a single shard file. At construction the
    reader checks, from footers only: every listed shard exists and is a shard of this
    format, its provenance equals the manifest's (and carries `expected_tokenizer_fingerprint`
    when given), its schema has the contract's types and is the same in every shard, it holds
    the `required_columns`, its row count matches the manifest, and (with `verify_hashes`) its
    sha256. Values are checked lazily on every batch read (see `check_batch_values`).
    `require_complete` refuses a set with unfinished shards when the corpus length is known.
    """

    def __init__(
        self,
        path: str | Path,
        required_columns: Iterable[str] = (),
        expected_tokenizer_fingerprint: str | None = None,
        verify_hashes: bool = False,
        *,
        consumer: str | None = None,
        require_complete: bool = True,
    ) -> None:
        self.required_columns = tuple(required_columns)
        self.consumer = consumer
        self.expected_tokenizer_fingerprint = expected_tokenizer_fingerprint
        path = Path(path)
        self.manifest = self._discover(path)
        self.directory = path if path.is_dir() else path.parent
        if not self.manifest.shards or self.manifest.num_rows == 0:
            raise ShardError(f"{path}: empty shard set (no finished shard holds a row)")
        missing = self.manifest.missing_indices() if require_complete else None
        if missing:
            names = ", ".join(shard_filename(k) for k in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ShardError(
                f"{path}: annotation is incomplete: {len(missing)} of "
                f"{self.manifest.plan.total_shards} planned shards are not finished ({names}"
                f"{more}); rerun annotation to finish them"
            )
        self.shards = [self.manifest.shards[k] for k in sorted(self.manifest.shards)]
        self.schema = self._validate_shards(verify_hashes)

    # -- discovery

    def _discover(self, path: Path) -> Manifest:
        if path.is_file() and path.suffix == ".parquet":
            return self._single_file_manifest(path)
        if path.is_file():
            manifest = Manifest.load(path)
            self._warn_unlisted(path.parent, manifest)
            return manifest
        if not path.is_dir():
            raise ShardError(f"{path}: no such shard directory or file")
        if (path / MANIFEST_NAME).exists():
            manifest = Manifest.load(path / MANIFEST_NAME)
        elif any(_WORKER_MANIFEST_RE.match(p.name) for p in path.iterdir()):
            manifest = merge_manifests(path)
        else:
            files = sorted(p.name for p in path.iterdir() if _SHARD_RE.match(p.name))
            if files:
                raise ShardError(
                    f"{path}: {len(files)} shard file(s) but no manifest; the reader only trusts "
                    "shards a manifest lists as finished (was annotation interrupted before its "
                    "first shard finished, or are per-worker manifests elsewhere?)"
                )
            raise ShardError(f"{path}: empty shard set (no manifest and no shards)")
        self._warn_unlisted(path, manifest)
        return manifest

    @staticmethod
    def _single_file_manifest(path: Path) -> Manifest:
        index, provenance = read_shard_metadata(path)
        meta = pq.read_metadata(path)
        info = ShardInfo(index, path.name, meta.num_rows, "", path.stat().st_size, None, None)
        return Manifest(ShardPlan(max(meta.num_rows, 1)), provenance, [info])

    @staticmethod
    def _warn_unlisted(directory: Path, manifest: Manifest) -> None:
        listed = {info.file for info in manifest.shards.values()}
        stray = sorted(
            p.name for p in directory.iterdir() if _SHARD_RE.match(p.name) and p.name not in listed
        )
        if stray:
            warnings.warn(
                f"{directory}: ignoring shard file(s) the manifest does not list as finished "
                f"(left by an interrupted run; a rerun rewrites them): {', '.join(stray)}",
                stacklevel=4,
            )

    # -- per-shard checks (footer only)

    def _validate_shards(self, verify_hashes: bool) -> pa.Schema:
        reference: pa.Schema | None = None
        reference_name = ""
        for info in self.shards:
            path = self.directory / info.file
            name = info.file
            if not path.exists():
                raise ShardError(f"{name}: listed in the manifest but missing on disk", shard=name)
            try:
                meta = pq.read_metadata(path)
            except (OSError, pa.ArrowException) as err:
                raise ShardError(
                    f"{name}: not a readable Parquet file: {err}", shard=name
                ) from None
            index, provenance = _parse_shard_metadata(meta.metadata or {}, name)
            if index != info.index:
                raise ShardError(
                    f"{name}: metadata says shard {index}, the manifest lists it as {info.index}",
                    shard=name,
                )
            if provenance != self.manifest.provenance:
                raise ShardError(
                    f"{name}: provenance differs from the manifest's ("
                    + "; ".join(provenance.differences(self.manifest.provenance))
                    + ")",
                    shard=name,
                )
            self._check_fingerprint(provenance, name)
            if meta.num_rows != info.num_rows:
                raise ShardError(
                    f"{name}: holds {meta.num_rows} rows, the manifest says {info.num_rows}",
                    shard=name,
                )
            if verify_hashes and info.sha256:
                actual = file_sha256(path)
                if actual != info.sha256:
                    raise ShardError(
                        f"{name}: sha256 {actual} does not match the manifest's {info.sha256} "
                        "(file changed or corrupted since it was finished)",
                        shard=name,
                    )
            schema = meta.schema.to_arrow_schema()
            check_shard_schema(schema, name)
            self._check_required(schema, name)
            if reference is None:
                reference, reference_name = schema, name
            elif not schema.equals(reference, check_metadata=False):
                raise ShardError(
                    f"{name}: schema differs from {reference_name}'s "
                    f"(columns {schema.names} vs {reference.names})",
                    shard=name,
                )
        assert reference is not None
        return reference.remove_metadata()

    def _check_fingerprint(self, provenance: Provenance, name: str) -> None:
        expected = self.expected_tokenizer_fingerprint
        if expected is None:
            return
        actual = provenance.policy_tokenizer_fingerprint
        if actual != expected:
            raise ShardError(
                f"{name}: provenance 'policy_tokenizer_fingerprint' is {actual!r} "
                f"(tokenizer {provenance.policy_tokenizer!r}), expected {expected!r}: the shards "
                "were annotated for another policy tokenizer; annotate again for this policy",
                shard=name,
                column="policy_tokenizer_fingerprint",
            )

    def _check_required(self, schema: pa.Schema, name: str) -> None:
        for column in self.required_columns:
            if column not in schema.names:
                needs = (
                    f"; {self.consumer} needs {', '.join(self.required_columns)}"
                    if self.consumer
                    else ""
                )
                raise ShardError(
                    f"{name}: column {column!r} is missing{needs} "
                    f"(columns present: {', '.join(schema.names)})",
                    shard=name,
                    column=column,
                )

    # -- metadata views

    @property
    def provenance(self) -> Provenance:
        return self.manifest.provenance

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def files(self) -> list[Path]:
        """Paths of the finished shards, e.g. for `polars.scan_parquet(reader.files)`."""
        return [self.directory / info.file for info in self.shards]

    def row_groups(self, shard_indices: Iterable[int] | None = None) -> list[RowGroupRef]:
        """Every row group of the (selected) shards, from footers only."""
        wanted = None if shard_indices is None else set(shard_indices)
        refs: list[RowGroupRef] = []
        for info in self.shards:
            if wanted is not None and info.index not in wanted:
                continue
            path = self.directory / info.file
            meta = pq.read_metadata(path)
            start = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                refs.append(RowGroupRef(info.index, path, g, rows, start))
                start += rows
        return refs

    # -- data

    def _columns_to_read(self, columns: Sequence[str] | None) -> tuple[list[str] | None, bool]:
        """Columns to read (always with `id`, to name rows in errors) and whether to drop `id`."""
        if columns is None:
            return None, False
        unknown = [c for c in columns if c not in self.schema.names]
        if unknown:
            raise ShardError(
                f"column {unknown[0]!r} is not in the shards (columns: {', '.join(self.schema.names)})",
                column=unknown[0],
            )
        wanted = list(columns)
        drop_id = ID_COLUMN not in wanted
        return ([ID_COLUMN, *wanted] if drop_id else wanted), drop_id

    def iter_batches(
        self,
        columns: Sequence[str] | None = None,
        batch_size: int = 1024,
        shard_indices: Iterable[int] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream validated RecordBatches of at most `batch_size` rows, shard by shard.

        Memory stays bounded by one row group plus one batch: files are read with
        `ParquetFile.iter_batches`, never whole.
        """
        read, drop_id = self._columns_to_read(columns)
        wanted = None if shard_indices is None else set(shard_indices)
        for info in self.shards:
            if wanted is not None and info.index not in wanted:
                continue
            offset = 0
            with pq.ParquetFile(self.directory / info.file) as handle:
                for batch in handle.iter_batches(batch_size=batch_size, columns=read):
                    check_batch_values(batch, info.file, row_offset=offset)
                    offset += batch.num_rows
                    yield batch.drop_columns([ID_COLUMN]) if drop_id else batch

    def read_row_group(self, ref: RowGroupRef, columns: Sequence[str] | None = None) -> pa.Table:
        """One validated row group (the unit to split across data-parallel ranks)."""
        read, drop_id = self._columns_to_read(columns)
        with pq.ParquetFile(ref.path) as handle:
            table = handle.read_row_group(ref.row_group, columns=read)
        check_batch_values(table, ref.path.name, row_offset=ref.first_row)
        return table.drop_columns([ID_COLUMN]) if drop_id else table

    def iter_rows(
        self, columns: Sequence[str] | None = None, batch_size: int = 1024
    ) -> Iterator[dict[str, Any]]:
        """Validated rows as dicts, streamed batch by batch."""
        for batch in self.iter_batches(columns=columns, batch_size=batch_size):
            yield from batch.to_pylist()

    def validate_values(self, batch_size: int = 8192) -> None:
        """Read every risk column once and raise on the first bad value: fail before training."""
        columns = sorted(risk_columns_of(self.schema)) + [MESSAGES_COLUMN]
        for _ in self.iter_batches(columns=columns, batch_size=batch_size):
            pass
