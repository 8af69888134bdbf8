"""safekeel: the one entry point.

    safekeel annotate --config configs/my.yaml --corpus.path data.jsonl --policy my/model
    safekeel train    --shards runs/annotate --method adaptive
    safekeel evaluate --checkpoints '[runs/train/final]'
    safekeel run                      # the chain on the embedded default (configs/embedded.yaml)

Every option is a dotted path into the stage's config (`--kl.beta 0.5`); `--config FILE`
supplies defaults from YAML (a file with `annotate:` / `train:` / `evaluate:` sections serves
every verb). The resolved config is saved beside each stage's output. The terminal shows
progress and one-line summaries; library logs go to OUTPUT_DIR/safekeel.log (`--verbose`
shows them). A mistake in the config, data or model names prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from dataclasses import dataclass
from typing import Any

from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.probe_stage import ProbeFitConfig
from safekeel.data.config import (
    ConfigError,
    add_config_arguments,
    deep_merge,
    from_dict,
    leaf_fields,
    load_config,
    overrides_from_namespace,
    read_yaml,
)
from safekeel.evaluate.config import EvaluateConfig
from safekeel.recipe import RunConfig, expand_placeholders, preset_path
from safekeel.train.config import TrainConfig

USER_ERROR = 2  # the exit code of a mistake in what the user gave (argparse's too)


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
    "evaluate": Verb(EvaluateConfig, "safekeel.evaluate.run:evaluate",
                     "Stage three: attack success rate and utility of checkpoints, as a report."),
    "probe": Verb(ProbeFitConfig, "safekeel.annotate.probe_stage:fit",
                  "Fit the harmful-intent probe on labelled prompt files and report it."),
    "run": Verb(RunConfig, "safekeel.recipe:run",
                "The stages chained by a config file; default: the embedded preset "
                "(configs/embedded.yaml)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safekeel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        sub = verbs.add_parser(name, help=verb.summary, description=verb.summary)
        default = " (default: the embedded preset)" if name == "run" else ""
        sub.add_argument("--config", metavar="FILE", help="YAML file with defaults for the options "
                         f"below (its `{name}:` section if it has one){default}.")
        sub.add_argument("--print-config", action="store_true",
                         help="Print the resolved config as YAML and exit.")
        sub.add_argument("--verbose", action="store_true", help="Show library logs (vLLM, "
                         "transformers) on the terminal too.")
        sub.add_argument("--debug", action="store_true",
                         help="On an error, show the full traceback.")
        add_config_arguments(sub, verb.config)
    return parser


def unknown_option_message(flag: str, config: type) -> str:
    names = [f"--{dotted}" for dotted, _, _ in leaf_fields(config)]
    close = difflib.get_close_matches(flag.split("=")[0], names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown option {flag}{hint} (see --help for every option)"


def user_error(message: str) -> int:
    print(f"safekeel: error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR


def load_stage_config(verb: str, cls: type, config_file: str | None,
                      overrides: dict[str, Any]) -> Any:
    """A verb's config. A stage given a run config (configs/smollm2.yaml) reads its own
    section, with the run's `{output_dir}` and `{data_dir}` filled in as `run` fills them, so
    one stage of a recipe reruns alone (`safekeel evaluate --config configs/smollm2.yaml`)."""
    if verb == "run" or config_file is None:
        return load_config(cls, config_file, overrides)
    values = read_yaml(config_file)
    if isinstance(values.get(verb), dict):  # a run config: this stage's section
        values = expand_placeholders(values[verb], str(values.get("output_dir", "")),
                                     str(values.get("data_dir", "")))
    return from_dict(cls, deep_merge(values, overrides) if overrides else values)


def main(argv: list[str] | None = None) -> int:
    from safekeel.console import is_user_error, routed_output

    argv = sys.argv[1:] if argv is None else argv
    args, unknown = build_parser().parse_known_args(argv)
    verb = VERBS[args.verb]
    if unknown:
        return user_error(unknown_option_message(unknown[0], verb.config))
    try:
        config_file = args.config
        if config_file is None and args.verb == "run":
            config_file = preset_path()
        cfg = load_stage_config(args.verb, verb.config, config_file,
                                overrides_from_namespace(args))
        if args.print_config:
            import yaml

            from safekeel.data.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        module_name, func_name = verb.runner.split(":")
        runner = getattr(importlib.import_module(module_name), func_name)
        with routed_output(cfg.output_dir, verbose=args.verbose):
            runner(cfg)
    except Exception as err:
        if args.debug or not (isinstance(err, ConfigError) or is_user_error(err)):
            raise
        return user_error(" ".join(str(err).split()) or type(err).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
