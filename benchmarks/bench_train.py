"""Stage two's speed against TRL and the machine, and its overheads against plain SFT.

    python benchmarks/bench_train.py                        # SmolLM2-135M-Instruct
    python benchmarks/bench_train.py --quick                # a 4-layer random Llama, 2 steps
    python benchmarks/bench_train.py --model tiny --steps 20

Every configuration trains in its own process on the same shards, rows and batch size;
step i reads the same rows everywhere (TRL's trainer is given our stream's row order).
What is printed, side by side (the issue's targets in brackets):

  tokens/s       real (non-padding) tokens per second of training, ours against TRL's
                 `SFTTrainer` on the same rows and batches [ours >= 2x TRL]
  FLOP share     model FLOP/s on real tokens as a share of the matmul peak measured in the
                 same process, in the precision the run computes in [>= 80%]. Model FLOPs:
                 6 x non-embedding parameters x real tokens + 6 x head parameters x response
                 tokens (the loss needs logits at response positions only); attention left
                 out, so a lower bound. SFT runs in float32 and, where bf16 is native, in bf16.
  step time      median over steps of the per-step ratio to SFT (same batches in the same
                 order): adaptive on zero-risk batches (b = 0, the reference forward is
                 skipped) [<= 1.05x]; every batch regulated with the frozen reference copy
                 (full fine-tuning, constant_kl) [<= 1.5x]; every batch regulated with the
                 adapter-disabled LoRA reference (against LoRA SFT); with the precomputed
                 reference (`--reference precomputed`, top-16, forward KL like the frozen
                 copy's row; the shards' reference columns are scored once beforehand, and
                 that time is printed) [<= 1.05x]
  peak memory    peak RSS of each training process (resource.getrusage) [LoRA regulated
                 <= 1.1x LoRA SFT; precomputed reference <= 1.02x SFT]
  reader         tokens per second the shard stream delivers against those the SFT trainer
                 consumes [>= 20x]

Precision: `--dtype auto` (the default) trains in bf16 autocast where the hardware has it
natively and in float32 elsewhere (safekeel.data.precision), ours and TRL's alike.
The "zero-risk" adaptive run uses a linear schedule with weight 0 at risk 0 (the paper's
preset never goes below 0.1, so it always regulates); all its rows have critic risk 0.
Rows: Alpaca instructions and answers from the shared data folder when present, else
templated text. TRL is a benchmark-only extra: `pip install -e .[bench]`; without it the
TRL row is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import REPO, SHARED, add_common_arguments, pick_dtype, process_peak_mib, say

SMOLLM2 = "smollm2-135m-instruct"
# The config values that select the precomputed reference (run on shards that carry the
# reference columns, `write_shards(..., reference_top_k=...)`); None leaves its row out.
PRECOMPUTED_REFERENCE: dict | None = {"reference": "precomputed"}
REFERENCE_TOP_K = 16


# --------------------------------------------------------------------------- inputs


def make_rows(n: int, risk: float) -> list[dict]:
    alpaca = SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json"
    if alpaca.exists():
        items = json.loads(alpaca.read_text())
        pairs = [(f"{i['instruction']} {i.get('input', '')}".strip(), i["output"])
                 for i in items if i.get("output")]
    else:
        pairs = [(f"Explain topic number {k} in a few sentences.",
                  " ".join(f"Sentence {j} about topic {k}." for j in range(20)))
                 for k in range(n)]
    rows = []
    for k in range(n):
        prompt, answer = pairs[k % len(pairs)]
        rows.append({
            "id": f"row-{k:05d}",
            "messages": [{"role": "user", "content": prompt[:600]},
                         {"role": "assistant", "content": answer[:900]}],
            "critic_p_unsafe": risk,
        })
    return rows


def reference_columns(rows: list[dict], policy: str, max_length: int, top_k: int
                      ) -> tuple[dict, dict]:
    """The precomputed reference's columns for `rows` and its provenance, as annotate's
    `reference` section makes them (transformers backend, the policy as training loads it)."""
    from safekeel.annotate.reference_stage import ReferenceAnnotator, ReferenceConfig
    from safekeel.data.models import load_causal_lm, load_tokenizer
    from safekeel.data.tokenization import TokenizationConfig

    # the dtype training loads the policy in (its checkpoint's), so the provenance matches
    dtype = str(next(load_causal_lm(policy).parameters()).dtype).removeprefix("torch.")
    annotator = ReferenceAnnotator(
        ReferenceConfig(enabled=True, backend="transformers", top_k=top_k, dtype=dtype),
        policy, load_tokenizer(policy), TokenizationConfig(max_length=max_length))
    try:
        return annotator.annotate(rows), annotator.provenance()["extra"]
    finally:
        annotator.close()


def write_shards(directory: Path, rows: list[dict], fingerprint: str,
                 reference: tuple[dict, dict] | None = None) -> Path:
    from safekeel.data.shards import (
        MANIFEST_NAME,
        Manifest,
        Provenance,
        ShardWriter,
        plan_shards,
        shard_schema,
    )

    provenance = Provenance(policy_tokenizer="bench", policy_tokenizer_fingerprint=fingerprint,
                            critic_model="bench-guard")
    columns = ["critic_p_unsafe"]
    if reference is not None:
        values, extra = reference
        provenance.extra.update(extra)
        rows = [{**row, **{c: v[i] for c, v in values.items()}} for i, row in enumerate(rows)]
        columns += list(values)
    schema = shard_schema([], columns)
    plan = plan_shards(len(rows), 64)
    infos = []
    for k in plan:
        start, stop = plan.row_range(k)
        with ShardWriter(directory, k, schema, provenance, row_group_size=32) as writer:
            writer.write_rows(rows[start:stop])
        infos.append(writer.info)
    Manifest(plan, provenance, infos).save(directory / MANIFEST_NAME)
    return directory


def prepare_model(name: str, work: Path) -> str:
    if name != "tiny":
        return name
    from safekeel.data.embedded.tiny_models import (
        build_tiny_llama,
        build_tokenizer,
        save_tiny_model,
    )

    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, num_layers=4, hidden_size=256, num_heads=4,
                             max_position_embeddings=1024)
    return str(save_tiny_model(work / "tiny", tokenizer=tokenizer, model=model))


# --------------------------------------------------------------------------- one configuration


def measure_peaks(dtypes: list[str], sizes: list[int]) -> dict[str, float]:
    """This process's matmul peak (FLOP/s) per dtype, before any model is loaded."""
    import torch

    from safekeel.data.precision import matmul_peak

    return {d: matmul_peak(getattr(torch, d), tuple(sizes), repeats=3) for d in dtypes}


