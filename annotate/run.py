"""Stage one's driver: corpus in, annotated Parquet shards + manifest + report out.

The corpus is cut into shards of `rows_per_shard` consecutive rows; shard k always holds
rows [k*S, (k+1)*S), whoever writes it. One pass over the corpus feeds this worker's
unfinished shards in order; each shard is scored, written through a temporary file, renamed
into place and only then recorded in the manifest. A rerun after a crash skips the
recorded shards and redoes the rest, so nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from tqdm.auto import tqdm

from safekeel.annotate.config import AnnotateConfig
from safekeel.data.config import config_hash, save_resolved
from safekeel.data.corpus import (
    LoadReport,
    check_labels,
    corpus_fingerprint,
    count_rows,
    iter_examples,
    iter_indexed_examples,
)
from safekeel.data.files import atomic_write_text
from safekeel.data.output_dir import guards_output_dir, prepare_output_dir
from safekeel.data.risk_columns import column as risk_column
from safekeel.data.shards import (
    ID_COLUMN,
    MESSAGES_COLUMN,
    Manifest,
    ManifestError,
    Provenance,
    ShardWriter,
    manifest_filename,
    merge_manifests,
    plan_shards,
    shard_schema,
    tokenizer_fingerprint,
)
from safekeel.data.tokenization import TokenizationIssue, tokenize_example

log = logging.getLogger(__name__)

SCHEMA_SAMPLE_ROWS = 1000  # rows read to infer the types of the original columns


class Annotator(Protocol):
    """One producer of shard columns (critic, STAR, probe, precomputed reference)."""

    columns: tuple[str, ...]

    def provenance(self) -> dict[str, Any]: ...

    def annotate(self, examples: list[dict[str, Any]]) -> dict[str, list[Any]]: ...

    def close(self) -> None: ...


@dataclass
class AnnotateResult:
    output_dir: Path
    shards_written: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    rows_written: int = 0
    seconds: float = 0.0
    load: LoadReport = field(default_factory=LoadReport)
    tokenization_issues: dict[str, int] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # over every finished shard

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "shards_written": self.shards_written,
            "shards_skipped_as_finished": self.shards_skipped,
            "rows_written": self.rows_written,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_written / self.seconds, 2) if self.seconds else None,
            "corpus": self.load.to_dict(),
            "tokenization_issues": self.tokenization_issues,
            "scores": self.scores,
        }


def code_version() -> str:
    try:
        return metadata.version("safekeel")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_annotators(cfg: AnnotateConfig, tokenizer: Any) -> list[Annotator]:
    """The risk scorers this config asks for, sharing one guard engine."""
    annotators: list[Annotator] = []
    if cfg.probe.enabled:
        from safekeel.annotate.probe_stage import ProbeAnnotator

        annotators.append(ProbeAnnotator(cfg.probe, cfg.policy, cfg.trust_remote_code,
                                         max_prompt_tokens=cfg.tokenization.max_length))
    if cfg.reference.enabled:
        from safekeel.annotate.reference_stage import ReferenceAnnotator

        annotators.append(ReferenceAnnotator(cfg.reference, cfg.policy, tokenizer,
                                             cfg.tokenization, cfg.trust_remote_code))
    if not cfg.critic.enabled:
        return annotators
    from safekeel.annotate.star import StarAnnotator
    from safekeel.data.guard.critic import make_critic

    # One settings object for the critic and STAR; the engine module turns prefix caching on
    # for an engine that also scores STAR's prefixes.
    critic = make_critic(cfg.critic, star=cfg.star.enabled)
    annotators.append(critic)
    if cfg.star.enabled:
        annotators.append(StarAnnotator(critic, tokenizer, cfg.star.segment_tokens,
                                        cfg.tokenization.mask_method, critic.provenance(),
                                        max_length=cfg.tokenization.max_length))
    return annotators


def original_fields(cfg: AnnotateConfig) -> list[pa.Field]:
    """Arrow types of the corpus's own columns, inferred from its first rows.

    Inferred from the start of the corpus, not from the rows this run happens to write, so
    every shard of every worker and every rerun gets the same schema.
    """
    sample = [
        {k: v for k, v in ex.items() if k not in (ID_COLUMN, MESSAGES_COLUMN)}
        for ex in itertools.islice(iter_examples(cfg.corpus), SCHEMA_SAMPLE_ROWS)
    ]
    if not sample:
        return []
    # rows are read as the file holds them, so a column may be absent from some: take the
    # union of the columns (a struct array infers it; a table would take the first row's)
    return list(pa.array(sample).type)


def scoring_config_hash(cfg: AnnotateConfig) -> str:
    """The config hash of the provenance: what decides the scores, not where they go, who
    wrote which part, or on which engine (so either engine can resume the other's run)."""
    values = dataclasses.asdict(
        dataclasses.replace(cfg, output_dir="", num_workers=1, worker_index=0)
    )
    for engine_only in ("engine", "ray"):  # left out: hashes from before they existed hold
        values.pop(engine_only)
    for report_only in ("label_column", "label_positive", "label_negative"):
        values["corpus"].pop(report_only)  # the report reads them; the scores do not
    # the kernel the reference ran is in the provenance (resolved: auto and eager are one
    # on a CPU, and vLLM ignores the option), so a rerun with another one is refused there
    values["reference"].pop("attn_implementation")
    return config_hash(values)


@guards_output_dir
def annotate(cfg: AnnotateConfig) -> AnnotateResult:
    """Annotate this worker's part of the corpus; resumable; returns what it did."""
    check_labels(cfg.corpus)  # before any model loads: a bad label stops the run at once
    if cfg.engine == "ray":
        from safekeel.annotate.ray_engine import annotate_on_ray

        return annotate_on_ray(cfg)
    from safekeel.data.models import load_tokenizer

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    prepare_output_dir(out)
    save_resolved(cfg, out / f"config.worker-{cfg.worker_index}-of-{cfg.num_workers}.yaml")

    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    annotators = build_annotators(cfg, tokenizer)
    provenance = run_provenance(cfg, tokenizer)
    for annotator in annotators:
        for key, value in annotator.provenance().items():
            if key == "extra":  # annotators add their own entries
                provenance.extra.update(value)
            else:
                setattr(provenance, key, value)

    total_rows = count_rows(cfg.corpus)
    plan = plan_shards(total_rows, cfg.rows_per_shard, cfg.num_workers, cfg.worker_index)
    refuse_another_corpus(out / manifest_filename(cfg.num_workers, cfg.worker_index),
                          provenance, cfg.corpus.path)
    manifest = Manifest.open(out, plan, provenance)
    pending = set(plan.pending(manifest.finished_indices()))
    result = AnnotateResult(out, shards_skipped=len(manifest.finished_indices()))
    schema = shard_schema(
        original_fields(cfg), {c for a in annotators for c in a.columns}
    )

    rows_to_do = sum(_rows_in(plan, k) for k in pending)
    progress = tqdm(total=rows_to_do, desc="annotate", unit="row", disable=rows_to_do == 0)
    issues: dict[str, int] = {}
    try:
        current: int | None = None
        batch: list[dict[str, Any]] = []
        stream = iter_indexed_examples(
            cfg.corpus, result.load, row_filter=lambda i: i // cfg.rows_per_shard in pending
        )
        for index, example in stream:
            shard = index // cfg.rows_per_shard
            if current is not None and shard != current:
                _finish_shard(cfg, current, batch, schema, provenance, annotators, manifest,
                              result)
                progress.update(result.load.rows_read - progress.n)
                batch = []
            current = shard
            _count_tokenization_issue(tokenizer, example, cfg, issues)
            batch.append(example)
        if current is not None:
            _finish_shard(cfg, current, batch, schema, provenance, annotators, manifest, result)
            progress.update(result.load.rows_read - progress.n)
        # Shards whose every row was skipped as bad still count as done (an empty shard).
        for k in sorted(set(plan.pending(manifest.finished_indices()))):
            _finish_shard(cfg, k, [], schema, provenance, annotators, manifest, result)
    finally:
        progress.close()
        for annotator in annotators:
            annotator.close()

    if cfg.num_workers > 1 and _all_workers_done(out, cfg.num_workers):
        merge_manifests(out, write=True)
    result.tokenization_issues = issues
    result.scores = score_summary(out, {c for a in annotators for c in a.columns}, cfg)
    warn_degenerate(result.scores)
    result.seconds = time.perf_counter() - started
    record_run(out / f"report.worker-{cfg.worker_index}-of-{cfg.num_workers}.json", result)
    return result


def run_provenance(cfg: AnnotateConfig, tokenizer: Any) -> Provenance:
    """What every shard of this run records before the scorers add theirs (either engine)."""
    provenance = Provenance(
        policy_tokenizer=cfg.policy,
        policy_tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        code_version=code_version(),
        config_hash=scoring_config_hash(cfg),
    )
    # Shards of one version of the corpus are never continued from another at the same path.
    provenance.extra["corpus_sha256"] = corpus_fingerprint(cfg.corpus)
    return provenance


def record_run(report_path: Path, result: AnnotateResult) -> None:
    """Append this run to the report and print its summary.

    One entry per run, so the report of a resumed annotation still shows the first attempt.
    """
    runs = json.loads(report_path.read_text())["runs"] if report_path.exists() else []
    # atomic: a kill keeps the old report whole
    atomic_write_text(report_path, json.dumps({"runs": [*runs, result.to_dict()]}, indent=2) + "\n")
    log.info("annotated %d rows into %s", result.rows_written, result.output_dir)
    print(_summary(result))


def refuse_another_corpus(manifest_path: Path, provenance: Provenance, corpus: str) -> None:
    """Say plainly when the shards on disk came from other corpus content (the manifest's
    generic provenance check would refuse it too, but as an opaque `extra` difference)."""
    if not manifest_path.exists():
        return
    before = Manifest.load(manifest_path).provenance.extra.get("corpus_sha256")
    now = provenance.extra["corpus_sha256"]
    if before is None:
        raise ManifestError(
            f"{manifest_path}: written without a record of the corpus content (an older "
            "safekeel), so a resume cannot tell whether the corpus changed; use a new "
            "output_dir, or remove the old one to start again"
        )
    if before != now:
        raise ManifestError(
            f"{manifest_path}: its shards were written from other content of the corpus "
            f"{corpus} (sha256 {str(before)[:12]}..., now {now[:12]}...); resuming would mix "
            "the two. Use a new output_dir, or remove the old one to start again"
        )


def _rows_in(plan, index: int) -> int:
    start, stop = plan.row_range(index)
    return stop - start


def _count_tokenization_issue(tokenizer, example, cfg: AnnotateConfig, issues: dict) -> None:
    """Rows the trainer will not be able to learn from are counted here, early, by reason."""
    reason = tokenization_issue(tokenizer, example, cfg.tokenization)
    if reason is not None:
        issues[reason] = issues.get(reason, 0) + 1


def tokenization_issue(tokenizer, example, tokenization) -> str | None:
    """Why the trainer cannot use this row as it is (refused or truncated), or None."""
    if example[MESSAGES_COLUMN][-1]["role"] != "assistant":
        return None
    tokenized = tokenize_example(tokenizer, example[MESSAGES_COLUMN], tokenization)
    if isinstance(tokenized, TokenizationIssue):
        return tokenized.reason
    return "response_truncated" if tokenized.truncated_tokens else None


def _finish_shard(cfg, index, examples, schema, provenance, annotators, manifest, result) -> None:
    scores: dict[str, list[Any]] = {}
    for annotator in annotators:
        scores.update(annotator.annotate(examples))
    rows = [dict(example) for example in examples]
    for column, values in scores.items():
        for row, value in zip(rows, values, strict=True):
            row[column] = value
    with ShardWriter(cfg.output_dir, index, schema, provenance,
                     row_group_size=cfg.row_group_size) as writer:
        writer.write_rows(rows)
    manifest.record(writer.info)
    result.shards_written += 1
    result.rows_written += len(rows)


def _all_workers_done(out: Path, num_workers: int) -> bool:
    for i in range(num_workers):
        path = out / manifest_filename(num_workers, i)
        if not path.exists() or Manifest.load(path).missing_indices():
            return False
    return True


HISTOGRAM_BINS = 10
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
# A scorer is degenerate on a corpus of at least this many rows when it flags none or all
# of them, or its scores span less than NEAR_CONSTANT: a risk-weighted training run then
# sees one constant weight (adaptive silently becomes constant KL).
DEGENERATE_MIN_ROWS = 100
NEAR_CONSTANT = 0.01
CRITIC_THRESHOLD = 0.5  # P(unsafe) >= 0.5: the guard's own decision (evaluate's default)


class DegenerateScoresWarning(UserWarning):
    """A risk scorer that tells the rows of this corpus apart hardly or not at all."""


def score_thresholds(cfg: AnnotateConfig) -> dict[str, float]:
    """Each risk column's decision threshold on its row risk: the critic's 0.5, the probe's
    own (probe.json), STAR's 0.5 on 1 - min P(safe)."""
    from safekeel.data.risk_columns import CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN

    thresholds = {CRITIC_COLUMN: CRITIC_THRESHOLD, STAR_VALUES_COLUMN: 0.5}
    if cfg.probe.enabled:
        meta = json.loads((Path(cfg.probe.path) / "probe.json").read_text())
        thresholds[PROBE_COLUMN] = float(meta["threshold"])
    return thresholds


def score_summary(out: Path, columns: set[str], cfg: AnnotateConfig | None = None,
                  ) -> dict[str, dict[str, Any]]:
    """The distribution of every risk score in the finished shards, and its AUROC against
    the corpus's label column when `cfg.corpus.label_column` is set.

    Per score column: count, mean and a 10-bin histogram on [0, 1] of all its values
    (segment columns: over every segment value), then over rows (the row risk: the value
    itself, or 1 - min P(safe) of a STAR row): quantiles, the threshold and the share of
    rows at or above it, `degenerate` (why the scores cannot tell rows apart, or None) and
    `auroc_vs_label`. Scanned lazily with polars, so it costs a pass over these columns.
    Columns that are not scores on [0, 1] (STAR's token ends) are left out.
    """
    import polars as pl

    from safekeel.data.corpus import label_is_positive

    files = sorted(out.glob("shard-*.parquet"))
    if not columns or not files:
        return {}
    frame = pl.scan_parquet(files)
    thresholds = score_thresholds(cfg) if cfg is not None else {}
    label_column = cfg.corpus.label_column if cfg is not None else None
    labels = None
    if label_column:
        raw = frame.select(pl.col(label_column)).collect()[label_column].to_list()
        labels = pl.Series([label_is_positive(v, cfg.corpus) for v in raw])
    summary = {}
    for column in sorted(columns):
        spec = risk_column(column)
        if (spec.low, spec.high) != (0, 1):
            continue
        per_row = frame.select(pl.col(column)).collect()[column]
        series = per_row.explode() if spec.granularity == "segment" else per_row
        series = series.drop_nulls()
        bins = (series * HISTOGRAM_BINS).floor().clip(0, HISTOGRAM_BINS - 1).cast(pl.Int64)
        counts = [0] * HISTOGRAM_BINS
        for b, n in bins.value_counts().iter_rows():
            counts[b] = n
        entry: dict[str, Any] = {
            "count": series.len(),
            "mean": round(float(series.mean()), 6) if series.len() else None,
            "histogram": {"bin_edges": [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)],
                          "counts": counts},
        }
        # STAR: a row is as risky as its least safe prefix
        risk = (1 - per_row.list.min()) if spec.granularity == "segment" else per_row
        entry.update(_row_risk_stats(risk, thresholds.get(column), labels))
        entry["row_risk"] = ("1 - min star_v_safe over the row's segments"
                             if spec.granularity == "segment" else column)
        summary[column] = entry
    if labels is not None:
        values = Counter(str(v) for v in raw)
        summary["label"] = {"column": label_column, "positive": int(labels.sum()),
                            "negative": int((~labels).sum()), "values": dict(values)}
    return summary


