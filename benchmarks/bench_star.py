"""STAR cost: k guard scores of a response's prefixes against one full-response score.

Side by side in one run, on the same responses (256 policy tokens each, k = 8 segments of
32 tokens), with vLLM scoring:

  full          one score per response (what the plain critic costs)
  star cached   k prefix scores per response, prefix caching on (KV blocks of 32 tokens)
  star uncached the same k scores with prefix caching off

Target: star cached at most 2x full. SmolLM2-135M-Instruct stands in for the guard (no guard
weights exist offline); it is also the policy whose tokens cut the segments. `--dtype auto`
computes in bf16 where the hardware has it natively, else in float32. Each phase prints as
it goes, with the peak RSS of this process during it.

    python benchmarks/bench_star.py [--responses 8] [--tokens 256] [--segment 32]
    python benchmarks/bench_star.py --quick     # 2 responses of 64 tokens, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS says otherwise
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

from benchlib import GENERIC_GUARD_OPTIONS, SHARED, PeakRSS, add_common_arguments, pick_dtype, say

from safekeel.annotate.star import StarAnnotator
from safekeel.data.guard.critic import GuardSettings, VLLMCritic
from safekeel.data.models import load_tokenizer

MODEL = "smollm2-135m-instruct"


def examples(tokenizer, count: int, tokens: int) -> list[dict]:
    """Alpaca instructions, each with a response of exactly `tokens` policy tokens."""
    data = json.loads((SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json").read_text())
    text = " ".join(item["output"] for item in data)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(count):
        response = tokenizer.decode(ids[i * tokens:(i + 1) * tokens]).strip()
        out.append({"id": str(i), "messages": [
            {"role": "user", "content": data[i]["instruction"]},
            {"role": "assistant", "content": response}]})
    return out


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=None, help="default 8; 2 with --quick")
    parser.add_argument("--tokens", type=int, default=None, help="default 256; 64 with --quick")
    parser.add_argument("--segment", type=int, default=32)
    add_common_arguments(parser)
    args = parser.parse_args()
    args.responses = args.responses or (2 if args.quick else 8)
    args.tokens = args.tokens or (64 if args.quick else 256)
    dtype = pick_dtype(args.dtype)

    tokenizer = load_tokenizer(MODEL)
    warm = examples(tokenizer, args.responses * 2, args.tokens)
    rows = warm[args.responses:]  # fresh responses: nothing of them is cached yet
    warm = warm[:args.responses]
    base = {"model": MODEL, "template": "generic", "template_options": GENERIC_GUARD_OPTIONS,
            "dtype": dtype, "batch_size": 1024, "progress": False,
            "distributed_executor_backend": "uni",
            "enforce_eager": args.quick}  # a smoke run skips graph compilation

    memory = {}

    def measure(caching: bool) -> dict[str, float]:
        """Times on one engine; engines run one after another (see data/engines.py)."""
        label = "cached" if caching else "uncached"
        settings = GuardSettings(**base, enable_prefix_caching=caching,
                                  block_size=32 if caching else None)
        say(f"engine with prefix caching {'on' if caching else 'off'}: starting")
        with PeakRSS() as peak:
            critic = VLLMCritic(settings)
            star = StarAnnotator(critic, tokenizer, args.segment)
            star.annotate(warm)  # compile / allocate once
            out = {}
            if not caching:
                say("full: scoring each response once")
                out["full"] = timed(lambda: critic.score([r["messages"] for r in rows]))
                say(f"full: {out['full']:.2f} s")
            say(f"star {label}: scoring the prefixes")
            out[f"star {label}"] = timed(lambda: star.annotate(rows))
            say(f"star {label}: {out[f'star {label}']:.2f} s")
            critic.close()
        for name in out:
            memory[name] = peak.peak_mib
        return out

    times = {**measure(caching=False), **measure(caching=True)}
    k = -(-args.tokens // args.segment)
    print(f"\nSTAR on {args.responses} responses of {args.tokens} policy tokens, k = {k} "
          f"segments of {args.segment} tokens, {MODEL} as guard, vLLM {dtype}")
    for name, seconds in times.items():
        print(f"  {name:14s} {seconds:7.2f} s   {seconds / times['full']:5.2f}x full   "
              f"peak RSS of its engine's phase {memory[name]:6.0f} MiB")
    print(f"  star cached / full = {times['star cached'] / times['full']:.2f}x (target <= 2x); "
          f"caching saves {times['star uncached'] / times['star cached']:.2f}x")
    say("done")


if __name__ == "__main__":
    main()