def shape_matched_rate(policy: str, dtype: str, tokens: int, response_tokens: int,
                       repeats: int = 3) -> float:
    """FLOP/s of the model's own matmuls at one step's size: every linear layer's forward
    product and its two backward products on `tokens` rows, the head on `response_tokens`
    rows. The most any trainer's matmuls could reach here: small model widths run far below
    the large-square peak."""
    import torch

    from safekeel.data.models import locate_model

    cfg = json.loads((Path(locate_model(policy)) / "config.json").read_text())
    h, inner, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) \
        // cfg["num_attention_heads"]
    half = getattr(torch, dtype)

    def seconds(m: int, k: int, n: int) -> float:
        x, w, dy = (torch.randn(a, b).to(half) for a, b in ((m, k), (k, n), (m, n)))
        best = float("inf")
        for _ in range(repeats + 1):  # the first: allocations, kernel choice
            started = time.perf_counter()
            x @ w, dy @ w.T, x.T @ dy
            best = min(best, time.perf_counter() - started)
        return best

    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inner), (h, inner), (inner, h)]
    flops = 6 * (layers * sum(tokens * k * n for k, n in layer)
                 + response_tokens * h * cfg["vocab_size"])
    spent = (layers * sum(seconds(tokens, k, n) for k, n in layer)
             + seconds(response_tokens, h, cfg["vocab_size"]))
    return flops / spent


def report_progress(message: str) -> None:
    print(f"progress {message}", flush=True)


def tail_log(path: Path, total: int, stop: threading.Event) -> None:
    """Print each step of the trainer's log as it is written (the trainer runs meanwhile)."""
    seen = 0
    while True:
        stopped = stop.wait(0.5)
        text = path.read_text() if path.exists() else ""
        lines = text.split("\n")[:-1]  # whole lines only: the trainer may be mid-write
        for line in lines[seen:]:
            record = json.loads(line)
            report_progress(f"step {record['step']}/{total}  {record['step_seconds']:.2f} s")
        seen = len(lines)
        if stopped:
            return


