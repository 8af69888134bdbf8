"""`safekeel run`: the stages chained by one config file, step by step and resumable.

    [embedded build] -> [probe fit] -> annotate once -> train every method from the same
    shards (+ plain SFT on a benign set) -> evaluate the starting policy and every trained
    model side by side

The preset is data (configs/embedded.yaml, shipped inside the package); this module only
orders the steps. `{output_dir}` in any string of the config stands for `output_dir`, so
a preset can name the files its own steps write. The embedded build makes a synthetic world
and a tiny aligned policy and guard with the project's own stages (nothing downloaded), and
reuses a finished build; annotate resumes its finished shards; train resumes its latest
checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.probe_stage import ProbeFitConfig
from safekeel.data.auroc import auroc
from safekeel.data.config import (
    ConfigError,
    deep_merge,
    from_dict,
    option,
    save_resolved,
    to_dict,
)
from safekeel.data.embedded.default import (
    DEFAULT_SEED,
    GUARD_TEMPLATE_OPTIONS,
    METRICS_NAME,
    UNSAFE_LABEL,
    EmbeddedDefault,
    EmbeddedSettings,
    TinyModelSettings,
    embedded_tokenizer,
    guard_chat_rows,
    harmful_start_token,
    measure_policy,
    rate_of,
    write_world_sets,
)
from safekeel.data.embedded.world import World, WorldExample, make_world, write_jsonl
from safekeel.data.guard.settings import GuardSettings
from safekeel.data.recipe_sets import PrepareConfig
from safekeel.data.risk_columns import STAR_ENDS_COLUMN, STAR_VALUES_COLUMN
from safekeel.evaluate.config import EvaluateConfig
from safekeel.recipe_results import ResultsConfig
from safekeel.recipe_steps import MeasureConfig, ModelBuildConfig, Steps, with_overrides
from safekeel.train.config import TrainConfig

EMBEDDED_PRESET = "embedded.yaml"
BUILD_DIR = "build"  # the embedded build's intermediate checkpoints, shards and logs
REPO_ROOT = Path(__file__).resolve().parent  # the package folder is the repo root


def preset_path(name: str = EMBEDDED_PRESET) -> Path:
    """A config shipped with safekeel (configs/ in the repo, safekeel/configs/ when installed)."""
    path = Path(str(resources.files("safekeel") / "configs" / name))
    if not path.is_file():
        raise ConfigError(f"preset {name}: not found at {path}")
    return path


@dataclass
class EmbeddedBuildConfig:
    enabled: bool = option(False, help="Build the embedded default into output_dir first: the "
                           "synthetic world (world/*.jsonl), a tiny aligned policy (policy/) and "
                           "a tiny guard (guard/), nothing downloaded; a finished build is reused.")
    seed: int = option(DEFAULT_SEED, help="Seed of the world and of the tiny models.")
    scale: Literal["full", "smoke"] = option(
        "full", help="full shows the effect (minutes); smoke checks the wiring (seconds).")
    full: EmbeddedSettings = option(EmbeddedSettings, help="The build at scale full.")
    smoke: EmbeddedSettings = option(EmbeddedSettings, help="The build at scale smoke.")

    @property
    def settings(self) -> EmbeddedSettings:
        return getattr(self, self.scale)


@dataclass(frozen=True)
class MethodRun:
    """One training run from the shared shards: its name, method and train overrides."""

    name: str
    method: str
    overrides: dict[str, Any]


def method_runs(specs: list[Any]) -> list[MethodRun]:
    """`methods` entries as runs. A string is "method[:signal]" (named method_signal); a
    mapping is {method, name?, signal?, <train options>...}, e.g. {name: adaptive_max,
    method: adaptive, signal: critic, risk: {aggregate: max}}."""
    from safekeel.train.config import METHODS, RISK_SIGNALS

    runs = []
    for spec in specs:
        if isinstance(spec, str):
            method, _, signal = spec.partition(":")
            name, overrides = spec.replace(":", "_"), {}
        elif isinstance(spec, dict) and isinstance(spec.get("method"), str):
            overrides = {k: v for k, v in spec.items() if k not in ("name", "method", "signal")}
            method, signal = spec["method"], spec.get("signal", "")
            name = spec.get("name") or (f"{method}_{signal}" if signal else method)
        else:
            raise ConfigError(f"methods: {spec!r} is neither \"method[:signal]\" nor a mapping "
                              "with a `method`")
        if method not in METHODS:
            raise ConfigError(f"methods: unknown method {method!r} in {spec!r}; "
                              f"allowed: {', '.join(METHODS)}")
        if signal:
            if signal not in RISK_SIGNALS:
                raise ConfigError(f"methods: unknown risk signal {signal!r} in {spec!r}; "
                                  f"allowed: {', '.join(RISK_SIGNALS)}")
            overrides = deep_merge(overrides, {"risk": {"signal": signal}})
        runs.append(MethodRun(str(name), method, overrides))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"methods: run names repeat: {names}")
    return runs


@dataclass
class RunConfig:
    output_dir: str = option("runs/default", help="Where every step of the run writes; "
                             "`{output_dir}` in any other value stands for it.")
    data_dir: str = option("", help="`{data_dir}` in any other value stands for it: local "
                           "data files; a relative path is read from the repo root.")
    scale: str = option("", help="A key of `scales` whose options replace the config's own "
                        "(e.g. smoke: a few steps and prompts); empty: none.")
    scales: dict[str, dict[str, Any]] = option({}, help="Named option sets for `scale`.")
    embedded: EmbeddedBuildConfig = option(EmbeddedBuildConfig, help="The embedded default.")
    prepare: PrepareConfig | None = option(
        None, help="Write training sets from local files before building (data/recipe_sets).")
    builds: list[ModelBuildConfig] = option(
        [], help="Models trained by annotate + train sft before the chain, each into "
        "{output_dir}/models/<name> (e.g. a safe reference and a guard, as LoRA adapters).")
    measure: MeasureConfig | None = option(
        None, help="Measure the builds on training-side held-out sets (refusal, guard AUROC).")
    results: ResultsConfig | None = option(
        None, help="After evaluate: a results page and a copy of the adapters.")
    probe: ProbeFitConfig | None = option(
        None, help="Fit the harmful-intent probe before annotating (point annotate.probe.path "
        "at its output_dir); null: no probe is fitted.")
    methods: list[Any] = option(
        ["sft", "constant_kl", "adaptive:critic", "adaptive:probe", "adaptive_example:critic",
         "star_dss"],
        help="Training runs from the same shards: a train method, optionally with the risk "
        "signal after a colon (adaptive:probe), or a mapping {name, method, signal, <train "
        "options>} (e.g. {name: adaptive_max, method: adaptive, risk: {aggregate: max}}).")
    benign_corpus: str = option(
        "", help="A purely benign fine-tuning set (same formats as annotate's corpus): plain "
        "SFT on it runs too, as `sft_benign`, to show how much benign fine-tuning alone "
        "moves safety.")
    annotate: AnnotateConfig = option(AnnotateConfig, help="Stage one.")
    train: TrainConfig = option(TrainConfig, help="Stage two (per method; method and "
                                "output_dir are set by the run).")
    evaluate: EvaluateConfig = option(EvaluateConfig, help="Stage three.")

    def validate(self) -> None:
        method_runs(self.methods)
        if self.scale and self.scale not in self.scales:
            raise ConfigError(f"scale: {self.scale!r} is not one of scales "
                              f"({', '.join(self.scales) or 'none defined'})")


def say(message: str) -> None:
    """One line of the run's progress on the terminal (library logs go to the log file)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------


