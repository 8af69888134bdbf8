"""Stage two: fine-tune a model on annotated shards with a risk-weighted objective.

Names: `cfg.policy` is the path of the model to fine-tune (the user-facing `--policy`);
in code the model being trained is `model`, and the rule that turns risk into per-token
weights a(t), b(t) is the `weight_policy` (`train.weights`).

`train(cfg)` reads top-down; each piece is a function of its own:

1. Checks that need no model: the config, the output directory (new, empty, or an
   earlier output of this stage; anything else is refused), the shard set (schema, the
   columns the method needs, the tokenizer's fingerprint in the provenance, every risk
   value finite and in range: `ShardReader` + `validate_values`).
2. `setup_accelerator`, `setup_data`, `setup_output_dir`, `setup_model`: the model,
   optimizer, schedule and reference (`train.reference`: a frozen copy for full
   fine-tuning, the model with its LoRA adapter disabled for `lora.enabled`, or with
   `--reference precomputed` no model: the log-probs stored in the shards, whose
   provenance is checked against this model shard by shard), then
   `resume_from_checkpoint`.
3. `run_loop`: one `train_step` per optimizer step = `gradient_accumulation_steps`
   micro-batches per process. The micro-batches of a step are fetched first so their
   response tokens can be counted (all-reduced over processes), then each one runs
   forward -> weights -> `token_objective` -> `normalise` -> backward (see
   `train.objective` for why the loss is normalised by the step's token count). The
   reference forward is skipped whenever b(t) = 0 for the whole micro-batch, and counted.
   Logits are only ever computed for response positions (hidden states + lm_head, lazily).
   Mixed precision (`mixed_precision`) autocasts the forward and the loss; the loss itself
   upcasts each chunk of logits to fp32. The step's metrics stay on the device
   (`train.metrics`) and reach the host once per step, after gradient clipping.
4. Every step is logged (`StepLog`: train_log.jsonl on the main process, and the tracker
   chosen by `report_to` under the keys `train/loss`, `train/ce`, `train/kl`,
   `train/kl_weight`, `train/batch_risk`, ...); every `save_every` steps the full state
   (model, optimizer, schedule, RNG) goes to `checkpoints/step-N` with `accelerate`'s
   `save_state`, and a rerun in the same output_dir resumes from the latest one. The data
   order depends only on (seed, epoch, rank), so resuming replays the same micro-batches:
   the logged loss sequence after resume equals the uninterrupted one.
5. `save_final_model`: `output_dir/final` in HF format (full weights, or the LoRA
   adapter), with the tokenizer and the resolved config; `merge_lora` also writes the
   adapter merged into the base weights to `output_dir/merged`.

A non-finite loss stops the run with the step and the example ids of the micro-batch,
before the optimizer step; the checkpoints written before it stay as they are.

Multiple processes (`accelerate launch` or `torchrun`): the data split is rank-aware (see
`train.data`; nothing else re-shards it); the token count, the logged sums and the NaN
flags are all-reduced. The reference forward runs on the *unwrapped* model, never through
DDP (see `train.reference`). `record_ranks` makes every process write the example ids it
trained on and a checksum of its final parameters (tests/train/test_multiprocess.py
checks both on 2 CPU processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from safekeel.data import precision
from safekeel.data.config import ConfigError, save_resolved, to_dict, validate
from safekeel.data.files import atomic_write_json, atomic_write_text
from safekeel.data.models import attention_kernel, load_causal_lm, load_tokenizer
from safekeel.data.output_dir import (
    OutputDirError,
    guards_output_dir,
    is_bookkeeping,
    prepare_output_dir,
)
from safekeel.data.risk_columns import REFERENCE_COLUMN_NAMES
from safekeel.data.shards import Manifest, ShardReader, tokenizer_fingerprint
from safekeel.train.config import TrainConfig, weight_policy_params
from safekeel.train.data import TrainingBatch, TrainingStream
from safekeel.train.metrics import StepMetrics, StepTotals
from safekeel.train.objective import (
    LossParts,
    count_step_tokens,
    lazy_masked_logits,
    normalise,
    token_objective,
)
from safekeel.train.reference import (
    AdapterDisabledReference,
    ReferenceModel,
    SkippingReference,
    StoredReference,
    build_reference,
    check_stored_reference,
    expected_reference_provenance,
)
from safekeel.train.weights import TokenWeights, WeightPolicy, make_weight_policy

LOG_NAME = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
MERGED_DIR = "merged"
LOGS_DIR = "logs"  # tracker output (TensorBoard)
RANKS_DIR = "ranks"
IDS_LOG_NAME = "example_ids.jsonl"
RANK_SUMMARY_NAME = "summary.json"
TRAINER_STATE_NAME = "trainer_state.json"
CONFIG_NAME = "train_config.yaml"
TRACKER_PROJECT = "safekeel"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingError(RuntimeError):
    """Training had to stop; the message says at which step and on which examples."""


class NonFiniteLossError(TrainingError):
    """A micro-batch's loss was NaN or infinite."""