def train_worker(spec: dict) -> dict:
    """Train one configuration of ours in this process; step times from the log."""
    import safekeel.train.run as run_module
    from safekeel.data.config import from_dict
    from safekeel.train.config import TrainConfig

    peaks = measure_peaks(spec.pop("peak_dtypes"), spec.pop("peak_sizes"))
    if spec.pop("zero_weight_at_zero_risk", False):
        # the paper's preset never reaches w = 0; a ramp from 0 lets zero-risk batches skip
        spec["risk"] = {"schedule": "linear",
                        "schedule_options": {"low": 0.0, "high": 1.0, "w_min": 0.0, "w_max": 0.9}}
    cfg = from_dict(TrainConfig, spec)
    stop = threading.Event()
    tail = threading.Thread(target=tail_log, args=(Path(cfg.output_dir) / run_module.LOG_NAME,
                                                   cfg.max_steps, stop), daemon=True)
    tail.start()
    started = time.perf_counter()
    try:
        result = run_module.train(cfg)
    finally:
        stop.set()
        tail.join(timeout=5)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    return {
        "step_seconds": [r["step_seconds"] for r in log],
        "response_tokens": [r["tokens"] for r in log],
        "ref_run": sum(r["ref_run"] for r in log),
        "ref_skipped": sum(r["ref_skipped"] for r in log),
        "wall_seconds": wall,
        "peak_rss_mib": process_peak_mib(),
        "matmul_peaks": peaks,
    }


def trl_worker(spec: dict) -> dict:
    """TRL's SFTTrainer on the same rows, in our stream's order, with the same batch size."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from safekeel.data.models import load_causal_lm, load_tokenizer

    peaks = measure_peaks(spec["peak_dtypes"], spec["peak_sizes"])
    rows = {r["id"]: r for r in json.loads(Path(spec["rows"]).read_text())}
    examples = []
    for row_id in spec["order"]:
        user, assistant = rows[row_id]["messages"]
        # prompt-completion rows: TRL's loss is then on the completion only, like ours
        examples.append({"prompt": [user], "completion": [assistant]})
    tokenizer = load_tokenizer(spec["policy"])
    model = load_causal_lm(spec["policy"])  # float32 weights; bf16 is autocast, as ours
    config = SFTConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"], learning_rate=1e-5, max_length=spec["max_length"],
        bf16=spec["bf16"], fp16=False, use_cpu=not torch.cuda.is_available(),
        # TRL turns gradient checkpointing on by default; off, it does the same work as ours
        gradient_checkpointing=False,
        save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    real_tokens: list[int] = []
    response_tokens: list[int] = []
    ends: list[float] = []

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            real_tokens.append(int(inputs["attention_mask"].sum()))
            response_tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            report_progress(f"step {state.global_step}/{spec['steps']}  "
                            f"{ends[-1] - ends[-2]:.2f} s")

    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(examples),
                      processing_class=tokenizer, callbacks=[StepTimes()])
    started = time.perf_counter()
    trainer.train()
    return {
        # the first interval starts at the first step's begin (data loading of step 1 is
        # left out, as our first step's warm-up is left out of the medians anyway)
        "step_seconds": [b - a for a, b in itertools.pairwise(ends)],
        "real_tokens": real_tokens,
        "response_tokens": response_tokens,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mib": process_peak_mib(),
        "matmul_peaks": peaks,
    }


def run_worker(name: str, spec: dict) -> dict:
    """Run one configuration in a fresh process, echoing its progress lines."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    say(f"{name}: starting")
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=errors,
                                text=True, bufsize=1)
        result = None
        for line in proc.stdout:
            if line.startswith("progress "):
                say(f"  {name}: {line.removeprefix('progress ').strip()}")
            elif line.startswith("result "):
                result = json.loads(line.removeprefix("result "))
        if proc.wait() != 0 or result is None:
            errors.seek(0)
            raise RuntimeError(f"worker {name!r} failed:\n{errors.read()[-4000:]}")
    say(f"{name}: done in {result['wall_seconds']:.0f} s, peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB")
    return result


