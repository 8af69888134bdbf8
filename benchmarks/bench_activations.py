"""Probe activations: the vLLM hook extractor against the transformers reference, side by side.

Annotate's probe reads the policy's residual stream on every row's prompt (the chat
template up to the generation prompt). Both extractors read the same layer of the same
model on the same prompts, in one run, and the script prints rows/s of each, the ratio,
start-up times and how far their activations differ:

  transformers  annotate.activations.TransformersActivationExtractor: batched forward
                passes (right padding, sorted by length) that stop at the deepest layer read
  vllm          annotate.activations.VLLMActivationExtractor.start: an engine started by
                data.engines (role "activations": eager, whole prompts, hooks in the worker)

The transformers reference runs first: an in-process vLLM engine binds OpenMP threads and
slows later torch work in the same process. Prompts are AdvBench behaviours and Alpaca
instructions (half each), as a corpus the probe scores would mix them.

    python benchmarks/bench_activations.py                 # 512 prompts, float32
    python benchmarks/bench_activations.py --quick         # 64 prompts: a quick look
    python benchmarks/bench_activations.py --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; plenty for one-token decodes

import numpy as np
import torch
from benchlib import SHARED, add_common_arguments, pick_dtype, process_peak_mib, say

from safekeel.annotate.activations import (
    ActivationSpec,
    TransformersActivationExtractor,
    VLLMActivationExtractor,
)
from safekeel.data.engines import usable_cores
from safekeel.data.models import load_causal_lm, load_tokenizer, resolve_model_path


def prompts(rows: int) -> list[str]:
    """Half AdvBench behaviours, half Alpaca instructions, interleaved."""
    with (SHARED / "advbench" / "harmful_behaviors.csv").open() as handle:
        harmful = [row["goal"] for row in csv.DictReader(handle)]
    data = json.loads((SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json").read_text())
    benign = [item["instruction"] + (f"\n{item['input']}" if item.get("input") else "")
              for item in data]
    mixed = [text for pair in zip(harmful, benign, strict=False) for text in pair]
    if len(mixed) < rows:
        raise SystemExit(f"only {len(mixed)} prompts available, asked for {rows}")
    return mixed[:rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    add_common_arguments(parser)  # --quick: 64 prompts; --dtype
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="transformers rows per forward (annotate's probe.batch_size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and engine threads; default OMP_NUM_THREADS, else every "
                        "core (on a busy machine one thread can be faster)")
    args = parser.parse_args()
    dtype = pick_dtype(args.dtype)
    rows = 64 if args.quick else args.rows
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or len(usable_cores())
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the engine's too (data.engines keeps it)
    torch.set_num_threads(threads)
    model_path = resolve_model_path(args.model)
    spec = ActivationSpec(layers=(args.layer,), pooling="last")
    tokenizer = load_tokenizer(model_path)
    conversations = [[{"role": "user", "content": text}] for text in prompts(rows)]

    say(f"transformers: loading {args.model}")
    started = time.perf_counter()
    model = load_causal_lm(model_path, dtype=dtype)
    reference = TransformersActivationExtractor(model, tokenizer, spec,
                                                batch_size=args.batch_size)
    hf_startup = time.perf_counter() - started
    token_ids = [reference.prompt_ids(c) for c in conversations]
    tokens = sum(map(len, token_ids))
    say(f"transformers: extracting {rows} prompts")
    started = time.perf_counter()
    expected = reference.extract(token_ids)
    hf_seconds = time.perf_counter() - started
    reference.close()
    del model

    say("vllm: starting the engine")
    started = time.perf_counter()
    served = VLLMActivationExtractor.start(model_path, spec, dtype=dtype,
                                           needed_tokens=max(map(len, token_ids)) + 1)
    vllm_startup = time.perf_counter() - started
    try:
        served.extract(token_ids[:8])  # first call: warm-up outside the timing
        say(f"vllm: extracting {rows} prompts")
        started = time.perf_counter()
        got = served.extract(token_ids)
        vllm_seconds = time.perf_counter() - started
    finally:
        served.close()

    relative = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"{args.model}, layer {args.layer} (last token), {dtype}, {threads} threads: "
          f"{rows} prompts, {tokens} tokens (mean {tokens / rows:.0f})")
    print(f"{'extractor':14s} {'start-up s':>10s} {'seconds':>8s} {'rows/s':>8s} {'tokens/s':>9s}")
    for name, startup, seconds in (("transformers", hf_startup, hf_seconds),
                                   ("vllm", vllm_startup, vllm_seconds)):
        print(f"{name:14s} {startup:10.1f} {seconds:8.2f} {rows / seconds:8.1f} "
              f"{tokens / seconds:9.0f}")
    print(f"vllm / transformers: {hf_seconds / vllm_seconds:.2f}x rows/s; max relative "
          f"difference of the activations {relative:.1e}; peak RSS {process_peak_mib():.0f} MiB")
    say("done")


if __name__ == "__main__":
    main()
