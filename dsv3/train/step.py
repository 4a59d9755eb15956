"""One optimizer step of DeepSeek-V3's recipe, on whatever model and batches it is given.

    for each of grad_accum micro-batches:  forward (bf16 autocast or fp32) -> L = L_main + MTP + balance
                                           -> backward; add up every router's expert loads
    clip the gradient norm -> AdamW step at the scheduled rate
    -> each router's bias += gamma * sign(mean load - load), from the loads of the whole step

It knows nothing of run directories, schedules or time budgets: the caller passes the learning rate, the
MTP weight and the bias speed of this step. Across processes (`Dist`), each data-parallel rank runs its own
share of the batch; the expert-parallel gradients are averaged, the gradient norm is taken over every
rank's shards, the expert loads are summed over every rank (so all move their biases alike, and MaxVio is
the global one) and the logged losses averaged. In one process all of that is the identity. With pipeline
parallelism the micro-batches go through the schedule instead (`dsv3.parallel.pipeline`); a NaN loss is
then caught by the gradient norm, which every rank knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from dsv3.model import DeepSeekV3, Output
from dsv3.model.moe import Routing
from dsv3.parallel.dist import Dist
from dsv3.parallel.expert import expert_stats
from dsv3.parallel.fsdp import reduce_expert_grads
from dsv3.parallel.pipeline import Pipeline
from dsv3.train.balance import routers, update_biases
from dsv3.train.config import TrainConfig
from dsv3.train.dsa import run_options
from dsv3.train.losses import Losses, balance_loss, compute_losses


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
    ep_max_ranks: int = 0  # expert parallelism: the most ranks one token's experts were on
    ep_sent_bytes: int = 0  # and the bytes of token rows all ranks sent to other ranks (forward dispatch + combine)
    indexer_kl: float = 0.0  # sparse-attention training: the indexers' KL loss


class TrainStep:
    def __init__(self, model: DeepSeekV3, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 autocast: Callable[[], AbstractContextManager], device: torch.device, d: Dist | None = None):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.autocast, self.device = autocast, device
        self.d = d or Dist(cfg.layout)
        self.gates = routers(model)
        self.n_routers = len(model.config.router_layers())
        self.pipeline = Pipeline(model, self.d, cfg.grad_accum, self._pipeline_loss, self._balance) \
            if self.d.layout.pp > 1 else None
        self._objective = (0.0, False)  # this step's MTP weight and whether to measure the MTP accuracy
        self._pipeline_sums: list[Losses] = []

    def __call__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, lr: float, mtp_lambda: float,
                 bias_gamma: float, accuracy: bool) -> StepStats:
        """Run grad_accum micro-batches from `batches` and one optimizer step; raise NonFinite (before the
        weights change) if the loss or the gradient norm is not finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.forget_statistics()  # what evaluations between steps sent
        sums, loads = self.accumulate(batches, mtp_lambda, accuracy)
        reduce_expert_grads(self.model, self.d)
        grad_norm = self.clip()
        _check_finite(grad_norm, "the gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if loads is not None:
            loads = self.d.all_reduce(loads)  # the whole global batch's loads, every router's
            if bias_gamma:
                update_biases(self.gates, loads, bias_gamma)
        sums = self._mean_over_data_ranks(sums)
        ep_ranks, ep_bytes = self._expert_stats()
        return StepStats(**{**sums, "mtp_acc": sums["mtp_acc"] if accuracy else None}, lr=lr,
                         grad_norm=grad_norm.item(), mtp_lambda=mtp_lambda, bias_gamma=bias_gamma, loads=loads,
                         ep_max_ranks=ep_ranks, ep_sent_bytes=ep_bytes)

    def accumulate(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], mtp_lambda: float,
                   accuracy: bool) -> tuple[dict[str, float], torch.Tensor | None]:
        """Forward and backward of a step's grad_accum micro-batches: the gradients of their mean loss are left
        in the parameters. Returns this rank's mean losses and its routers' loads [routers, E] (None without
        MoE layers; rows of routers held by other pipeline ranks are zero)."""
        if self.pipeline is not None:
            return self._accumulate_pipeline(batches, mtp_lambda, accuracy)
        cfg, n = self.cfg, self.cfg.grad_accum
        sums = dict.fromkeys(("loss", "mtp_loss", "mtp_acc", "balance_loss", "indexer_kl"), 0.0)
        loads = None
        for _ in range(n):
            x, y = (t.to(self.device) for t in next(batches))
            with self.autocast():
                out = self.model.run(x, mtp=bool(self.model.mtp), **run_options(cfg.dsa_stage))
            losses = compute_losses(out, y, cfg, mtp_lambda, accuracy=accuracy)
            _check_finite(losses.total, "the loss")
            (losses.total / n).backward()
            _add(sums, losses, 1 / n)
            if out.routing:
                counts = torch.stack([r.counts for r in out.routing + out.mtp_routing])  # [routers, E]
                loads = counts if loads is None else loads + counts
        return sums, loads

    def _accumulate_pipeline(self, batches, mtp_lambda: float, accuracy: bool):
        """The same through the pipeline: the step's micro-batches go in as one batch, the schedule splits them.
        The losses are known on the last stage's rank; the other ranks report zeros (the mean over ranks is
        taken by `_mean_over_data_ranks`), the balance loss where each router runs."""
        n = self.cfg.grad_accum
        xs, ys = zip(*(next(batches) for _ in range(n)))
        self._objective, self._pipeline_sums = (mtp_lambda, accuracy), []
        with self.autocast():
            self.pipeline.step(torch.cat(xs).to(self.device), torch.cat(ys).to(self.device))
        sums = dict.fromkeys(("loss", "mtp_loss", "mtp_acc", "balance_loss"), 0.0)
        for losses in self._pipeline_sums:
            _add(sums, losses, 1 / n)
        loads, balance = self.pipeline.take_loads()
        sums["balance_loss"] = balance / n
        return sums, (loads if self.n_routers else None)

    def _pipeline_loss(self, outputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: the main and MTP losses (balance losses are added where
        their routers run)."""
        mtp_lambda, accuracy = self._objective
        out = Output(logits=outputs[0], hidden=None, mtp_logits=list(outputs[1:]))
        losses = compute_losses(out, labels, self.cfg, mtp_lambda, accuracy=accuracy)
        self._pipeline_sums.append(losses)
        return losses.total

    def _balance(self, routing: list[Routing], batch: int) -> torch.Tensor | None:
        return balance_loss(routing, batch, self.cfg)

    def clip(self) -> torch.Tensor:
        """Clip the gradient norm to cfg.grad_clip; returns the norm before clipping. Across processes the norm
        is taken over every rank's shards (each parameter element lives on one rank of its data group, and
        the pipeline stages hold different ones); copies held by several ranks are counted once."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not self.d.distributed:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            squares += _local(p.grad).double().pow(2).sum()
        if self.d.layout.ep > 1 and self.d.layout.dp_shard > 1:
            squares -= self._replicated_expert_squares()
        if self.pipeline is not None and self.pipeline.replica:  # 1F1B's second embedding, for MTP
            squares -= _local(self.model.embed.weight.grad).double().pow(2).sum()
        norm = self.d.all_reduce(squares).sqrt().float()
        coef = min(1.0, self.cfg.grad_clip / (float(norm) + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
        return norm

    def _replicated_expert_squares(self) -> torch.Tensor:
        """The dp ranks holding the same experts each count their (identical, averaged) gradients: keep one."""
        out = torch.zeros((), dtype=torch.float64, device=self.device)
        experts = [p for n, p in self.model.named_parameters() if ".ffn.experts." in n and p.grad is not None]
        for p in experts:
            out += _local(p.grad).double().pow(2).sum()
        return out * (1 - 1 / self.d.layout.dp_shard)

    def _mean_over_data_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Every rank's sums added up (pipeline ranks hold parts of them), divided by the data-parallel ranks."""
        if not self.d.distributed:
            return sums
        values = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        self.d.all_reduce(values)
        return dict(zip(sums, (values / self.d.layout.data_parallel).tolist()))

    def biases(self) -> list[list[float]] | None:
        """Every router's selection bias, [routers][E] (gathered from the pipeline ranks); None without them."""
        if not self.gates or any(g.bias is None for g in self.gates.values()):
            return None
        E = self.model.config.n_routed_experts
        full = torch.zeros(self.n_routers, E, dtype=torch.float64, device=self.device)
        for i, gate in self.gates.items():
            full[i] = gate.bias.double()
        if self.pipeline is not None:
            self.d.all_reduce(full, "pp")
        return full.tolist()

    def forget_statistics(self) -> None:
        """Drop the loads and exchange counters gathered by passes that were not a step (the time-budget probe)."""
        expert_stats(self.model)
        if self.pipeline is not None:
            self.pipeline.take_loads()

    def _expert_stats(self) -> tuple[int, int]:
        ranks, sent = expert_stats(self.model)
        if not self.d.distributed or self.d.layout.ep == 1:
            return ranks, sent
        t = torch.tensor([ranks], dtype=torch.int64, device=self.device)
        self.d.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        s = self.d.all_reduce(torch.tensor([sent], dtype=torch.int64, device=self.device))
        return int(t), int(s)


def _add(sums: dict[str, float], losses: Losses, weight: float) -> None:
    sums["loss"] += losses.main.item() * weight
    if losses.mtp:
        sums["mtp_loss"] += sum(m.item() for m in losses.mtp) / len(losses.mtp) * weight
    if losses.mtp_acc is not None:
        sums["mtp_acc"] += losses.mtp_acc.item() * weight
    if losses.balance is not None:
        sums["balance_loss"] += losses.balance.item() * weight
    if losses.indexer_kl is not None:
        sums["indexer_kl"] += losses.indexer_kl.item() * weight


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFinite(what, value.item())
