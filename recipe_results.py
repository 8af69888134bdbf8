"""A recipe's results page and its published adapters.

`write_results` writes RESULTS.md: the commands, the machine, the build measurements, the
adapters with their sha256, and evaluate's own report (evaluate/report.py wrote it: the
tables with intervals and the plots), so the tables are made in one place only.
`check_targets` holds the run to the targets its config names (evaluate metrics, build
measurements, annotate's scorer report), each met or missed with its number.
`publish_adapters` copies the adapters (the run's models/ and each trained method's final
adapter) into one folder, e.g. the repository's benchmarks/<recipe>/adapters/.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safekeel.data.adapters import read_adapter_base
from safekeel.data.config import option
from safekeel.recipe_steps import adapter_sha256

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass
class Target:
    """One claim the run is held to, e.g. "plain SFT raises AdvBench ASR by >= 30 points"."""

    what: str = option("", help="The claim, as the targets table shows it.")
    source: Literal["evaluate", "build", "annotate"] = option(
        "evaluate", help="evaluate: a metric of evaluate's report.json; build: the build "
        "measurements (build_metrics.json); annotate: annotate's report of the shards.")
    metric: str = option("", help="evaluate: a metric name (eval/asr/advbench/keyword); build "
                         "and annotate: a dotted path (guard.auroc_heldout, "
                         "scores.probe_p_harmful.auroc_vs_label).")
    checkpoints: list[str] = option([], help="evaluate: the checkpoints held to it, a line each.")
    relative_to: str = option("", help="evaluate: a checkpoint whose value is subtracted "
                              "first (e.g. reference: points above the reference).")
    at_most: float | None = option(None, help="Met when the value is at most this.")
    at_least: float | None = option(None, help="Met when the value is at least this.")


@dataclass
class ResultsConfig:
    path: str = option("{output_dir}/RESULTS.md", help="The results page.")
    commands: list[str] = option([], help="The commands that made the run, as shown on the page.")
    publish_dir: str = option("", help="Copy every adapter (the builds and each method) into "
                              "this folder; empty: no copy.")
    targets: list[Target] = option([], help="Claims the run is held to: a table of each with "
                                   "its value, met or missed, heads the page.")


@dataclass(frozen=True)
class TargetCheck:
    what: str
    subject: str  # the checkpoint, or the source
    value: float | None  # None: not measured in this run
    met: bool | None
    shown: str


def _dotted(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def check_targets(targets: list[Target], *, evaluate_report: dict[str, Any],
                  build_metrics: dict[str, Any], annotate_report: dict[str, Any]
                  ) -> list[TargetCheck]:
    """Each target's value in this run and whether it is met; a target whose value the run
    did not produce (a method not trained) is listed as not measured, never as met."""
    metrics = {c["name"]: c["metrics"] for c in evaluate_report.get("checkpoints", [])}
    checks = []
    for target in targets:
        if target.source == "evaluate":
            subjects = target.checkpoints or list(metrics)
            values = {}
            for name in subjects:
                value = metrics.get(name, {}).get(target.metric)
                base = (metrics.get(target.relative_to, {}).get(target.metric)
                        if target.relative_to else 0.0)
                values[name] = None if value is None or base is None else value - base
        else:
            source = build_metrics if target.source == "build" else annotate_report
            values = {target.source: _dotted(source, target.metric)}
        for subject, value in values.items():
            met = None
            if isinstance(value, (int, float)):
                met = ((target.at_most is None or value <= target.at_most)
                       and (target.at_least is None or value >= target.at_least))
            checks.append(TargetCheck(target.what, subject, value, met,
                                      _shown(target, value)))
    return checks


def _shown(target: Target, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "not measured"
    if target.source != "evaluate":
        return f"{value:.3f}"
    if target.relative_to:
        return f"{100 * value:+.1f} points vs {target.relative_to}"
    return f"{100 * value:.1f}%"


def targets_table(checks: list[TargetCheck]) -> list[str]:
    lines = ["| target | model / source | value | met |", "| --- | --- | --- | --- |"]
    for check in checks:
        met = {True: "yes", False: "**no**", None: "n/a"}[check.met]
        lines.append(f"| {check.what} | {check.subject} | {check.shown} | {met} |")
    return lines


def last_annotate_scores(annotate_dir: str | Path) -> dict[str, Any]:
    """Annotate's report of its last run that scored rows (worker 0's; a resumed run that
    found every shard finished scores nothing)."""
    report = Path(annotate_dir) / "report.worker-0-of-1.json"
    if not report.is_file():
        candidates = sorted(Path(annotate_dir).glob("report.worker-0-of-*.json"))
        if not candidates:
            return {}
        report = candidates[0]
    runs = json.loads(report.read_text())["runs"]
    scored = [run for run in runs if run.get("scores")]
    return scored[-1] if scored else {}


def machine_line() -> str:
    """CPU model, cores and the vector capabilities that decide speed and bf16 (lscpu)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    have = [f for f in CPU_FLAGS if f in flags]
    return (f"{fields.get('Model name', platform.machine())}, {fields.get('CPU(s)', '?')} "
            f"CPU(s), {', '.join(have) or 'none of ' + '/'.join(CPU_FLAGS)}")


