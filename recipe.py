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
from typing import TYPE_CHECKING, Any, Literal

from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.probe_stage import ProbeFitConfig
from safekeel.data.auroc import auroc
from safekeel.data.config import ConfigError, from_dict, option, save_resolved, to_dict
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
from safekeel.data.risk_columns import STAR_ENDS_COLUMN, STAR_VALUES_COLUMN
from safekeel.evaluate.config import EvaluateConfig
from safekeel.train.config import TrainConfig

if TYPE_CHECKING:
    from safekeel.train.run import TrainResult

EMBEDDED_PRESET = "embedded.yaml"
BUILD_DIR = "build"  # the embedded build's intermediate checkpoints, shards and logs


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


@dataclass
class RunConfig:
    output_dir: str = option("runs/default", help="Where every step of the run writes; "
                             "`{output_dir}` in any other value stands for it.")
    embedded: EmbeddedBuildConfig = option(EmbeddedBuildConfig, help="The embedded default.")
    probe: ProbeFitConfig | None = option(
        None, help="Fit the harmful-intent probe before annotating (point annotate.probe.path "
        "at its output_dir); null: no probe is fitted.")
    methods: list[str] = option(
        ["sft", "constant_kl", "adaptive:critic", "adaptive:probe", "adaptive_example:critic",
         "star_dss"],
        help="Training runs from the same shards: a train method, optionally with the risk "
        "signal after a colon (adaptive:probe).")
    benign_corpus: str = option(
        "", help="A purely benign fine-tuning set (same formats as annotate's corpus): plain "
        "SFT on it runs too, as `sft_benign`, to show how much benign fine-tuning alone "
        "moves safety.")
    annotate: AnnotateConfig = option(AnnotateConfig, help="Stage one.")
    train: TrainConfig = option(TrainConfig, help="Stage two (per method; method and "
                                "output_dir are set by the run).")
    evaluate: EvaluateConfig = option(EvaluateConfig, help="Stage three.")

    def validate(self) -> None:
        from safekeel.train.config import METHODS, RISK_SIGNALS

        for spec in self.methods:
            method, _, signal = spec.partition(":")
            if method not in METHODS:
                raise ConfigError(f"methods: unknown method {method!r} in {spec!r}; "
                                  f"allowed: {', '.join(METHODS)}")
            if signal and signal not in RISK_SIGNALS:
                raise ConfigError(f"methods: unknown risk signal {signal!r} in {spec!r}; "
                                  f"allowed: {', '.join(RISK_SIGNALS)}")


def say(message: str) -> None:
    """One line of the run's progress on the terminal (library logs go to the log file)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------


def run(cfg: RunConfig) -> None:
    """Every step of the chain that `cfg` asks for, in order."""
    from safekeel.annotate.probe_stage import fit
    from safekeel.annotate.run import annotate
    from safekeel.evaluate.run import evaluate

    cfg = with_output_dir(cfg)
    out = Path(cfg.output_dir)
    save_resolved(cfg, out / "run_config.yaml")
    if cfg.embedded.enabled:
        say(f"embedded default ({cfg.embedded.scale}): world, tiny policy and guard in {out}")
        prepare_embedded_default(out, seed=cfg.embedded.seed, settings=cfg.embedded.settings)
    if cfg.probe is not None:
        fit(cfg.probe)

    say(f"[1/3] annotate {cfg.annotate.corpus.path}")
    annotate(cfg.annotate)

    runs = len(cfg.methods) + bool(cfg.benign_corpus)
    say(f"[2/3] train {runs} model(s) from {cfg.annotate.output_dir}")
    checkpoints = {"reference": cfg.annotate.policy}
    for spec in cfg.methods:
        method, _, signal = spec.partition(":")
        name = spec.replace(":", "_")
        risk = replace(cfg.train.risk, signal=signal) if signal else cfg.train.risk
        say(f"  {spec}")
        result = train_run_model(cfg, out, name, method=method, risk=risk,
                                 shards=cfg.train.shards or cfg.annotate.output_dir)
        checkpoints[name] = str(result.final_dir)
    if cfg.benign_corpus:
        checkpoints["sft_benign"] = str(train_on_benign_corpus(cfg, out).final_dir)

    say(f"[3/3] evaluate {len(checkpoints)} model(s)")
    evaluate(replace(cfg.evaluate, checkpoints=list(checkpoints.values()),
                     checkpoint_names=list(checkpoints), output_dir=str(out / "evaluate"),
                     critic=judge_settings(cfg)))


def judge_settings(cfg: RunConfig) -> GuardSettings:
    """Evaluate's Safety Critic: its own if it names a model, else annotate's guard with
    every setting (dtype, backend, engine) kept and only the judge's threshold evaluate's."""
    if cfg.evaluate.critic.model or not cfg.annotate.critic.model:
        return cfg.evaluate.critic
    return replace(cfg.annotate.critic, threshold=cfg.evaluate.critic.threshold)


def with_output_dir(cfg: RunConfig) -> RunConfig:
    """`cfg` with every `{output_dir}` replaced by the run's output folder."""

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{output_dir}", cfg.output_dir)
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v) for v in value]
        return value

    return from_dict(RunConfig, expand(to_dict(cfg)))


def train_on_benign_corpus(cfg: RunConfig, out: Path) -> TrainResult:
    """Plain SFT on the benign set: its shards need no risk scores, only the data pass."""
    from safekeel.annotate.run import annotate

    benign_shards = out / "annotate_benign"
    annotate(replace(cfg.annotate, corpus=replace(cfg.annotate.corpus, path=cfg.benign_corpus),
                     critic=replace(cfg.annotate.critic, model=""),
                     star=replace(cfg.annotate.star, enabled=False),
                     probe=replace(cfg.annotate.probe, path=""),
                     output_dir=str(benign_shards)))
    say(f"  sft on the benign set {cfg.benign_corpus}")
    return train_run_model(cfg, out, "sft_benign", method="sft", shards=str(benign_shards))


def train_run_model(cfg: RunConfig, out: Path, name: str, **changes) -> TrainResult:
    """Stage two for one model of the run: the run's train settings, the annotated policy
    unless train names another, and `out/train/<name>`."""
    from safekeel.train.run import train

    return train(replace(cfg.train, policy=cfg.train.policy or cfg.annotate.policy,
                         output_dir=str(out / "train" / name), **changes))


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
