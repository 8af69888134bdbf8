"""Step metrics: accumulated on the device per micro-batch, reaching the host once per step,
and logged as the same token-weighted ratios as summing each micro-batch on the host."""

import math
from contextlib import contextmanager

import pytest
import torch

import safekeel.train.run as run_module
from safekeel.data.shards import tokenizer_fingerprint
from safekeel.train.metrics import StepMetrics
from safekeel.train.objective import LossParts
from safekeel.train.run import train
from tests.train.test_run import make_config, read_log, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return write_shards(tmp_path_factory.mktemp("shards"), 12, tokenizer_fingerprint(tiny_tokenizer))


class OneProcess:
    """What `StepMetrics.sync` and the NaN stop use of an Accelerator, for one process."""

    num_processes, process_index, gradient_accumulation_steps = 1, 0, 1

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor


@contextmanager
def host_syncs_refused(monkeypatch):
    """Every way a tensor's value reaches Python raises while the block runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was copied to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def micro_batch(numerator, ce, kl, n, a, b, risk):
    parts = LossParts(torch.tensor(numerator), torch.tensor(ce),
                      None if kl is None else torch.tensor(kl), n)
    return {"parts": parts, "ce_weights": torch.tensor(a), "kl_weights": torch.tensor(b),
            "batch_risk": None if risk is None else torch.tensor(risk)}


def test_accumulating_never_syncs_and_the_step_syncs_once(monkeypatch):
    first = micro_batch(3.0, 4.0, 0.5, 2, [1.0, 0.5], [0.0, 0.5], 0.25)
    second = micro_batch(6.0, 6.0, None, 3, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 0.75)
    padding = micro_batch(0.0, 0.0, None, 0, [], [], 0.0)
    metrics = StepMetrics(torch.tensor(5))
    with host_syncs_refused(monkeypatch):
        metrics.add(**first, reference_skipped=False, padding=False)
        metrics.add(**second, reference_skipped=True, padding=False)
        metrics.add(**padding, reference_skipped=True, padding=True)

    copies = []
    original = torch.Tensor.tolist

    def counted(self):
        copies.append(self.shape)
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counted)
        patch.setattr(torch.Tensor, "item", lambda self: pytest.fail(".item() in sync"))
        totals = metrics.sync(OneProcess(), torch.tensor(2.5))
    assert len(copies) == 1

    record = totals.record(step=7, lr=0.1, step_seconds=1.0)
    assert record["loss"] == 9.0 / 5 and record["ce"] == 10.0 / 5
    assert record["kl"] == 0.5 / 2  # only the micro-batch whose KL was computed
    assert record["ce_weight"] == 4.5 / 5 and record["kl_weight"] == 0.5 / 5
    assert record["batch_risk"] == 0.5  # the padding micro-batch does not count
    assert (record["ref_run"], record["ref_skipped"], record["tokens"]) == (1, 2, 5)
    assert record["grad_norm"] == 2.5
    assert list(record) == ["step", "loss", "ce", "kl", "kl_weight", "ce_weight", "batch_risk",
                            "ref_skipped", "ref_run", "tokens", "lr", "grad_norm",
                            "step_seconds"]
    assert totals.first_nonfinite() is None


def test_a_non_finite_micro_batch_is_found_after_the_step():
    metrics = StepMetrics(torch.tensor(4))
    for numerator in (1.0, float("nan"), float("inf")):
        metrics.add(**micro_batch(numerator, 1.0, None, 1, [1.0], [0.0], None),
                    reference_skipped=True, padding=False)
    totals = metrics.sync(OneProcess(), None)
    assert totals.first_nonfinite() == 1
    assert math.isnan(totals.local_losses[1]) and totals.local_losses[2] == math.inf
    assert totals.grad_norm is None and totals.record(1, 0.1, 0.0)["kl"] is None


@pytest.mark.parametrize("method, accumulation", [("star_dss", 4), ("downweight", 2)])
def test_logged_metrics_equal_sums_over_the_micro_batches(method, accumulation,
                                                          tiny_model_dir, shards, tmp_path):
    """Each logged value, recomputed on the host from what every micro-batch returned.

    star_dss with 4 micro-batches per step over 6 micro-batches: the second step is topped
    up with 2 empty ones (no batch risk, reference skipped); downweight never has a KL.
    """
    captured = []
    original = run_module.micro_batch_loss

    def spy(model, head, reference, weight_policy, batch, **kw):
        result = original(model, head, reference, weight_policy, batch, **kw)
        captured.append((batch, result))
        return result

    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "micro_batch_loss", spy)
        train(make_config(tiny_model_dir, shards, out, method=method,
                          gradient_accumulation_steps=accumulation))
    log = read_log(out)
    assert len(captured) == len(log) * accumulation
    for step, record in enumerate(log):
        window = captured[step * accumulation:(step + 1) * accumulation]
        tokens = sum(int(batch.response_mask.sum()) for batch, _ in window)
        with_kl = [r.parts for _, r in window if r.parts.kl_sum is not None]
        risks = [r.weights.batch_risk.item() for b, r in window
                 if r.weights.batch_risk is not None and not b.is_empty]
        expected = {
            "tokens": tokens,
            "loss": sum(r.parts.numerator.item() for _, r in window) / tokens,
            "ce": sum(r.parts.ce_sum.item() for _, r in window) / tokens,
            "kl": (sum(p.kl_sum.item() for p in with_kl) / sum(p.n_tokens for p in with_kl)
                   if with_kl else None),
            "ce_weight": sum(r.weights.a[batch.response_mask].sum().item()
                             for batch, r in window) / tokens,
            "kl_weight": sum(r.weights.b[batch.response_mask].sum().item()
                             for batch, r in window) / tokens,
            "batch_risk": sum(risks) / len(risks) if risks else None,
            "ref_skipped": sum(r.reference_skipped for _, r in window),
            "ref_run": sum(not r.reference_skipped for _, r in window),
        }
        for key, want in expected.items():
            assert record[key] == (want if want is None or isinstance(want, int)
                                   else pytest.approx(want, rel=1e-6)), (step + 1, key)
    if method == "star_dss":
        assert log[-1]["ref_skipped"] == 2 and log[-1]["kl"] is not None
    else:
        assert all(r["kl"] is None and r["ref_run"] == 0 for r in log)


class SecondOfTwoProcesses(OneProcess):
    """Process 1 of 2 whose reduce adds process 0's flags: its micro-batch 2 was NaN."""

    num_processes, process_index, gradient_accumulation_steps = 2, 1, 3

    def reduce(self, tensor, reduction):
        other = torch.zeros_like(tensor)
        other[-2] = 1.0  # the flag of micro-batch 2 (of 3), the last 3 entries are flags
        return tensor + other


