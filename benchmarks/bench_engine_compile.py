"""vLLM eager against compiled: engine start-up, and throughput for generation and scoring.

Every engine starts in its own process (as a new `safekeel` command would), with vLLM's and
inductor's compile caches in a fresh folder, so the first compiled start is a cold one. The
starts measured, in order:

1. compiled, model A, cold cache; then the work below
2. compiled, model A again (cache warm for this very model)
3. compiled, model B: a copy of A with slightly changed weights in another folder (another
   checkpoint of the same architecture, as an evaluation of several checkpoints meets)
4. eager, model A; then the work below
5. eager, model B

Work, timed after a warm-up: (a) generation of `--new-tokens` (64) greedy tokens for
`--prompts` (256) chat prompts of the synthetic world; (b) prompt-only scoring
(`max_tokens=1`, what the guard and the reference do) of `--prompts` distinct rows of
`--score-tokens` (150) tokens. The table prints both modes side by side with the ratios, and
the break-even: how much work pays back compiling on this machine (the figure
`safekeel.data.engines` resolves `enforce_eager: auto` with).

    python benchmarks/bench_engine_compile.py           # SmolLM2-135M-Instruct, ~10 min on 2 cores
    python benchmarks/bench_engine_compile.py --quick   # the tiny test model, 8 rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import add_common_arguments, pick_dtype, say

RESULT_MARK = "RESULT "


def scoring_rows(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct rows of `length` tokens cut from the world's text (no shared prefix,
    so prefix caching does not help either mode)."""
    from safekeel.data.embedded.world import make_world

    world = make_world(0)
    text = " ".join(turn["content"] for pool in (world.eval_tasks, world.eval_harmful,
                                                  world.eval_benign_overrefusal)
                    for row in pool for turn in row["messages"])
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(stream) < 2 * length:
        stream = stream * (2 * length // max(len(stream), 1) + 1)
    span = len(stream) - length
    return [stream[(i * (length - 1)) % span:(i * (length - 1)) % span + length]
            for i in range(count)]


def child(job: dict) -> dict:
    """Start one engine, optionally do the work, return the timings (runs in a subprocess)."""
    import vllm
    from bench_generation import world_prompts
    from vllm.inputs import TokensPrompt

    from safekeel.data.engines import EngineSpec, shutdown_engine, start_engine
    from safekeel.evaluate.generation import load_tokenizer, render_prompt

    result: dict = {}
    started = time.perf_counter()
    llm = start_engine(EngineSpec(model=job["model"], role="generation", dtype=job["dtype"],
                                  enforce_eager=job["eager"], max_model_len=512))
    result["start_s"] = time.perf_counter() - started
    try:
        if job["work"]:
            tokenizer = load_tokenizer(job["model"])
            prompts = [render_prompt(tokenizer, c) for c in world_prompts(job["prompts"])]
            rows = scoring_rows(tokenizer, job["prompts"], job["score_tokens"])

            def run(ids: list[list[int]], max_tokens: int) -> tuple[float, int]:
                params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                             ignore_eos=True, detokenize=False)
                begun = time.perf_counter()
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params,
                                    use_tqdm=False)
                return time.perf_counter() - begun, sum(len(o.outputs[0].token_ids)
                                                        for o in outs)

            run(prompts[:4], 4)  # warm-up
            result["generate_s"], result["generated_tokens"] = run(prompts, job["new_tokens"])
            result["prompt_tokens"] = sum(map(len, prompts))
            result["score_s"], _ = run(rows, 1)
            result["scored_tokens"] = sum(map(len, rows))
    finally:
        shutdown_engine(llm)
    return result


