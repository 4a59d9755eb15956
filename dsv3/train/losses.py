"""The training objective: next-token cross-entropy, the MTP losses (DeepSeek-V3 section 2.2), the
balance losses and, when training sparse attention, the indexers' KL loss (`dsv3.train.dsa`), combined
into one scalar; plus the statistics logged beside it.

With labels = inputs shifted by one ([B, T], labels[:, i] = t_{i+1}), MTP depth k's logits [B, T-k, V]
at position i predict t_{i+k+1}, so their targets are labels[:, k:].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsv3.data.loader import IGNORE
from dsv3.model import Output
from dsv3.model.moe import Routing
from dsv3.train.balance import aux_balance_loss, sequence_balance_loss
from dsv3.train.config import TrainConfig
from dsv3.train.dsa import indexer_kl


def mtp_lambda(progress: float, cfg: TrainConfig) -> float:
    """The MTP loss weight at `progress` (fraction of the run done): 0.3 early, 0.1 later in the paper."""
    return cfg.mtp_lambda if progress < cfg.mtp_switch else cfg.mtp_lambda_late


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 of logits [..., V] against targets [...], over the targets that are not IGNORE
    (zero, not NaN, when there are none: a chat window of context only)."""
    logits = logits.flatten(0, -2).float()
    mean = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE)  # NaN when every target is IGNORE
    # no host sync to test for that; the gradient stays finite (ignored rows get zero from the loss's backward)
    return torch.where((targets != IGNORE).any(), mean, mean.new_zeros(()))


def balance_loss(routing: list[Routing], batch: int, cfg: TrainConfig) -> torch.Tensor | None:
    """alpha * the balance loss of `cfg.balance` over the routers in `routing` (None when off or no router)."""
    if cfg.balance == "aux-free" and cfg.seq_alpha > 0 and routing:
        return cfg.seq_alpha * sum(sequence_balance_loss(r, batch) for r in routing)
    if cfg.balance == "aux-loss" and cfg.aux_alpha > 0 and routing:
        return cfg.aux_alpha * sum(aux_balance_loss(r) for r in routing)
    return None


@dataclass
class Losses:
    total: torch.Tensor  # what backward() runs on
    main: torch.Tensor  # next-token cross-entropy of the main head
    mtp: list[torch.Tensor] = field(default_factory=list)  # per MTP depth k
    balance: torch.Tensor | None = None  # alpha * balance loss, summed over routers (None when off)
    mtp_acc: torch.Tensor | None = None  # depth 1: share of positions whose argmax is the next-next token
    indexer_kl: torch.Tensor | None = None  # sparse-attention training: the indexers' KL to main attention


def compute_losses(out: Output, labels: torch.Tensor, cfg: TrainConfig, lam: float, accuracy: bool = True) -> Losses:
    """L = L_main + lam / D * sum_k L_k (+ the balance loss of `cfg.balance`). `accuracy` adds the MTP top-1
    accuracy (an argmax over the vocabulary: worth skipping on steps that are not logged)."""
    main = cross_entropy(out.logits, labels)
    total = main
    mtp = [cross_entropy(logits, labels[:, k:]) for k, logits in enumerate(out.mtp_logits, start=1)]
    if mtp:
        total = total + lam / len(mtp) * sum(mtp)
    balance = balance_loss(out.routing + out.mtp_routing, labels.shape[0], cfg)
    if balance is not None:
        total = total + balance
    kl = indexer_kl(out.indexer) if out.indexer else None
    if kl is not None:  # the warm-up trains the indexers alone (the rest is frozen): their loss is the objective
        total = kl if cfg.dsa_stage == "warmup" else total + kl
    acc = None
    if out.mtp_logits and accuracy:
        with torch.no_grad():
            target = labels[:, 1:]
            hits = (out.mtp_logits[0].argmax(-1) == target) & (target != IGNORE)
            acc = hits.sum() / (target != IGNORE).sum().clamp(min=1)
    return Losses(total=total, main=main, mtp=mtp, balance=balance, mtp_acc=acc, indexer_kl=kl)
