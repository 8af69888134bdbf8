"""Training curves with the live reference against the precomputed one, step by step.

    python benchmarks/bench_ref_curve.py               # SmolLM2-135M-Instruct, 6 steps
    python benchmarks/bench_ref_curve.py --quick       # the embedded tiny Llama, 4 steps
    python benchmarks/bench_ref_curve.py --estimator k3 --steps 10

The rows (harmful SST-2 mix from the shared data folder when present, else templated
text; always templated text for the tiny model, whose context SST-2's template overflows) are
annotated once with the `reference` section (transformers, top-16, float32), then
`constant_kl` trains twice on the same shards, in float32, with the same seed: once with the
live frozen copy, once with `--reference precomputed`. With a target-token estimator (k2,
the default; k3; k1) the two must agree to float noise; with forward KL the precomputed
run is the top-k lower bound and drifts by the missed mass. Printed: loss and KL per step
for both, their largest relative difference, the step times, and the largest difference of
the final weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import SHARED, add_common_arguments, say

SMOLLM2 = "smollm2-135m-instruct"
DATA = SHARED / "nlsr_finetune" / "sst2" / "train_merged_n1000_p0.2.json"


def write_corpus(path: Path, n: int, shared: bool) -> Path:
    if shared and DATA.exists():
        items = json.loads(DATA.read_text())[:n]
        rows = [{"prompt": f"{i['instruction']} {i.get('input', '')}".strip(),
                 "response": i["output"]} for i in items]
    else:
        rows = [{"prompt": f"Explain topic number {k}.",
                 "response": " ".join(f"Sentence {j} about topic {k}." for j in range(12))}
                for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_policy(work: Path) -> str:
    from safekeel.data.embedded.tiny_models import save_tiny_model

    return str(save_tiny_model(work / "tiny"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=f"'tiny', {SMOLLM2!r} or a path")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (6; 4 quick)")
    parser.add_argument("--batch", type=int, default=4, help="rows a step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens a row at most")
    parser.add_argument("--estimator", default="k2", choices=("k1", "k2", "k3", "forward"))
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    add_common_arguments(parser, dtype=False)
    args = parser.parse_args()
    args.model = args.model or ("tiny" if args.quick else SMOLLM2)
    args.steps = args.steps or (4 if args.quick else 6)

    from safetensors.torch import load_file

    from safekeel.annotate.config import AnnotateConfig
    from safekeel.annotate.run import annotate
    from safekeel.data.config import from_dict
    from safekeel.train.config import TrainConfig
    from safekeel.train.run import train

    work = Path(tempfile.mkdtemp(prefix="bench_ref_curve_"))
    policy = tiny_policy(work) if args.model == "tiny" else args.model
    # the tiny model's tokenizer spends a token on a few characters: SST-2's long template
    # would not fit its context, so it gets the short templated rows
    corpus = write_corpus(work / "corpus.jsonl", args.steps * args.batch, args.model != "tiny")
    tokenization = {"max_length": args.max_length}
    say(f"annotating {args.steps * args.batch} rows with the reference (top-{args.top_k})")
    started = time.perf_counter()
    annotate(from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus)}, "policy": policy, "output_dir": str(work / "shards"),
        "tokenization": tokenization,
        # the section's default dtype, float32: what the live float32 reference computes in
        "reference": {"enabled": True, "backend": "transformers", "top_k": args.top_k}}))
    say(f"annotated in {time.perf_counter() - started:.1f} s")

    logs, finals = {}, {}
    for mode in ("live", "precomputed"):
        say(f"training with the {mode} reference, {args.steps} steps")
        out = work / mode
        result = train(from_dict(TrainConfig, {
            "policy": policy, "shards": str(work / "shards"), "output_dir": str(out),
            "method": "constant_kl", "kl": {"estimator": args.estimator, "beta": 0.5},
            "reference": mode, "per_device_batch_size": args.batch, "max_steps": args.steps,
            "learning_rate": args.learning_rate, "warmup_ratio": 0.0,
            "mixed_precision": "no", "tokenization": tokenization, "save_every": 0,
            "progress_bar": False}))
        logs[mode] = [json.loads(line) for line in result.log_path.read_text().splitlines()]
        finals[mode] = load_file(str(result.final_dir / "model.safetensors"))

    print(f"\nmodel {args.model}, constant_kl beta 0.5, kl.estimator {args.estimator}, "
          f"top-{args.top_k}, {args.batch} rows a step, max_length {args.max_length}, float32")
    print(f"{'step':>4} {'loss live':>10} {'loss pre':>10} {'kl live':>10} {'kl pre':>10} "
          f"{'s live':>7} {'s pre':>7}")
    worst = 0.0
    for live, pre in zip(logs["live"], logs["precomputed"], strict=True):
        print(f"{live['step']:4d} {live['loss']:10.5f} {pre['loss']:10.5f} {live['kl']:10.6f} "
              f"{pre['kl']:10.6f} {live['step_seconds']:7.2f} {pre['step_seconds']:7.2f}")
        worst = max(worst, abs(pre["loss"] - live["loss"]) / abs(live["loss"]))
    weights = max(float((finals["precomputed"][k] - v).abs().max())
                  for k, v in finals["live"].items())
    times = {m: statistics.median(r["step_seconds"] for r in logs[m][1:] or logs[m])
             for m in logs}
    print(f"largest relative loss difference {worst:.2e}; largest final weight difference "
          f"{weights:.2e}; median step {times['live']:.2f} s live, "
          f"{times['precomputed']:.2f} s precomputed "
          f"({times['precomputed'] / times['live']:.2f}x)")
    say("done")


if __name__ == "__main__":
    main()
