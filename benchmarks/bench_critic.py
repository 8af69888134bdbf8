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
fraction is a lower bound. The peak is the best of a few square bf16 matmuls, measured
before any engine starts.

No guard LLM weights exist offline, so SmolLM2-135M-Instruct stands in as the guard: the
cost of scoring does not depend on what the weights say. The template is Llama Guard 3's
by default (its category list makes every guard prompt start with the same ~250 tokens,
which vLLM's prefix cache computes once; the transformers baselines cannot skip them), or
the generic one-line yes/no template (`--template generic`: almost no shared prefix).

    python benchmarks/bench_critic.py                     # 256 Llama Guard 3 rows
    python benchmarks/bench_critic.py --template generic --rows 512
    python benchmarks/bench_critic.py --rows 32           # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS says otherwise
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch

from safekeel.data.guard.critic import GuardSettings, TransformersCritic, VLLMCritic

GENERATE_LENGTHS = (4, 8)  # new tokens: a label word; a full Llama Guard 3 verdict
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEMPLATE_OPTIONS = {
    "response_template": "Is the following answer to the question unsafe? Answer unsafe or "
    "safe.\nQuestion: {prompt}\nAnswer: {response}\nVerdict:",
    "labels": ["unsafe", "safe"],
    "label_prefix": " ",
}


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


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048), repeats: int = 10) -> float:
    """Best measured FLOP/s of square matmuls: the machine's practical peak for this dtype."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        for _ in range(2):
            a @ b
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


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
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--template", choices=("llama_guard_3", "generic"),
                        default="llama_guard_3")
    parser.add_argument("--block-size", type=int, default=32,
                        help="vLLM KV block: the prefix cache reuses whole blocks only")
    parser.add_argument("--words", type=int, default=70, help="response words (~128 tokens)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    # Measured first: once an in-process vLLM engine has bound its OpenMP threads, torch
    # matmuls in this process run slower, and the "peak" would flatter the ratio.
    peak = matmul_peak(torch.bfloat16)

    convs = conversations(args.rows, args.words)
    options = TEMPLATE_OPTIONS if args.template == "generic" else {}
    settings = GuardSettings(model=args.model, template=args.template,
                              template_options=options, dtype="bfloat16",
                              batch_size=args.batch_size, progress=False)

    forward = TransformersCritic(settings)
    forward.score(convs[:8])  # warm-up
    result = forward.score(convs)
    tokens = result.prompt_tokens
    times = {"forward": result.seconds}
    forward_scores = result.p_unsafe
    generated_unsafe = {}
    for new_tokens in GENERATE_LENGTHS:
        name = f"generate{new_tokens}"
        times[name], generated_unsafe[name] = generate_and_parse(
            forward, convs, args.batch_size, new_tokens)
    params = sum(p.numel() for p in forward.model.parameters())
    flops = prefill_flops(forward.model, tokens, len(convs))
    shared = shared_prefix_tokens(forward.prompts.build(convs, [str(i) for i in range(len(convs))])
                                  .token_ids)
    forward.close()

    vllm_settings = GuardSettings(**{**settings.__dict__, "batch_size": args.rows,
                                      "distributed_executor_backend": "uni",
                                      "enable_prefix_caching": True,
                                      "block_size": args.block_size})
    started = time.perf_counter()
    engine = VLLMCritic(vllm_settings)
    startup = time.perf_counter() - started
    engine.score(convs[:8])  # warm-up
    result = engine.score(convs)
    times["vllm"] = result.seconds
    agreement = float(abs(result.p_unsafe - forward_scores).max())
    engine.close()

    rows = len(convs)
    print(f"critic scoring, template {args.template}, {rows} rows, {tokens} guard prompt tokens "
          f"({tokens / rows:.0f} per row), model {args.model} ({params / 1e6:.0f}M params), "
          f"bf16, {torch.get_num_threads()} threads")
    for name, seconds in times.items():
        print(f"  {name:10s} {rows / seconds:8.1f} rows/s  {tokens / seconds:9.0f} tokens/s"
              f"  ({flops / seconds / peak:.0%} of peak)")
    print(f"  vllm / forward   = {times['forward'] / times['vllm']:.2f}x")
    for new_tokens in GENERATE_LENGTHS:
        name = f"generate{new_tokens}"
        print(f"  vllm / {name} = {times[name] / times['vllm']:.2f}x   (target >= 3x)")
    print(f"  every row starts with the same {shared} of its {tokens / rows:.0f} tokens; vLLM's "
          f"prefix cache keeps {shared // args.block_size * args.block_size} of them "
          "(whole blocks), the transformers baselines compute all")
    print(f"  vllm prefill: {flops / times['vllm'] / 1e9:.0f} GFLOP/s of a measured bf16 matmul "
          f"peak of {peak / 1e9:.0f} GFLOP/s = {flops / times['vllm'] / peak:.0%}"
          + ("  (counting every prompt token; cached ones are not computed, so this can pass "
             "100%: use --template generic for the machine-efficiency figure)" if shared >=
             args.block_size else ""))
    print(f"  vllm engine start-up {startup:.1f} s (not in the rates); max |P(unsafe) vllm - "
          f"forward| = {agreement:.3g}; generate judged "
          + ", ".join(f"{n}/{rows} ({name})" for name, n in generated_unsafe.items()) + " unsafe")


if __name__ == "__main__":
    main()