class ResumeError(ValueError):
    """The checkpoint in output_dir was written by a run with other settings, or is damaged."""


@dataclass(frozen=True)
class LoopSettings:
    """Deprecated: these options now live in `TrainConfig`; a field set here overrides it.

    Kept so that callers written against the earlier `train(cfg, LoopSettings(...))` work.
    """

    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    save_every: int | None = None
    shuffle_buffer: int | None = None
    chunk_size: int | None = None
    progress_bar: bool | None = None

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(cfg, **changes)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    log_path: Path
    steps: int  # optimizer steps done in total (including those before a resume)
    resumed_from_step: int | None
    world_size: int
    ref_forwards_run: int  # this process, this run
    ref_forwards_skipped: int
    tokenization_issues: dict[str, int] = field(default_factory=dict)
    truncated_examples: int = 0
    merged_dir: Path | None = None


# --------------------------------------------------------------------------- set-up


def linear_warmup_schedule(total_steps: int, warmup_steps: int):
    """LR factor of (0-based) step s: (s+1)/warmup during warm-up, then linear decay.

    No step has factor 0, so the first and last steps both train.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def resolve_mixed_precision(choice: str) -> str:
    """The accelerate `mixed_precision` for a config value (see `data.precision`)."""
    try:
        return precision.resolve_mixed_precision(choice)
    except ValueError as err:  # fp16 without a GPU
        raise ConfigError(str(err)) from None


def tracker_name(report_to: str) -> str | None:
    """accelerate's `log_with` for `report_to`; a tracker whose package is missing is refused."""
    if report_to == "none":
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"report_to: {report_to!r} needs the {package} package (pip install {package})"
        )
    return report_to


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config flattened to dotted keys with scalar values (what trackers accept)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (bool, int, float, str)):
                flat[f"{prefix}{key}"] = value
            else:  # lists, None
                flat[f"{prefix}{key}"] = json.dumps(value)

    walk(to_dict(cfg), "")
    return flat


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output_dir that is a file, or a non-empty directory this stage did not write.

    Ours means: it holds our resolved config (`train_config.yaml`, written first by every
    run) as a mapping with a method and shards. Checked before anything is loaded or written.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir}: is a file, not a directory")
    if not output_dir.is_dir():
        return
    entries = sorted(p.name for p in output_dir.iterdir() if not is_bookkeeping(p.name))
    if not entries:
        return
    config_path = output_dir / CONFIG_NAME
    if not config_path.is_file():
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirError(
            f"output_dir {output_dir}: not empty and not written by safekeel train (no "
            f"{CONFIG_NAME}; it holds {shown}); use a new or empty directory"
        )
    try:
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise OutputDirError(f"{config_path}: not valid YAML ({err})") from None
    if not isinstance(saved, dict) or not {"method", "shards"} <= saved.keys():
        raise OutputDirError(
            f"{config_path}: not a safekeel train config (no method/shards keys); "
            "use a new or empty output_dir"
        )


