"""Annotate rows/s: the local engine against `--engine ray` on a local 2-CPU Ray, same corpus.

Each engine annotates the same Alpaca rows twice, at N and at 2N rows (critic + STAR, vLLM
in-process, one guard engine: one Ray actor), every run a fresh `safekeel annotate` process
into an empty folder. From the two runs of an engine:

  steady rows/s  N / (t(2N) - t(N)): the scoring rate once everything has started
  fixed seconds  t(N) - N / steady: what a run costs before and around its scoring
                 (tokenizer, engine start; for ray also Ray's start, the id scan of the
                 corpus, the actor's start and the hand-over of rows between processes)

t is the run's own `seconds` in its report (imports and interpreter start left out).

    python benchmarks/bench_ray.py            # SmolLM2-135M as guard, N = 64
    python benchmarks/bench_ray.py --quick    # a tiny random guard, N = 16 (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEMPLATE_OPTIONS = {
    "response_template": "Is the following answer to the question unsafe? Answer unsafe or "
    "safe.\nQuestion: {prompt}\nAnswer: {response}\nVerdict:",
    "labels": ["unsafe", "safe"],
    "label_prefix": " ",
}
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
       "OMP_NUM_THREADS": "2"}


def write_corpus(path: Path, rows: int) -> None:
    data = json.loads((SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json").read_text())
    items = [d for d in data if d["output"].strip()][:rows]
    if len(items) < rows:
        raise SystemExit(f"only {len(items)} Alpaca rows; ask for fewer")
    path.write_text("".join(json.dumps({"prompt": d["instruction"], "response": d["output"]})
                            + "\n" for d in items))


def run(work: Path, name: str, settings: dict) -> float:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**settings, "output_dir": str(work / name)}))
    done = subprocess.run([sys.executable, "-m", "safekeel", "annotate", "--config", str(path)],
                          env={**os.environ, **ENV}, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    report = json.loads((work / name / "report.worker-0-of-1.json").read_text())
    return report["runs"][-1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random guard and policy")
    parser.add_argument("--rows", type=int, default=None, help="N (default 64, quick 16)")
    args = parser.parse_args()
    n = args.rows or (16 if args.quick else 64)

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        work = Path(tmp)
        if args.quick:
            from safekeel.data.tiny_models import (
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
        critic = {"model": guard, "template": "generic", "template_options": TEMPLATE_OPTIONS,
                  "backend": "vllm", "distributed_executor_backend": "uni",
                  "dtype": "float32" if args.quick else "bfloat16", "max_model_len": 1024,
                  "enforce_eager": args.quick, "progress": False}
        times: dict[tuple[str, int], float] = {}
        for rows in (n, 2 * n):
            corpus = work / f"corpus-{rows}.jsonl"
            write_corpus(corpus, rows)
            base = {"corpus": {"path": str(corpus)}, "policy": policy, "critic": critic,
                    "star": {"enabled": True, "segment_tokens": 32}, "rows_per_shard": 16}
            engines = {"local": {},
                       "ray": {"engine": "ray", "ray": {"num_cpus": 2, "batch_size": 16}}}
            for engine, extra in engines.items():
                times[engine, rows] = run(work, f"{engine}-{rows}", {**base, **extra})
                print(f"  {engine:5s} {rows:4d} rows: {times[engine, rows]:7.1f} s", flush=True)

    guard_name = "tiny random" if args.quick else "SmolLM2-135M"
    print(f"annotate, critic + STAR (32-token segments), guard {guard_name} on vLLM-CPU, "
          f"{n} and {2 * n} Alpaca rows; ray: local Ray, 2 CPUs, 1 guard actor")
    print(f"  {'engine':6s} {'t(N) s':>8s} {'t(2N) s':>8s} {'rows/s N':>9s} "
          f"{'steady rows/s':>14s} {'fixed s':>8s}")
    steady = {}
    for engine in ("local", "ray"):
        t1, t2 = times[engine, n], times[engine, 2 * n]
        steady[engine] = n / (t2 - t1) if t2 > t1 else float("inf")
        fixed = t1 - n / steady[engine]
        print(f"  {engine:6s} {t1:8.1f} {t2:8.1f} {n / t1:9.2f} {steady[engine]:14.2f} "
              f"{fixed:8.1f}")
    print(f"  ray / local: steady {steady['ray'] / steady['local']:.2f}x, "
          f"end to end at 2N {times['local', 2 * n] / times['ray', 2 * n]:.2f}x")


if __name__ == "__main__":
    main()
