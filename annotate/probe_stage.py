"""The harmful-intent probe inside stage one: fit it from prompt files (`safekeel probe`),
and apply it to a corpus (`safekeel annotate --probe.path DIR`).

Both read the policy model's activations on the prompt as its chat template renders it
just before generation (annotate.activations); the probe file records the model
fingerprint, layers and pooling, and applying it to another model or layer is refused.
Fitting reads them with transformers (float32); applying reads them from a vLLM engine
wherever vLLM is installed (the same numbers in float32: relative difference 2e-6 on
SmolLM2; 2.8x to 7x the rows per second on a busy machine, `benchmarks/bench_activations.py`), else with
transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safekeel.annotate.activations import (
    ActivationError,
    ActivationSpec,
    TransformersActivationExtractor,
    VLLMActivationExtractor,
)
from safekeel.annotate.probe import (
    ProbeError,
    fit_probe_from_files,
    load_probe,
    load_probe_for,
    probe_scores,
    save_probe,
)
from safekeel.annotate.probe_formats import (
    PROMPT_SLOT,
    FormatError,
    PromptFormat,
    prompt_formats,
)
from safekeel.data.config import ConfigError, option, save_resolved
from safekeel.data.corpus import CorpusConfig
from safekeel.data.files import file_sha256
from safekeel.data.risk_columns import PROBE_COLUMN


@dataclass
class ProbeApplyConfig:
    path: str = option("", help="A probe directory (probe.safetensors + probe.json) made by "
                       "`safekeel probe`; empty: no probe column.")
    backend: Literal["auto", "vllm", "transformers"] = option(
        "auto", help="Where the policy's activations are read: auto is a vLLM engine wherever "
        "vllm is installed (hooks in its worker), else transformers (the reference).")
    dtype: Literal["float32", "bfloat16"] = option(
        "float32", help="The policy's dtype while its activations are read: the one the probe "
        "was fitted in (`safekeel probe --dtype`, float32 by default; probe.json's "
        "activation_dtype). Another is refused: the probe's threshold holds in its own.")
    batch_size: int = option(16, help="Prompts per forward pass of the policy model "
                             "(transformers; vLLM schedules its own batches).")

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
                                              "each file (after `exclude`).")
    exclude: str = option("", help="A prompt file (same formats) whose prompts are dropped "
                          "from `harmful` and `benign` before fitting, matched ignoring case "
                          "and spacing: e.g. an evaluation set such as AdvBench, so its "
                          "prompts stay unseen.")
    formats: list[str] = option([], help="Format augmentation: extra templates, each holding "
                                "{prompt} once, that wrap the user's text (e.g. an Alpaca "
                                "template). Every prompt is fitted once as plain chat and once "
                                "per format; the report gives the held-out AUROC of each.")
    format_corpus: CorpusConfig = option(CorpusConfig, help="The corpus the probe will "
                                         "annotate (set format_corpus.path): the wrapper its "
                                         "user turns share (longest common prefix and suffix "
                                         "over its first format_sample_rows rows, read as "
                                         "annotate reads them) becomes one more format. Only "
                                         "that wrapper text is used: the corpus's rows are "
                                         "never training data of the probe.")
    format_sample_rows: int = option(1000, help="Rows of format_corpus the wrapper is "
                                     "derived from.")
    batch_size: int = option(16, help="Prompts per forward pass.")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "float32", help="The policy's dtype while its activations are read; annotate reads "
        "them in the same one (probe.json records it). float32 by default: the same probe "
        "scores the same on any machine, and reading prompts is a small share of annotate's "
        "work. auto: bfloat16 where the hardware has it natively, else float32.")
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
        if self.format_sample_rows < 2:
            raise ConfigError(f"format_sample_rows: must be at least 2, got "
                              f"{self.format_sample_rows}")
        for i, template in enumerate(self.formats):
            if template.count(PROMPT_SLOT) != 1:
                raise ConfigError(f"formats[{i}]: must hold {PROMPT_SLOT} exactly once, got "
                                  f"{template!r}")

    def prompt_formats(self) -> list[PromptFormat]:
        """Plain chat, the explicit templates, and the format corpus's wrapper if it has one."""
        try:
            return prompt_formats(self.formats,
                                  self.format_corpus if self.format_corpus.path else None,
                                  self.format_sample_rows)
        except FormatError as error:
            raise ConfigError(str(error)) from None

    def spec(self) -> ActivationSpec:
        return ActivationSpec(layers="all" if self.all_layers else tuple(self.layers),
                              pooling=self.pooling)