def configure_for_deepspeed(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Give DeepSpeed the micro-batch size it cannot infer, and keep one accumulation count.

    We `prepare` no DataLoader (the stream is rank-aware already), so DeepSpeed's "auto"
    micro-batch size has nothing to be filled from. If its config sets another accumulation
    count, accelerate would silently use that one and our token normalisation would be off.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"gradient_accumulation_steps: {cfg.gradient_accumulation_steps}, but the DeepSpeed "
            f"config sets {accelerator.gradient_accumulation_steps}; make them equal"
        )


def uses_stored_reference(cfg: TrainConfig, weight_policy: WeightPolicy) -> bool:
    """`--reference precomputed` for a method that has a KL term at all."""
    return cfg.reference == "precomputed" and weight_policy.uses_reference


def columns_read(cfg: TrainConfig, weight_policy: WeightPolicy) -> tuple[str, ...]:
    """The shard columns the run streams: the weight policy's, and the stored reference's."""
    stored = REFERENCE_COLUMN_NAMES if uses_stored_reference(cfg, weight_policy) else ()
    return (*weight_policy.required_columns, *stored)


def open_shards(cfg: TrainConfig, weight_policy: WeightPolicy, tokenizer: Any) -> ShardReader:
    """Validate the shard set for this method and tokenizer; raises ShardError naming where."""
    if not cfg.shards:
        raise ConfigError("shards: no shard directory given")
    reader = ShardReader(
        cfg.shards,
        required_columns=columns_read(cfg, weight_policy),
        expected_tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        consumer=f"method {cfg.method!r}",
    )
    reader.validate_values()  # every risk value once, before any training
    return reader


def apply_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA adapter as configured; only the adapter trains."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError("lora.enabled: needs the peft package (pip install 'safekeel[peft]')")
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(f"lora.target_modules: {err}") from None
    # The saved adapter names the policy as the user gave it, not the directory it was
    # loaded from (for an adapter policy, a merge cache that may be deleted).
    from safekeel.data.adapters import base_reference

    peft_model.peft_config["default"].base_model_name_or_path = base_reference(cfg.policy)
    return peft_model


# --------------------------------------------------------------------------- checkpoints


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json; a damaged one is an error naming the file."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeError(f"{path}: unreadable trainer state ({err})") from None
    if not isinstance(state, dict) or not {"step", "resume_key"} <= state.keys():
        raise ResumeError(f"{path}: not a safekeel trainer state (needs step and resume_key)")
    return state


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps (complete: its trainer_state.json exists)."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), path)
        for path in root.iterdir()
        if (m := _STEP_DIR.match(path.name)) and (path / TRAINER_STATE_NAME).is_file()
    ]
    return max(found)[1] if found else None


# Settings that change where results go or how they are shown, not the trained weights:
# a rerun may change them and still resume.
_RESUME_FREE = ("output_dir", "save_every", "report_to", "progress_bar", "record_ranks",
                "merge_lora")


def _resume_key(
    cfg: TrainConfig, world_size: int, total_steps: int, shards: Manifest | None = None
) -> dict[str, Any]:
    """What must not change between a run and its resume for the result to be exact: every
    setting that shapes the weights, and the shards' content (a checkpoint of one corpus
    continued on another would mix the two)."""
    settings = {
        f"config.{k}": v for k, v in tracker_config(cfg).items() if k not in _RESUME_FREE
    }
    if shards is not None:
        blob = json.dumps([s.to_dict() for s in shards.shards.values()], sort_keys=True)
        settings["shards_sha256"] = hashlib.sha256(blob.encode()).hexdigest()
    return settings | {
        "policy": cfg.policy,
        "shards": str(Path(cfg.shards).resolve()),
        "method": cfg.method,
        "seed": cfg.seed,
        "per_device_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "epochs": cfg.epochs,
        "total_steps": total_steps,
        "world_size": world_size,
        "lora": to_dict(cfg.lora) if cfg.lora.enabled else None,
    }


