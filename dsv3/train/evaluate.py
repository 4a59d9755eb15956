"""Validation: loss, perplexity, MTP loss and accuracy, and the global MaxVio of each router over the held-out
windows (the loads of the whole validation set summed before measuring, as the balancing paper's MaxVio_global)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from dsv3.data import DatasetInfo, eval_batches
from dsv3.model import DeepSeekV3
from dsv3.train.balance import max_vio, relative_loads
from dsv3.train.losses import cross_entropy


@torch.no_grad()
def evaluate(model: DeepSeekV3, info: DatasetInfo, batch_size: int, seq_len: int, windows: int,
             autocast: Callable[[], AbstractContextManager], device: torch.device, step: int) -> dict[str, Any]:
    """A validation record: token-weighted mean losses over `windows` fixed windows of the validation split."""
    was_training = model.training
    model.eval()
    main = mtp = acc = 0.0
    n = n_mtp = 0
    loads = None
    use_mtp = len(model.mtp) > 0
    for x, y in eval_batches(info, batch_size, seq_len, max_windows=windows):
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model.run(x, mtp=use_mtp)
        main += cross_entropy(out.logits, y).item() * y.numel()
        n += y.numel()
        if out.mtp_logits:
            logits, target = out.mtp_logits[0], y[:, 1:]
            mtp += cross_entropy(logits, target).item() * target.numel()
            acc += (logits.argmax(-1) == target).sum().item()
            n_mtp += target.numel()
        counts = torch.stack([r.counts for r in out.routing + out.mtp_routing]) if out.routing else None
        if counts is not None:
            loads = counts if loads is None else loads + counts
    model.train(was_training)
    record: dict[str, Any] = {"step": step, "val_loss": main / n, "val_ppl": math.exp(min(main / n, 50.0))}
    if n_mtp:
        record.update(val_mtp_loss=mtp / n_mtp, val_mtp_acc=acc / n_mtp)
    if loads is not None:
        vio = max_vio(loads)
        record.update(val_maxvio=vio.mean().item(), val_maxvio_max=vio.max().item(),
                      val_load=relative_loads(loads))
    return record