def run(cfg: RunConfig) -> None:
    """Every step of the chain that `cfg` asks for, in order; finished steps are reused."""
    from safekeel.annotate.probe_stage import fit
    from safekeel.annotate.run import annotate
    from safekeel.evaluate.run import evaluate

    cfg = with_output_dir(with_scale(cfg))
    out = Path(cfg.output_dir)
    save_resolved(cfg, out / "run_config.yaml")
    steps = Steps(out, say)
    if cfg.embedded.enabled:
        say(f"embedded default ({cfg.embedded.scale}): world, tiny policy and guard in {out}")
        prepare_embedded_default(out, seed=cfg.embedded.seed, settings=cfg.embedded.settings)
    if cfg.prepare is not None or cfg.builds:
        say(f"[0/3] prepare data and build {len(cfg.builds)} model(s)")
        prepare_and_build(cfg, out, steps)
    if cfg.probe is not None:
        probe = cfg.probe
        steps.run("probe", {"probe": to_dict(probe), "upstream": upstream(steps)},
                  [probe.output_dir], lambda: fit(probe))

    say(f"[1/3] annotate {cfg.annotate.corpus.path}")
    steps.run("annotate", {"annotate": to_dict(cfg.annotate),
                           "corpus": input_identity(cfg.annotate.corpus.path),
                           "upstream": upstream(steps)},
              [cfg.annotate.output_dir], lambda: annotate(cfg.annotate), resumes_itself=True)

    runs = method_runs(cfg.methods)
    say(f"[2/3] train {len(runs) + bool(cfg.benign_corpus)} model(s) from "
        f"{cfg.annotate.output_dir}")
    checkpoints = {"reference": cfg.annotate.policy}
    trained_from = upstream(steps)
    for spec in runs:
        settings = with_overrides(cfg.train, spec.overrides)
        settings = replace(settings, method=spec.method,
                           policy=settings.policy or cfg.annotate.policy,
                           shards=settings.shards or cfg.annotate.output_dir,
                           output_dir=str(out / "train" / spec.name))
        steps.run(f"train_{spec.name}", {"train": to_dict(settings), "upstream": trained_from},
                  [settings.output_dir], lambda settings=settings: train_model(settings))
        checkpoints[spec.name] = str(Path(settings.output_dir) / "final")
    if cfg.benign_corpus:
        checkpoints["sft_benign"] = train_on_benign_corpus(cfg, out, steps)

    say(f"[3/3] evaluate {len(checkpoints)} model(s)")
    evaluate_cfg = replace(cfg.evaluate, checkpoints=list(checkpoints.values()),
                           checkpoint_names=list(checkpoints),
                           output_dir=str(out / "evaluate"), critic=judge_settings(cfg))
    # evaluate reuses its own cached generations; the record only skips a finished report
    steps.run("evaluate", {"evaluate": to_dict(evaluate_cfg), "upstream": upstream(steps)},
              [], lambda: evaluate(evaluate_cfg))
    if cfg.results is not None:
        publish_results(cfg, out, checkpoints, steps)