def _row_risk_stats(risk, threshold: float | None, labels) -> dict[str, Any]:
    """Quantiles, share at or above the threshold, degeneracy and AUROC of one row risk."""
    from safekeel.data.auroc import auroc

    known = risk.is_not_null()
    values = risk.filter(known)
    stats: dict[str, Any] = {"rows": values.len()}
    if not values.len():
        return stats | {"degenerate": "no scores"}
    stats["quantiles"] = {f"q{round(q * 100):02d}": round(float(values.quantile(q)), 6)
                          for q in QUANTILES}
    stats["min"], stats["max"] = round(float(values.min()), 6), round(float(values.max()), 6)
    stats["threshold"] = threshold
    share = float((values >= threshold).mean()) if threshold is not None else None
    stats["share_at_or_above_threshold"] = None if share is None else round(share, 6)
    reason = None
    if values.len() >= DEGENERATE_MIN_ROWS:
        if stats["max"] - stats["min"] < NEAR_CONSTANT:
            reason = (f"near-constant: every row scores in [{stats['min']:.4f}, "
                      f"{stats['max']:.4f}]")
        elif share == 0.0:
            reason = f"no row of {values.len()} at or above its threshold {threshold:.3g}"
        elif share == 1.0:
            reason = f"every row of {values.len()} at or above its threshold {threshold:.3g}"
    stats["degenerate"] = reason
    if labels is not None:
        y = labels.filter(known)
        both = 0 < int(y.sum()) < y.len()
        stats["auroc_vs_label"] = (round(auroc(values.to_numpy(), y.to_numpy()), 6)
                                   if both else None)
    return stats


