"""The per-token objective, checked against a naive float64 reference built from full logits.

The reference below materialises [B, T, V] logits, loops over tokens and writes every
estimator from its textbook formula; the library works on masked rows in chunks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from safekeel.train.objective import (
    KL_ESTIMATORS,
    LazyLogits,
    ObjectiveInputError,
    count_step_tokens,
    lazy_masked_logits,
    masked_hidden,
    masked_logits,
    normalise,
    token_kl,
    token_objective,
)
from safekeel.train.weights import expand_star_to_tokens, make_weight_policy, needs_reference

REPO = Path(__file__).resolve().parents[2]
B, T, H, V = 3, 7, 6, 13


# --------------------------------------------------------------------------- fixtures


def make_problem(seed: int = 0) -> dict:
    """A tiny batch: hidden states, a policy head and a different reference head."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:6] = True  # 4 tokens
    mask[1, 1:3] = True  # 2 tokens
    mask[2, 0:7] = True  # 7 tokens
    return {
        "hidden": torch.randn(B, T, H, generator=g),
        "ref_hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g),
        "ref_weight": torch.randn(V, H, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "mask": mask,
        "a": torch.rand(B, T, generator=g),
        "b": torch.rand(B, T, generator=g) * 2,
    }


def naive_objective(prob: dict, estimator: str | None, clamp: float | None = None):
    """float64 sum_t a CE + b KL from full [B, T, V] logits; returns (value, grads).

    grads: d value / d hidden and d value / d policy head weight. estimator None: no KL.
    """
    hidden = prob["hidden"].double().requires_grad_()
    weight = prob["weight"].double().requires_grad_()
    logits = hidden @ weight.T
    logp = logits - logits.exp().sum(-1, keepdim=True).log()
    ref_logits = prob["ref_hidden"].double() @ prob["ref_weight"].double().T
    ref_logp = ref_logits - ref_logits.exp().sum(-1, keepdim=True).log()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            if not prob["mask"][i, t]:
                continue
            y = int(prob["labels"][i, t])
            lp, lq = logp[i, t], ref_logp[i, t]
            ce = -lp[y]
            if estimator is None:
                kl = torch.zeros((), dtype=torch.float64)
            elif estimator == "forward":
                kl = sum(lq[v].exp() * (lq[v] - lp[v]) for v in range(V))
            elif estimator == "reverse":
                kl = sum(lp[v].exp() * (lp[v] - lq[v]) for v in range(V))
            else:
                log_ratio = lp[y] - lq[y]
                if clamp is not None:
                    log_ratio = log_ratio.clamp(-clamp, clamp)
                if estimator == "k1":
                    kl = log_ratio
                elif estimator == "k2":
                    kl = 0.5 * log_ratio**2
                else:
                    ratio = torch.exp(-log_ratio)  # q(y) / p(y)
                    kl = ratio - 1 - torch.log(ratio)
            total = total + prob["a"][i, t].double() * ce + prob["b"][i, t].double() * kl
    total.backward()
    return total.detach(), hidden.grad, weight.grad


def library_objective(
    prob: dict,
    estimator: str | None,
    *,
    lazy: bool = False,
    chunk_size: int = 1024,
    clamp: float | None = None,
    recompute: bool | None = None,
    b: torch.Tensor | None = None,
):
    """The library's numerator and gradients for the same problem (float32)."""
    hidden = prob["hidden"].clone().requires_grad_()
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data.copy_(prob["weight"])
    ref_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    ref_head.weight.data.copy_(prob["ref_weight"])
    mask = prob["mask"]
    b = prob["b"] if b is None else b
    if lazy:
        policy = lazy_masked_logits(hidden, head, mask)
        ref = lazy_masked_logits(prob["ref_hidden"], ref_head, mask)
    else:
        policy = masked_logits(hidden, head, mask)
        with torch.no_grad():
            ref = masked_logits(prob["ref_hidden"], ref_head, mask)
    parts = token_objective(
        policy,
        prob["labels"][mask],
        prob["a"][mask],
        b[mask] if estimator is not None else torch.zeros(int(mask.sum())),
        ref if estimator is not None else None,
        kl_estimator=estimator or "forward",
        chunk_size=chunk_size,
        log_ratio_clamp=clamp,
        recompute=recompute,
    )
    parts.numerator.backward()
    return parts, hidden.grad, head.weight.grad


def assert_matches_naive(parts, grads, naive, tol: float = 2e-5):
    value, hidden_grad, weight_grad = naive
    assert parts.numerator.item() == pytest.approx(value.item(), rel=tol, abs=tol)
    torch.testing.assert_close(grads[0].double(), hidden_grad, atol=tol, rtol=tol)
    torch.testing.assert_close(grads[1].double(), weight_grad, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- vs naive


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_objective_matches_naive_full_logits_reference(estimator, lazy, chunk_size):
    prob = make_problem()
    naive = naive_objective(prob, estimator)
    parts, *grads = library_objective(prob, estimator, lazy=lazy, chunk_size=chunk_size)
    assert_matches_naive(parts, grads, naive)
    assert parts.n_tokens == 13


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_log_ratio_clamp_matches_naive(estimator):
    prob = make_problem(seed=3)
    naive = naive_objective(prob, estimator, clamp=0.5)
    parts, *grads = library_objective(prob, estimator, chunk_size=5, clamp=0.5)
    assert_matches_naive(parts, grads, naive)
    # The random heads are far apart, so the clamp must actually have bitten somewhere.
    unclamped = naive_objective(prob, estimator)[0]
    assert abs(unclamped.item() - naive[0].item()) > 1e-3


def test_chunked_equals_unchunked_with_and_without_recompute():
    prob = make_problem(seed=1)
    whole, *whole_grads = library_objective(prob, "forward", chunk_size=10_000, recompute=False)
    for chunk_size in (1, 2, 5, 13):
        for recompute in (True, False):
            for lazy in (True, False):
                parts, *grads = library_objective(
                    prob, "forward", lazy=lazy, chunk_size=chunk_size, recompute=recompute
                )
                torch.testing.assert_close(parts.numerator, whole.numerator)
                torch.testing.assert_close(parts.ce_sum, whole.ce_sum)
                torch.testing.assert_close(parts.kl_sum, whole.kl_sum)
                for got, want in zip(grads, whole_grads, strict=True):
                    torch.testing.assert_close(got, want)


def test_logging_sums_are_unweighted_and_detached():
    prob = make_problem(seed=2)
    parts, *_ = library_objective(prob, "reverse", chunk_size=3)
    logits = prob["hidden"] @ prob["weight"].T
    ref_logits = prob["ref_hidden"] @ prob["ref_weight"].T
    mask, labels = prob["mask"], prob["labels"]
    expected_ce = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
    p = logits[mask].softmax(-1)
    expected_kl = (p * (p.log() - ref_logits[mask].log_softmax(-1))).sum()
    torch.testing.assert_close(parts.ce_sum, expected_ce)
    torch.testing.assert_close(parts.kl_sum, expected_kl)
    assert not parts.ce_sum.requires_grad and not parts.kl_sum.requires_grad


# --------------------------------------------------------------------------- SFT, KL, DSS


def test_zero_kl_weight_reproduces_plain_sft_loss_and_gradients():
    prob = make_problem(seed=4)
    mask, labels = prob["mask"], prob["labels"]
    prob["a"] = torch.ones(B, T)
    # Independent SFT reference: torch's cross entropy, mean over response tokens.
    hidden = prob["hidden"].clone().requires_grad_()
    weight = prob["weight"].clone().requires_grad_()
    sft = F.cross_entropy((hidden @ weight.T)[mask], labels[mask])
    sft.backward()
    n = int(mask.sum())
    zero_b = torch.zeros(B, T)
    for estimator, lazy in ((None, False), (None, True), ("forward", False), ("k2", True)):
        # With a reference given and b = 0, the KL term must not leak into the gradient.
        parts, hidden_grad, weight_grad = library_objective(prob, estimator, lazy=lazy, b=zero_b)
        torch.testing.assert_close(normalise(parts.numerator, n), sft.detach())
        torch.testing.assert_close(hidden_grad / n, hidden.grad)
        torch.testing.assert_close(weight_grad / n, weight.grad)


def test_reference_may_be_omitted_only_when_kl_weight_is_zero():
    logits = torch.randn(4, V)
    labels = torch.tensor([1, 2, 3, 4])
    parts = token_objective(logits, labels, torch.ones(4), torch.zeros(4), None)
    assert parts.kl_sum is None
    with pytest.raises(ObjectiveInputError, match="no reference"):
        token_objective(logits, labels, torch.ones(4), torch.tensor([0, 0, 0.1, 0]), None)


@pytest.mark.parametrize("estimator", ["forward", "reverse", "k2", "k3"])
def test_policy_equal_to_reference_gives_zero_kl_and_zero_kl_gradient(estimator):
    torch.manual_seed(5)
    logits = torch.randn(6, V, requires_grad=True)
    labels = torch.randint(0, V, (6,))
    parts = token_objective(
        logits,
        labels,
        torch.zeros(6),
        torch.ones(6),
        logits.detach().clone(),
        kl_estimator=estimator,
        chunk_size=4,
    )
    assert parts.kl_sum.abs().item() < 1e-6
    assert parts.numerator.abs().item() < 1e-6
    parts.numerator.backward()
    assert logits.grad.abs().max().item() < 1e-6


def test_k1_at_equality_is_zero_but_its_gradient_is_minus_the_ce_gradient():
    # Documented behaviour: k1 = log p(y) - log q(y) is a signed log-ratio, so its gradient
    # does not vanish at p = q; it is exactly -grad CE, whatever the reference.
    torch.manual_seed(6)
    logits = torch.randn(5, V, requires_grad=True)
    labels = torch.randint(0, V, (5,))
    parts = token_objective(
        logits, labels, torch.zeros(5), torch.ones(5), logits.detach().clone(), kl_estimator="k1"
    )
    assert parts.kl_sum.abs().item() < 1e-6
    parts.numerator.backward()
    ce_logits = logits.detach().clone().requires_grad_()
    F.cross_entropy(ce_logits, labels, reduction="sum").backward()
    torch.testing.assert_close(logits.grad, -ce_logits.grad)


def test_forward_kl_is_non_negative_and_zero_only_at_equality():
    torch.manual_seed(7)
    policy_logp = torch.randn(200, V).log_softmax(-1)
    ref_logp = (torch.randn(200, V) * 2).log_softmax(-1)
    labels = torch.zeros(200, dtype=torch.long)
    for estimator in ("forward", "reverse", "k2", "k3"):
        kl = token_kl(policy_logp, ref_logp, labels, estimator)
        assert (kl > 0).all(), estimator
        same = token_kl(policy_logp, policy_logp, labels, estimator)
        assert same.abs().max().item() < 1e-6, estimator


def test_estimators_on_a_hand_computed_two_token_case():
    # p = policy = (0.5, 0.5), q = reference = (0.9, 0.1), label y = 0.
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    y = torch.tensor([0])
    expected = {
        "forward": 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5),
        "reverse": 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1),
        "k1": math.log(0.5) - math.log(0.9),
        "k2": 0.5 * (math.log(0.5) - math.log(0.9)) ** 2,
        "k3": 0.9 / 0.5 - 1 - math.log(0.9 / 0.5),
    }
    for estimator, value in expected.items():
        got = token_kl(p, q, y, estimator).item()
        assert got == pytest.approx(value, rel=1e-5), estimator
    # The clamp bounds |log p(y) - log q(y)| = 0.588 to 0.25.
    assert token_kl(p, q, y, "k2", log_ratio_clamp=0.25).item() == pytest.approx(0.5 * 0.25**2)


