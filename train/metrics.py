"""What one optimizer step logs, accumulated without waiting for the device.

`StepMetrics.add` runs once per micro-batch and only adds device tensors (and host counts
the loop knows anyway); nothing is copied to the host there. `StepMetrics.sync` runs once
per step: one all-reduce over processes and one copy to the host, which also carries the
gradient norm and the per-micro-batch finiteness flags the NaN check needs.

Logged values are ratios of sums over the step's response tokens (all micro-batches, all
processes), so a long micro-batch weighs more than a short one:

  loss = sum a CE + b KL / tokens     ce = sum CE / tokens     kl = sum KL / KL tokens
  kl_weight = sum b / tokens          ce_weight = sum a / tokens
  batch_risk = mean over this process's non-empty micro-batches (main process only)

The sums are float64 and added in micro-batch order, so the values equal those of adding
each micro-batch's float32 scalars on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from safekeel.train.objective import LossParts

# Summed on the device, per micro-batch: objective numerator, unweighted CE, unweighted KL,
# sum of a(t), sum of b(t), all over response tokens.
_DEVICE_SUMS = 5


@dataclass(frozen=True)
class StepTotals:
    """One step's metrics on the host: sums over all processes unless marked local."""

    loss_sum: float
    ce_sum: float
    kl_sum: float
    kl_tokens: int  # tokens of micro-batches whose KL was computed
    ce_weight_sum: float
    kl_weight_sum: float
    ref_skipped: int
    ref_run: int
    tokens: int
    nonfinite: list[int]  # per micro-batch index: how many processes had a NaN/inf loss
    local_losses: list[float]  # this process's loss numerator per micro-batch
    local_risk_sum: float
    local_risk_count: int
    grad_norm: float | None

    def first_nonfinite(self) -> int | None:
        """Index of the first micro-batch whose loss was not finite on some process."""
        return next((i for i, count in enumerate(self.nonfinite) if count), None)

    def record(self, step: int, lr: float, step_seconds: float) -> dict[str, Any]:
        """The train log line of this step (the same keys, in the same order, as ever)."""
        n = max(self.tokens, 1)
        return {
            "step": step,
            "loss": self.loss_sum / n,
            "ce": self.ce_sum / n,
            "kl": self.kl_sum / self.kl_tokens if self.kl_tokens > 0 else None,
            "kl_weight": self.kl_weight_sum / n,
            "ce_weight": self.ce_weight_sum / n,
            "batch_risk": (
                self.local_risk_sum / self.local_risk_count if self.local_risk_count else None
            ),
            "ref_skipped": self.ref_skipped,
            "ref_run": self.ref_run,
            "tokens": self.tokens,
            "lr": lr,
            # None where the engine clips by itself and reports nothing (DeepSpeed)
            "grad_norm": self.grad_norm,
            "step_seconds": step_seconds,
        }


class StepMetrics:
    """Accumulators of one optimizer step; make a new one per step."""

    def __init__(self, step_tokens: Tensor) -> None:
        """`step_tokens`: the step's response-token count over all processes (a device scalar)."""
        self._step_tokens = step_tokens
        device = step_tokens.device
        self._sums = torch.zeros(_DEVICE_SUMS, dtype=torch.float64, device=device)
        self._risk_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._losses: list[Tensor] = []
        self._kl_tokens = 0
        self._ref_skipped = 0
        self._ref_run = 0
        self._risk_count = 0

    def add(
        self,
        parts: LossParts,
        *,
        ce_weights: Tensor,
        kl_weights: Tensor,
        batch_risk: Tensor | None,
        reference_skipped: bool,
        padding: bool,
    ) -> None:
        """Add one micro-batch.

        ce_weights, kl_weights: a(t), b(t) of its N response tokens (what the objective got);
        batch_risk: the weight policy's, or None; padding: an empty micro-batch topping up
        the step (its batch risk does not count).
        """
        loss = parts.numerator.detach().to(torch.float64)
        kl_sum = parts.kl_sum if parts.kl_sum is not None else torch.zeros_like(parts.ce_sum)
        self._sums += torch.stack([
            loss,
            parts.ce_sum.detach().to(torch.float64),
            kl_sum.detach().to(torch.float64),
            ce_weights.sum().to(torch.float64),  # summed in float32, like the objective's
            kl_weights.sum().to(torch.float64),
        ])
        self._losses.append(loss)
        if parts.kl_sum is not None:
            self._kl_tokens += parts.n_tokens
        self._ref_skipped += int(reference_skipped)
        self._ref_run += int(not reference_skipped)
        if batch_risk is not None and not padding:
            self._risk_sum = self._risk_sum + batch_risk.detach().to(torch.float64)
            self._risk_count += 1

    def sync(self, accelerator: Accelerator, grad_norm: Tensor | float | None) -> StepTotals:
        """All-reduce the summed metrics over processes and copy everything to the host once."""
        device = self._sums.device
        k = len(self._losses)
        losses = torch.stack(self._losses) if k else torch.zeros(0, dtype=torch.float64,
                                                                 device=device)
        host_counts = torch.tensor(
            [self._kl_tokens, self._ref_skipped, self._ref_run], dtype=torch.float64,
            device=device,
        )
        summed = torch.cat([self._sums, host_counts, (~torch.isfinite(losses)).to(torch.float64)])
        summed = accelerator.reduce(summed, reduction="sum")
        # A plain tensor rides along with the one copy; anything else (None, a float, a
        # DTensor under some FSDP set-ups) is converted as it is, at the end.
        norm_on_device = type(grad_norm) is Tensor
        local = [self._risk_sum, self._step_tokens.to(torch.float64)]
        if norm_on_device:
            local.append(grad_norm.detach().to(device=device, dtype=torch.float64))
        values = torch.cat([summed, torch.stack(local), losses]).tolist()  # the one host sync
        summed_values, local_values, local_losses = _split(values, [summed.numel(), len(local), k])
        sums, nonfinite = summed_values[:_DEVICE_SUMS + 3], summed_values[_DEVICE_SUMS + 3:]
        risk_sum, tokens, *norm = local_values
        if norm_on_device:
            grad_norm = norm[0]
        return StepTotals(
            loss_sum=sums[0],
            ce_sum=sums[1],
            kl_sum=sums[2],
            ce_weight_sum=sums[3],
            kl_weight_sum=sums[4],
            kl_tokens=int(sums[5]),
            ref_skipped=int(sums[6]),
            ref_run=int(sums[7]),
            tokens=int(tokens),
            nonfinite=[int(c) for c in nonfinite],
            local_losses=local_losses,
            local_risk_sum=risk_sum,
            local_risk_count=self._risk_count,
            grad_norm=None if grad_norm is None else float(grad_norm),
        )


def _split(values: list[float], sizes: list[int]) -> list[list[float]]:
    """Consecutive pieces of `values` with the given sizes."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(values[start:start + size])
        start += size
    return pieces