def test_every_process_names_the_first_bad_micro_batch(tmp_path):
    from safekeel.train.data import TrainingExample, collate

    batch = collate([TrainingExample(id="ex-07", input_ids=[5, 6, 7], labels=[-100, 6, 7])], 0)
    metrics = StepMetrics(torch.tensor(6))
    for numerator in (1.0, 2.0, float("nan")):
        metrics.add(**micro_batch(numerator, 1.0, None, 2, [1.0, 1.0], [0.0, 0.0], None),
                    reference_skipped=True, padding=False)
    accelerator = SecondOfTwoProcesses()
    totals = metrics.sync(accelerator, None)
    assert totals.nonfinite == [0, 1, 1]
    window = [(0, batch)] * 3
    with pytest.raises(run_module.NonFiniteLossError) as caught:
        run_module._stop_if_not_finite(accelerator, totals, window, 4, tmp_path / "step-2")
    assert str(caught.value) == (
        "step 4 (micro-batch 2 of 3, process 1): another process's loss is not finite; "
        f"training stopped, last checkpoint: {tmp_path / 'step-2'}")

    alone = StepMetrics(torch.tensor(2))
    alone.add(**micro_batch(float("nan"), 1.0, None, 2, [1.0, 1.0], [0.0, 0.0], None),
              reference_skipped=True, padding=False)
    with pytest.raises(run_module.NonFiniteLossError, match=r"step 1 \(micro-batch 1 of 1\): "
                       r"loss is nan on examples \['ex-07'\]; .* last checkpoint: none yet"):
        run_module._stop_if_not_finite(OneProcess(), alone.sync(OneProcess(), None),
                                       [(0, batch)], 1, None)