def perturbed_copy(source: str, target: Path) -> Path:
    """A copy of the checkpoint at `source` with every float weight nudged by 0.1% noise."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for path in Path(source).iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            for name, tensor in tensors.items():
                if tensor.is_floating_point():
                    noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
                    tensors[name] = (tensor + 1e-3 * tensor.std() * noise).contiguous()
            save_file(tensors, target / path.name, metadata={"format": "pt"})
        elif path.is_file():
            shutil.copy(path, target / path.name)
    return target


def spawn(job: dict, cache: Path) -> dict:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise SystemExit(f"engine process failed ({done.returncode}):\n{done.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="HF directory, hub id or alias (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=None, help="default 256; 8 with --quick")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64; 8 with --quick")
    parser.add_argument("--score-tokens", type=int, default=None,
                        help="tokens per scored row (default 150; 32 with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(RESULT_MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return
    args.prompts = args.prompts or (8 if args.quick else 256)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    args.score_tokens = args.score_tokens or (32 if args.quick else 150)
    dtype = pick_dtype(args.dtype)

    from safekeel.data.embedded.tiny_models import save_tiny_model
    from safekeel.data.models import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_a = str(save_tiny_model(tmp_path / "tiny")) if args.quick else (
            resolve_model_path(args.model))
        model_b = str(perturbed_copy(model_a, tmp_path / "model_b"))
        say(f"model A {model_a}, model B: its copy with weights changed by 0.1% noise; {dtype}")
        common = {"dtype": dtype, "prompts": args.prompts, "new_tokens": args.new_tokens,
                  "score_tokens": args.score_tokens}
        runs = [("compiled", "A, cold cache", model_a, True),
                ("compiled", "A, warm cache", model_a, False),
                ("compiled", "B (other weights)", model_b, False),
                ("eager", "A", model_a, True),
                ("eager", "B (other weights)", model_b, False)]
        results = {}
        for mode, label, model, work in runs:
            say(f"{mode}: starting {label}" + (", then generating and scoring" if work else ""))
            results[(mode, label)] = spawn({**common, "model": model, "eager": mode == "eager",
                                            "work": work}, tmp_path / "cache")
            say(f"{mode}: {label}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                 else f"{k} {v}"
                                                 for k, v in results[(mode, label)].items()))

    compiled, eager = results[("compiled", "A, cold cache")], results[("eager", "A")]
    print(f"\n{'engine start (s)':<34}{'compiled':>10}{'eager':>10}{'ratio':>8}")
    for c_label, e_label in (("A, cold cache", "A"), ("A, warm cache", "A"),
                             ("B (other weights)", "B (other weights)")):
        c, e = results[("compiled", c_label)]["start_s"], results[("eager", e_label)]["start_s"]
        print(f"{c_label:<34}{c:>10.1f}{e:>10.1f}{c / e:>7.1f}x")
    print(f"\n{'throughput (tokens/s)':<34}{'compiled':>10}{'eager':>10}{'ratio':>8}")
    speeds = {}
    for name, seconds, tokens in (("generation (new tokens)", "generate_s", "generated_tokens"),
                                  ("scoring (prompt tokens)", "score_s", "scored_tokens")):
        c, e = compiled[tokens] / compiled[seconds], eager[tokens] / eager[seconds]
        speeds[name] = (c, e)
        print(f"{name:<34}{c:>10.1f}{e:>10.1f}{c / e:>7.2f}x")
    print(f"(generation: {args.prompts} prompts, {eager['prompt_tokens']} prompt tokens, "
          f"{args.new_tokens} new tokens each; scoring: {args.prompts} rows x "
          f"{args.score_tokens} tokens)")
    # Compiling pays when the seconds it saves on the work exceed its extra start-up.
    print("\nbreak-even (work at which compiling pays back its extra start-up):")
    for c_label, e_label in (("A, cold cache", "A"), ("B (other weights)", "B (other weights)")):
        extra = results[("compiled", c_label)]["start_s"] - results[("eager", e_label)]["start_s"]
        for name, (c, e) in speeds.items():
            saved = 1 / e - 1 / c  # seconds saved per token
            tokens = f"{extra / saved:,.0f} tokens" if saved > 0 else "never (compiled not faster)"
            print(f"  {c_label:<20} {name:<26} extra start {extra:6.1f} s -> {tokens}")
    say("done")


if __name__ == "__main__":
    main()