def _extractor(policy: str, spec: ActivationSpec, batch_size: int,
               trust_remote_code: bool = False, dtype: str = "float32"
               ) -> TransformersActivationExtractor:
    from safekeel.data.models import load_causal_lm, load_tokenizer
    from safekeel.data.precision import resolve_dtype

    dtype = resolve_dtype(dtype, device="cpu")  # transformers loads it on the CPU
    tokenizer = load_tokenizer(policy, trust_remote_code=trust_remote_code)
    model = load_causal_lm(policy, dtype=dtype, trust_remote_code=trust_remote_code)
    return TransformersActivationExtractor(model, tokenizer, spec, batch_size=batch_size,
                                           name=policy)


def resolve_probe_backend(backend: str) -> str:
    """'vllm' or 'transformers': auto picks vLLM wherever it is installed."""
    from safekeel.data.engines import vllm_available

    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        from safekeel.data.engines import VLLM_INSTALL_HINT

        raise ConfigError(f"probe.backend: 'vllm' but vllm is not installed: {VLLM_INSTALL_HINT} "
                          "(or set probe.backend: transformers)")
    return backend


def apply_extractor(cfg: ProbeApplyConfig, policy: str, spec: ActivationSpec, *,
                    max_prompt_tokens: int, trust_remote_code: bool = False,
                    fitted_dtype: str | None = None,
                    ) -> TransformersActivationExtractor | VLLMActivationExtractor:
    """The extractor annotate's probe reads activations with: a vLLM engine by default
    (context `max_prompt_tokens` + 1), the transformers reference where vLLM is absent.
    A probe that records its `fitted_dtype` is refused in another `cfg.dtype`."""
    dtype = cfg.dtype
    if fitted_dtype is not None and dtype != fitted_dtype:  # before the policy loads
        raise ProbeError(f"{cfg.path}: field 'activation_dtype' is {fitted_dtype!r}, but "
                         f"probe.dtype reads the activations in {dtype}; the probe's "
                         f"standardisation and threshold hold in its own dtype: set probe.dtype: "
                         f"{fitted_dtype}")
    if resolve_probe_backend(cfg.backend) == "vllm":
        return VLLMActivationExtractor.start(
            policy, spec, dtype=dtype, needed_tokens=max_prompt_tokens + 1,
            trust_remote_code=trust_remote_code, name=policy)
    return _extractor(policy, spec, cfg.batch_size, trust_remote_code, dtype)


def fit(cfg: ProbeFitConfig) -> dict[str, Any]:
    """The `probe` verb: fit on labelled prompt files, save, print and return the report."""
    out = Path(cfg.output_dir)
    formats = cfg.prompt_formats()  # before the model loads: a bad corpus fails fast
    extractor = _extractor(cfg.policy, cfg.spec(), cfg.batch_size, cfg.trust_remote_code,
                           cfg.dtype)
    probe = fit_probe_from_files(
        extractor, cfg.harmful, cfg.benign, cfg.kind,
        max_prompts_per_file=cfg.max_prompts_per_file, formats=formats,
        exclude_path=cfg.exclude or None, l2=cfg.l2,
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
    if probe.training.get("n_excluded"):
        print(f"  {probe.training['n_excluded']} prompt(s) found in {cfg.exclude} left out")
    for fmt in formats:
        per = report["per_format"].get(fmt.name)
        if per is not None:
            value = "n/a" if per["auroc"] is None else f"{per['auroc']:.4f}"
            print(f"  format {fmt.name}: held-out AUROC {value} over {per['n_heldout']} "
                  f"renderings; template {fmt.template!r}")
    return report


class ProbeAnnotator:
    """Adds `probe_p_harmful`: the probe's P(harmful intent) of each example's prompt."""

    columns = (PROBE_COLUMN,)

    def __init__(self, cfg: ProbeApplyConfig, policy: str, trust_remote_code: bool = False,
                 max_prompt_tokens: int = 1024):
        stored = load_probe(cfg.path)  # read its layers and pooling first
        spec = ActivationSpec(layers="all" if stored.layers == "all" else tuple(stored.layers),
                              pooling=stored.pooling)
        self.extractor = apply_extractor(cfg, policy, spec, max_prompt_tokens=max_prompt_tokens,
                                         trust_remote_code=trust_remote_code,
                                         fitted_dtype=stored.activation_dtype)
        try:
            self.probe = load_probe_for(cfg.path, self.extractor)  # refuses another model
        except Exception:
            self.extractor.close()
            raise
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
        limit = getattr(self.extractor, "max_prompt_tokens", None)
        for i, (example, ids) in enumerate(zip(examples, prompts, strict=True)):
            if limit is not None and len(ids) > limit:
                raise ActivationError(
                    f"row {example.get('id', i)!r}: its prompt has {len(ids)} tokens, more than "
                    f"the probe's vLLM engine holds ({limit}, from tokenization.max_length); "
                    "raise tokenization.max_length or set probe.backend: transformers"
                )
        return {PROBE_COLUMN: [float(p) for p in probe_scores(self.probe, self.extractor,
                                                              prompts)]}

    def close(self) -> None:
        self.extractor.close()