def with_scale(cfg: RunConfig) -> RunConfig:
    """`cfg` with the options of its `scale` (if any) put over its own."""
    if not cfg.scale:
        return cfg
    return from_dict(RunConfig, deep_merge(to_dict(cfg), cfg.scales[cfg.scale]))


def upstream(steps: Steps) -> dict[str, str]:
    """The keys of the steps so far that later steps read (measurements feed nothing)."""
    return {name: key for name, key in steps.keys.items() if name != "measure"}


def input_identity(path: str) -> str:
    """A local input file's content digest (its name when it is not a local file)."""
    from safekeel.data.recipe_sets import file_digest

    return file_digest(path) if path and Path(path).is_file() else path


def train_model(settings: TrainConfig) -> dict[str, Any]:
    from safekeel.train.run import train

    result = train(settings)
    return {"steps": result.steps, "final_dir": str(result.final_dir)}


def prepare_and_build(cfg: RunConfig, out: Path, steps: Steps) -> None:
    """Training sets from local files, then each model of `builds`, then their measures."""
    from safekeel.data.recipe_sets import input_fingerprint, prepare_sets
    from safekeel.evaluate.refusal import is_refusal
    from safekeel.recipe_steps import (
        build_model,
        greedy_answers,
        measure_guard,
        measure_refusal,
        model_dir,
    )

    if cfg.prepare is not None:
        prep = cfg.prepare
        compliant = prep.compliant

        def answer(prompts: list[str]) -> list[str]:
            say(f"  answers of {compliant.model} to {len(prompts)} instructions")
            answers = greedy_answers(compliant.model, prompts, compliant.max_new_tokens,
                                     compliant.batch_size, compliant.dtype)
            # a refusal is neither a compliant (unsafe) row nor a helpful benign one
            return ["" if is_refusal(a) else a for a in answers]

        steps.run("prepare", {"prepare": to_dict(prep), "inputs": input_fingerprint(prep)},
                  [prep.output_dir],
                  lambda: prepare_sets(prep, answer if compliant.model else None).counts)
    tokenization = to_dict(cfg.train.tokenization)
    for build in cfg.builds:
        steps.run(f"build_{build.name}",
                  {"build": to_dict(build), "tokenization": tokenization,
                   "corpus": input_identity(build.corpus), "upstream": upstream(steps)},
                  [model_dir(out, build.name), out / "build" / build.name],
                  lambda build=build: build_model(build, out, tokenization))
    if cfg.measure is not None:
        measure = cfg.measure

        def measure_builds() -> dict[str, Any]:
            metrics: dict[str, Any] = {}
            if measure.policy:
                metrics["safe_reference"] = measure_refusal(measure)
                m = metrics["safe_reference"]
                say(f"  safe reference: refusal {m['refusal_rate_harmful']:.1%} on "
                    f"{m['refusal_n_harmful']} held-out harmful, over-refusal "
                    f"{m['overrefusal_rate_benign']:.1%} on {m['overrefusal_n_benign']} benign")
            if cfg.annotate.critic.model and (measure.guard_heldout or measure.labelled_corpus):
                metrics["guard"] = g = measure_guard(measure, cfg.annotate.critic)
                say(f"  guard: AUROC {g.get('auroc_heldout', float('nan')):.3f} held out, "
                    f"{g.get('auroc_labelled_corpus', float('nan')):.3f} on "
                    f"{measure.labelled_corpus} `{measure.label_column}`")
            Path(measure.output).write_text(json.dumps(metrics, indent=2) + "\n")
            return metrics

        steps.run("measure", {"measure": to_dict(measure), "critic": to_dict(cfg.annotate.critic),
                              "upstream": upstream(steps)},
                  [measure.output], measure_builds)