def batch_tokens(shards: Path, policy: str, max_length: int, batch: int) -> tuple[list, list]:
    """Our stream's micro-batches in training order: (real tokens, response tokens) each,
    and the row ids in order (the trainer uses the same stream with the same seed)."""
    from safekeel.data.models import load_tokenizer
    from safekeel.data.shards import ShardReader
    from safekeel.data.tokenization import TokenizationConfig
    from safekeel.train.config import TrainConfig
    from safekeel.train.data import TrainingStream

    defaults = TrainConfig()  # the trainer's defaults: its seed, buffer and length grouping
    stream = TrainingStream(ShardReader(shards, required_columns=["critic_p_unsafe"]),
                            load_tokenizer(policy), TokenizationConfig(max_length=max_length),
                            batch, risk_columns=["critic_p_unsafe"], seed=defaults.seed,
                            buffer_size=defaults.shuffle_buffer,
                            group_by_length=defaults.group_by_length)
    counts = [(int(m.attention_mask.sum()), m.num_response_tokens)
              for m in stream.iter_batches(0)]
    order = [example.id for examples in stream.iter_batch_examples(0) for example in examples]
    return counts, order


def parameter_counts(policy: str) -> tuple[int, int]:
    """(non-embedding parameters outside the head, head parameters), from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from safekeel.data.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(policy))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once here
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    body = total - embedding - (0 if config.tie_word_embeddings else head)
    return body, head


def reader_tokens_per_second(shards: Path, policy: str, max_length: int, batch: int) -> float:
    """Tokens (non-padding positions) per second out of the training stream, no model."""
    from safekeel.data.models import load_tokenizer
    from safekeel.data.shards import ShardReader
    from safekeel.data.tokenization import TokenizationConfig
    from safekeel.train.data import TrainingStream

    tokenizer = load_tokenizer(policy)
    reader = ShardReader(shards, required_columns=["critic_p_unsafe"])
    stream = TrainingStream(reader, tokenizer, TokenizationConfig(max_length=max_length), batch,
                            risk_columns=["critic_p_unsafe"], group_by_length=True)
    tokens, started = 0, time.perf_counter()
    for epoch in range(3):
        for micro in stream.iter_batches(epoch):
            tokens += int(micro.attention_mask.sum())
    return tokens / (time.perf_counter() - started)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help=f"'tiny', {SMOLLM2!r} or a path (default {SMOLLM2}; tiny with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per configuration (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps left out of the medians (default 1)")
    parser.add_argument("--batch", type=int, default=None, help="rows a step (default 4)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens a row at most (default 256; 64 with --quick)")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's SFTTrainer out")
    add_common_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    for name, full, small in (("model", SMOLLM2, "tiny"), ("steps", 5, 2), ("warmup", 1, 1),
                              ("batch", 4, 2), ("max_length", 256, 64)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.peak_sizes = [256, 512] if quick else [1024, 2048]
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        worker = trl_worker if spec.pop("kind") == "trl" else train_worker
        print("result " + json.dumps(worker(spec)), flush=True)
        return

    from safekeel.data.models import load_tokenizer
    from safekeel.data.precision import bf16_is_native
    from safekeel.data.shards import tokenizer_fingerprint

    dtype = pick_dtype(args.dtype)
    mixed = {"bfloat16": "bf16", "float32": "no"}
    # SFT in every precision worth knowing: the chosen one, and float32 beside bf16
    sft_dtypes = [dtype] + (["float32"] if dtype == "bfloat16" else [])
    if dtype == "float32" and bf16_is_native():
        say("bf16 is native here but --dtype float32 was asked for: float32 only")
    trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    if not args.no_trl and not trl:
        say("TRL is not installed (pip install -e .[bench]): its row is left out")

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    policy = prepare_model(args.model, work)
    say(f"model {args.model}: preparing shards")
    fingerprint = tokenizer_fingerprint(load_tokenizer(policy))
    total_steps = args.steps + args.warmup
    n_rows = total_steps * args.batch
    safe_rows = make_rows(n_rows, 0.0)
    (work / "rows_safe.json").write_text(json.dumps(safe_rows))
    safe = write_shards(work / "safe", safe_rows, fingerprint)
    risky = write_shards(work / "risky", make_rows(n_rows, 0.9), fingerprint)
    with_reference = None
    if PRECOMPUTED_REFERENCE is not None:
        started = time.perf_counter()
        values = reference_columns(safe_rows, policy, args.max_length, REFERENCE_TOP_K)
        seconds = time.perf_counter() - started
        with_reference = write_shards(work / "safe_ref", safe_rows, fingerprint, values)
        say(f"precomputed reference (top-{REFERENCE_TOP_K}) of {n_rows} rows scored in "
            f"{seconds:.1f} s, once")
    counts, order = batch_tokens(safe, policy, args.max_length, args.batch)
    counts = counts[:total_steps]
    body, head = parameter_counts(policy)

    def spec(name: str, shards: Path, precision: str = dtype, peak: bool = False,
             **values) -> dict:
        return {"kind": "ours", "policy": policy, "shards": str(shards),
                "output_dir": str(work / name), "per_device_batch_size": args.batch,
                "max_steps": total_steps, "learning_rate": 1e-5, "save_every": 0,
                "progress_bar": False, "mixed_precision": mixed[precision],
                "tokenization": {"max_length": args.max_length},
                "peak_dtypes": [precision] if peak else [], "peak_sizes": args.peak_sizes,
                **values}

    configs: dict[str, dict | None] = {}
    for precision in sft_dtypes:
        configs[f"sft {precision}"] = spec(f"sft_{precision}", safe, precision, peak=True,
                                           method="sft")
    if trl:
        configs[f"trl sft {dtype}"] = {
            "kind": "trl", "policy": policy, "rows": str(work / "rows_safe.json"),
            "order": order, "output_dir": str(work / "trl"), "batch": args.batch,
            "steps": total_steps, "max_length": args.max_length, "bf16": dtype == "bfloat16",
            "peak_dtypes": [dtype], "peak_sizes": args.peak_sizes}
    configs["adaptive, zero risk"] = spec("adaptive0", safe, method="adaptive",
                                          zero_weight_at_zero_risk=True)
    configs["regulated, frozen copy"] = spec("ckl", safe, method="constant_kl")
    configs["regulated, precomputed ref"] = (
        None if PRECOMPUTED_REFERENCE is None
        else spec("precomputed", with_reference, method="constant_kl",
                  **PRECOMPUTED_REFERENCE))
    configs["lora sft"] = spec("lora_sft", risky, method="sft", lora={"enabled": True})
    configs["lora regulated, adapter off"] = spec("lora_adaptive", risky, method="adaptive",
                                                  lora={"enabled": True})
    say(f"{len([c for c in configs.values() if c])} configurations, {total_steps} steps each "
        f"({args.warmup} warm-up), {args.batch} rows a step, max_length {args.max_length}")

    results = {name: run_worker(name, values) for name, values in configs.items() if values}
    base = f"sft {dtype}"
    sft = results[base]
    # our log counts response tokens; the stream's own count must agree step by step, or the
    # token totals below would not be those of the trained batches
    if sft["response_tokens"] != [r for _, r in counts]:
        raise RuntimeError("the trainer's batches differ from the stream's: "
                           f"{sft['response_tokens']} vs {[r for _, r in counts]}")

    def measured(values: list) -> list:
        return values[args.warmup:]

    def rates(result: dict, real: list[int], response: list[int]) -> tuple[float, float]:
        seconds = sum(measured(result["step_seconds"]))
        flops = sum(6 * body * t + 6 * head * r
                    for t, r in zip(measured(real), measured(response), strict=True))
        return sum(measured(real)) / seconds, flops / seconds

    def paired_ratio(name: str, against: str) -> float:
        # Every configuration reads the same rows in the same order, so step i has the same
        # batch everywhere: the median of per-step ratios cancels batch-length differences,
        # and the median shrugs off steps slowed by other processes on a shared machine.
        return statistics.median(
            t / b for t, b in zip(measured(results[name]["step_seconds"]),
                                  measured(results[against]["step_seconds"]), strict=True))

    print(f"\nmodel {args.model} ({body / 1e6:.0f}M non-embedding + {head / 1e6:.0f}M head "
          f"parameters); {args.batch} rows a step, max_length {args.max_length}; {args.steps} "
          f"measured steps after {args.warmup} warm-up; threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; load average "
          f"{os.getloadavg()[0]:.1f}; {sum(measured([t for t, _ in counts]))} real tokens")

    print("\nthroughput (real tokens; model FLOP/s against the matmul peak measured in the "
          "same process)")
    real = [t for t, _ in counts]
    response = [r for _, r in counts]
    speed = {}
    for name, result in results.items():
        if not result["matmul_peaks"]:
            continue
        own = (result["real_tokens"], result["response_tokens"]) if name.startswith("trl") \
            else (real, response)
        tokens_per_s, flops = rates(result, *own)
        speed[name] = tokens_per_s
        (precision, peak), = result["matmul_peaks"].items()
        # each trainer's own count of the tokens it was given (TRL tokenises by itself)
        print(f"  {name:28s} {tokens_per_s:8.0f} tokens/s ({sum(measured(own[0]))} real, "
              f"{sum(measured(own[1]))} response)  {flops / 1e9:7.1f} GFLOP/s = "
              f"{flops / peak:4.0%} of {peak / 1e9:.0f} GFLOP/s ({precision})   target >= 80%")
    # the ceiling at this model's widths: the same matmuls alone, measured now in this process
    step_real = round(statistics.mean(measured(real)))
    step_response = round(statistics.mean(measured(response)))
    for precision in sft_dtypes:
        square = measure_peaks([precision], args.peak_sizes)[precision]
        shaped = shape_matched_rate(policy, precision, step_real, step_response)
        _, flops = rates(results[f"sft {precision}"], real, response)
        print(f"  the model's matmuls alone ({precision}, {step_real} tokens a step): "
              f"{shaped / 1e9:.1f} GFLOP/s = {shaped / square:.0%} of the square peak "
              f"{square / 1e9:.0f} GFLOP/s; sft {precision} reaches {flops / shaped:.0%} of them")
    trl_name = f"trl sft {dtype}"
    if trl_name in speed:
        ratio = speed[base] / speed[trl_name]
        print(f"  ours / TRL = {ratio:.2f}x   target >= 2x: {'ok' if ratio >= 2 else 'MISSED'}")

    print(f"\nstep time: median s/step; median of per-step ratios to sft ({dtype})")
    rows_out = [(base, base, None), ("adaptive, zero risk", base, 1.05),
                ("regulated, frozen copy", base, 1.5),
                ("regulated, precomputed ref", base, 1.05),
                ("lora sft", "lora sft", None), ("lora regulated, adapter off", "lora sft", None)]
    for name, against, target in rows_out:
        if name not in results:
            print(f"  {name:28s}     n/a   (PRECOMPUTED_REFERENCE is None)")
            continue
        ratio = paired_ratio(name, against)
        goal = "" if target is None else f"   target <= {target:.2f}x: " + (
            "ok" if ratio <= target else "MISSED")
        vs = "" if against == base else f" of {against}"
        print(f"  {name:28s} {statistics.median(measured(results[name]['step_seconds'])):7.3f} s"
              f"  {ratio:5.2f}x{vs}{goal}")

    print("\npeak memory (RSS of each training process)")
    memory_targets = {"regulated, precomputed ref": (base, 1.02),
                      "lora regulated, adapter off": ("lora sft", 1.1)}
    for name, result in results.items():
        against, target = memory_targets.get(
            name, ("lora sft" if name.startswith("lora") else base, None))
        share = result["peak_rss_mib"] / results[against]["peak_rss_mib"]
        goal = "" if target is None else f"   target <= {target:.2f}x: " + (
            "ok" if share <= target else "MISSED")
        print(f"  {name:28s} {result['peak_rss_mib']:7.0f} MiB  {share:5.2f}x {against}{goal}")

    reader = reader_tokens_per_second(safe, policy, args.max_length, args.batch)
    trainer = speed[base]
    ratio = reader / trainer
    print("\nshard reader vs trainer (real tokens)")
    print(f"  reader  {reader:10.0f} tokens/s\n  trainer {trainer:10.0f} tokens/s ({base})\n"
          f"  ratio   {ratio:10.1f}x   target >= 20x: {'ok' if ratio >= 20 else 'MISSED'}")
    say("done")


if __name__ == "__main__":
    main()
