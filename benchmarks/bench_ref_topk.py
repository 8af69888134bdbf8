"""Error of the top-k forward KL (precomputed reference) against the exact full-vocabulary KL.

The train stage can read the reference's log-probs from the shards instead of running it
(`annotate.reference_logprobs`, `train.objective.PrecomputedReference`). k1, k2, k3 need
only the target token's log-prob and are exact; forward KL(ref || policy) is taken over the
stored top-k (and the label token, which the objective splits out of the bucket) plus one
bucket for the rest of the mass, which is a lower bound of the exact value. This measures
how far below, per response token, for several k, with and without the label split out.

Setup, on SmolLM2-135M-Instruct in float32:

  reference  the shipped model
  policy     the same model after a few SFT steps (AdamW) on rows of the harmful SST-2 mix
             (shared data nlsr_finetune/sst2/train_merged_n1000_p0.2.json), the way a
             fine-tuning run drifts away from its reference
  tokens     the response tokens of other rows of the same file (held out from the SFT)

Per k: exact forward KL in float64 from both full distributions, the top-k estimate from
the values the annotate scorer stores (its own `logprobs_from_logits`, float32, on the same
reference logits: the scorer's positions are tested against a full forward in
tests/annotate) through the train objective's own function;
mean and max absolute error, relative error (on tokens whose exact KL is at least 1e-3),
the error of the sum (what a loss averages), the reference's mass outside the top-k, and
storage per token (raw, and Parquet with zstd as the shards are written).

    python benchmarks/bench_ref_topk.py [--quick] [--tokens 2000] [--sft-steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from benchlib import SHARED, add_common_arguments, say

from safekeel.annotate.reference_logprobs import (
    ReferenceRow,
    logprobs_from_logits,
    reference_arrays,
    storage_bytes_per_token,
)
from safekeel.data.corpus import CorpusConfig, load_examples
from safekeel.data.models import load_causal_lm, load_tokenizer
from safekeel.data.tokenization import TokenizationConfig, TokenizedExample, tokenize_example
from safekeel.train.data import TrainingExample, collate
from safekeel.train.objective import (
    PrecomputedReference,
    lazy_masked_logits,
    stack_precomputed,
    token_objective,
    topk_forward_kl,
)

DATA = SHARED / "nlsr_finetune" / "sst2" / "train_merged_n1000_p0.2.json"
MODEL = "smollm2-135m-instruct"
EXACT_DTYPE = "float32"  # errors of the top-k bucket alone, not of a lower precision
KS = (4, 8, 16, 32, 64)
# the rest bucket alone, and with the label token split out of it (what training uses)
VARIANTS = ("top-k + rest", "top-k + label + rest")
TRAINED_VARIANT = VARIANTS[1]
RELATIVE_FLOOR = 1e-3  # relative error only where the exact KL is at least this (nats)


def tokenized_rows(tokenizer, count_sft: int, max_tokens: int, max_length: int, seed: int):
    """SFT rows and held-out rows (until `max_tokens` response tokens), seeded shuffle."""
    examples = load_examples(CorpusConfig(path=str(DATA)))
    order = np.random.default_rng(seed).permutation(len(examples))
    cfg = TokenizationConfig(max_length=max_length)
    sft: list[TokenizedExample] = []
    held_out: list[TokenizedExample] = []
    tokens = 0
    for index in order:
        example = tokenize_example(tokenizer, examples[int(index)]["messages"], cfg)
        if not isinstance(example, TokenizedExample):
            continue
        if len(sft) < count_sft:
            sft.append(example)
        elif tokens < max_tokens:
            held_out.append(example)
            tokens += example.response_tokens
        else:
            break
    return sft, held_out, tokens


def batches(examples, size: int, pad_token_id: int):
    for start in range(0, len(examples), size):
        chunk = examples[start:start + size]
        yield chunk, collate(
            [TrainingExample(str(i), e.input_ids, e.labels) for i, e in enumerate(chunk)],
            pad_token_id,
        )


def sft(model, examples, *, steps: int, snapshots: set[int], batch_size: int, lr: float,
        pad_token_id: int) -> dict[int, torch.nn.Module]:
    """Plain SFT steps (the train objective with a = 1, b = 0); a frozen copy of the policy
    after each step count in `snapshots`."""
    policy = copy.deepcopy(model).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    rows = list(batches(examples, batch_size, pad_token_id))
    kept: dict[int, torch.nn.Module] = {}
    for step in range(1, steps + 1):
        _, batch = rows[(step - 1) % len(rows)]
        mask = batch.response_mask
        hidden = policy.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state[:, :-1]
        n = int(mask.sum())
        parts = token_objective(
            lazy_masked_logits(hidden, policy.lm_head, mask), batch.target_ids[mask],
            torch.ones(n), torch.zeros(n), chunk_size=256,
        )
        loss = parts.numerator / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        say(f"sft step {step}/{steps}: CE {loss.item():.3f} on {n} tokens")
        if step in snapshots:
            kept[step] = copy.deepcopy(policy).eval().requires_grad_(False)
    return kept


@torch.no_grad()
def response_logits(model, batch) -> torch.Tensor:
    """Logits [N, V] of the batch's response positions (model dtype)."""
    hidden = model.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state[:, :-1][batch.response_mask]
    return model.lm_head(hidden)


