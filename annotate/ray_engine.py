"""Stage one on a Ray cluster (`safekeel annotate --engine ray`): Ray Data schedules the work.

    corpus sources --(Ray Data read, one task per source)--> rows of the unfinished shards
      --(guard pool: critic + STAR, one engine per actor)--> + critic / STAR columns
      --(probe pool, one policy model per actor)--> + probe column
      --> the driver: rows gathered per shard, written by ShardWriter, recorded in the manifest

What stays as in the local engine: the shard layout (shard k holds corpus rows
[k*S, (k+1)*S)), the schema and provenance of every file, the ids (annotate.ray_corpus), the
scores (same annotators, built by `annotate.run.build_annotators` inside each actor), and
resume: a shard is listed in the manifest only once its file is complete, and a rerun
(by either engine) redoes exactly the shards the manifest does not list.

Why the driver writes: shards need all their rows in one place, and the rows are small next
to the guard's work (scores and the corpus's own text), so one writer keeps up with many GPUs
and the output needs no filesystem shared between machines. STAR's prefixes of a response
are scored inside the actor that got the row, so they share that engine's prefix cache.

Failures: Ray Data's defaults rerun a read task whose worker or node died and restart a
dead actor elsewhere, redoing its batches in flight (no retry limit), so a dead node costs
only its work in flight. If the driver dies, rerun the same command: finished shards
are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from safekeel.annotate.config import AnnotateConfig, RayConfig
from safekeel.annotate.ray_corpus import (
    ISSUE_COLUMN,
    ROW_COLUMN,
    detect_corpus_shape,
    plan_ids,
    read_source,
    scan_sources,
    with_read_columns,
)
from safekeel.data.config import save_resolved
from safekeel.data.corpus import resolve_sources
from safekeel.data.output_dir import prepare_output_dir
from safekeel.data.shards import (
    CRITIC_COLUMN,
    ID_COLUMN,
    MESSAGES_COLUMN,
    PROBE_COLUMN,
    RISK_COLUMN_TYPES,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
    Manifest,
    ManifestError,
    ShardWriter,
    manifest_filename,
    plan_shards,
    shard_schema,
)

PROVENANCE_COLUMN = {"guard": "_provenance_guard", "probe": "_provenance_probe"}


# --------------------------------------------------------------------------- the cluster


def connect(settings: RayConfig) -> bool:
    """Join the cluster (`address`, else RAY_ADDRESS) or start a local Ray (then True)."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=settings.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def guard_resources(cfg: AnnotateConfig) -> tuple[int, float]:
    """(actors, GPUs per actor) of the guard pool, defaults resolved against the cluster."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = cfg.ray.gpus_per_actor
    if gpus is None:
        gpus = float(cfg.critic.tensor_parallel_size) if cluster_gpus else 0.0
    actors = cfg.ray.actors
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus)) if gpus else 1
    return actors, gpus


# --------------------------------------------------------------------------- the actors


class ScoringActor:
    """One actor of a pool: the annotators `build_annotators` makes for one part of the config.

    part "guard": critic and STAR on one engine; part "probe": the probe. Each batch comes
    back with the score columns added; the first batch an actor returns also carries the
    provenance of its annotators, which the driver checks and records.
    """

    def __init__(self, cfg: AnnotateConfig, part: str) -> None:
        from safekeel.annotate.run import build_annotators
        from safekeel.data.models import load_tokenizer

        if part == "guard":
            cfg = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, path=""))
        else:
            cfg = dataclasses.replace(cfg, critic=dataclasses.replace(cfg.critic, model=""),
                                      star=dataclasses.replace(cfg.star, enabled=False))
        tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        self.annotators = build_annotators(cfg, tokenizer)
        provenance: dict[str, Any] = {}
        for annotator in self.annotators:
            provenance.update(annotator.provenance())
        self.provenance = json.dumps(provenance, sort_keys=True)
        self.column = PROVENANCE_COLUMN[part]
        self.sent_provenance = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        examples = batch.select([ID_COLUMN, MESSAGES_COLUMN]).to_pylist()
        for annotator in self.annotators:
            for name, values in annotator.annotate(examples).items():
                batch = batch.append_column(pa.field(name, RISK_COLUMN_TYPES[name]),
                                            pa.array(values, type=RISK_COLUMN_TYPES[name]))
        stamp = [None] * batch.num_rows
        if not self.sent_provenance and batch.num_rows:
            stamp[0], self.sent_provenance = self.provenance, True
        return batch.append_column(pa.field(self.column, pa.string()),
                                   pa.array(stamp, type=pa.string()))

    def __del__(self) -> None:
        for annotator in getattr(self, "annotators", []):
            annotator.close()


def risk_columns(cfg: AnnotateConfig) -> set[str]:
    columns = {CRITIC_COLUMN} if cfg.critic.enabled else set()
    if cfg.star.enabled:
        columns |= {STAR_VALUES_COLUMN, STAR_ENDS_COLUMN}
    if cfg.probe.enabled:
        columns.add(PROBE_COLUMN)
    return columns


def pools(cfg: AnnotateConfig) -> list[tuple[str, dict[str, Any]]]:
    """(part, map_batches arguments) of each actor pool the config needs, in pipeline order."""
    import ray.data

    out = []
    if cfg.critic.enabled:
        actors, gpus = guard_resources(cfg)
        out.append(("guard", {"compute": ray.data.ActorPoolStrategy(size=actors),
                              "num_gpus": gpus, "num_cpus": cfg.ray.cpus_per_actor}))
    if cfg.probe.enabled:
        out.append(("probe", {"compute": ray.data.ActorPoolStrategy(size=cfg.ray.probe_actors),
                              "num_gpus": cfg.ray.probe_gpus_per_actor,
                              "num_cpus": cfg.ray.cpus_per_actor}))
    return out


# --------------------------------------------------------------------------- the driver


def annotate_on_ray(cfg: AnnotateConfig):
    """`annotate.run.annotate` for engine=ray: same output, same resume, work on the cluster."""
    import ray

    from safekeel.annotate.run import (
        AnnotateResult,
        original_fields,
        record_run,
        refuse_another_corpus,
        run_provenance,
        score_summary,
        warn_degenerate,
    )
    from safekeel.data.models import load_tokenizer

    started = time.perf_counter()
    out = prepare_output_dir(cfg.output_dir)
    save_resolved(cfg, out / "config.worker-0-of-1.yaml")
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    base_provenance = run_provenance(cfg, tokenizer)
    refuse_another_corpus(out / manifest_filename(), base_provenance, cfg.corpus.path)
    columns = risk_columns(cfg)
    fields = original_fields(cfg)
    schema = shard_schema(fields, columns)
    read_schema = with_read_columns(shard_schema(fields, ()))

    started_ray = connect(cfg.ray)
    try:
        sources = resolve_sources(cfg.corpus)
        shape = detect_corpus_shape(cfg.corpus, sources)
        scans = scan_sources(cfg.corpus, sources, shape)
        total_rows = sum(scan.rows for scan in scans)
        if cfg.corpus.max_rows is not None:
            total_rows = min(total_rows, cfg.corpus.max_rows)
        plan = plan_shards(total_rows, cfg.rows_per_shard)
        finished = _finished_shards(out, plan)
        pending = frozenset(plan.pending(finished))
        result = AnnotateResult(out, shards_skipped=len(finished))
        ids = plan_ids(cfg.corpus, sources, scans, shape, pending, cfg.rows_per_shard,
                       result.load)
        expected = _rows_expected(plan, pending, ids.dropped_rows())
        writer = _ShardSink(cfg, out, plan, schema, base_provenance, expected, result,
                            parts=[part for part, _ in pools(cfg)])
        if any(expected.values()):
            dataset = _dataset(cfg, sources, ids, shape, read_schema, pending)
            writer.consume(dataset)
        writer.finish()
    finally:
        if started_ray:
            ray.shutdown()

    result.tokenization_issues = writer.issues
    result.scores = score_summary(out, columns, cfg)
    warn_degenerate(result.scores)
    result.seconds = time.perf_counter() - started
    record_run(out / "report.worker-0-of-1.json", result)
    return result


def _finished_shards(out: Path, plan) -> set[int]:
    """Shards an earlier run (of either engine) finished; its plan must be this run's."""
    path = out / manifest_filename()
    if not path.exists():
        return set()
    existing = Manifest.load(path)
    if existing.plan != plan:
        raise ManifestError(f"{path}: written for plan {existing.plan.to_dict()}, this run has "
                            f"{plan.to_dict()}; use a new output directory or remove the old one")
    return existing.finished_indices()


