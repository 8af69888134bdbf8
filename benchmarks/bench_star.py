"""STAR cost: k guard scores of a response's prefixes against one full-response score.

Side by side in one run, on the same responses (256 policy tokens each, k = 8 segments of
32 tokens), with vLLM scoring:

  full          one score per response (what the plain critic costs)
  star cached   k prefix scores per response, prefix caching on (KV blocks of 32 tokens)
  star uncached the same k scores with prefix caching off

Target: star cached at most 2x full. SmolLM2-135M-Instruct stands in for the guard (no guard
weights exist offline); it is also the policy whose tokens cut the segments.

    python benchmarks/bench_star.py [--responses 8] [--tokens 256] [--segment 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS says otherwise
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

from safekeel.annotate.star import StarAnnotator
from safekeel.data.guard.critic import GuardSettings, VLLMCritic
from safekeel.data.models import load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = "smollm2-135m-instruct"
TEMPLATE_OPTIONS = {
    "response_template": "Is the following answer to the question unsafe? Answer unsafe or "
    "safe.\nQuestion: {prompt}\nAnswer: {response}\nVerdict:",
    "labels": ["unsafe", "safe"],
    "label_prefix": " ",
}


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
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--segment", type=int, default=32)
    args = parser.parse_args()

    tokenizer = load_tokenizer(MODEL)
    warm = examples(tokenizer, args.responses * 2, args.tokens)
    rows = warm[args.responses:]  # fresh responses: nothing of them is cached yet
    warm = warm[:args.responses]
    base = {"model": MODEL, "template": "generic", "template_options": TEMPLATE_OPTIONS,
            "dtype": "bfloat16", "batch_size": 1024, "progress": False,
            "distributed_executor_backend": "uni"}

    def measure(caching: bool) -> dict[str, float]:
        """Times on one engine; engines run one after another (see data/engines.py)."""
        settings = GuardSettings(**base, enable_prefix_caching=caching,
                                  block_size=32 if caching else None)
        critic = VLLMCritic(settings)
        star = StarAnnotator(critic, tokenizer, args.segment)
        star.annotate(warm)  # compile / allocate once
        out = {}
        if not caching:
            out["full"] = timed(lambda: critic.score([r["messages"] for r in rows]))
        out["star cached" if caching else "star uncached"] = timed(lambda: star.annotate(rows))
        critic.close()
        return out

    times = {**measure(caching=False), **measure(caching=True)}
    k = -(-args.tokens // args.segment)
    print(f"STAR on {args.responses} responses of {args.tokens} policy tokens, k = {k} "
          f"segments of {args.segment} tokens, {MODEL} as guard, vLLM bf16")
    for name, seconds in times.items():
        print(f"  {name:14s} {seconds:7.2f} s   {seconds / times['full']:5.2f}x full")
    print(f"  star cached / full = {times['star cached'] / times['full']:.2f}x (target <= 2x); "
          f"caching saves {times['star uncached'] / times['star cached']:.2f}x")


if __name__ == "__main__":
    main()
