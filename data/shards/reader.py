"""Reading a finished shard set: validated from footers up front, values checked as they stream.

The reader trusts the manifest only: a shard file that is not listed (left by a crashed run)
is ignored with a warning; a listed file that is missing, unreadable, has another row count,
provenance or schema (or, with `verify_hashes`, another sha256) is an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from safekeel.data.files import file_sha256
from safekeel.data.shards.checks import check_batch_values
from safekeel.data.shards.manifest import (
    MANIFEST_NAME,
    SHARD_FILE_RE,
    WORKER_MANIFEST_RE,
    Manifest,
    ShardInfo,
    ShardPlan,
    merge_manifests,
    shard_filename,
)
from safekeel.data.shards.provenance import Provenance, parse_shard_metadata, read_shard_metadata
from safekeel.data.shards.schema import (
    ID_COLUMN,
    MESSAGES_COLUMN,
    ShardError,
    check_shard_schema,
    risk_columns_of,
)


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
        elif any(WORKER_MANIFEST_RE.match(p.name) for p in path.iterdir()):
            manifest = merge_manifests(path)
        else:
            files = sorted(p.name for p in path.iterdir() if SHARD_FILE_RE.match(p.name))
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
            p.name for p in directory.iterdir() if SHARD_FILE_RE.match(p.name) and p.name not in listed
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
            index, provenance = parse_shard_metadata(meta.metadata or {}, name)
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