def test_star_dss_with_v_one_is_sft_and_with_v_zero_is_pure_kl():
    prob = make_problem(seed=8)
    mask, labels = prob["mask"], prob["labels"]
    n = int(mask.sum())
    policy = make_weight_policy("star_dss", lam=0.7)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data.copy_(prob["weight"])
    logits = masked_logits(prob["hidden"], head, mask)
    ref = masked_logits(prob["ref_hidden"], lambda h: h @ prob["ref_weight"].T, mask).detach()

    # V = 1 on every token (from one STAR segment per example): plain SFT, no reference.
    star_ones = torch.zeros(B, T)
    for i in range(B):
        star_ones[i, mask[i]] = expand_star_to_tokens([1.0], [1], int(mask[i].sum()))
    safe = policy(mask, star_v_safe_tokens=star_ones)
    assert not needs_reference(safe)
    parts = token_objective(logits, labels[mask], safe.a[mask], safe.b[mask], None)
    expected_sft = F.cross_entropy(logits, labels[mask])
    torch.testing.assert_close(normalise(parts.numerator, n), expected_sft)
    (grad_dss,) = torch.autograd.grad(parts.numerator / n, head.weight, retain_graph=True)
    (grad_sft,) = torch.autograd.grad(expected_sft, head.weight, retain_graph=True)
    torch.testing.assert_close(grad_dss, grad_sft)

    # V = 0 everywhere: only lam * k2 remains.
    unsafe = policy(mask, star_v_safe_tokens=torch.zeros(B, T))
    parts = token_objective(
        logits, labels[mask], unsafe.a[mask], unsafe.b[mask], ref, kl_estimator="k2"
    )
    log_ratio = logits.float().log_softmax(-1).gather(-1, labels[mask][:, None]) - ref.log_softmax(
        -1
    ).gather(-1, labels[mask][:, None])
    expected_kl = 0.7 * (0.5 * log_ratio**2).sum()
    torch.testing.assert_close(parts.numerator, expected_kl)
    (grad_dss,) = torch.autograd.grad(parts.numerator, head.weight, retain_graph=True)
    (grad_kl,) = torch.autograd.grad(expected_kl, head.weight)
    torch.testing.assert_close(grad_dss, grad_kl)


