"""Shard and manifest file names, the shard plan, and the manifest of finished shards.

Resuming and splitting (stage one):

* shard k always holds rows [k*S, (k+1)*S) of the corpus, so its content does not depend on
  which worker or which run produced it;
* worker i of n owns the shards with k % n == i (`plan_shards`) and keeps its own manifest
  `_manifest.worker-{i}-of-{n}.json`; `merge_manifests` joins them into `_manifest.json`;
* a rerun skips shards listed in the manifest and rewrites any other, so a crash between
  the rename and the manifest update only costs redoing that shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safekeel.data.files import atomic_write_text
from safekeel.data.shards.provenance import Provenance
from safekeel.data.shards.schema import SHARD_FORMAT_VERSION, ManifestError

MANIFEST_NAME = "_manifest.json"
SHARD_FILE_RE = re.compile(r"^shard-(\d+)\.parquet$")
WORKER_MANIFEST_RE = re.compile(r"^_manifest\.worker-(\d+)-of-(\d+)\.json$")


def shard_filename(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def manifest_filename(num_workers: int = 1, worker_index: int = 0) -> str:
    """`_manifest.json` for a single worker, `_manifest.worker-{i}-of-{n}.json` otherwise."""
    if num_workers == 1:
        return MANIFEST_NAME
    return f"_manifest.worker-{worker_index}-of-{num_workers}.json"




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
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
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
        if (m := WORKER_MANIFEST_RE.match(path.name))
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