def _rows_expected(plan, pending: frozenset[int], dropped: np.ndarray) -> dict[int, int]:
    """Rows each pending shard will hold: its range less its bad rows."""
    expected = {}
    for k in pending:
        start, stop = plan.row_range(k)
        bad = int(np.searchsorted(dropped, stop) - np.searchsorted(dropped, start))
        expected[k] = stop - start - bad
    return expected


def _dataset(cfg: AnnotateConfig, sources, ids, shape, read_schema: pa.Schema, pending):
    """The pipeline: read the pending shards' rows, then each actor pool in turn."""
    import ray.data

    size = cfg.rows_per_shard
    wanted = [i for i, p in enumerate(ids.sources) if p.rows and any(
        k in pending for k in range(p.start // size, (p.start + p.rows - 1) // size + 1))]
    read_kwargs = {"cfg": cfg.corpus, "sources": sources, "plans": ids.sources, "shape": shape,
                   "schema": read_schema, "rows_per_shard": size, "pending_shards": pending,
                   "policy": cfg.policy, "tokenization": cfg.tokenization,
                   "trust_remote_code": cfg.trust_remote_code, "block_rows": cfg.ray.batch_size}
    dataset = ray.data.from_items([{"source": i} for i in wanted],
                                  override_num_blocks=max(len(wanted), 1))
    dataset = dataset.map_batches(read_source, batch_size=1, fn_kwargs=read_kwargs,
                                  batch_format="numpy", num_cpus=1)
    # Ray Data joins a task's outputs into blocks of up to 128 MiB and hands a block to one
    # actor whole: cut them to one actor batch, so rows spread over the pool and reach the
    # writer as they are scored.
    dataset = dataset.repartition(target_num_rows_per_block=cfg.ray.batch_size)
    for part, arguments in pools(cfg):
        dataset = dataset.map_batches(ScoringActor, fn_constructor_args=(cfg, part),
                                      batch_size=cfg.ray.batch_size, batch_format="pyarrow",
                                      udf_modifying_row_count=False, **arguments)
    return dataset


class _ShardSink:
    """Gathers scored rows per shard; a shard is written and recorded once all its rows are in.

    The manifest is opened when the provenance of every pool is known (it comes with each
    actor's first batch), and checked against an earlier run's, as the local engine does.
    """

    def __init__(self, cfg, out, plan, schema, base_provenance, expected, result, parts):
        self.cfg, self.out, self.plan, self.schema = cfg, out, plan, schema
        self.base_provenance, self.expected, self.result = base_provenance, expected, result
        self.parts = parts
        self.provenance_of: dict[str, str] = {}
        self.manifest: Manifest | None = None
        self.buffers: dict[int, list[pa.Table]] = defaultdict(list)
        self.counts: dict[int, int] = defaultdict(int)
        self.complete: list[int] = []  # shards with all their rows, waiting for provenance
        self.issues: dict[str, int] = {}
        self.progress = tqdm(total=sum(expected.values()), desc="annotate (ray)", unit="row",
                             disable=not any(expected.values()))

    def consume(self, dataset) -> None:
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                self._take(batch)
        finally:
            self.progress.close()

    def _take(self, batch: pa.Table) -> None:
        for part in self.parts:
            self._note_provenance(part, batch.column(PROVENANCE_COLUMN[part]))
        shards = batch.column(ROW_COLUMN).to_numpy() // self.cfg.rows_per_shard
        for k in np.unique(shards).tolist():
            if k not in self.expected:
                raise RuntimeError(f"row of shard {k}, which this run does not write")
            part = batch.filter(pa.array(shards == k))
            self.buffers[k].append(part)
            self.counts[k] += part.num_rows
            if self.counts[k] > self.expected[k]:
                raise RuntimeError(f"shard {k}: more rows than planned (a batch came twice)")
            if self.counts[k] == self.expected[k]:
                self.complete.append(k)
        self.progress.update(batch.num_rows)
        self._write_complete()

    def _note_provenance(self, part: str, column: pa.ChunkedArray) -> None:
        for value in pc.drop_null(column).unique().to_pylist():
            known = self.provenance_of.setdefault(part, value)
            if value != known:
                raise ManifestError(f"{part} actors disagree on provenance ({known} vs {value});"
                                    " are the nodes running the same models and code?")

    def _open_manifest(self) -> bool:
        if self.manifest is not None:
            return True
        if any(part not in self.provenance_of for part in self.parts):
            return False
        provenance = dataclasses.replace(self.base_provenance)
        for part in self.parts:
            for key, value in json.loads(self.provenance_of[part]).items():
                setattr(provenance, key, value)
        self.manifest = Manifest.open(self.out, self.plan, provenance)
        return True

    def _write_complete(self) -> None:
        if not self.complete or not self._open_manifest():
            return
        for k in self.complete:
            self._write(k)
        self.complete = []

    def _write(self, k: int) -> None:
        assert self.manifest is not None
        parts = self.buffers.pop(k, [])
        table = pa.concat_tables(parts) if parts else None
        if table is not None:
            table = table.sort_by(ROW_COLUMN)
            for reason in pc.drop_null(table.column(ISSUE_COLUMN)).to_pylist():
                self.issues[reason] = self.issues.get(reason, 0) + 1
            table = table.select(self.schema.names)
        with ShardWriter(self.out, k, self.schema, self.manifest.provenance,
                         row_group_size=self.cfg.row_group_size) as writer:
            if table is not None:
                writer.write_table(table)
        self.manifest.record(writer.info)
        self.result.shards_written += 1
        self.result.rows_written += table.num_rows if table is not None else 0
        del self.expected[k]

    def finish(self) -> None:
        """Write the shards left: those whose every row was bad (empty), after checks."""
        missing = {k: n - self.counts[k] for k, n in self.expected.items()
                   if self.counts[k] != n and k not in self.complete}
        if missing:
            raise RuntimeError(f"the pipeline ended with rows missing from shards {missing}")
        self.complete = sorted(set(self.complete) | set(self.expected))
        if self.complete and not self._open_manifest():
            self._provenance_without_rows()
        self._write_complete()

    def _provenance_without_rows(self) -> None:
        """No row was scored (every pending row was bad): build each pool's annotators once
        on the cluster, only to learn their provenance for the empty shards."""
        import ray

        @ray.remote(max_calls=1)
        def describe(cfg, part):
            return ScoringActor(cfg, part).provenance

        for part, arguments in pools(self.cfg):
            options = {"num_gpus": arguments["num_gpus"], "num_cpus": arguments["num_cpus"]}
            self.provenance_of[part] = ray.get(describe.options(**options).remote(self.cfg, part))
        self._open_manifest()