# --------------------------------------------------------------------------- memory, dtype


def test_no_fp32_logits_of_all_rows_are_kept_for_backward():
    n, chunk, hidden_size, vocab = 64, 8, 16, 50
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    labels = torch.randint(0, vocab, (n,))

    def saved_vocab_elements(recompute: bool) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            if tensor.dtype == torch.float32 and tensor.dim() and tensor.shape[-1] == vocab:
                total += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            parts = token_objective(
                LazyLogits(hidden, head),
                labels,
                torch.ones(n),
                torch.zeros(n),
                chunk_size=chunk,
                recompute=recompute,
            )
        parts.numerator.backward()
        return total

    # Without recompute every chunk's log-probs stay alive until backward; with it, none.
    assert saved_vocab_elements(recompute=False) >= n * vocab
    assert saved_vocab_elements(recompute=True) < chunk * vocab


def test_bf16_logits_are_upcast_before_log_softmax():
    torch.manual_seed(9)
    hidden = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    head = torch.nn.Linear(32, 300, bias=False).to(torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    labels = torch.randint(0, 300, (10,))
    logits = masked_logits(hidden, head, mask)
    assert logits.dtype == torch.bfloat16 and logits.shape == (10, 300)
    parts = token_objective(logits, labels, torch.ones(10), torch.zeros(10), chunk_size=3)
    assert parts.numerator.dtype == torch.float32
    expected = F.cross_entropy(logits.double(), labels, reduction="sum")
    assert parts.numerator.item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_rows_follow_row_major_mask_order():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    torch.testing.assert_close(masked_hidden(hidden, mask), torch.tensor([[1.0], [2.0], [3.0]]))


# --------------------------------------------------------------------------- normalisation


def test_gradient_accumulation_with_unequal_micro_batches_matches_whole_batch():
    prob = make_problem(seed=10)
    mask, labels = prob["mask"], prob["labels"]
    weight0 = prob["weight"]

    def numerator(rows: list[int], weight: torch.Tensor) -> torch.Tensor:
        sub_mask = mask[rows]
        logits = masked_logits(prob["hidden"][rows], lambda h: h @ weight.T, sub_mask)
        ref = masked_logits(prob["ref_hidden"][rows], lambda h: h @ prob["ref_weight"].T, sub_mask)
        return token_objective(
            logits,
            labels[rows][sub_mask],
            prob["a"][rows][sub_mask],
            prob["b"][rows][sub_mask],
            ref,
            chunk_size=3,
        ).numerator

    whole = weight0.clone().requires_grad_()
    normalise(numerator([0, 1, 2], whole), int(mask.sum())).backward()

    micro_batches = [[0, 1], [2]]  # 6 and 7 tokens
    n = count_step_tokens(mask[rows] for rows in micro_batches)
    assert n.item() == 13
    accumulated = weight0.clone().requires_grad_()
    for rows in micro_batches:
        normalise(numerator(rows, accumulated), n).backward()
    torch.testing.assert_close(accumulated.grad, whole.grad)

    # A backward that divides by the number of micro-batches (accelerator.backward does)
    # is undone by accumulation_steps.
    divided = weight0.clone().requires_grad_()
    for rows in micro_batches:
        (normalise(numerator(rows, divided), n, accumulation_steps=2) / 2).backward()
    torch.testing.assert_close(divided.grad, whole.grad)

    # Averaging per-micro-batch means instead would be wrong here: the test can tell.
    naive = weight0.clone().requires_grad_()
    for rows in micro_batches:
        (numerator(rows, naive) / int(mask[rows].sum()) / 2).backward()
    assert not torch.allclose(naive.grad, whole.grad, atol=1e-4)


def test_normalise_edge_cases():
    numerator = torch.tensor(6.0, requires_grad=True)
    assert normalise(numerator, 3).item() == pytest.approx(2.0)
    assert normalise(numerator, torch.tensor(3), world_size=2).item() == pytest.approx(4.0)
    # No response tokens in the whole step: zero loss, not NaN, and backward still works.
    empty = normalise(torch.zeros((), requires_grad=True), torch.tensor(0))
    assert empty.item() == 0.0
    for bad in (
        {"global_tokens": -1},
        {"global_tokens": 2.5},
        {"global_tokens": 4, "world_size": 0},
        {"global_tokens": 4, "accumulation_steps": True},
    ):
        with pytest.raises(ObjectiveInputError):
            normalise(numerator, **bad)


def test_empty_micro_batch_gives_a_graph_connected_zero():
    hidden = torch.randn(0, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    parts = token_objective(
        LazyLogits(hidden, head),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
        torch.zeros(0),
    )
    assert parts.n_tokens == 0 and parts.numerator.item() == 0.0
    parts.numerator.backward()
    assert head.weight.grad is not None and (head.weight.grad == 0).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kl_estimator": "js"}, "allowed: forward, reverse, k1, k2, k3"),
        ({"kl_estimator": "forward", "log_ratio_clamp": 1.0}, "target-token"),
        ({"kl_estimator": "k2", "log_ratio_clamp": 0.0}, "> 0"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.tensor([0, 1, 2])}, "labels must be integer with shape"),
        ({"labels": torch.tensor([0, 1, 2, V])}, "outside the vocabulary"),
        ({"labels": torch.tensor([0, -1, 2, 3])}, ">= 0"),
        ({"ce_weight": torch.ones(3)}, "ce_weight must have shape"),
        ({"ref": torch.zeros(3, V)}, "ref has 3 rows"),
        ({"ref": torch.zeros(4, V + 1)}, "vocabulary"),
    ],
)
def test_bad_objective_inputs_raise(change, message):
    args = {
        "policy": torch.randn(4, V),
        "labels": torch.tensor([0, 1, 2, 3]),
        "ce_weight": torch.ones(4),
        "kl_weight": torch.ones(4),
        "ref": torch.randn(4, V),
    }
    args.update(change)
    with pytest.raises(ObjectiveInputError, match=message):
        token_objective(**args)