def summarise(exact: np.ndarray, approx: np.ndarray, rest: np.ndarray) -> dict[str, float]:
    error = exact - approx
    significant = exact >= RELATIVE_FLOOR
    relative = error[significant] / exact[significant]
    return {
        "mean_abs": float(np.abs(error).mean()),
        "max_abs": float(np.abs(error).max()),
        "mean_rel": float(relative.mean()) if relative.size else float("nan"),
        "max_rel": float(relative.max()) if relative.size else float("nan"),
        "sum_rel": float(error.sum() / exact.sum()),
        "min_signed": float(error.min()),  # negative would mean the bound was broken
        "mean_ref_rest": float(rest.mean()),
    }


def parquet_bytes_per_token(rows, k: int, tokens: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ref.parquet"
        pq.write_table(pa.table(reference_arrays(rows, k)), path, compression="zstd")
        return path.stat().st_size / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # an accuracy measurement: float32 by design (see the module docstring), so no --dtype
    add_common_arguments(parser, dtype=False)
    parser.add_argument("--model", default=MODEL, help="reference model (alias or directory)")
    parser.add_argument("--tokens", type=int, default=2000, help="held-out response tokens")
    parser.add_argument("--sft-rows", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, default=8)
    parser.add_argument("--snapshots", type=int, nargs="*", default=[1],
                        help="also measure the policy after these step counts")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (1 is faster when the machine is busy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.sft_rows, args.sft_steps, args.snapshots = 300, 8, 2, [1]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    say(f"loading {args.model} ({EXACT_DTYPE}), {args.threads} threads")
    tokenizer = load_tokenizer(args.model)
    reference = load_causal_lm(args.model, dtype=EXACT_DTYPE).requires_grad_(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sft_rows, held_out, tokens = tokenized_rows(
        tokenizer, args.sft_rows, args.tokens, args.max_length, args.seed
    )
    say(f"{len(sft_rows)} SFT rows; {len(held_out)} held-out rows, {tokens} response tokens")

    snapshots = sorted({min(n, args.sft_steps) for n in args.snapshots} | {args.sft_steps})
    policies = sft(reference, sft_rows, steps=args.sft_steps, snapshots=set(snapshots),
                   batch_size=args.batch_size, lr=args.lr, pad_token_id=pad)

    exact_parts: dict[int, list[np.ndarray]] = {s: [] for s in snapshots}
    approx_parts = {(s, v, k): [] for s in snapshots for v in VARIANTS for k in KS}
    rest_parts: dict[int, list[np.ndarray]] = {k: [] for k in KS}
    stored: list[ReferenceRow] = []
    done = 0
    for _, batch in batches(held_out, args.batch_size, pad):
        mask = batch.response_mask
        ref_logits = response_logits(reference, batch)
        ref_logp = ref_logits.double().log_softmax(-1)
        # what annotate stores for these positions (top-64; smaller k are its prefixes)
        target, top_ids, top_logp = logprobs_from_logits(ref_logits, batch.target_ids[mask], max(KS))
        offsets = np.cumsum([0, *mask.sum(1).tolist()])
        rows = [
            ReferenceRow(target[a:b].numpy(), top_ids[a:b].to(torch.int32).numpy(),
                         top_logp[a:b].numpy())
            for a, b in itertools.pairwise(offsets)
        ]
        stored.extend(rows)
        full = stack_precomputed(
            [PrecomputedReference(torch.from_numpy(r.target_logprob),
                                  torch.from_numpy(r.topk_ids).long(),
                                  torch.from_numpy(r.topk_logprobs)) for r in rows],
            mask,
        )
        for k in KS:
            rest_parts[k].append((1 - full.topk_logprobs[:, :k].double().exp().sum(-1)).numpy())
        for step, policy in policies.items():
            policy_logits = response_logits(policy, batch)
            policy_logp = policy_logits.double().log_softmax(-1)
            exact_parts[step].append((ref_logp.exp() * (ref_logp - policy_logp)).sum(-1).numpy())
            policy32 = policy_logits.float().log_softmax(-1)  # what training computes in
            labels = batch.target_ids[mask]
            for k in KS:
                ids, top = full.topk_ids[:, :k], full.topk_logprobs[:, :k]
                plain = topk_forward_kl(policy32, ids, top)
                with_label = topk_forward_kl(policy32, ids, top, labels, full.target_logprob)
                approx_parts[step, "top-k + rest", k].append(plain.double().numpy())
                approx_parts[step, "top-k + label + rest", k].append(with_label.double().numpy())
        done += int(mask.sum())
        last = snapshots[-1]
        so_far = np.concatenate(exact_parts[last])
        k16 = {v: summarise(so_far, np.concatenate(approx_parts[last, v, 16]),
                            np.concatenate(rest_parts[16])) for v in VARIANTS}
        say(f"KL over {done}/{tokens} tokens, policy after {last} steps: mean exact "
            f"{so_far.mean():.4f} nats; k=16 error of the sum: "
            + ", ".join(f"{v} {k16[v]['sum_rel']:.1%}" for v in VARIANTS))

    results: dict = {
        "model": args.model,
        "tokens": done,
        "sft": {"rows": len(sft_rows), "lr": args.lr, "batch_size": args.batch_size},
        "relative_floor": RELATIVE_FLOOR,
        "storage": {},
        "by_steps": {},
    }
    for k in KS:
        sliced = [ReferenceRow(r.target_logprob, r.topk_ids[:, :k], r.topk_logprobs[:, :k])
                  for r in stored]
        results["storage"][k] = {
            "bytes_per_token_raw": storage_bytes_per_token(k),
            "bytes_per_token_parquet_zstd": round(parquet_bytes_per_token(sliced, k, done), 1),
        }
    for step in snapshots:
        exact_all = np.concatenate(exact_parts[step])
        entry = {
            "exact_forward_kl": {"mean": float(exact_all.mean()), "max": float(exact_all.max()),
                                 "median": float(np.median(exact_all))},
            "tokens_above_floor": int((exact_all >= RELATIVE_FLOOR).sum()),
            "variants": {},
        }
        print(f"\npolicy after {step} SFT steps: exact forward KL per token mean "
              f"{exact_all.mean():.4f}, median {np.median(exact_all):.4f}, max "
              f"{exact_all.max():.4f} nats; {entry['tokens_above_floor']} of {done} tokens "
              f">= {RELATIVE_FLOOR}", flush=True)
        for variant in VARIANTS:
            print(f"  {variant} (the train objective uses {TRAINED_VARIANT})"
                  if variant != TRAINED_VARIANT else f"  {variant}", flush=True)
            print(f"{'k':>3} {'mean abs':>10} {'max abs':>10} {'mean rel':>9} {'max rel':>9} "
                  f"{'sum rel':>9} {'ref rest':>9} {'B/tok raw':>9} {'B/tok pq':>9}", flush=True)
            by_k = entry["variants"][variant] = {}
            for k in KS:
                figures = summarise(exact_all, np.concatenate(approx_parts[step, variant, k]),
                                    np.concatenate(rest_parts[k]))
                by_k[k] = figures
                size = results["storage"][k]
                print(f"{k:>3} {figures['mean_abs']:>10.2e} {figures['max_abs']:>10.2e} "
                      f"{figures['mean_rel']:>9.2%} {figures['max_rel']:>9.2%} "
                      f"{figures['sum_rel']:>9.2%} {figures['mean_ref_rest']:>9.2e} "
                      f"{size['bytes_per_token_raw']:>9d} "
                      f"{size['bytes_per_token_parquet_zstd']:>9.1f}", flush=True)
        results["by_steps"][step] = entry
    results["seconds"] = round(time.perf_counter() - started, 1)
    say(f"done in {results['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    say("done")


if __name__ == "__main__":
    main()
