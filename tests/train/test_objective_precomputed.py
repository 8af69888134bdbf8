"""The objective against a precomputed reference: exact for k1/k2/k3, top-k + rest for forward.

The live path (reference logits) is the yardstick: the stored values are taken from the
same reference logits, so any difference comes from the precomputed path itself.
"""

from __future__ import annotations

import pytest
import torch

from safekeel.train.objective import (
    ObjectiveInputError,
    PrecomputedReference,
    masked_logits,
    stack_precomputed,
    token_kl,
    token_objective,
    topk_forward_kl,
)

B, T, H, V = 3, 7, 6, 13


def make_problem(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 1:3] = True
    mask[2, 0:7] = True
    return {
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g),
        "ref_logits": torch.randn(B, T, V, generator=g) * 2,
        "labels": torch.randint(0, V, (B, T), generator=g),
        "mask": mask,
        "a": torch.rand(B, T, generator=g),
        "b": torch.rand(B, T, generator=g) * 2,
    }


def stored_from_logits(ref_logits: torch.Tensor, labels: torch.Tensor, k: int) -> PrecomputedReference:
    """What annotate stores, taken from reference logits [N, V] in float32."""
    logq = ref_logits.float().log_softmax(-1)
    target = logq.gather(-1, labels[:, None]).squeeze(-1)
    if k == 0:
        return PrecomputedReference(target)
    top_logq, top_ids = logq.topk(k, dim=-1)
    return PrecomputedReference(target, top_ids, top_logq)


def objective(prob: dict, estimator: str, *, k: int | None = None, clamp=None, chunk_size=1024):
    """Numerator and gradients (hidden, head weight); k None: live reference logits."""
    hidden = prob["hidden"].clone().requires_grad_()
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data.copy_(prob["weight"])
    mask = prob["mask"]
    labels = prob["labels"][mask]
    ref_logits = prob["ref_logits"][mask]
    ref = ref_logits if k is None else stored_from_logits(ref_logits, labels, k)
    parts = token_objective(
        masked_logits(hidden, head, mask), labels, prob["a"][mask], prob["b"][mask], ref,
        kl_estimator=estimator, log_ratio_clamp=clamp, chunk_size=chunk_size,
    )
    parts.numerator.backward()
    return parts, hidden.grad, head.weight.grad


def assert_same(left, right, tol: float) -> None:
    (parts_l, *grads_l), (parts_r, *grads_r) = left, right
    assert parts_l.numerator.item() == pytest.approx(parts_r.numerator.item(), rel=tol, abs=tol)
    assert parts_l.kl_sum.item() == pytest.approx(parts_r.kl_sum.item(), rel=tol, abs=tol)
    for grad_l, grad_r in zip(grads_l, grads_r, strict=True):
        torch.testing.assert_close(grad_l, grad_r, atol=tol, rtol=tol)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_target_token_estimators_are_exact(estimator, clamp):
    prob = make_problem()
    live = objective(prob, estimator, clamp=clamp)
    for k in (0, 3):  # the top-k is not read by these estimators
        assert_same(objective(prob, estimator, k=k, clamp=clamp, chunk_size=4), live, 1e-6)


def test_full_vocabulary_top_k_is_the_exact_forward_kl():
    prob = make_problem(1)
    assert_same(objective(prob, "forward", k=V, chunk_size=5), objective(prob, "forward"), 1e-5)


def coarse_forward_kl(logp, logq, ids, labels=None) -> torch.Tensor:
    """float64 textbook KL between q and p with every token outside `ids` (and the label,
    when given) merged into one."""
    out = []
    for row in range(logp.shape[0]):
        p, q = logp[row].double().exp(), logq[row].double().exp()
        own = set(ids[row].tolist()) | ({int(labels[row])} if labels is not None else set())
        own = sorted(own)
        kl = sum(q[v] * torch.log(q[v] / p[v]) for v in own)
        q_rest, p_rest = 1 - q[own].sum(), 1 - p[own].sum()
        out.append(kl + q_rest * torch.log(q_rest / p_rest))
    return torch.stack(out)


def random_pair(seed: int, rows: int = 6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g, dtype=dtype) * 2
    logq = (torch.randn(rows, V, generator=g, dtype=dtype) * 2).log_softmax(-1)
    labels = torch.randint(0, V, (rows,), generator=g)
    return logits, logq, labels


@pytest.mark.parametrize("k", [1, 4, 12])
@pytest.mark.parametrize("with_label", [False, True])
def test_top_k_forward_kl_is_the_bucketed_kl_and_a_lower_bound(k, with_label):
    logits, logq, labels = random_pair(k)
    logp = logits.log_softmax(-1)
    top_logq, ids = logq.topk(k, dim=-1)
    labels[0] = ids[0, 0]  # one label inside the top-k: it must not count twice
    extra = (labels, logq.gather(-1, labels[:, None]).squeeze(-1)) if with_label else ()
    approx = topk_forward_kl(logp, ids, top_logq, *extra)
    expected = coarse_forward_kl(logp, logq, ids, labels if with_label else None)
    torch.testing.assert_close(approx.double(), expected, atol=1e-5, rtol=1e-5)
    exact = token_kl(logp, logq, labels, "forward")
    assert bool((approx <= exact + 1e-6).all())
    assert bool((approx >= -1e-6).all())
    if with_label:  # the finer split is at least as close to the exact value
        assert bool((approx >= topk_forward_kl(logp, ids, top_logq) - 1e-6).all())


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("with_label", [False, True])
def test_top_k_forward_kl_gradient_matches_finite_differences(k, with_label):
    logits, logq, labels = random_pair(7, rows=4, dtype=torch.float64)
    logits.requires_grad_()
    top_logq, ids = logq.topk(k, dim=-1)
    extra = (labels, logq.gather(-1, labels[:, None]).squeeze(-1)) if with_label else ()

    def kl_of_logits(x):
        return topk_forward_kl(x.log_softmax(-1), ids, top_logq, *extra)

    assert torch.autograd.gradcheck(kl_of_logits, (logits,), eps=1e-6, atol=1e-6)


