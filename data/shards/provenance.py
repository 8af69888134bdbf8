"""Provenance: how a shard set's risk columns were made, and the shard footer that carries it.

The provenance is stored twice: in every shard's Parquet key-value metadata under
`safekeel` (so a lone file still says how it was made) and in the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from safekeel.data.risk_columns import RISK_COLUMNS
from safekeel.data.shards.schema import SHARD_FORMAT_VERSION, ShardError

METADATA_KEY = b"safekeel"

# Which provenance fields a risk column cannot be trusted without (from its declaration).
PROVENANCE_NEEDED_BY: dict[str, tuple[str, ...]] = {c.name: c.provenance for c in RISK_COLUMNS}

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


# --------------------------------------------------------------------------- shard footer


def shard_metadata(index: int, provenance: Provenance) -> dict[bytes, bytes]:
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
    return parse_shard_metadata(kv, path.name)


def parse_shard_metadata(kv: Mapping[bytes, bytes], name: str) -> tuple[int, Provenance]:
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

