"""Annotated Parquet shards: the hand-over between annotation (stage one) and training (stage two).

A shard set is a directory of `shard-00000.parquet`, `shard-00001.parquet`, ... plus a
manifest `_manifest.json` that lists the *finished* shards. Each shard holds the normalised
examples (`id`, `messages`), the original corpus columns carried through, and the risk
columns of the annotators that ran (declared in data/risk_columns.py). The provenance of the scores (guard
model, probe file, policy tokenizer, ...) is stored twice: in every shard's Parquet key-value
metadata under `safekeel` (so a lone file still says how it was made) and in the manifest.

File naming is chosen so that plain readers see only finished data: the manifest starts with
`_` and unfinished shards are written as hidden `.shard-*.parquet.tmp` files, both of which
pyarrow's dataset discovery (and so `pandas.read_parquet(dir)`) skips; `polars.scan_parquet`
over `dir/shard-*.parquet` matches neither. Polars reads a set with
`pl.scan_parquet(dir / "shard-*.parquet")` (a bare directory path makes it refuse the
manifest file); pandas and pyarrow read the directory itself.

Modules: `schema` (columns, types, errors), `checks` (value rules), `provenance` (how the
scores were made, in every shard's footer), `manifest` (names, plan, finished shards,
merging per-worker manifests), `writer` and `reader`. The risk columns themselves are
declared in `safekeel.data.risk_columns`. Import the public names from this package.
"""

from safekeel.data.files import file_sha256
from safekeel.data.risk_columns import (
    CRITIC_COLUMN,
    PROBE_COLUMN,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
)
from safekeel.data.shards.checks import check_batch_values
from safekeel.data.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardPlan,
    manifest_filename,
    merge_manifests,
    plan_shards,
    shard_filename,
)
from safekeel.data.shards.provenance import (
    METADATA_KEY,
    PROVENANCE_NEEDED_BY,
    Provenance,
    read_shard_metadata,
    tokenizer_fingerprint,
)
from safekeel.data.shards.reader import RowGroupRef, ShardReader
from safekeel.data.shards.schema import (
    ID_COLUMN,
    MESSAGE_TYPE,
    MESSAGES_COLUMN,
    RISK_COLUMN_TYPES,
    SHARD_FORMAT_VERSION,
    ManifestError,
    ShardError,
    check_shard_schema,
    risk_columns_of,
    shard_schema,
)
from safekeel.data.shards.writer import DEFAULT_ROW_GROUP_SIZE, ShardWriter

__all__ = [
    "CRITIC_COLUMN",
    "DEFAULT_ROW_GROUP_SIZE",
    "ID_COLUMN",
    "MANIFEST_NAME",
    "MESSAGES_COLUMN",
    "MESSAGE_TYPE",
    "METADATA_KEY",
    "PROBE_COLUMN",
    "PROVENANCE_NEEDED_BY",
    "RISK_COLUMN_TYPES",
    "SHARD_FORMAT_VERSION",
    "STAR_ENDS_COLUMN",
    "STAR_VALUES_COLUMN",
    "Manifest",
    "ManifestError",
    "Provenance",
    "RowGroupRef",
    "ShardError",
    "ShardInfo",
    "ShardPlan",
    "ShardReader",
    "ShardWriter",
    "check_batch_values",
    "check_shard_schema",
    "file_sha256",
    "manifest_filename",
    "merge_manifests",
    "plan_shards",
    "read_shard_metadata",
    "risk_columns_of",
    "shard_filename",
    "shard_schema",
    "tokenizer_fingerprint",
]