def publish_results(cfg: RunConfig, out: Path, checkpoints: dict[str, str],
                    steps: Steps) -> None:
    """RESULTS.md after evaluate, and the adapters copied into results.publish_dir."""
    from safekeel.recipe_results import (
        check_targets,
        is_adapter,
        last_annotate_scores,
        publish_adapters,
        write_results,
    )
    from safekeel.recipe_steps import model_dir

    results = cfg.results
    assert results is not None
    adapters = {b.name: model_dir(out, b.name) for b in cfg.builds}
    adapters.update({name: Path(path) for name, path in checkpoints.items()
                     if name != "reference" and Path(path).is_dir()})
    adapters = {name: path for name, path in adapters.items() if is_adapter(path)}
    if results.publish_dir:
        adapters = publish_adapters(adapters, results.publish_dir)
        say(f"  {len(adapters)} adapter(s) copied to {results.publish_dir}")
    metrics_path = Path(cfg.measure.output) if cfg.measure else None
    metrics = json.loads(metrics_path.read_text()) if metrics_path and metrics_path.exists() else {}
    seconds = {}
    for name in steps.keys:
        record = json.loads((steps.dir / f"{name}.json").read_text())
        if "seconds" in record:
            seconds[name] = record["seconds"]
    checks = None
    if results.targets:
        report_path = out / "evaluate" / "report.json"
        checks = check_targets(
            results.targets, build_metrics=metrics,
            evaluate_report=json.loads(report_path.read_text()) if report_path.is_file() else {},
            annotate_report=last_annotate_scores(cfg.annotate.output_dir))
        missed = [c for c in checks if c.met is False]
        say(f"  targets: {sum(c.met is True for c in checks)} of {len(checks)} met"
            + (f"; missed: {'; '.join(f'{c.what} ({c.subject}: {c.shown})' for c in missed)}"
               if missed else ""))
    page = write_results(results.path, commands=results.commands, build_metrics=metrics,
                         adapters=adapters, evaluate_report=out / "evaluate" / "report.md",
                         step_seconds=seconds, checks=checks)
    say(f"  results: {page}")


def judge_settings(cfg: RunConfig) -> GuardSettings:
    """Evaluate's Safety Critic: its own if it names a model, else annotate's guard with
    every setting (dtype, backend, engine) kept and only the judge's threshold evaluate's."""
    if cfg.evaluate.critic.model or not cfg.annotate.critic.model:
        return cfg.evaluate.critic
    return replace(cfg.annotate.critic, threshold=cfg.evaluate.critic.threshold)


