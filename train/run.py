"""Stage two: fine-tune the policy on annotated shards with a risk-weighted objective.

`train(cfg)` runs the whole stage:

1. Check everything that can be checked before a model is loaded: the config, the output
   directory (new, empty, or an earlier output of this stage; anything else is refused),
   the shard set (schema, the columns the method needs, the policy tokenizer's fingerprint
   in the provenance, every risk value finite and in range: `ShardReader` + `validate_values`).
2. Load the policy. Full fine-tuning: for methods whose KL weight can be non-zero, a frozen
   copy in eval mode is the reference (`FrozenCopyReference`). LoRA (`lora.enabled`): peft
   wraps the policy and the reference is the same model inside `disable_adapter()`
   (`AdapterDisabledReference`), so no second copy of the weights exists.
3. Loop over optimizer steps. One step = `gradient_accumulation_steps` micro-batches per
   process. The micro-batches of a step are fetched first so their response tokens can be
   counted (all-reduced over processes), then each one runs
   forward -> weights -> `token_objective` -> `normalise` -> backward (see
   `train.objective` for why the loss is normalised by the step's token count). The
   reference forward is skipped whenever b(t) = 0 for the whole micro-batch, and counted.
   Logits are only ever computed for response positions (hidden states + lm_head, lazily).
   Mixed precision (`mixed_precision`) autocasts the forward and the loss; the loss itself
   upcasts each chunk of logits to fp32.
4. Every step is logged (train_log.jsonl on the main process, and the tracker chosen by
   `report_to` under the keys `train/loss`, `train/ce`, `train/kl`, `train/kl_weight`,
   `train/batch_risk`, ...); every `save_every` steps the full state (model, optimizer,
   schedule, RNG) goes to `checkpoints/step-N` with `accelerate`'s `save_state`, and a
   rerun in the same output_dir resumes from the latest one. The data order depends only
   on (seed, epoch, rank), so resuming replays the same micro-batches: the logged loss
   sequence after resume equals the uninterrupted one.
5. The final model goes to `output_dir/final` in HF format (full weights, or the LoRA
   adapter), with the tokenizer and the resolved config; `merge_lora` also writes the
   adapter merged into the base weights to `output_dir/merged`.

A non-finite loss stops the run with the step and the example ids of the micro-batch;
the checkpoints written before it stay as they are.

Multiple processes (`accelerate launch` or `torchrun`): the data split is rank-aware (see
`train.data`; nothing else re-shards it); the token count, the logged sums and the NaN
check are all-reduced. The reference forward runs on the *unwrapped* model, never through
DDP: whether it runs is decided per process (b = 0 on one rank's micro-batch need not hold
on another's), and a wrapped forward could start collectives the other ranks never join.
`record_ranks` makes every process write the example ids it trained on and a checksum of
its final parameters (tests/train/test_multiprocess.py checks both on 2 CPU processes).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from safekeel.data.config import ConfigError, save_resolved, to_dict, validate
from safekeel.data.models import load_causal_lm, load_tokenizer
from safekeel.data.output_dir import (
    OutputDirError,
    guards_output_dir,
    is_write_check,
    prepare_output_dir,
)
from safekeel.data.shards import Manifest, ShardReader, tokenizer_fingerprint
from safekeel.train.config import TrainConfig, weight_policy_params
from safekeel.train.data import TrainingBatch, TrainingStream
from safekeel.train.objective import (
    LazyLogits,
    LossParts,
    count_step_tokens,
    lazy_masked_logits,
    normalise,
    token_objective,
)
from safekeel.train.weights import TokenWeights, WeightPolicy, make_weight_policy, needs_reference

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
    """The accelerate `mixed_precision` for a config value; fp16 without a GPU is refused."""
    has_cuda = torch.cuda.is_available()
    if choice == "auto":
        if not has_cuda:
            return "no"  # CPU autocast changes numerics for little gain on small models
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and not has_cuda:
        raise ConfigError("mixed_precision: 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    return choice


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
    entries = sorted(p.name for p in output_dir.iterdir() if not is_write_check(p.name))
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


def open_shards(cfg: TrainConfig, policy: WeightPolicy, tokenizer: Any) -> ShardReader:
    """Validate the shard set for this method and tokenizer; raises ShardError naming where."""
    if not cfg.shards:
        raise ConfigError("shards: no shard directory given")
    reader = ShardReader(
        cfg.shards,
        required_columns=policy.required_columns,
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
        return get_peft_model(model, lora)
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(f"lora.target_modules: {err}") from None


# --------------------------------------------------------------------------- references


class ReferencePolicy(Protocol):
    """The safe reference q: logits for the response positions of a batch, without gradient."""

    def response_logits(self, batch: TrainingBatch) -> LazyLogits: ...


def _base_hidden(causal_lm: torch.nn.Module, batch: TrainingBatch) -> Tensor:
    """Final-norm hidden states [B, T-1, H] from the transformer body, without the head."""
    return causal_lm.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state[:, :-1]


@dataclass
class FrozenCopyReference:
    """Full fine-tuning: a frozen copy of the initial policy, in eval mode."""

    model: torch.nn.Module

    def response_logits(self, batch: TrainingBatch) -> LazyLogits:
        with torch.no_grad():
            hidden = _base_hidden(self.model, batch)
        return lazy_masked_logits(hidden, self.model.get_output_embeddings(), batch.response_mask)


@dataclass
class AdapterDisabledReference:
    """LoRA: the policy itself with its adapter switched off, i.e. the base model.

    Only the body runs inside `disable_adapter()`; the head is applied later, lazily, which
    is exact because the head never carries an adapter (`LoraConfig.validate` refuses it).
    The body runs in eval mode so that the reference is deterministic.
    """

    peft_model: Any  # peft.PeftModel, unwrapped (not the DDP/FSDP wrapper)

    def response_logits(self, batch: TrainingBatch) -> LazyLogits:
        causal_lm = self.peft_model.get_base_model()
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            with torch.no_grad(), self.peft_model.disable_adapter():
                hidden = _base_hidden(causal_lm, batch)
        finally:
            causal_lm.train(was_training)
        return lazy_masked_logits(hidden, causal_lm.get_output_embeddings(), batch.response_mask)


def build_reference(model: torch.nn.Module, device: torch.device) -> FrozenCopyReference:
    """A frozen copy of the (not yet trained) policy in eval mode: the safe reference."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    return FrozenCopyReference(reference.to(device))


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


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


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
    tmp = log_path.with_name(f".{log_path.name}.tmp")  # a kill now keeps the old log whole
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log_path)


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
    reference: ReferencePolicy | None,
    policy: WeightPolicy,
    batch: TrainingBatch,
    *,
    kl_estimator: str,
    chunk_size: int,
) -> MicroResult:
    """sum_t a CE + b KL for one micro-batch; the reference runs only if some b(t) != 0."""
    mask = batch.response_mask
    weights = policy(
        mask,
        critic_p_unsafe=batch.critic_p_unsafe,
        probe_p_harmful=batch.probe_p_harmful,
        star_v_safe_tokens=batch.star_v_safe_tokens,
    )
    policy_logits = lazy_masked_logits(_final_hidden(model, batch), head, mask)
    ref_logits = None
    skip = not needs_reference(weights)
    if not skip:
        if reference is None:
            raise TrainingError(f"method {policy.name!r} set a KL weight but has no reference")
        ref_logits = reference.response_logits(batch)
    parts = token_objective(
        policy_logits,
        batch.target_ids[mask],
        weights.a[mask],
        weights.b[mask],
        ref_logits,
        kl_estimator=kl_estimator,
        chunk_size=chunk_size,
    )
    return MicroResult(parts, weights, skip)


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
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir)
    accumulation = cfg.gradient_accumulation_steps
    log_with = tracker_name(cfg.report_to)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=accumulation,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=log_with,
        project_dir=str(output_dir / LOGS_DIR),
    )
    configure_for_deepspeed(accelerator, cfg)
    set_seed(cfg.seed)
    rank = accelerator.process_index

    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    policy = make_weight_policy(cfg.method, **weight_policy_params(cfg))
    reader = open_shards(cfg, policy, tokenizer)
    stream = TrainingStream(
        reader,
        tokenizer,
        cfg.tokenization,
        cfg.per_device_batch_size,
        risk_columns=policy.required_columns,
        seed=cfg.seed,
        rank=rank,
        world_size=accelerator.num_processes,
        buffer_size=cfg.shuffle_buffer,
    )
    micro_total = sum(stream.batches_per_epoch(e) for e in range(cfg.epochs))
    total_steps = math.ceil(micro_total / accumulation)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    log_path = output_dir / LOG_NAME
    rank_dir = output_dir / RANKS_DIR / f"rank-{rank}"
    # Every process has checked output_dir before any of them writes to it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_output_dir(output_dir)
        save_resolved(cfg, output_dir / CONFIG_NAME)
    if cfg.record_ranks:
        rank_dir.mkdir(parents=True, exist_ok=True)

    model = load_causal_lm(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    model.train()
    reference: ReferencePolicy | None = None
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    elif policy.uses_reference:
        # Copied before `prepare` so it never becomes part of the optimised (or wrapped)
        # model, and frozen in eval mode.
        reference = build_reference(model, accelerator.device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    # The schedule counts optimizer steps; it is stepped by hand and not `prepare`d, which
    # would step it once per process and per micro-batch.
    scheduler = LambdaLR(optimizer, linear_warmup_schedule(total_steps, warmup_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    head = unwrapped.get_output_embeddings()
    if cfg.lora.enabled and policy.uses_reference:
        reference = AdapterDisabledReference(unwrapped)

    resume_key = _resume_key(cfg, accelerator.num_processes, total_steps, reader.manifest)
    start_step = 0
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
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
        start_step = int(state["step"])
    if accelerator.is_main_process:
        _truncate_log(log_path, start_step)
    ids_path = rank_dir / IDS_LOG_NAME
    if cfg.record_ranks:
        _truncate_log(ids_path, start_step)
    if log_with is not None:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(cfg))

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"train {cfg.method}" + (" (LoRA)" if cfg.lora.enabled else ""),
        disable=not (cfg.progress_bar and accelerator.is_local_main_process),
    )
    ref_run = ref_skipped = 0
    last_checkpoint = checkpoint
    step = start_step
    steps = _steps(stream, cfg.epochs, accumulation)
    for _ in range(start_step):  # replay the data order up to the checkpoint
        next(steps)
    # Step time runs from the end of one step to the end of the next: it includes reading
    # and tokenising the rows, which the generator does lazily inside the loop.
    step_started = time.perf_counter()
    for window in steps:
        if step >= total_steps:
            break
        step += 1
        batches = [batch.to(accelerator.device) for _, batch in window]
        n_tokens = count_step_tokens([b.response_mask for b in batches])
        lr = scheduler.get_last_lr()[0]
        # numerator, ce, kl, kl tokens, a sum, b sum, ref skipped, ref run
        sums = torch.zeros(8, dtype=torch.float64, device=accelerator.device)
        risks: list[float] = []
        for index, batch in enumerate(batches):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    result = micro_batch_loss(
                        model, head, reference, policy, batch,
                        kl_estimator=cfg.kl.estimator, chunk_size=cfg.chunk_size,
                    )
                parts = result.parts
                _stop_if_not_finite(accelerator, parts, batch, step, index, last_checkpoint)
                loss = normalise(
                    parts.numerator,
                    n_tokens,
                    world_size=accelerator.num_processes,
                    accumulation_steps=accumulation,
                )
                accelerator.backward(loss)
            mask = batch.response_mask
            sums += torch.tensor(
                [
                    parts.numerator.item(),
                    parts.ce_sum.item(),
                    0.0 if parts.kl_sum is None else parts.kl_sum.item(),
                    0 if parts.kl_sum is None else parts.n_tokens,
                    result.weights.a[mask].sum().item(),
                    result.weights.b[mask].sum().item(),
                    float(result.reference_skipped),
                    float(not result.reference_skipped),
                ],
                dtype=torch.float64,
                device=accelerator.device,
            )
            ref_skipped += int(result.reference_skipped)
            ref_run += int(not result.reference_skipped)
            if result.weights.batch_risk is not None and not batch.is_empty:
                risks.append(result.weights.batch_risk.item())

        # The last micro-batch of the window synced the gradients (see `_steps`).
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

        sums = accelerator.reduce(sums, reduction="sum")
        n = max(int(n_tokens), 1)
        record = {
            "step": step,
            "loss": sums[0].item() / n,
            "ce": sums[1].item() / n,
            "kl": sums[2].item() / sums[3].item() if sums[3] > 0 else None,
            "kl_weight": sums[5].item() / n,
            "ce_weight": sums[4].item() / n,
            "batch_risk": sum(risks) / len(risks) if risks else None,  # main process
            "ref_skipped": int(sums[6].item()),
            "ref_run": int(sums[7].item()),
            "tokens": int(n_tokens),
            "lr": lr,
            # None where the engine clips by itself and reports nothing (DeepSpeed)
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "step_seconds": time.perf_counter() - step_started,
        }
        if accelerator.is_main_process:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if cfg.record_ranks:
            with open(ids_path, "a", encoding="utf-8") as handle:
                for index, (epoch, batch) in enumerate(window):
                    ids = [i for i in batch.ids if i]
                    line = {"step": step, "micro_batch": index, "epoch": epoch, "ids": ids}
                    handle.write(json.dumps(line) + "\n")
        if log_with is not None:
            accelerator.log(
                {f"train/{k}": v for k, v in record.items() if k != "step" and v is not None},
                step=step,
            )
        bar.update(1)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            kl="-" if record["kl"] is None else f"{record['kl']:.4f}",
            kl_w=f"{record['kl_weight']:.3f}",
        )
        # The last step is saved too, so a rerun of a finished run has nothing left to do.
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            last_checkpoint = _save_checkpoint(accelerator, output_dir, step, resume_key)
        step_started = time.perf_counter()
    bar.close()

    final_dir = output_dir / FINAL_DIR
    merged_dir = output_dir / MERGED_DIR if cfg.lora.enabled and cfg.merge_lora else None
    accelerator.wait_for_everyone()
    if cfg.record_ranks:
        _write_json_atomic(rank_dir / RANK_SUMMARY_NAME, {
            "rank": rank,
            "world_size": accelerator.num_processes,
            "steps": step,
            "parameter_sha256": parameter_checksum(unwrapped),
        })
    _save_final(accelerator, model, tokenizer, cfg, final_dir, merged_dir)
    accelerator.end_training()
    return TrainResult(
        output_dir=output_dir,
        final_dir=final_dir,
        log_path=log_path,
        steps=step,
        resumed_from_step=start_step if checkpoint is not None else None,
        world_size=accelerator.num_processes,
        ref_forwards_run=ref_run,
        ref_forwards_skipped=ref_skipped,
        tokenization_issues=dict(stream.issues),
        truncated_examples=stream.truncated_examples,
        merged_dir=merged_dir,
    )


def _save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: TrainConfig,
    final_dir: Path,
    merged_dir: Path | None,
) -> None:
    """HF-format model (full weights, or the LoRA adapter), tokenizer and resolved config.

    `get_state_dict` runs on every process: under FSDP / ZeRO-3 it gathers the shards.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # peft keeps only the adapter's weights from the full state dict
        unwrapped.save_pretrained(final_dir, state_dict=state_dict)
        tokenizer.save_pretrained(final_dir)
        save_resolved(cfg, final_dir / CONFIG_NAME)
        if merged_dir is not None:
            # The run is over: merging in place is fine, the model is not used afterwards.
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
            save_resolved(cfg, merged_dir / CONFIG_NAME)
    accelerator.wait_for_everyone()


def _stop_if_not_finite(
    accelerator: Accelerator,
    parts: LossParts,
    batch: TrainingBatch,
    step: int,
    index: int,
    last_checkpoint: Path | None,
) -> None:
    """Raise NonFiniteLossError on every process if any process's loss is NaN or infinite.

    The flag is all-reduced so that all processes stop together, before the backward pass
    (a process that stopped alone would leave the others waiting in the all-reduce).
    """
    local_bad = not bool(torch.isfinite(parts.numerator))
    flag = torch.tensor([float(local_bad)], device=parts.numerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return
    where = f"micro-batch {index + 1} of {accelerator.gradient_accumulation_steps}"
    if accelerator.num_processes > 1:
        where += f", process {accelerator.process_index}"
    what = (
        f"loss is {parts.numerator.item()} on examples {[i for i in batch.ids if i]}"
        if local_bad
        else "another process's loss is not finite"
    )
    saved = last_checkpoint if last_checkpoint is not None else "none yet"
    raise NonFiniteLossError(
        f"step {step} ({where}): {what}; training stopped, last checkpoint: {saved}"
    )


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, resume_key: dict[str, Any]
) -> Path:
    """Full state to checkpoints/step-N; trainer_state.json last, so it marks completeness."""
    path = output_dir / CHECKPOINTS_DIR / f"step-{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(
            path / TRAINER_STATE_NAME, {"step": step, "resume_key": resume_key}
        )
    accelerator.wait_for_everyone()
    return path
