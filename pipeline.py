"""safekeel: the one entry point.

    safekeel annotate --config configs/my.yaml --corpus.path data.jsonl --policy my/model
    safekeel train    --shards runs/annotate --method adaptive
    safekeel evaluate --checkpoints '[runs/train/final]'
    safekeel run                      # all three stages on the embedded default

Every option is a dotted path into the stage's config (`--kl.beta 0.5`); `--config FILE`
supplies defaults from YAML (a file with `annotate:` / `train:` / `evaluate:` sections serves
every verb). The resolved config is saved beside each stage's output.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.probe_stage import ProbeFitConfig
from safekeel.data.config import (
    ConfigError,
    add_config_arguments,
    from_dict,
    leaf_fields,
    load_config,
    option,
    overrides_from_namespace,
)
from safekeel.evaluate.config import EvaluateConfig
from safekeel.train.config import TrainConfig

if TYPE_CHECKING:
    from safekeel.data.guard.settings import GuardSettings
    from safekeel.train.run import TrainResult


@dataclass
class RunConfig:
    output_dir: str = option("runs/default", help="Where every stage of the run writes.")
    embedded_scale: Literal["full", "smoke"] = option(
        "full", help="With no corpus given, the embedded default's size: full shows the "
        "effect (minutes); smoke checks the wiring (seconds).")
    embedded_seed: int = option(0, help="With no corpus given, the seed of the embedded "
                                "world and of its tiny models.")
    methods: list[str] = option(
        ["sft", "constant_kl", "adaptive:critic", "adaptive:probe", "adaptive_example:critic",
         "star_dss"],
        help="Training runs from the same shards: a train method, optionally with the risk "
        "signal after a colon (adaptive:probe).")
    benign_corpus: str = option(
        "", help="A purely benign fine-tuning set (same formats as annotate's corpus): plain "
        "SFT on it runs too, as `sft_benign`, to show how much benign fine-tuning alone "
        "moves safety. The embedded default uses its world's benign set.")
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


@dataclass(frozen=True)
class Verb:
    config: type
    runner: str  # "module:function", imported only when the verb runs (keeps --help fast)
    summary: str


VERBS = {
    "annotate": Verb(AnnotateConfig, "safekeel.annotate.run:annotate",
                     "Stage one: score a corpus for risk and write annotated Parquet shards."),
    "train": Verb(TrainConfig, "safekeel.train.run:train",
                  "Stage two: fine-tune from annotated shards with risk-adaptive KL."),
    "evaluate": Verb(EvaluateConfig, "safekeel.pipeline:evaluate_verb",
                     "Stage three: attack success rate and utility of checkpoints, as a report."),
    "probe": Verb(ProbeFitConfig, "safekeel.annotate.probe_stage:fit",
                  "Fit the harmful-intent probe on labelled prompt files and report it."),
    "run": Verb(RunConfig, "safekeel.pipeline:run",
                "All three stages on the embedded default (or on your config)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safekeel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        sub = verbs.add_parser(name, help=verb.summary, description=verb.summary)
        sub.add_argument("--config", metavar="FILE", help="YAML file with defaults for the options "
                         f"below (its `{name}:` section if it has one).")
        sub.add_argument("--print-config", action="store_true",
                         help="Print the resolved config as YAML and exit.")
        add_config_arguments(sub, verb.config)
    return parser


def unknown_option_message(flag: str, config: type) -> str:
    names = [f"--{dotted}" for dotted, _, _ in leaf_fields(config)]
    close = difflib.get_close_matches(flag.split("=")[0], names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown option {flag}{hint} (see --help for every option)"


def run(cfg: RunConfig) -> None:
    """All three stages, chained; with no corpus given, on the embedded default.

    annotate once -> train every method in `methods` from the same shards -> evaluate the
    starting policy (the safe reference) and every trained model side by side.
    """
    from safekeel.annotate.run import annotate
    from safekeel.data.config import save_resolved

    out = Path(cfg.output_dir)
    if not cfg.annotate.corpus.path:
        cfg = embedded_run_config(cfg, out)
    save_resolved(cfg, out / "run_config.yaml")

    print(f"[1/3] annotate {cfg.annotate.corpus.path}", flush=True)
    annotate(cfg.annotate)

    runs = len(cfg.methods) + bool(cfg.benign_corpus)
    print(f"[2/3] train {runs} model(s) from {cfg.annotate.output_dir}", flush=True)
    checkpoints = {"reference": cfg.annotate.policy}
    for spec in cfg.methods:
        method, _, signal = spec.partition(":")
        name = spec.replace(":", "_")
        risk = replace(cfg.train.risk, signal=signal) if signal else cfg.train.risk
        print(f"  {spec}", flush=True)
        result = train_run_model(cfg, out, name, method=method, risk=risk,
                                 shards=cfg.train.shards or cfg.annotate.output_dir)
        checkpoints[name] = str(result.final_dir)
    if cfg.benign_corpus:
        checkpoints["sft_benign"] = str(train_on_benign_corpus(cfg, out).final_dir)

    print(f"[3/3] evaluate {len(checkpoints)} model(s)", flush=True)
    run_evaluation(cfg, checkpoints, out)


def train_on_benign_corpus(cfg: RunConfig, out: Path) -> TrainResult:
    """Plain SFT on the benign set: its shards need no risk scores, only the data pass."""
    from safekeel.annotate.run import annotate

    benign_shards = out / "annotate_benign"
    annotate(replace(cfg.annotate, corpus=replace(cfg.annotate.corpus, path=cfg.benign_corpus),
                     critic=replace(cfg.annotate.critic, model=""),
                     star=replace(cfg.annotate.star, enabled=False),
                     probe=replace(cfg.annotate.probe, path=""),
                     output_dir=str(benign_shards)))
    print(f"  sft on the benign set {cfg.benign_corpus}", flush=True)
    return train_run_model(cfg, out, "sft_benign", method="sft", shards=str(benign_shards))


def train_run_model(cfg: RunConfig, out: Path, name: str, **changes) -> TrainResult:
    """Stage two for one model of the run: the run's train settings, the annotated policy
    unless train names another, and `out/train/<name>`."""
    from safekeel.train.run import train

    return train(replace(cfg.train, policy=cfg.train.policy or cfg.annotate.policy,
                         output_dir=str(out / "train" / name), **changes))


def embedded_run_config(cfg: RunConfig, out: Path) -> RunConfig:
    """The run on the embedded default: its world, its aligned policy, its guard as critic."""
    import json

    from safekeel.annotate.probe_stage import ProbeFitConfig, fit
    from safekeel.data.embedded import SCALES, prepare_embedded_default

    print(f"embedded default ({cfg.embedded_scale}): world, tiny policy and guard in {out}",
          flush=True)
    settings = SCALES[cfg.embedded_scale]
    default = prepare_embedded_default(out, seed=cfg.embedded_seed, settings=settings)

    # The probe learns harmful intent from the alignment set's prompts, apart from the
    # attack mix it then scores.
    probe_sets = {"harmful": out / "probe" / "harmful.jsonl",
                  "benign": out / "probe" / "benign.jsonl"}
    probe_sets["harmful"].parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in default.sets["alignment_train"].open()]
    for label, path in probe_sets.items():
        wanted = label == "harmful"
        path.write_text("".join(json.dumps({"messages": r["messages"][:1]}) + "\n"
                                for r in rows if r["is_harmful"] == wanted))
    probe_dir = out / "probe" / "model"
    fit(from_dict(ProbeFitConfig, {"policy": str(default.policy),
                                   "harmful": str(probe_sets["harmful"]),
                                   "benign": str(probe_sets["benign"]),
                                   "layers": [-1], "output_dir": str(probe_dir)}))

    critic = replace(cfg.annotate.critic, model=str(default.guard),
                     template=default.guard_template,
                     template_options=default.guard_template_options, dtype="float32",
                     enforce_eager=True)
    annotate_cfg = replace(
        cfg.annotate,
        corpus=replace(cfg.annotate.corpus, path=str(default.attack_mix)),
        policy=str(default.policy), critic=critic,
        star=replace(cfg.annotate.star, enabled=True,
                     segment_tokens=settings.star_segment_tokens),
        probe=replace(cfg.annotate.probe, path=str(probe_dir)),
        tokenization=replace(cfg.annotate.tokenization, max_length=settings.max_length),
        output_dir=str(out / "annotate"),
    )
    # Fine-tuning on the attack mix: a few epochs, so that plain SFT has time to learn the
    # harmful-compliant share and the defenses have something to hold back. The attack
    # dilutes harmful rows among benign ones (30%), so a batch's *mean* risk stays near 0.3,
    # where the paper's preset gives w = 0.1 and SFT wins; the batch *max* pulls every batch
    # that holds a harmful row to the reference (the paper's own attack is all harmful, where
    # the two agree).
    train_cfg = replace(cfg.train, learning_rate=1e-3, epochs=3, per_device_batch_size=16,
                        warmup_ratio=0.05, save_every=0,
                        risk=replace(cfg.train.risk, aggregate="max"),
                        tokenization=replace(cfg.train.tokenization,
                                             max_length=settings.max_length))
    evaluate_cfg = embedded_evaluate_config(cfg.evaluate, default, settings, critic)
    return replace(cfg, annotate=annotate_cfg, train=train_cfg, evaluate=evaluate_cfg,
                   benign_corpus=cfg.benign_corpus or str(default.sets["benign_finetune"]))


def embedded_evaluate_config(base: EvaluateConfig, default, settings,
                             critic: GuardSettings) -> EvaluateConfig:
    """Evaluation on the world's held-out sets, judged by keywords and by the tiny guard
    served exactly as annotate's `critic` (only the judge's threshold is evaluate's)."""
    from safekeel.evaluate.config import PromptSetConfig, TaskConfig

    return replace(
        base,
        harmful_prompts=PromptSetConfig(name="world_harmful",
                                        path=str(default.sets["eval_harmful"]),
                                        category_column="topic"),
        benign_prompts=PromptSetConfig(name="world_benign",
                                       path=str(default.sets["eval_benign_overrefusal"])),
        tasks=[TaskConfig(name="world_tasks", path=str(default.sets["eval_tasks"]),
                          reference="row", scorer="safekeel.evaluate.prompts:world_task_scorer")],
        critic=replace(critic, threshold=base.critic.threshold),
        max_new_tokens=settings.generation_tokens,
        enforce_eager=True,  # tiny models: compiling each engine costs more than it saves
    )


def run_evaluation(cfg: RunConfig, checkpoints: dict[str, str], out: Path) -> None:
    evaluate_verb(replace(cfg.evaluate, checkpoints=list(checkpoints.values()),
                          checkpoint_names=list(checkpoints), output_dir=str(out / "evaluate")))


def evaluate_verb(cfg: EvaluateConfig) -> None:
    """`safekeel evaluate`: stage three (it builds its own Safety Critic judge)."""
    from safekeel.evaluate.run import evaluate

    evaluate(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    verb = VERBS[args.verb]
    if unknown:
        parser.exit(2, f"safekeel {args.verb}: {unknown_option_message(unknown[0], verb.config)}\n")
    try:
        cfg = load_config(
            verb.config, args.config, overrides_from_namespace(args),
            section=None if args.verb == "run" else args.verb,
        )
    except ConfigError as err:
        parser.exit(2, f"safekeel {args.verb}: config error: {err}\n")
    if args.print_config:
        import yaml

        from safekeel.data.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    module_name, func_name = verb.runner.split(":")
    runner = getattr(importlib.import_module(module_name), func_name)
    runner(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