def _truncate_log(log_path: Path, keep_through_step: int) -> None:
    """Keep the log lines of steps already covered by the checkpoint we resume from."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
        if record["step"] <= keep_through_step:
            kept.append(line)
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))  # a kill keeps it whole


def parameter_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes, in module order (equal iff bitwise equal)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- one micro-batch


@dataclass
class MicroResult:
    parts: LossParts
    weights: TokenWeights
    ce_weights: Tensor  # a(t) of the N response tokens, as the objective got them
    kl_weights: Tensor  # b(t) likewise
    reference_skipped: bool


def _final_hidden(model: torch.nn.Module, batch: TrainingBatch) -> Tensor:
    """Final-norm hidden states [B, T-1, H] of the positions that predict the next token.

    The model's own forward runs (so DDP sees it), asked for the logits of one position only.
    """
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return out.hidden_states[-1][:, :-1]


def micro_batch_loss(
    model: torch.nn.Module,
    head: torch.nn.Module,
    reference: SkippingReference,
    weight_policy: WeightPolicy,
    batch: TrainingBatch,
    *,
    kl_estimator: str,
    chunk_size: int,
) -> MicroResult:
    """sum_t a CE + b KL for one micro-batch; the reference runs only if some b(t) != 0."""
    mask = batch.response_mask
    weights = weight_policy(
        mask,
        critic_p_unsafe=batch.critic_p_unsafe,
        probe_p_harmful=batch.probe_p_harmful,
        star_v_safe_tokens=batch.star_v_safe_tokens,
    )
    model_logits = lazy_masked_logits(_final_hidden(model, batch), head, mask)
    ref_logits = reference.logits_if_needed(batch, weights)
    ce_weights, kl_weights = weights.a[mask], weights.b[mask]
    parts = token_objective(
        model_logits,
        batch.target_ids[mask],
        ce_weights,
        kl_weights,
        ref_logits,
        kl_estimator=kl_estimator,
        chunk_size=chunk_size,
    )
    return MicroResult(
        parts, weights, ce_weights, kl_weights, reference_skipped=ref_logits is None
    )


# --------------------------------------------------------------------------- set-up pieces


@dataclass
class OutputPaths:
    """Where one run writes, under output_dir; `rank` names this process's folder."""

    root: Path
    rank: int
    merge_lora: bool

    @property
    def log(self) -> Path:
        return self.root / LOG_NAME

    @property
    def rank_dir(self) -> Path:
        return self.root / RANKS_DIR / f"rank-{self.rank}"

    @property
    def example_ids(self) -> Path:
        return self.rank_dir / IDS_LOG_NAME

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def merged(self) -> Path | None:
        return self.root / MERGED_DIR if self.merge_lora else None


@dataclass
class TrainedModel:
    """The model being trained (as `prepare`d, and unwrapped), its optimizer and schedule,
    and the reference it is held to."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    reference: SkippingReference

    @property
    def head(self) -> torch.nn.Module:
        return self.unwrapped.get_output_embeddings()


def setup_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator for this run (precision, accumulation, tracker), with seeds set."""
    # accelerate keeps one process-wide state and refuses a second run in the same process
    # with another precision; each train() is a run of its own (the process group stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=tracker_name(cfg.report_to),
        project_dir=str(Path(cfg.output_dir) / LOGS_DIR),
    )
    configure_for_deepspeed(accelerator, cfg)
    set_seed(cfg.seed)
    return accelerator


def setup_data(
    cfg: TrainConfig, weight_policy: WeightPolicy, tokenizer: Any, accelerator: Accelerator
) -> TrainingStream:
    """This process's share of the validated shard set, as tokenised micro-batches."""
    reader = open_shards(cfg, weight_policy, tokenizer)
    return TrainingStream(
        reader,
        tokenizer,
        cfg.tokenization,
        cfg.per_device_batch_size,
        risk_columns=columns_read(cfg, weight_policy),
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        buffer_size=cfg.shuffle_buffer,
        group_by_length=cfg.group_by_length,
        accumulation_steps=cfg.gradient_accumulation_steps,
    )