def warn_degenerate(summary: dict[str, dict[str, Any]]) -> None:
    """One loud line per degenerate scorer (on the terminal: the console prints the
    project's own warnings there as well as into the log)."""
    for column, stats in summary.items():
        if stats.get("degenerate"):
            warnings.warn(f"{column} is degenerate on this corpus: {stats['degenerate']}; a "
                          "risk-weighted training run reading it sees one constant weight "
                          "(check the scorer: a probe fitted on another prompt format, a "
                          "guard in the wrong template)", DegenerateScoresWarning, stacklevel=2)


def _histogram_bar(counts: list[int]) -> str:
    """The histogram as one line of block characters, for the terminal."""
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(counts) or 1
    return "".join(blocks[round(c / top * (len(blocks) - 1))] for c in counts)


def _summary(result: AnnotateResult) -> str:
    d = result.to_dict()
    skipped = d["corpus"]["rows_skipped"]
    lines = [(
        f"annotate: {d['rows_written']} rows in {d['shards_written']} new shard(s) "
        f"({d['shards_skipped_as_finished']} already finished), {skipped} bad row(s) skipped, "
        f"{d['seconds']} s ({d['rows_per_second']} rows/s) -> {d['output_dir']}"
    )]
    for column, stats in d["scores"].items():
        if column == "label":
            lines.append(f"  label {stats['column']!r}: {stats['positive']} positive, "
                         f"{stats['negative']} negative")
            continue
        line = (f"  {column:16s} mean {stats['mean']:.3f} over {stats['count']} values, "
                f"histogram 0..1 [{_histogram_bar(stats['histogram']['counts'])}]")
        if stats.get("share_at_or_above_threshold") is not None:
            line += (f", {stats['share_at_or_above_threshold']:.1%} of rows >= "
                     f"{stats['threshold']:.3g}")
        if stats.get("auroc_vs_label") is not None:
            line += f", AUROC vs label {stats['auroc_vs_label']:.3f}"
        if stats.get("degenerate"):
            line += "  DEGENERATE"
        lines.append(line)
    return "\n".join(lines)
