"""One optimizer step of DeepSeek-V3's recipe, on whatever model and batches it is given.

    for each of grad_accum micro-batches:  forward (bf16 autocast or fp32) -> L = L_main + MTP + balance
                                           -> backward; add up every router's expert loads
    clip the gradient norm -> AdamW step at the scheduled rate
    -> each router's bias += gamma * sign(mean load - load), from the loads of the whole step

It knows nothing of run directories, schedules or time budgets: the caller passes the learning rate, the
MTP weight and the bias speed of this step. A distributed trainer reuses it by overriding `global_loads`
(sum the loads over ranks, so every rank moves its biases alike) and `clip` (a norm over every shard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from dsv3.model import DeepSeekV3
from dsv3.train.balance import routers, update_biases
from dsv3.train.config import TrainConfig
from dsv3.train.losses import compute_losses


class NonFinite(ArithmeticError):
    """The loss or the gradient norm became NaN or infinite."""

    def __init__(self, what: str, value: float):
        super().__init__(f"{what} became {value}")
        self.what, self.value = what, value


@dataclass
class StepStats:
    loss: float  # main next-token loss, averaged over the micro-batches
    mtp_loss: float
    mtp_acc: float | None  # None when not computed (steps that are not logged)
    balance_loss: float
    lr: float
    grad_norm: float
    mtp_lambda: float
    bias_gamma: float
    loads: torch.Tensor | None  # [routers, E] tokens per expert over the whole step; None without MoE layers


class TrainStep:
    def __init__(self, model: DeepSeekV3, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 autocast: Callable[[], AbstractContextManager], device: torch.device):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.autocast, self.device = autocast, device
        self.gates = routers(model)

    def __call__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, lr: float, mtp_lambda: float,
                 bias_gamma: float, accuracy: bool) -> StepStats:
        """Run grad_accum micro-batches from `batches` and one optimizer step; raise NonFinite (before the
        weights change) if the loss or the gradient norm is not finite."""
        cfg, n = self.cfg, self.cfg.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = {"loss": 0.0, "mtp_loss": 0.0, "mtp_acc": 0.0, "balance_loss": 0.0}
        loads = None
        for _ in range(n):
            x, y = (t.to(self.device) for t in next(batches))
            with self.autocast():
                out = self.model.run(x, mtp=bool(self.model.mtp))
            losses = compute_losses(out, y, cfg, mtp_lambda, accuracy=accuracy)
            _check_finite(losses.total, "the loss")
            (losses.total / n).backward()
            sums["loss"] += losses.main.item() / n
            if losses.mtp:
                sums["mtp_loss"] += sum(m.item() for m in losses.mtp) / len(losses.mtp) / n
            if losses.mtp_acc is not None:
                sums["mtp_acc"] += losses.mtp_acc.item() / n
            if losses.balance is not None:
                sums["balance_loss"] += losses.balance.item() / n
            if out.routing:
                counts = torch.stack([r.counts for r in out.routing + out.mtp_routing])  # [routers, E]
                loads = counts if loads is None else loads + counts
        grad_norm = self.clip()
        _check_finite(grad_norm, "the gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if loads is not None:
            loads = self.global_loads(loads)
            if bias_gamma:
                update_biases(self.gates, loads, bias_gamma)
        return StepStats(**{**sums, "mtp_acc": sums["mtp_acc"] if accuracy else None}, lr=lr,
                         grad_norm=grad_norm.item(), mtp_lambda=mtp_lambda, bias_gamma=bias_gamma, loads=loads)

    def clip(self) -> torch.Tensor:
        """Clip the gradient norm to cfg.grad_clip; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def global_loads(self, loads: torch.Tensor) -> torch.Tensor:
        """The expert loads of the whole global batch (one process: its own)."""
        return loads


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFinite(what, value.item())
