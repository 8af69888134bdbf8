"""Generation throughput: vLLM against transformers `generate`, same prompts, same model.

Both backends get the same chat-formatted token ids (the evaluate stage's own generators,
`evaluate.generation`), greedy decoding, the same dtype and the same number of new tokens.
Throughput is generated tokens per second of generation (model loading and engine start-up
are timed separately); the last line is the ratio. Prompts are the synthetic world's chat
prompts (tasks, how-to and harmful requests), so nothing is downloaded. `--dtype auto` (the
default) computes in bf16 where the hardware has it natively, else in float32. Each phase
prints as it goes, with the peak RSS of this process during it.

    python benchmarks/bench_generation.py              # SmolLM2-135M-Instruct, 64 x 48 tokens
    python benchmarks/bench_generation.py --small      # the tiny test model, seconds
    python benchmarks/bench_generation.py --eager      # vLLM without graph compilation
    python benchmarks/bench_generation.py --quick      # tiny model, 4 prompts x 8 tokens
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import PeakRSS, add_common_arguments, pick_dtype, say


def world_prompts(count: int) -> list[list[dict[str, str]]]:
    """`count` chat prompts from the synthetic world, interleaving its evaluation sets."""
    from safekeel.data.embedded.world import make_world

    world = make_world(0)
    pools = [world.eval_tasks, world.eval_benign_overrefusal, world.eval_harmful]
    prompts = []
    for index in range(count):
        pool = pools[index % len(pools)]
        prompts.append(pool[(index // len(pools)) % len(pool)]["messages"])
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="HF directory, hub id or alias (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--small", action="store_true", help="use the tiny test model instead")
    parser.add_argument("--prompts", type=int, default=None, help="default 64; 4 with --quick")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default 48; 8 with --quick")
    parser.add_argument("--hf-batch-size", type=int, default=64,
                        help="prompts per transformers generate call (default: all at once)")
    parser.add_argument("--eager", action="store_true", help="vLLM with enforce_eager=True")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.small = args.eager = True
    args.prompts = args.prompts or (4 if args.quick else 64)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 48)
    dtype = pick_dtype(args.dtype)

    from safekeel.data.embedded.tiny_models import save_tiny_model
    from safekeel.data.models import resolve_model_path
    from safekeel.evaluate.generation import (
        GenerationSettings,
        TransformersGenerator,
        VLLMGenerator,
        render_prompt,
    )

    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny_model(Path(tmp) / "tiny")) if args.small else (
            resolve_model_path(args.model))
        conversations = world_prompts(args.prompts)
        settings = GenerationSettings(dtype=dtype, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.hf_batch_size, enforce_eager=args.eager,
                                      max_model_len=512)
        say(f"model {model} ({dtype}), {args.prompts} chat prompts x up to "
            f"{args.max_new_tokens} new tokens, greedy")
        rows = {}
        memory = {}

        # transformers first: an in-process vLLM engine changes the process's threading.
        say("transformers: loading")
        with PeakRSS() as peak:
            started = time.perf_counter()
            hf = TransformersGenerator(model, settings)
            load_seconds = time.perf_counter() - started
            prompts = [render_prompt(hf.tokenizer, c) for c in conversations]
            say(f"prompt tokens: mean {sum(map(len, prompts)) / len(prompts):.1f}")
            hf.generate_tokens(prompts[:2], 4)  # warm-up: first-call allocations
            say("transformers: generating")
            started = time.perf_counter()
            hf_out = hf.generate_tokens(prompts, args.max_new_tokens)
            rows["transformers"] = (load_seconds, time.perf_counter() - started, hf_out)
            hf.close()
        memory["transformers"] = peak.peak_mib

        say("vllm: starting the engine")
        with PeakRSS() as peak:
            started = time.perf_counter()
            vllm_generator = VLLMGenerator(model, settings)
            load_seconds = time.perf_counter() - started
            try:
                vllm_generator.generate_tokens(prompts[:2], 4)  # warm-up
                say("vllm: generating")
                started = time.perf_counter()
                vllm_out = vllm_generator.generate_tokens(prompts, args.max_new_tokens)
                rows["vllm"] = (load_seconds, time.perf_counter() - started, vllm_out)
            finally:
                vllm_generator.close()
        memory["vllm"] = peak.peak_mib

    print(f"\n{'backend':<13}{'load s':>8}{'generate s':>12}{'tokens':>8}{'tokens/s':>10}"
          f"{'peak RSS MiB':>14}")
    speed = {}
    for name, (load_seconds, seconds, outputs) in rows.items():
        tokens = sum(len(o.token_ids) + (o.finish_reason == "stop") for o in outputs)
        speed[name] = tokens / seconds
        print(f"{name:<13}{load_seconds:>8.1f}{seconds:>12.2f}{tokens:>8}{speed[name]:>10.1f}"
              f"{memory[name]:>14.0f}")
    same = sum(a.token_ids == b.token_ids for a, b in zip(hf_out, vllm_out, strict=True))
    print(f"identical greedy outputs: {same}/{len(prompts)}")
    print(f"vLLM / transformers throughput: {speed['vllm'] / speed['transformers']:.1f}x")
    say("done")


if __name__ == "__main__":
    main()