def with_output_dir(cfg: RunConfig) -> RunConfig:
    """`cfg` with every `{output_dir}` replaced by the run's output folder and every
    `{data_dir}` by the data folder."""
    return from_dict(RunConfig, expand_placeholders(to_dict(cfg), cfg.output_dir, cfg.data_dir))


def expand_placeholders(value: Any, output_dir: str, data_dir: str) -> Any:
    """`value` (nested dicts and lists) with `{output_dir}` and `{data_dir}` replaced; a
    relative data folder is read from the repo root, as a run config's is."""
    if data_dir and not Path(data_dir).is_absolute():
        data_dir = str((REPO_ROOT / data_dir).resolve())

    def expand(item: Any) -> Any:
        if isinstance(item, str):
            return item.replace("{output_dir}", output_dir).replace("{data_dir}", data_dir)
        if isinstance(item, dict):
            return {k: expand(v) for k, v in item.items()}
        if isinstance(item, list):
            return [expand(v) for v in item]
        return item

    return expand(value)


def train_on_benign_corpus(cfg: RunConfig, out: Path, steps: Steps) -> str:
    """Plain SFT on the benign set: its shards need no risk scores, only the data pass."""
    from safekeel.annotate.run import annotate

    benign = replace(cfg.annotate, corpus=replace(cfg.annotate.corpus, path=cfg.benign_corpus),
                     critic=replace(cfg.annotate.critic, model=""),
                     star=replace(cfg.annotate.star, enabled=False),
                     probe=replace(cfg.annotate.probe, path=""),
                     reference=replace(cfg.annotate.reference, enabled=False),  # sft needs none
                     output_dir=str(out / "annotate_benign"))
    steps.run("annotate_benign", {"annotate": to_dict(benign),
                                  "corpus": input_identity(cfg.benign_corpus),
                                  "upstream": upstream(steps)},
              [benign.output_dir], lambda: annotate(benign), resumes_itself=True)
    say(f"  sft on the benign set {cfg.benign_corpus}")
    settings = replace(cfg.train, method="sft", policy=cfg.train.policy or cfg.annotate.policy,
                       shards=benign.output_dir, output_dir=str(out / "train" / "sft_benign"))
    steps.run("train_sft_benign", {"train": to_dict(settings), "upstream": upstream(steps)},
              [settings.output_dir], lambda: train_model(settings))
    return str(Path(settings.output_dir) / "final")


# --------------------------------------------------------------------------------------
# The embedded build: tiny policy and guard, trained by stages one and two
# --------------------------------------------------------------------------------------


class EmbeddedBuildError(RuntimeError):
    """A build step failed; the message names the step."""


def prepare_embedded_default(
    out_dir: str | Path, seed: int = DEFAULT_SEED, settings: EmbeddedSettings | None = None,
) -> EmbeddedDefault:
    """Write the world, build (or reuse) the tiny policy and guard, and measure them.

    Writes `world/*.jsonl`, `policy/`, `guard/` (HF checkpoints with the tokenizer),
    `build/` (stage outputs) and `embedded_metrics.json` under `out_dir`. A build whose
    metrics file carries the same build key (seed + settings) is reused as it is. The same
    seed and settings rebuild the same weights bit for bit on the same machine and libraries.
    """
    settings = settings or EmbeddedSettings()
    root = Path(out_dir)
    world = make_world(seed, **settings.world)
    sets = write_world_sets(world, root / "world")
    policy_dir, guard_dir = root / "policy", root / "guard"
    metrics_path = root / METRICS_NAME
    key = settings.key(seed)

    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        complete = all((d / "model.safetensors").exists() for d in (policy_dir, guard_dir))
        if metrics.get("build_key") == key and complete:
            _say(f"reusing the tiny policy and guard in {root} (build {key})")
            return EmbeddedDefault(root, policy_dir, guard_dir, sets, metrics)
        metrics_path.unlink()  # another build's, or incomplete: rebuild from scratch

    import torch

    threads = torch.get_num_threads()
    # One thread: float sums then happen in one order on every machine, so the weights do
    # not depend on the core count; and models this small gain nothing from more threads.
    torch.set_num_threads(1)
    try:
        metrics = _build(root, world, sets, settings, seed, key)
    finally:
        torch.set_num_threads(threads)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    _say(_summary(metrics))
    return EmbeddedDefault(root, policy_dir, guard_dir, sets, metrics)