def count_total_steps(cfg: TrainConfig, stream: TrainingStream) -> int:
    """Optimizer steps of the whole run: every epoch's micro-batches, capped by max_steps."""
    micro_total = sum(stream.batches_per_epoch(e) for e in range(cfg.epochs))
    total_steps = math.ceil(micro_total / cfg.gradient_accumulation_steps)
    return total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)


def setup_output_dir(cfg: TrainConfig, accelerator: Accelerator) -> OutputPaths:
    """Create output_dir and write the resolved config (main process); the rank folder."""
    paths = OutputPaths(
        Path(cfg.output_dir), accelerator.process_index, cfg.lora.enabled and cfg.merge_lora
    )
    # Every process has checked output_dir before any of them writes to it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_output_dir(paths.root)
        if not (paths.root / CONFIG_NAME).exists():  # a rerun's is saved once it may resume
            save_resolved(cfg, paths.root / CONFIG_NAME)
    if cfg.record_ranks:
        paths.rank_dir.mkdir(parents=True, exist_ok=True)
    return paths


def setup_model(
    cfg: TrainConfig, weight_policy: WeightPolicy, accelerator: Accelerator, total_steps: int,
    stream: TrainingStream | None = None,
) -> TrainedModel:
    """Load the model (`cfg.policy`), its reference, optimizer and schedule; `prepare` them.

    Full fine-tuning copies the reference before `prepare`, so it never becomes part of
    the optimised (or wrapped) model. LoRA's reference is the model with its adapter off.
    `--reference precomputed` builds none: every shard of `stream` must hold the stored
    reference of this very model (checked against the model as loaded, before any adapter).
    """
    model = load_causal_lm(
        cfg.policy, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attention_kernel(cfg.attn_implementation,
                                             accelerator.device.type))
    model.train()
    reference: ReferenceModel | None = None
    stored = uses_stored_reference(cfg, weight_policy)
    if stored:
        if stream is None:
            raise ConfigError("reference: precomputed needs the training stream's shards")
        expected = expected_reference_provenance(
            model, stream.tokenizer, cfg.tokenization, cfg.policy,
            min_top_k=cfg.reference_min_top_k, on_cpu=accelerator.device.type == "cpu")
        check_stored_reference(stream.reader.files, expected, estimator=cfg.kl.estimator)
        reference = StoredReference()
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    elif weight_policy.uses_reference and not stored:
        reference = build_reference(model, accelerator.device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        # None: PyTorch's own choice (foreach); fused has kernels on CPU and CUDA only
        fused=(cfg.fused_optimizer and accelerator.device.type in ("cpu", "cuda")) or None,
    )
    # The schedule counts optimizer steps; it is stepped by hand and not `prepare`d, which
    # would step it once per process and per micro-batch.
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = LambdaLR(optimizer, linear_warmup_schedule(total_steps, warmup_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if cfg.lora.enabled and weight_policy.uses_reference and not stored:
        reference = AdapterDisabledReference(unwrapped)
    return TrainedModel(
        model, unwrapped, optimizer, scheduler, SkippingReference(reference, cfg.method)
    )


def resume_from_checkpoint(
    accelerator: Accelerator, output_dir: Path, resume_key: dict[str, Any]
) -> tuple[Path | None, int]:
    """Load output_dir's latest checkpoint, if any: (its path, the step it was written at)."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return None, 0
    state = read_trainer_state(checkpoint / TRAINER_STATE_NAME)
    if state["resume_key"] != resume_key:
        changed = [
            f"{k}: {state['resume_key'].get(k)!r} -> {v!r}"
            for k, v in resume_key.items()
            if state["resume_key"].get(k) != v
        ]
        raise ResumeError(
            f"{checkpoint}: written by a run with other settings ({'; '.join(changed)}); "
            "use another output_dir to start afresh"
        )
    accelerator.load_state(str(checkpoint))
    return checkpoint, int(state["step"])


class StepLog:
    """Where each step's record goes: train_log.jsonl (main process), the tracker under
    `train/<key>`, the progress bar, and with `record_ranks` this process's example ids.

    Opening it drops the lines of steps after `start_step` (a resumed run rewrites them).
    """

    def __init__(
        self, cfg: TrainConfig, accelerator: Accelerator, paths: OutputPaths,
        start_step: int, total_steps: int,
    ) -> None:
        self._accelerator = accelerator
        self._paths = paths
        self._record_ranks = cfg.record_ranks
        self._tracking = cfg.report_to != "none"
        if accelerator.is_main_process:
            _truncate_log(paths.log, start_step)
        if cfg.record_ranks:
            _truncate_log(paths.example_ids, start_step)
        if self._tracking:
            accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(cfg))
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=f"train {cfg.method}" + (" (LoRA)" if cfg.lora.enabled else ""),
            disable=not (cfg.progress_bar and accelerator.is_local_main_process),
        )

    def write(self, record: dict[str, Any], window: Window) -> None:
        step = record["step"]
        if self._accelerator.is_main_process:
            with open(self._paths.log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._record_ranks:
            with open(self._paths.example_ids, "a", encoding="utf-8") as handle:
                for index, (epoch, batch) in enumerate(window):
                    ids = [i for i in batch.ids if i]
                    line = {"step": step, "micro_batch": index, "epoch": epoch, "ids": ids}
                    handle.write(json.dumps(line) + "\n")
        if self._tracking:
            self._accelerator.log(
                {f"train/{k}": v for k, v in record.items() if k != "step" and v is not None},
                step=step,
            )
        self._bar.update(1)
        self._bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            kl="-" if record["kl"] is None else f"{record['kl']:.4f}",
            kl_w=f"{record['kl_weight']:.3f}",
        )

    def close(self) -> None:
        self._bar.close()


# --------------------------------------------------------------------------- the loop


Window = list[tuple[int, TrainingBatch]]  # (epoch, micro-batch) of one optimizer step


def _micro_batches(stream: TrainingStream, epochs: int) -> Iterator[tuple[int, TrainingBatch]]:
    for epoch in range(epochs):
        for batch in stream.iter_batches(epoch):
            yield epoch, batch


def _steps(stream: TrainingStream, epochs: int, accumulation: int) -> Iterator[Window]:
    """Micro-batches grouped per optimizer step; the last group is topped up with empty ones.

    Topping up keeps every step at exactly `accumulation` micro-batches, which is what
    `accelerator.accumulate` counts on to sync gradients on the last one.
    """
    window: Window = []
    epoch = 0
    for epoch, batch in _micro_batches(stream, epochs):
        window.append((epoch, batch))
        if len(window) == accumulation:
            yield window
            window = []
    if window:
        yield window + [(epoch, stream.empty_batch()) for _ in range(accumulation - len(window))]


@guards_output_dir
def train(cfg: TrainConfig, settings: LoopSettings | None = None) -> TrainResult:
    """Run stage two with `cfg`; resumes from output_dir's latest checkpoint if there is one.

    `settings` is deprecated (set the same options in `cfg`); fields it sets win.
    """
    if settings is not None:
        cfg = settings.apply(cfg)
    validate(cfg)
    check_output_dir(Path(cfg.output_dir))  # before anything is loaded or written
    accelerator = setup_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    weight_policy = make_weight_policy(cfg.method, **weight_policy_params(cfg))
    stream = setup_data(cfg, weight_policy, tokenizer, accelerator)
    total_steps = count_total_steps(cfg, stream)
    paths = setup_output_dir(cfg, accelerator)
    trained = setup_model(cfg, weight_policy, accelerator, total_steps, stream)

    resume_key = _resume_key(cfg, accelerator.num_processes, total_steps,
                             stream.reader.manifest)
    checkpoint, start_step = resume_from_checkpoint(accelerator, paths.root, resume_key)
    if accelerator.is_main_process:
        save_resolved(cfg, paths.root / CONFIG_NAME)  # a refused rerun left the old one
    step_log = StepLog(cfg, accelerator, paths, start_step, total_steps)
    steps = run_loop(
        cfg, accelerator, trained, weight_policy, stream, step_log,
        start_step=start_step, total_steps=total_steps,
        resume_key=resume_key, last_checkpoint=checkpoint,
    )
    step_log.close()

    accelerator.wait_for_everyone()
    if cfg.record_ranks:
        save_rank_summary(accelerator, trained, paths, steps)
    save_final_model(accelerator, trained, tokenizer, cfg, paths)
    accelerator.end_training()
    return TrainResult(
        output_dir=paths.root,
        final_dir=paths.final,
        log_path=paths.log,
        steps=steps,
        resumed_from_step=start_step if checkpoint is not None else None,
        world_size=accelerator.num_processes,
        ref_forwards_run=trained.reference.forwards_run,
        ref_forwards_skipped=trained.reference.forwards_skipped,
        tokenization_issues=dict(stream.issues),
        truncated_examples=stream.truncated_examples,
        merged_dir=paths.merged,
    )


def run_loop(
    cfg: TrainConfig,
    accelerator: Accelerator,
    trained: TrainedModel,
    weight_policy: WeightPolicy,
    stream: TrainingStream,
    step_log: StepLog,
    *,
    start_step: int,
    total_steps: int,
    resume_key: dict[str, Any],
    last_checkpoint: Path | None,
) -> int:
    """Optimizer steps from `start_step` to `total_steps`, logged and checkpointed.

    Returns the number of the last step done. The data order depends only on (seed, epoch,
    rank), so skipping the first `start_step` windows replays exactly what a resumed run
    had trained on.
    """
    step = start_step
    steps = _steps(stream, cfg.epochs, cfg.gradient_accumulation_steps)
    for _ in range(start_step):  # replay the data order up to the checkpoint
        next(steps)
    # Step time runs from the end of one step to the end of the next: it includes reading
    # and tokenising the rows, which the generator does lazily inside the loop.
    step_started = time.perf_counter()
    for window in steps:
        if step >= total_steps:
            break
        step += 1
        lr = trained.scheduler.get_last_lr()[0]
        totals = train_step(cfg, accelerator, trained, weight_policy, window)
        _stop_if_not_finite(accelerator, totals, window, step, last_checkpoint)
        trained.optimizer.step()
        trained.scheduler.step()
        trained.optimizer.zero_grad()
        step_log.write(totals.record(step, lr, time.perf_counter() - step_started), window)
        # The last step is saved too, so a rerun of a finished run has nothing left to do.
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            last_checkpoint = save_checkpoint(
                accelerator, Path(cfg.output_dir), step, resume_key
            )
        step_started = time.perf_counter()
    return step


def train_step(
    cfg: TrainConfig,
    accelerator: Accelerator,
    trained: TrainedModel,
    weight_policy: WeightPolicy,
    window: Window,
) -> StepTotals:
    """Forward and backward over one step's micro-batches, then clip; the step's metrics.

    The step's response tokens are counted first (over all processes) so that every
    micro-batch's loss is normalised by them (see `train.objective`). The metrics reach
    the host once, after the gradients are clipped; the optimizer step is the caller's,
    after it has checked that every loss was finite.
    """
    batches = [batch.to(accelerator.device) for _, batch in window]
    step_tokens = count_step_tokens([b.response_mask for b in batches])
    metrics = StepMetrics(step_tokens)
    # read from the host copies: asking the device would wait for it on every micro-batch
    empty = [host.is_empty for _, host in window]
    for batch, is_empty in zip(batches, empty, strict=True):
        with accelerator.accumulate(trained.model):
            with accelerator.autocast():
                result = micro_batch_loss(
                    trained.model, trained.head, trained.reference, weight_policy, batch,
                    kl_estimator=cfg.kl.estimator, chunk_size=cfg.chunk_size,
                )
            loss = normalise(
                result.parts.numerator,
                step_tokens,
                world_size=accelerator.num_processes,
                accumulation_steps=cfg.gradient_accumulation_steps,
            )
            accelerator.backward(loss)
        metrics.add(
            result.parts,
            ce_weights=result.ce_weights,
            kl_weights=result.kl_weights,
            batch_risk=result.weights.batch_risk,
            reference_skipped=result.reference_skipped,
            padding=is_empty,
        )
    # The last micro-batch of the window synced the gradients (see `_steps`).
    grad_norm = accelerator.clip_grad_norm_(trained.model.parameters(), cfg.max_grad_norm)
    return metrics.sync(accelerator, grad_norm)


def _stop_if_not_finite(
    accelerator: Accelerator,
    totals: StepTotals,
    window: Window,
    step: int,
    last_checkpoint: Path | None,
) -> None:
    """Raise NonFiniteLossError on every process if any process's loss was NaN or infinite.

    The finiteness flags were all-reduced with the step's metrics, so all processes stop
    together, before the optimizer step: the weights and the checkpoints stay as they were.
    """
    index = totals.first_nonfinite()
    if index is None:
        return
    where = f"micro-batch {index + 1} of {accelerator.gradient_accumulation_steps}"
    if accelerator.num_processes > 1:
        where += f", process {accelerator.process_index}"
    local_loss = totals.local_losses[index]
    batch = window[index][1]
    what = (
        f"loss is {local_loss} on examples {[i for i in batch.ids if i]}"
        if not math.isfinite(local_loss)
        else "another process's loss is not finite"
    )
    saved = last_checkpoint if last_checkpoint is not None else "none yet"
    raise NonFiniteLossError(
        f"step {step} ({where}): {what}; training stopped, last checkpoint: {saved}"
    )


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, resume_key: dict[str, Any]
) -> Path:
    """Full state to checkpoints/step-N; trainer_state.json last, so it marks completeness."""
    path = output_dir / CHECKPOINTS_DIR / f"step-{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(
            path / TRAINER_STATE_NAME, {"step": step, "resume_key": resume_key}
        )
    accelerator.wait_for_everyone()
    return path


def save_rank_summary(
    accelerator: Accelerator, trained: TrainedModel, paths: OutputPaths, steps: int
) -> None:
    """`record_ranks`: this process's world size, steps and final-parameter checksum."""
    atomic_write_json(paths.rank_dir / RANK_SUMMARY_NAME, {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "steps": steps,
        "parameter_sha256": parameter_checksum(trained.unwrapped),
    })


def save_final_model(
    accelerator: Accelerator,
    trained: TrainedModel,
    tokenizer: Any,
    cfg: TrainConfig,
    paths: OutputPaths,
) -> None:
    """HF-format model (full weights, or the LoRA adapter), tokenizer and resolved config;
    with `merge_lora` also the adapter merged into the base weights.

    `get_state_dict` runs on every process: under FSDP / ZeRO-3 it gathers the shards.
    """
    state_dict = accelerator.get_state_dict(trained.model)
    if accelerator.is_main_process:
        if cfg.lora.enabled and cfg.lora.save_dtype != "float32":
            dtype = getattr(torch, cfg.lora.save_dtype)
            state_dict = {k: v.to(dtype) if "lora_" in k else v for k, v in state_dict.items()}
        # peft keeps only the adapter's weights from the full state dict; the base may be an
        # adapter (no config.json), and embeddings are never trained: do not look for them
        trained.unwrapped.save_pretrained(paths.final, state_dict=state_dict,
                                          **({"save_embedding_layers": False}
                                             if cfg.lora.enabled else {}))
        tokenizer.save_pretrained(paths.final)
        save_resolved(cfg, paths.final / CONFIG_NAME)
        if paths.merged is not None:
            # The run is over: merging in place is fine, the model is not used afterwards.
            merged = trained.unwrapped.merge_and_unload()
            merged.save_pretrained(paths.merged)
            tokenizer.save_pretrained(paths.merged)
            save_resolved(cfg, paths.merged / CONFIG_NAME)
    accelerator.wait_for_everyone()
