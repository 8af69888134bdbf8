"""Writing one shard: values checked as they arrive, made visible by an atomic rename.

Unfinished shards are written as hidden `.shard-*.parquet.tmp` files, which pyarrow's
dataset discovery (and so `pandas.read_parquet(dir)`) skips and `dir/shard-*.parquet` does
not match; a shard becomes visible only through an atomic rename once it is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import pyarrow as pa
import pyarrow.parquet as pq

from safekeel.data.files import file_sha256, fsync_directory, temporary_path
from safekeel.data.shards.checks import check_batch_values
from safekeel.data.shards.manifest import ShardInfo, shard_filename
from safekeel.data.shards.provenance import Provenance, shard_metadata
from safekeel.data.shards.schema import ID_COLUMN, ShardError, check_shard_schema, risk_columns_of

DEFAULT_ROW_GROUP_SIZE = 2048


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
            {**(schema.metadata or {}), **shard_metadata(index, provenance)}
        )
        self.provenance = provenance
        self.row_group_size = row_group_size
        self.check_values = check_values
        self.info: ShardInfo | None = None
        self._tmp = temporary_path(self.path)
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
        fsync_directory(self.out_dir)
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