def _say(message: str) -> None:
    say(f"embedded default: {message}")


def _build(root: Path, world: World, sets: dict[str, Path], settings: EmbeddedSettings,
           seed: int, key: str) -> dict[str, Any]:
    """Train both models into root/policy and root/guard, measure them, return the metrics."""
    policy_dir, guard_dir = root / "policy", root / "guard"
    started = time.perf_counter()
    work = root / BUILD_DIR
    if work.exists():
        shutil.rmtree(work)  # a rebuild starts from nothing, so it cannot resume half-way
    tokenizer = embedded_tokenizer(settings.max_length)
    guard_corpus = write_jsonl(guard_chat_rows(world.guard_train), work / "guard_train_chat.jsonl")

    _say(f"training the tiny policy on {len(world.alignment_train)} alignment rows")
    _train_tiny_model("policy", sets["alignment_train"], settings.policy, settings, seed,
                      tokenizer, work, policy_dir)
    _say(f"training the tiny guard on {len(world.guard_train)} guard rows")
    _train_tiny_model("guard", guard_corpus, settings.guard, settings, seed + 1, tokenizer,
                      work, guard_dir)

    _say("measuring the policy (greedy answers to held-out requests and tasks)")
    metrics = {"build_key": key, "seed": seed, "settings": asdict(settings)}
    metrics["policy"] = measure_policy(
        greedy_answers(policy_dir, settings.generation_tokens), world)
    _say("measuring the guard (AUROC on guard_eval, STAR on turns-harmful responses)")
    metrics["guard"] = measure_guard(guard_dir, world.guard_eval, settings.star_segment_tokens)
    metrics["build_seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def _train_tiny_model(
    name: str, corpus: Path, model: TinyModelSettings, settings: EmbeddedSettings, seed: int,
    tokenizer: Any, work: Path, destination: Path,
) -> None:
    """Random tiny Llama -> annotate (data pass) -> train (sft) -> `destination`."""
    from safekeel.annotate.run import annotate
    from safekeel.data.embedded.tiny_models import build_tiny_llama, save_tiny_model
    from safekeel.train.run import train

    initial = save_tiny_model(
        work / f"{name}_init",
        tokenizer=tokenizer,
        model=build_tiny_llama(
            tokenizer, num_layers=model.num_layers, hidden_size=model.hidden_size,
            num_heads=model.num_heads, intermediate_size=model.intermediate_size,
            max_position_embeddings=settings.max_length, seed=seed,
        ),
    )
    tokenization = {"max_length": settings.max_length, "mask_method": "prefix"}
    shards = work / f"{name}_shards"
    annotate(from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus)}, "policy": str(initial), "output_dir": str(shards),
        "tokenization": tokenization,
    }))
    started = time.perf_counter()
    result = train(from_dict(TrainConfig, {
        "policy": str(initial), "shards": str(shards), "output_dir": str(work / f"{name}_train"),
        "method": "sft", "learning_rate": model.learning_rate, "max_steps": model.max_steps,
        "epochs": 1000, "per_device_batch_size": model.batch_size, "seed": seed,
        "tokenization": tokenization, "progress_bar": False, "save_every": 0,
        # float32 on every machine: the same seed builds the same weights whether or not
        # the processor has native bf16 (and models this small gain nothing from it)
        "mixed_precision": "no",
        # the buffer's order: the build's step counts and learning rates were chosen on it,
        # and length-grouped batches give other weights (measured: refusal 81%, under the 90% bar)
        "group_by_length": False,
        # and the kernels it was built with (eager attention and fused AdamW, the defaults
        # since, round differently: the same seed would give other weights)
        "attn_implementation": "sdpa", "fused_optimizer": False,
    }))
    if result.tokenization_issues:
        raise EmbeddedBuildError(
            f"training the {name}: rows the trainer could not use: {result.tokenization_issues}"
        )
    last = json.loads(result.log_path.read_text().splitlines()[-1])
    _say(f"{name}: {result.steps} steps in {time.perf_counter() - started:.0f} s, "
         f"final loss {last['loss']:.4f}")
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(result.final_dir, destination)


