"""Validation: loss, perplexity, MTP loss and accuracy, and the global MaxVio of each router over the held-out
windows (the loads of the whole validation set summed before measuring, as the balancing paper's MaxVio_global)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from dsv3.data import DatasetInfo, eval_batches
from dsv3.data.loader import IGNORE
from dsv3.model import DeepSeekV3
from dsv3.train.balance import max_vio, relative_loads
from dsv3.train.losses import cross_entropy

Forward = Callable[[torch.Tensor], tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]]


@torch.no_grad()
def evaluate(model: DeepSeekV3, info: DatasetInfo, batch_size: int, seq_len: int, windows: int,
             autocast: Callable[[], AbstractContextManager], device: torch.device, step: int, *,
             forward: Forward | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> dict[str, Any]:
    """A validation record: token-weighted mean losses over `windows` fixed windows of the validation split.

    `forward(ids)` gives the logits of the main head and of each MTP depth (None on a process that does not
    compute them) and the routers' loads [routers, E]; by default the whole model's. `reduce` adds up a tensor
    over the processes that each hold part of the answer (pipeline stages); by default nothing to add."""
    was_training = model.training
    model.eval()
    forward = forward or (lambda ids: _whole_model(model, ids))
    sums = torch.zeros(5, dtype=torch.float64)  # main loss, tokens, MTP loss, MTP hits, MTP tokens
    loads = None
    for x, y in eval_batches(info, batch_size, seq_len, max_windows=windows):
        x, y = x.to(device), y.to(device)
        with autocast():
            logits, counts = forward(x)
        if logits is not None:
            sums += _batch_sums(logits, y)
        if counts is not None:
            loads = counts if loads is None else loads + counts
    model.train(was_training)
    if reduce is not None:
        sums = reduce(sums.to(device)).cpu()
        loads = reduce(loads) if loads is not None else None
    main, n, mtp, acc, n_mtp = sums.tolist()
    n = max(n, 1)
    record: dict[str, Any] = {"step": step, "val_loss": main / n, "val_ppl": math.exp(min(main / n, 50.0))}
    if n_mtp:
        record.update(val_mtp_loss=mtp / n_mtp, val_mtp_acc=acc / n_mtp)
    if loads is not None:
        vio = max_vio(loads)
        record.update(val_maxvio=vio.mean().item(), val_maxvio_max=vio.max().item(),
                      val_load=relative_loads(loads))
    return record


def _whole_model(model: DeepSeekV3, ids: torch.Tensor):
    out = model.run(ids, mtp=len(model.mtp) > 0)
    counts = torch.stack([r.counts for r in out.routing + out.mtp_routing]) if out.routing else None
    return (out.logits, *out.mtp_logits), counts


def _batch_sums(logits: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
    """[main loss sum, targets, depth-1 MTP loss sum, its top-1 hits, its targets] of one batch (labels that are
    IGNORE, chat context, count nowhere)."""
    n = (y != IGNORE).sum().item()
    out = [cross_entropy(logits[0], y).item() * n, n, 0.0, 0.0, 0.0]
    if len(logits) > 1:
        target = y[:, 1:]
        m = (target != IGNORE).sum().item()
        out[2:] = [cross_entropy(logits[1], target).item() * m,
                   ((logits[1].argmax(-1) == target) & (target != IGNORE)).sum().item(), m]
    return torch.tensor(out, dtype=torch.float64)