def is_adapter(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file()


def publish_adapters(adapters: dict[str, Path], destination: str | Path) -> dict[str, Path]:
    """Copy each adapter folder's adapter files into `destination/<name>`; returns the
    copies. An adapter stacked on another one of the set names it as `../<name>`, so the
    published folder loads wherever it is copied (data/adapters.read_adapter_base)."""
    destination = Path(destination)
    names = {source.resolve(): name for name, source in adapters.items()}
    copies = {}
    for name, source in adapters.items():
        target = destination / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for file in source.iterdir():
            if file.is_file() and (file.name.startswith("adapter_") or file.name == "README.md"):
                shutil.copy2(file, target / file.name)
        config_path = target / "adapter_config.json"
        config = json.loads(config_path.read_text())
        base = read_adapter_base(source)
        if Path(base).is_dir() and Path(base).resolve() in names:
            config["base_model_name_or_path"] = f"../{names[Path(base).resolve()]}"
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        copies[name] = target
    return copies


def write_results(path: str | Path, *, commands: list[str], build_metrics: dict[str, Any],
                  adapters: dict[str, Path], evaluate_report: Path | None,
                  step_seconds: dict[str, float], checks: list[TargetCheck] | None = None
                  ) -> Path:
    path = Path(path)
    lines = ["# Results", ""]
    if checks:
        met = sum(check.met is True for check in checks)
        lines += ["## Against the targets", "", f"{met} of {len(checks)} met.", ""]
        lines += targets_table(checks) + [""]
    lines += ["## Commands", "", "```"] + commands + ["```", "", "## Machine", "",
                                                       machine_line(), ""]
    if step_seconds:
        lines += ["## Steps", "", "| step | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {seconds:.0f} |" for name, seconds in step_seconds.items()]
        lines.append("")
    if build_metrics:
        lines += ["## Builds", "", "```json", json.dumps(build_metrics, indent=2), "```", ""]
    if adapters:
        lines += ["## Adapters", "", "| model | folder | size | sha256 |", "| --- | --- | --- | --- |"]
        for name, folder in adapters.items():
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            lines.append(f"| {name} | `{folder}` | {size / 1e6:.1f} MB | "
                         f"`{adapter_sha256(folder)}` |")
        lines.append("")
    if evaluate_report is not None and evaluate_report.is_file():
        report = evaluate_report.read_text(encoding="utf-8")
        # evaluate's page one level down; its plots are beside it
        body = ["#" + line if line.startswith("#") else line for line in report.splitlines()]
        relative = _relative(evaluate_report.parent, path.parent)
        body = [line.replace("](", f"]({relative}/") if line.startswith("![") else line
                for line in body]
        lines += body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _relative(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)
