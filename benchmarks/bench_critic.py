"""Safety Critic throughput: vLLM single-prefill scoring against two transformers baselines.

All three score the same rows with the same model and template, side by side in one run:

  vllm       data.guard.critic.VLLMCritic: one prefill per row, logprobs of the two label ids
  forward    data.guard.critic.TransformersCritic: a batched forward, last position only
  generate   the common approach: `generate` the verdict text greedily and parse it, with
             two lengths: 4 new tokens (the least that reads a label word) and 8 (a full
             Llama Guard 3 verdict, "\n\nunsafe\nS10" and the end token, what its model
             card's recipe generates before parsing)

and the fraction of this machine's measured bf16 matmul peak reached by vLLM's prefill.
Model FLOPs = 2 * non-embedding parameters * prompt tokens + 2 * lm_head parameters per row
(the engine computes logits at the last position only); attention is left out, so the
fraction is a lower bound. The peak is the best of a few square matmuls in the dtype the run
computes in (`--dtype auto`: bf16 where the hardware has it natively, else float32),
measured before any engine starts. Each phase prints as it starts and ends, with the peak
RSS of this process during it.

No guard LLM weights exist offline, so SmolLM2-135M-Instruct stands in as the guard: the
cost of scoring does not depend on what the weights say. The template is Llama Guard 3's
by default (its category list makes every guard prompt start with the same ~250 tokens,
which vLLM's prefix cache computes once; the transformers baselines cannot skip them), or
the generic one-line yes/no template (`--template generic`: almost no shared prefix).

    python benchmarks/bench_critic.py                     # 96 Llama Guard 3 rows
    python benchmarks/bench_critic.py --template generic --rows 512
    python benchmarks/bench_critic.py --quick             # 4 short rows, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS says otherwise
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch
from benchlib import GENERIC_GUARD_OPTIONS, SHARED, PeakRSS, add_common_arguments, pick_dtype, say

from safekeel.data.engines import usable_cores
from safekeel.data.guard.critic import GuardSettings, TransformersCritic, VLLMCritic
from safekeel.data.precision import matmul_peak

GENERATE_LENGTHS = (4, 8)  # new tokens: a label word; a full Llama Guard 3 verdict


def conversations(rows: int, words: int) -> list[list[dict[str, str]]]:
    """Alpaca instructions with their answers, cut to a similar length (about 128 tokens)."""
    data = json.loads((SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json").read_text())
    out = []
    for item in data:
        response = " ".join(item["output"].split()[:words])
        if len(item["output"].split()) >= words // 2:
            out.append([{"role": "user", "content": item["instruction"]},
                        {"role": "assistant", "content": response}])
        if len(out) == rows:
            return out
    raise SystemExit(f"only {len(out)} usable rows in the Alpaca demo file")


def prefill_flops(model: torch.nn.Module, prompt_tokens: int, rows: int) -> float:
    """Matmul FLOPs of scoring: every layer on every token, the vocabulary head once a row."""
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once here
    per_token = params - embedding - (0 if model.config.tie_word_embeddings else head)
    return 2 * per_token * prompt_tokens + 2 * head * rows


def shared_prefix_tokens(token_ids: list[list[int]]) -> int:
    """Length of the token prefix every rendered guard prompt starts with."""
    first = token_ids[0]
    length = len(first)
    for ids in token_ids[1:]:
        length = next((i for i, (a, b) in enumerate(zip(first[:length], ids)) if a != b),
                      min(length, len(ids)))
    return length


def generate_and_parse(
    critic: TransformersCritic, convs, batch_size: int, new_tokens: int
) -> tuple[float, int]:
    """The usual way: generate the verdict as text, then look for the unsafe label in it."""
    model, tokenizer = critic.model, critic.tokenizer
    prompts = critic.prompts.build(convs, [str(i) for i in range(len(convs))]).token_ids
    tokenizer.padding_side = "left"
    started = time.perf_counter()
    unsafe = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for text in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                           skip_special_tokens=True):
            unsafe += bool(re.match(r"\s*unsafe", text))
    return time.perf_counter() - started, unsafe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="default 96; 4 with --quick")
    parser.add_argument("--template", choices=("llama_guard_3", "generic"),
                        default="llama_guard_3")
    parser.add_argument("--block-size", type=int, default=32,
                        help="vLLM KV block: the prefix cache reuses whole blocks only")
    parser.add_argument("--words", type=int, default=None,
                        help="response words (default 70, ~128 tokens; 20 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    add_common_arguments(parser)
    args = parser.parse_args()
    args.rows = args.rows or (4 if args.quick else 96)
    args.words = args.words or (20 if args.quick else 70)
    warm = 2 if args.quick else 8  # warm-up rows
    torch.set_num_threads(len(usable_cores()))
    dtype = pick_dtype(args.dtype)
    # Measured first: once an in-process vLLM engine has bound its OpenMP threads, torch
    # matmuls in this process run slower, and the "peak" would flatter the ratio.
    say(f"measuring the {dtype} matmul peak")
    peak = matmul_peak(getattr(torch, dtype), (256, 512) if args.quick else (1024, 2048))
    say(f"matmul peak {peak / 1e9:.0f} GFLOP/s")

    convs = conversations(args.rows, args.words)
    options = GENERIC_GUARD_OPTIONS if args.template == "generic" else {}
    settings = GuardSettings(model=args.model, template=args.template,
                              template_options=options, dtype=dtype,
                              batch_size=args.batch_size, progress=False)
    rows = len(convs)
    memory = {}

    say("transformers: loading the guard")
    with PeakRSS() as peak_rss:
        forward = TransformersCritic(settings)
        forward.score(convs[:warm])  # warm-up
        say(f"transformers forward: scoring {rows} rows")
        result = forward.score(convs)
    memory["forward"] = peak_rss.peak_mib
    tokens = result.prompt_tokens
    times = {"forward": result.seconds}
    say(f"transformers forward: {rows / result.seconds:.1f} rows/s")
    forward_scores = result.p_unsafe
    generated_unsafe = {}
    for new_tokens in GENERATE_LENGTHS:
        name = f"generate{new_tokens}"
        say(f"transformers {name}: generating {new_tokens} tokens for {rows} rows")
        with PeakRSS() as peak_rss:
            times[name], generated_unsafe[name] = generate_and_parse(
                forward, convs, args.batch_size, new_tokens)
        memory[name] = peak_rss.peak_mib
        say(f"transformers {name}: {rows / times[name]:.1f} rows/s")
    params = sum(p.numel() for p in forward.model.parameters())
    flops = prefill_flops(forward.model, tokens, len(convs))
    shared = shared_prefix_tokens(forward.prompts.build(convs, [str(i) for i in range(len(convs))])
                                  .token_ids)
    forward.close()

    vllm_settings = GuardSettings(**{**settings.__dict__, "batch_size": args.rows,
                                      "distributed_executor_backend": "uni",
                                      "enforce_eager": args.quick,  # smoke: no compilation
                                      "enable_prefix_caching": True,
                                      "block_size": args.block_size})
    say("vllm: starting the engine")
    with PeakRSS() as peak_rss:
        started = time.perf_counter()
        engine = VLLMCritic(vllm_settings)
        startup = time.perf_counter() - started
        engine.score(convs[:warm])  # warm-up
        say(f"vllm: scoring {rows} rows")
        result = engine.score(convs)
    memory["vllm"] = peak_rss.peak_mib
    times["vllm"] = result.seconds
    say(f"vllm: {rows / result.seconds:.1f} rows/s")
    agreement = float(abs(result.p_unsafe - forward_scores).max())
    engine.close()

    print(f"\ncritic scoring, template {args.template}, {rows} rows, {tokens} guard prompt "
          f"tokens ({tokens / rows:.0f} per row), model {args.model} ({params / 1e6:.0f}M "
          f"params), {dtype}, {torch.get_num_threads()} threads")
    for name, seconds in times.items():
        print(f"  {name:10s} {rows / seconds:8.1f} rows/s  {tokens / seconds:9.0f} tokens/s"
              f"  ({flops / seconds / peak:.0%} of peak)  peak RSS {memory[name]:6.0f} MiB")
    print(f"  vllm / forward   = {times['forward'] / times['vllm']:.2f}x")
    for new_tokens in GENERATE_LENGTHS:
        name = f"generate{new_tokens}"
        print(f"  vllm / {name} = {times[name] / times['vllm']:.2f}x   (target >= 3x)")
    print(f"  every row starts with the same {shared} of its {tokens / rows:.0f} tokens; vLLM's "
          f"prefix cache keeps {shared // args.block_size * args.block_size} of them "
          "(whole blocks), the transformers baselines compute all")
    print(f"  vllm prefill: {flops / times['vllm'] / 1e9:.0f} GFLOP/s of a measured {dtype} "
          f"matmul peak of {peak / 1e9:.0f} GFLOP/s = {flops / times['vllm'] / peak:.0%}"
          + ("  (counting every prompt token; cached ones are not computed, so this can pass "
             "100%: use --template generic for the machine-efficiency figure)" if shared >=
             args.block_size else ""))
    print(f"  vllm engine start-up {startup:.1f} s (not in the rates); max |P(unsafe) vllm - "
          f"forward| = {agreement:.3g}; generate judged "
          + ", ".join(f"{n}/{rows} ({name})" for name, n in generated_unsafe.items()) + " unsafe")
    say("done")


if __name__ == "__main__":
    main()