def greedy_answers(model_dir: Path, max_new_tokens: int
                   ) -> Callable[[list[WorldExample]], list[str]]:
    """The model's greedy float32 replies to single-turn rows, by stage three's generator
    (transformers: the tiny models answer faster than an engine starts)."""
    from safekeel.evaluate.generation import (
        GenerationSettings,
        TransformersGenerator,
        render_prompt,
    )

    generator = TransformersGenerator(str(model_dir), GenerationSettings(
        backend="transformers", dtype="float32", max_new_tokens=max_new_tokens, batch_size=64))

    def answers(rows: list[WorldExample]) -> list[str]:
        prompts = [render_prompt(generator.tokenizer, row["messages"][:1]) for row in rows]
        return [g.text for g in generator.generate_tokens(prompts, max_new_tokens)]

    return answers


def _summary(metrics: dict[str, Any]) -> str:
    p, g = metrics["policy"], metrics["guard"]
    return (
        f"built in {metrics['build_seconds']} s: refusal {p['refusal_rate']:.1%} "
        f"(held-out topics {p['refusal_rate_heldout_topics']:.1%}), tasks "
        f"{p['task_accuracy']:.1%}, over-refusal {p['overrefusal_rate']:.1%}; guard AUROC "
        f"{g['auroc']:.3f}, STAR V before/after harm {g['star']['mean_v_before']:.2f}/"
        f"{g['star']['mean_v_after']:.2f}"
    )


def measure_guard(guard_dir: Path, guard_eval: list[WorldExample], segment_tokens: int
                  ) -> dict[str, Any]:
    """The guard's AUROC on guard_eval and STAR values before / after harm starts."""
    from safekeel.annotate.star import StarAnnotator
    from safekeel.data.guard.critic import TransformersCritic
    from safekeel.data.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(guard_dir)
    settings = GuardSettings(
        model=str(guard_dir), template="generic", template_options=dict(GUARD_TEMPLATE_OPTIONS),
        backend="transformers", dtype="float32", progress=False,
    )
    critic = TransformersCritic(settings, model=load_causal_lm(guard_dir), tokenizer=tokenizer)
    scored = critic.score([row["messages"] for row in guard_eval],
                          sources=[row["id"] for row in guard_eval])
    p_unsafe = [float(p) for p in scored.p_unsafe]
    unsafe = [row["guard_label"] == UNSAFE_LABEL for row in guard_eval]

    # STAR on whole responses that turn harmful part-way: V should stay high on the
    # prefixes before the first harmful word and fall on the prefixes that reach it.
    turns = [row for row in guard_eval
             if row["kind"] == "turns_harmful" and row["harmful_start_char"] is not None
             and not row["is_prefix"]]
    star = StarAnnotator(critic, tokenizer, segment_tokens, mask_method="prefix")
    columns = star.annotate(turns) if turns else {STAR_VALUES_COLUMN: [], STAR_ENDS_COLUMN: []}
    before: list[float] = []
    after: list[float] = []
    located = []  # per example: V high on every prefix before harm and low on every after
    for row, values, ends in zip(turns, columns[STAR_VALUES_COLUMN], columns[STAR_ENDS_COLUMN],
                                 strict=True):
        response = row["messages"][1]["content"]
        start = harmful_start_token(response, row["harmful_start_char"])
        pre = [v for v, end in zip(values, ends, strict=True) if end <= start]
        post = [v for v, end in zip(values, ends, strict=True) if end > start]
        before += pre
        after += post
        located.append(all(v > 0.5 for v in pre) and all(v < 0.5 for v in post))
    critic.close()
    return {
        "auroc": auroc(p_unsafe, unsafe),
        "accuracy_at_0_5": rate_of([(p > 0.5) == u for p, u in zip(p_unsafe, unsafe, strict=True)]),
        "mean_label_mass": float(scored.label_mass.mean()),
        "rows": len(guard_eval),
        "star": {
            "examples": len(turns),
            "segment_tokens": segment_tokens,
            "mean_v_before": rate_of(before),
            "mean_v_after": rate_of(after),
            "located_rate": rate_of(located),
        },
    }
