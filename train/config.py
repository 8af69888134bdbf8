"""Options of stage two (train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from safekeel.data.config import ConfigError, option
from safekeel.data.risk_columns import RISK_SIGNALS
from safekeel.data.tokenization import TokenizationConfig

# The names a config may choose, listed once here (torch-free, so --help stays fast); the
# weight policies and schedules of train.weights carry the same names (a test holds them
# equal). The risk signals come from the per-example risk columns (data.risk_columns).
METHODS = ("sft", "constant_kl", "filter", "downweight", "adaptive", "adaptive_example",
           "star_dss")
BATCH_AGGREGATES = ("mean", "max")
SCHEDULE_KINDS = ("paper", "linear", "step", "sigmoid")
Method = Literal[METHODS]
RiskSignal = Literal[RISK_SIGNALS]
BatchAggregate = Literal[BATCH_AGGREGATES]
ScheduleKind = Literal[SCHEDULE_KINDS]

# Llama-style attention and MLP projections: the usual LoRA targets.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]
# Output heads under their usual names. The KL reference is the policy with its adapter
# disabled, and the trainer projects hidden states through the head lazily, *outside* that
# context (see train.objective.LazyLogits); an adapter on the head would leak into the
# reference, so targeting it is refused.
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output")


@dataclass
class KLConfig:
    beta: float = option(0.1, help="KL weight for constant_kl.")
    estimator: Literal["forward", "reverse", "k1", "k2", "k3"] = option(
        "forward", help="forward/reverse: full-vocabulary KL(ref||policy) / KL(policy||ref); "
        "k1/k2/k3: target-token estimators.")

    def validate(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")


@dataclass
class LoraConfig:
    enabled: bool = option(False, help="Train a LoRA adapter instead of all weights; the KL "
                           "reference is then the same model with the adapter disabled.")
    r: int = option(8, help="LoRA rank.")
    alpha: float = option(16.0, help="LoRA scaling numerator (the update is scaled by alpha/r).")
    dropout: float = option(0.05, help="Dropout on the LoRA input.")
    target_modules: list[str] = option(
        DEFAULT_LORA_TARGETS, help="Module names that get an adapter, or ['all-linear'] for "
        "every linear layer but the output head. The output head cannot be targeted.")
    save_dtype: Literal["float32", "bfloat16"] = option(
        "float32", help="dtype of the saved adapter weights (training runs in float32); "
        "bfloat16 halves the file, e.g. for committing small adapters.")

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules: must name at least one module")
        heads = [m for m in self.target_modules if m.split(".")[-1] in OUTPUT_HEAD_NAMES]
        if heads:
            raise ConfigError(
                f"target_modules: {heads[0]!r} is the output head; an adapter there would also "
                "change the KL reference (the adapter-disabled model), so it is not supported"
            )


@dataclass
class RiskConfig:
    signal: RiskSignal = option(
        "critic", help="Which risk column drives the weights: the critic's P(unsafe), the "
        "probe's P(harmful), or their max / mean.")
    aggregate: BatchAggregate = option(
        "mean", help="adaptive: batch risk = mean (the paper) or max of the examples' risks.")
    schedule: ScheduleKind = option(
        "paper", help="adaptive*: risk -> KL weight w. paper: r = 1 + 4p on the 1..5 scale, "
        "w = clip((r - 2) / 3, 0.1, 0.9); linear/step/sigmoid: see schedule_options.")
    schedule_options: dict[str, float] = option(
        {}, help="Schedule parameters: linear {low, high, w_min, w_max}, step {threshold, "
        "w_low, w_high}, sigmoid {center, temperature, w_min, w_max}.")
    threshold: float = option(0.5, help="filter / downweight: examples with risk >= this are "
                              "flagged.")
    downweight_factor: float = option(0.1, help="downweight: CE weight of flagged examples.")
    star_lambda: float = option(1.0, help="star_dss: KL weight lambda on unsafe segments.")


def weight_policy_params(cfg: TrainConfig) -> dict[str, object]:
    """The parameters of train.weights.make_weight_policy that `cfg.method` takes."""
    risk = cfg.risk
    schedule = {"kind": risk.schedule, **risk.schedule_options}
    return {
        "sft": {},
        "constant_kl": {"beta": cfg.kl.beta},
        "filter": {"threshold": risk.threshold, "signal": risk.signal},
        "downweight": {"threshold": risk.threshold, "signal": risk.signal,
                       "factor": risk.downweight_factor},
        "adaptive": {"schedule": schedule, "signal": risk.signal, "aggregate": risk.aggregate},
        "adaptive_example": {"schedule": schedule, "signal": risk.signal},
        "star_dss": {"lam": risk.star_lambda},
    }[cfg.method]


@dataclass
class TrainConfig:
    shards: str = option("", help="Directory of annotated shards (with _manifest.json).")
    policy: str = option("", help="The model to fine-tune (HF dir, hub name, or "
                         "smollm2-135m-instruct); its frozen copy is the safe reference.")
    trust_remote_code: bool = option(False, help="Allow model code from the hub.")
    method: Method = option(
        "adaptive", help="How risk turns into per-token CE and KL weights.")
    kl: KLConfig = option(KLConfig, help="KL term.")
    reference: Literal["live", "precomputed"] = option(
        "live", help="The KL reference q. live: a frozen copy of the policy (full "
        "fine-tuning) or the policy with its adapter off (LoRA), run on every regulated "
        "micro-batch. precomputed: no reference model and no reference forward; the log-probs "
        "annotate stored (reference.enabled) are read from the shards. k1/k2/k3 are exact; "
        "forward KL uses the stored top-k plus one bucket (an underestimate); reverse is "
        "refused.")
    reference_min_top_k: int = option(
        1, help="--reference precomputed with forward KL: refuse shards storing a smaller "
        "top-k.")
    risk: RiskConfig = option(RiskConfig, help="How the risk columns set the weights.")
    lora: LoraConfig = option(LoraConfig, help="LoRA adapter (off: full fine-tuning).")
    tokenization: TokenizationConfig = option(TokenizationConfig, help="Chat tokenisation.")
    output_dir: str = option("runs/train", help="Checkpoints, logs and the final model. Must be "
                             "new, empty, or an earlier output of this stage (then it resumes).")
    learning_rate: float = option(1e-4, help="Peak learning rate.")
    warmup_ratio: float = option(0.1, help="Share of the optimizer steps with a linear LR "
                                 "warm-up (then linear decay).")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Clip the gradient norm to this.")
    epochs: int = option(1, help="Passes over the shards.")
    max_steps: int | None = option(None, help="Stop after this many optimizer steps.")
    per_device_batch_size: int = option(8, help="Examples per micro-batch per process.")
    gradient_accumulation_steps: int = option(1, help="Micro-batches per optimizer step.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", help="Autocast dtype. auto: bf16 where it is native (GPUs with bf16; CPUs "
        "with AVX512-BF16, AMX or Arm BF16), fp16 on other GPUs, no (fp32) on other CPUs. "
        "bf16 on a CPU that emulates it warns: it runs many times slower there.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = option(
        "auto", help="The policy's attention kernel. auto: eager on CPU (PyTorch's CPU "
        "flash-attention backward took ~16% of a SmolLM2 training step; eager is faster "
        "there, benchmarks/README.md), transformers' default (sdpa) elsewhere.")
    fused_optimizer: bool = option(True, help="AdamW's fused kernel on CPU and CUDA: one pass "
                                   "over the parameters, not one per operation (on a CPU it "
                                   "cut the optimizer step of SmolLM2 about 5x).")
    chunk_size: int = option(1024, help="Response positions per fp32 log-softmax chunk "
                             "(bounds the memory of the loss).")
    shuffle_buffer: int = option(256, help="Rows in each process's shuffle buffer.")
    group_by_length: bool = option(
        True, help="Put rows of like length in the same micro-batch (less padding): windows "
        "of 64 optimizer steps' rows are sorted by length, cut into steps, and the steps "
        "shuffled (seeded). Every row is still trained on once per epoch.")
    seed: int = option(0, help="Seed for shuffling and initialisation.")
    save_every: int = option(50, help="Optimizer steps between full-state checkpoints (a rerun "
                             "resumes from the latest); 0: only the final model.")
    merge_lora: bool = option(False, help="With LoRA, also save the adapter merged into the "
                              "base weights (output_dir/merged).")
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "none", help="Tracker for the metrics (train_log.jsonl is always written); "
        "tensorboard logs go to output_dir/logs.")
    progress_bar: bool = option(True, help="Show a progress bar (main process).")
    record_ranks: bool = option(False, help="Each process writes output_dir/ranks/rank-N/: the "
                                "example ids it trained on and a checksum of its final "
                                "parameters (for checking a distributed set-up).")

    def validate(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")
        for name in ("epochs", "per_device_batch_size", "gradient_accumulation_steps",
                     "chunk_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps: must be at least 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.save_every < 0:
            raise ConfigError(f"save_every: must be >= 0, got {self.save_every}")
        from safekeel.train.weights import make_weight_policy

        try:  # the weight policy checks its own parameters, naming what is allowed
            make_weight_policy(self.method, **weight_policy_params(self))
        except ValueError as err:
            raise ConfigError(f"risk: {err}") from None
        if self.reference == "precomputed" and self.kl.estimator == "reverse":
            raise ConfigError(
                "reference: precomputed stores the reference's top-k only, and reverse KL "
                "needs its whole distribution; use kl.estimator k2/k3 (exact) or forward "
                "(top-k), or --reference live")
        if self.reference_min_top_k < 1:
            raise ConfigError(
                f"reference_min_top_k: must be at least 1, got {self.reference_min_top_k}")
        if self.merge_lora and not self.lora.enabled:
            raise ConfigError("merge_lora: needs lora.enabled (there is no adapter to merge)")