def test_label_completing_the_vocabulary_leaves_an_empty_rest_with_finite_gradient():
    """k = V - 1 with the label outside the top-k: every token has its own term (exact)."""
    logits, logq, _ = random_pair(11, rows=3, dtype=torch.float64)
    logits.requires_grad_()
    top_logq, ids = logq.topk(V - 1, dim=-1)
    labels = logq.argmin(-1)  # the one token outside the top-(V-1)
    approx = topk_forward_kl(logits.log_softmax(-1), ids, top_logq, labels,
                             logq.gather(-1, labels[:, None]).squeeze(-1))
    exact = token_kl(logits.log_softmax(-1), logq, labels, "forward")
    torch.testing.assert_close(approx, exact, atol=1e-10, rtol=1e-10)
    approx.sum().backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_gradient_flows_through_the_policy_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g, requires_grad=True)
    top_logq, ids = torch.randn(4, V, generator=g).log_softmax(-1).topk(4, dim=-1)
    top_logq.requires_grad_()
    topk_forward_kl(logits.log_softmax(-1), ids, top_logq).sum().backward()
    assert top_logq.grad is None
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_forward_kl_is_zero_with_zero_gradient_when_policy_equals_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, V, generator=g, dtype=torch.float64, requires_grad=True)
    top_logq, ids = logits.detach().log_softmax(-1).topk(3, dim=-1)
    kl = topk_forward_kl(logits.log_softmax(-1), ids, top_logq)
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-12, rtol=0)
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-12, rtol=0)


def test_reverse_kl_is_refused_with_a_reason():
    prob = make_problem()
    with pytest.raises(ObjectiveInputError, match="reverse KL .* top-k"):
        objective(prob, "reverse", k=4)


def test_forward_kl_without_stored_top_k_is_refused():
    prob = make_problem()
    with pytest.raises(ObjectiveInputError, match="k = 0"):
        objective(prob, "forward", k=0)


def test_top_k_id_outside_the_vocabulary_is_refused():
    mask = torch.ones(1, 2, dtype=torch.bool)
    stored = PrecomputedReference(
        torch.zeros(2), torch.tensor([[0, V], [1, 2]]), torch.full((2, 2), -1.0)
    )
    with pytest.raises(ObjectiveInputError, match="outside the vocabulary"):
        token_objective(
            masked_logits(torch.randn(1, 2, H), torch.nn.Linear(H, V), mask),
            torch.zeros(2, dtype=torch.long), torch.ones(2), torch.ones(2), stored,
        )


def test_stack_follows_the_mask_row_order_and_checks_counts():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    rows = [
        PrecomputedReference(torch.tensor([-1.0, -2.0]), torch.tensor([[1, 2], [3, 4]]),
                             torch.tensor([[-0.1, -0.2], [-0.3, -0.4]])),
        PrecomputedReference(torch.tensor([-3.0]), torch.tensor([[5, 6]]), torch.tensor([[-0.5, -0.6]])),
    ]
    stacked = stack_precomputed(rows, mask)
    assert stacked.target_logprob.tolist() == [-1.0, -2.0, -3.0]
    assert stacked.topk_ids.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert stacked.topk_ids.dtype == torch.int64
    with pytest.raises(ObjectiveInputError, match="row 1: .* covers 1 response tokens, .* has 2"):
        stack_precomputed(rows, torch.tensor([[False, True, True], [True, True, False]]))
    with pytest.raises(ObjectiveInputError, match="different top-k sizes"):
        stack_precomputed([rows[0], PrecomputedReference(torch.tensor([-3.0]))], mask)


def test_malformed_precomputed_values_are_refused():
    with pytest.raises(ObjectiveInputError, match="both topk_ids and topk_logprobs"):
        PrecomputedReference(torch.zeros(2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ObjectiveInputError, match="integer"):
        PrecomputedReference(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ObjectiveInputError, match="shaped like topk_ids"):
        PrecomputedReference(torch.zeros(2), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))


def test_rows_with_little_policy_mass_outside_the_top_k_are_summed_directly():
    """1 - (mass on the ids) cancels when the policy puts almost everything there; those rows
    take the direct sum, the others the cheap difference, and both match float64."""
    logits, logq, labels = random_pair(21, rows=6)
    top_logq, ids = logq.topk(4, dim=-1)
    # rows 0-2: the policy puts all but ~1e-7 of its mass on the row's first top-k id
    logits[:3].scatter_(-1, ids[:3, :1], 20.0)
    logp = logits.log_softmax(-1)
    extra = (labels, logq.gather(-1, labels[:, None]).squeeze(-1))
    approx = topk_forward_kl(logp, ids, top_logq, *extra)
    expected = coarse_forward_kl(logits.double().log_softmax(-1), logq.double(), ids, labels)
    assert bool(torch.isfinite(approx).all())
    torch.testing.assert_close(approx.double(), expected, atol=1e-5, rtol=1e-5)

    def kl_of_logits(x):
        return topk_forward_kl(x.log_softmax(-1), ids, top_logq.double(), labels,
                               extra[1].double())

    logits64 = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(kl_of_logits, (logits64,), eps=1e-6, atol=1e-5)
