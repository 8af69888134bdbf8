"""The harmful-intent probe inside stage one: fit it from prompt files (`safekeel probe`),
and apply it to a corpus (`safekeel annotate --probe.path DIR`).

Both read the policy model's activations on the prompt as its chat template renders it
just before generation (annotate.activations); the probe file records the model
fingerprint, layers and pooling, and applying it to another model or layer is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safekeel.annotate.activations import ActivationSpec, TransformersActivationExtractor
from safekeel.annotate.probe import (
    fit_probe_from_files,
    load_probe,
    load_probe_for,
    probe_scores,
    save_probe,
)
from safekeel.data.config import ConfigError, option, save_resolved
from safekeel.data.files import file_sha256
from safekeel.data.risk_columns import PROBE_COLUMN


@dataclass
class ProbeApplyConfig:
    path: str = option("", help="A probe directory (probe.safetensors + probe.json) made by "
                       "`safekeel probe`; empty: no probe column.")
    batch_size: int = option(16, help="Prompts per forward pass of the policy model.")

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {self.batch_size}")


@dataclass
class ProbeFitConfig:
    policy: str = option("", help="The policy model whose activations the probe reads.")
    harmful: str = option("", help="Harmful prompts: txt (one a line), json list, or "
                          "json/jsonl/csv/parquet rows with a prompt-like column.")
    benign: str = option("", help="Benign prompts, same formats.")
    layers: list[int] = option([-1], help="Decoder layers to read (negative counts from the "
                               "end); several are concatenated.")
    all_layers: bool = option(False, help="Average every decoder layer instead of `layers` "
                              "(the reference code's choice).")
    pooling: Literal["last", "mean"] = option("last", help="Last prompt token or mean over "
                                              "prompt tokens.")
    kind: Literal["logreg", "mlp"] = option("logreg", help="Logistic regression (L2, class-"
                                            "balanced) or a one-hidden-layer MLP.")
    l2: float = option(1e-2, help="L2 penalty on the weights.")
    val_fraction: float = option(0.25, help="Share of each class held out for the report.")
    target_recall: float = option(0.9, help="The threshold is the highest reaching this "
                                  "recall on the held-out split.")
    max_prompts_per_file: int | None = option(None, help="Use at most this many prompts of "
                                              "each file.")
    batch_size: int = option(16, help="Prompts per forward pass.")
    seed: int = option(0, help="Split and initialisation seed.")
    trust_remote_code: bool = option(False, help="Allow the policy's code from the hub.")
    output_dir: str = option("runs/probe", help="Where probe.safetensors, probe.json and the "
                             "report go.")

    def validate(self) -> None:
        for name in ("policy", "harmful", "benign"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"target_recall: must be in (0, 1], got {self.target_recall}")

    def spec(self) -> ActivationSpec:
        return ActivationSpec(layers="all" if self.all_layers else tuple(self.layers),
                              pooling=self.pooling)


def _extractor(policy: str, spec: ActivationSpec, batch_size: int,
               trust_remote_code: bool = False) -> TransformersActivationExtractor:
    from safekeel.data.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(policy, trust_remote_code=trust_remote_code)
    model = load_causal_lm(policy, dtype="float32", trust_remote_code=trust_remote_code)
    return TransformersActivationExtractor(model, tokenizer, spec, batch_size=batch_size,
                                           name=policy)


def fit(cfg: ProbeFitConfig) -> dict[str, Any]:
    """The `probe` verb: fit on labelled prompt files, save, print and return the report."""
    out = Path(cfg.output_dir)
    extractor = _extractor(cfg.policy, cfg.spec(), cfg.batch_size, cfg.trust_remote_code)
    probe = fit_probe_from_files(
        extractor, cfg.harmful, cfg.benign, cfg.kind,
        max_prompts_per_file=cfg.max_prompts_per_file, l2=cfg.l2,
        val_fraction=cfg.val_fraction, target_recall=cfg.target_recall, seed=cfg.seed,
    )
    save_probe(probe, out)
    save_resolved(cfg, out / "probe_config.yaml")
    report = probe.report.to_dict()
    (out / "probe_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"probe ({cfg.kind}, layers {probe.layers}, pooling {probe.pooling}) on held-out "
          f"prompts: AUROC {report['auroc']:.4f}, accuracy {report['accuracy']:.3f}, "
          f"precision {report['precision']:.3f}, recall {report['recall']:.3f} at threshold "
          f"{report['threshold']:.3f} -> {out}")
    return report


class ProbeAnnotator:
    """Adds `probe_p_harmful`: the probe's P(harmful intent) of each example's prompt."""

    columns = (PROBE_COLUMN,)

    def __init__(self, cfg: ProbeApplyConfig, policy: str, trust_remote_code: bool = False):
        stored = load_probe(cfg.path)  # read its layers and pooling first
        spec = ActivationSpec(layers="all" if stored.layers == "all" else tuple(stored.layers),
                              pooling=stored.pooling)
        self.extractor = _extractor(policy, spec, cfg.batch_size, trust_remote_code)
        self.probe = load_probe_for(cfg.path, self.extractor)  # refuses another model
        self.weights_sha256 = file_sha256(Path(cfg.path) / "probe.safetensors")

    def provenance(self) -> dict[str, Any]:
        layers = self.probe.layers
        return {
            "probe_file_sha256": self.weights_sha256,
            "probe_layers": list(range(self.extractor.num_layers)) if layers == "all"
            else list(layers),
            "probe_pooling": self.probe.pooling + (" (mean of all layers)"
                                                   if layers == "all" else ""),
        }

    def annotate(self, examples: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
        prompts = [self.extractor.prompt_ids(e["messages"], source=str(e.get("id", i)))
                   for i, e in enumerate(examples)]
        if not prompts:
            return {PROBE_COLUMN: []}
        return {PROBE_COLUMN: [float(p) for p in probe_scores(self.probe, self.extractor,
                                                              prompts)]}

    def close(self) -> None:
        pass