def test_masked_hidden_checks_shapes():
    with pytest.raises(ObjectiveInputError, match=r"\[B, T, H\]"):
        masked_hidden(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ObjectiveInputError, match="mask must be bool"):
        masked_hidden(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ObjectiveInputError, match="mask must be bool"):
        masked_hidden(torch.zeros(2, 3, 4), torch.ones(2, 3))


# --------------------------------------------------------------------------- real model


def test_tiny_llama_masked_logits_and_sft_loss_match_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    config = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 48, (2, 9))
    response = torch.zeros(2, 9, dtype=torch.bool)
    response[0, 5:] = True
    response[1, 3:] = True
    # Shift once: logits at t predict token t + 1, so the mask moves left by one.
    labels = input_ids[:, 1:]
    mask = response[:, 1:]

    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    logits = masked_logits(hidden, model.lm_head, mask)
    full = model(input_ids=input_ids).logits[:, :-1]
    torch.testing.assert_close(logits, full[mask])

    hf_labels = torch.where(response, input_ids, torch.full_like(input_ids, -100))
    hf_loss = model(input_ids=input_ids, labels=hf_labels).loss
    weights = make_weight_policy("sft")(mask)
    parts = token_objective(
        lazy_masked_logits(hidden, model.lm_head, mask),
        labels[mask],
        weights.a[mask],
        weights.b[mask],
        None,
        chunk_size=4,
    )
    torch.testing.assert_close(normalise(parts.numerator, parts.n_tokens), hf_loss)

    # The wrapper-friendly route named in the module docstring gives the same states.
    wrapped = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1)
    assert wrapped.logits.shape[1] == 1
    torch.testing.assert_close(wrapped.hidden_states[-1][:, :-1], hidden)


