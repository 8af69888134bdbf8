"""Stage two's overheads against plain SFT, on the same model, shards and batches.

    python benchmarks/bench_train.py                       # SmolLM2-135M-Instruct
    python benchmarks/bench_train.py --model tiny --steps 20  # a 4-layer random Llama

What is measured (the issue's targets in brackets):

  step time      full fine-tuning, median over steps of the per-step ratio to sft
                 (same batches in the same order in every configuration):
                 sft; adaptive on zero-risk batches (b = 0: the reference forward is
                 skipped) [<= 1.05x sft]; constant_kl, every batch regulated [<= 1.5x sft]
  peak memory    peak RSS of a whole training process (resource.getrusage, each
                 configuration in its own subprocess): LoRA adaptive on high-risk batches,
                 the reference being the adapter-disabled model [<= 1.1x LoRA sft]; full
                 fine-tuning with its frozen reference copy is shown for contrast
  reader         response-and-prompt tokens per second the shard stream delivers (read,
                 shuffle, tokenise, pad) against those the sft trainer consumes [>= 20x]

The "zero-risk" adaptive run uses a linear schedule with weight 0 at risk 0 (the paper's
preset never goes below 0.1, so it always regulates); all its rows have critic risk 0.
Rows: Alpaca instructions and answers from the shared data folder when present, else
templated text; the same rows for every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOLLM2 = "smollm2-135m-instruct"


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


def write_shards(directory: Path, rows: list[dict], fingerprint: str) -> Path:
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
    schema = shard_schema([], ["critic_p_unsafe"])
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


def worker(spec: dict) -> dict:
    """Train one configuration in this process; step times from the log, peak RSS at the end."""
    import safekeel.train.run as run_module
    from safekeel.data.config import from_dict
    from safekeel.train.config import TrainConfig

    if spec.pop("zero_weight_at_zero_risk", False):
        # the paper's preset never reaches w = 0; a ramp from 0 lets zero-risk batches skip
        spec["risk"] = {"schedule": "linear",
                        "schedule_options": {"low": 0.0, "high": 1.0, "w_min": 0.0, "w_max": 0.9}}
    cfg = from_dict(TrainConfig, spec)
    started = time.perf_counter()
    result = run_module.train(cfg)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    return {
        "step_seconds": [r["step_seconds"] for r in log],
        "tokens": [r["tokens"] for r in log],
        "ref_run": sum(r["ref_run"] for r in log),
        "ref_skipped": sum(r["ref_skipped"] for r in log),
        "wall_seconds": wall,
        # Linux reports ru_maxrss in KiB
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker failed for {spec['output_dir']}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reader_tokens_per_second(shards: Path, policy: str, max_length: int, batch: int) -> float:
    """Tokens (non-padding positions) per second out of the training stream, no model."""
    from safekeel.data.models import load_tokenizer
    from safekeel.data.shards import ShardReader
    from safekeel.data.tokenization import TokenizationConfig
    from safekeel.train.data import TrainingStream

    tokenizer = load_tokenizer(policy)
    reader = ShardReader(shards, required_columns=["critic_p_unsafe"])
    stream = TrainingStream(reader, tokenizer, TokenizationConfig(max_length=max_length), batch,
                            risk_columns=["critic_p_unsafe"])
    tokens, started = 0, time.perf_counter()
    for epoch in range(3):
        for micro in stream.iter_batches(epoch):
            tokens += int(micro.attention_mask.sum())
    return tokens / (time.perf_counter() - started)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SMOLLM2, help=f"'tiny', {SMOLLM2!r} or a path")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from safekeel.data.models import load_tokenizer
    from safekeel.data.shards import tokenizer_fingerprint

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    policy = prepare_model(args.model, work)
    fingerprint = tokenizer_fingerprint(load_tokenizer(policy))
    n_rows = (args.steps + args.warmup) * args.batch
    safe = write_shards(work / "safe", make_rows(n_rows, 0.0), fingerprint)
    risky = write_shards(work / "risky", make_rows(n_rows, 0.9), fingerprint)

    def spec(name: str, shards: Path, **values) -> dict:
        return {"policy": policy, "shards": str(shards), "output_dir": str(work / name),
                "per_device_batch_size": args.batch, "max_steps": args.steps + args.warmup,
                "learning_rate": 1e-5, "save_every": 0, "progress_bar": False,
                "tokenization": {"max_length": args.max_length}, **values}

    configs = {
        "sft": spec("sft", safe, method="sft"),
        "adaptive, zero risk": spec("adaptive0", safe, method="adaptive",
                                    zero_weight_at_zero_risk=True),
        "constant_kl, all regulated": spec("ckl", safe, method="constant_kl"),
        "lora sft": spec("lora_sft", risky, method="sft", lora={"enabled": True}),
        "lora adaptive, high risk": spec("lora_adaptive", risky, method="adaptive",
                                         lora={"enabled": True}),
    }
    results = {}
    for name, values in configs.items():
        results[name] = run_worker(values)
        r = results[name]
        print(f"  ran {name:28s} wall {r['wall_seconds']:6.1f} s, reference forwards "
              f"run {r['ref_run']}, skipped {r['ref_skipped']}", flush=True)

    def step_times(name: str) -> list[float]:
        return results[name]["step_seconds"][args.warmup:]

    def paired_ratio(name: str) -> float:
        # Every configuration reads the same rows in the same order, so step i has the same
        # batch everywhere: the median of per-step ratios cancels batch-length differences,
        # and the median shrugs off steps slowed by other processes on a shared machine.
        return statistics.median(t / b for t, b in zip(step_times(name), step_times("sft"),
                                                      strict=True))

    print(f"\nmodel {args.model}; {args.batch} rows per step, max_length {args.max_length}; "
          f"{args.steps} steps after {args.warmup} warm-up; torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("\nstep time (full fine-tuning): median s/step; median of per-step ratios to sft")
    for name, target in (("sft", None), ("adaptive, zero risk", 1.05),
                         ("constant_kl, all regulated", 1.5)):
        ratio = paired_ratio(name)
        goal = "" if target is None else f"   target <= {target:.2f}x: " + (
            "ok" if ratio <= target else "MISSED")
        print(f"  {name:28s} {statistics.median(step_times(name)):7.3f} s   {ratio:5.2f}x{goal}")

    print("\npeak memory (RSS of the training process)")
    lora_base = results["lora sft"]["peak_rss_mib"]
    for name, target in (("lora sft", None), ("lora adaptive, high risk", 1.1),
                         ("constant_kl, all regulated", None)):
        peak = results[name]["peak_rss_mib"]
        goal = "" if target is None else f"   target <= {target:.2f}x: " + (
            "ok" if peak / lora_base <= target else "MISSED")
        label = name if name.startswith("lora") else "full FT + reference copy"
        print(f"  {label:28s} {peak:7.0f} MiB  {peak / lora_base:5.2f}x{goal}")

    reader = reader_tokens_per_second(safe, policy, args.max_length, args.batch)
    sft = results["sft"]
    trainer = sum(sft["tokens"][args.warmup:]) / sum(sft["step_seconds"][args.warmup:])
    print("\nshard reader vs trainer")
    print(reader_vs_trainer(safe, policy, args, reader, trainer))


def reader_vs_trainer(shards: Path, policy: str, args, reader: float, trainer_response: float):
    """Both rates in all non-padding tokens: the trainer's log counts response tokens only,
    so its rate is scaled by the stream's own ratio of all tokens to response tokens."""
    from safekeel.data.models import load_tokenizer
    from safekeel.data.shards import ShardReader
    from safekeel.data.tokenization import TokenizationConfig
    from safekeel.train.data import TrainingStream

    stream = TrainingStream(ShardReader(shards, required_columns=["critic_p_unsafe"]),
                            load_tokenizer(policy), TokenizationConfig(max_length=args.max_length),
                            args.batch, risk_columns=["critic_p_unsafe"])
    total = response = 0
    for micro in stream.iter_batches(0):
        total += int(micro.attention_mask.sum())
        response += micro.num_response_tokens
    trainer = trainer_response * total / response
    ratio = reader / trainer
    return (f"  reader  {reader:10.0f} tokens/s\n  trainer {trainer:10.0f} tokens/s (sft)\n"
            f"  ratio   {ratio:10.1f}x   target >= 20x: {'ok' if ratio >= 20 else 'MISSED'}")


if __name__ == "__main__":
    main()