# --------------------------------------------------------------------------- processes

_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import torch.nn.functional as F
    from safekeel.train.objective import count_step_tokens, masked_logits, normalise, token_objective

    WORLD = 2

    def problem():
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(4, 6, 5, generator=g)
        weight = torch.randn(11, 5, generator=g)
        labels = torch.randint(0, 11, (4, 6), generator=g)
        mask = torch.zeros(4, 6, dtype=torch.bool)
        for row, count in enumerate([1, 5, 2, 6]):  # unequal on purpose
            mask[row, 6 - count:] = True
        return hidden, weight, labels, mask

    def worker(rank, init_file, out_file):
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
        )
        hidden, weight0, labels, mask = problem()
        weight = weight0.clone().requires_grad_()
        micro_batches = [[row] for row in range(rank, 4, WORLD)]  # 2 micro-batches each
        n = count_step_tokens(mask[rows] for rows in micro_batches)
        for rows in micro_batches:
            sub = mask[rows]
            logits = masked_logits(hidden[rows], lambda h: h @ weight.T, sub)
            parts = token_objective(
                logits, labels[rows][sub], torch.ones(int(sub.sum())),
                torch.zeros(int(sub.sum())), None,
            )
            normalise(parts.numerator, n, world_size=WORLD).backward()
        grad = weight.grad
        dist.all_reduce(grad)
        grad /= WORLD  # what DDP does: average over processes
        if rank == 0:
            whole = weight0.clone().requires_grad_()
            F.cross_entropy((hidden @ whole.T)[mask], labels[mask]).backward()
            with open(out_file, "w") as f:
                json.dump({"ddp": grad.tolist(), "whole": whole.grad.tolist(),
                           "tokens": int(n), "world": dist.get_world_size()}, f)
        dist.barrier()  # a rank tearing gloo down while the other still works aborts it
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
    """
)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_with_ddp_averaging_match_the_whole_batch(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "init"), str(out)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world"] == 2
    assert data["tokens"] == 14  # 1 + 5 + 2 + 6 over both processes
    torch.testing.assert_close(torch.tensor(data["ddp"]), torch.tensor(data["whole"]))
