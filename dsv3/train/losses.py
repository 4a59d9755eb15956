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

# values of the logits per chunk of the fused loss: 4 MB in fp32, the fastest of the sizes tried on a CPU
CHUNK_ELEMENTS = 2**20


def mtp_lambda(progress: float, cfg: TrainConfig) -> float:
    """The MTP loss weight at `progress` (fraction of the run done): 0.3 early, 0.1 later in the paper."""
    return cfg.mtp_lambda if progress < cfg.mtp_switch else cfg.mtp_lambda_late


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Mean cross-entropy in fp32 of logits [..., V] against targets [...], over the targets that are not IGNORE
    (zero, not NaN, when there are none: a chat window of context only).

    `fused` (the default) computes it a chunk of rows at a time (`ChunkedCrossEntropy`); False is the readable
    reference, torch's cross-entropy on an fp32 copy of the logits. Both give the same loss and gradient."""
    if fused:
        return ChunkedCrossEntropy.apply(logits.flatten(0, -2), targets.flatten())
    mean = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE)  # NaN if all IGNORE
    # no host sync to test for that; the gradient stays finite (ignored rows get zero from the loss's backward)
    return torch.where((targets != IGNORE).any(), mean, mean.new_zeros(()))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy without an fp32 copy of the logits [N, V]: the forward pass keeps only each row's log-sum-exp,
    and the backward pass writes the gradient (softmax - one_hot) / n, in the logits' dtype, chunk by chunk.

    Each chunk of rows (CHUNK_ELEMENTS values) is widened to fp32 into one reused buffer and reduced in place
    while it is in cache; torch's loss instead makes whole [N, V] passes, each into freshly allocated memory (the
    cast, log-softmax, its backward, the cast of the gradient back to bf16), several times as slow on the CPU at
    the small preset's 2048 x 8192 logits. The sums are taken in fp32 as there, so the loss is the same and the
    gradient differs only in bf16 rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # [N]
        for rows, z in _widened_chunks(logits):
            top = z.amax(dim=-1, keepdim=True)  # [r, 1]
            lse[rows] = z.sub_(top).exp_().sum(dim=-1).log_().add_(top[:, 0])
        valid = targets != IGNORE  # [N]
        targets = targets.masked_fill(~valid, 0)  # ignored rows pick any class: their loss and gradient are masked
        n = valid.sum().clamp(min=1)
        picked = logits.gather(1, targets[:, None])[:, 0].float()  # [N], the target's logit
        ctx.save_for_backward(logits, targets, valid, lse, n)
        return ((lse - picked) * valid).sum() / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, valid, lse, n = ctx.saved_tensors
        scale = ((grad / n) * valid)[:, None]  # [N, 1]: d loss / d (each row's loss)
        out = torch.empty_like(logits)
        for rows, z in _widened_chunks(logits):
            z.sub_(lse[rows, None]).exp_().mul_(scale[rows])  # softmax * scale
            out[rows] = z.scatter_add_(1, targets[rows, None], -scale[rows])  # minus scale at the target
        return out, None


def _widened_chunks(logits: torch.Tensor):
    """(rows, that chunk of logits [N, V] copied into an fp32 buffer [r, V]), chunk by chunk; the buffer is reused,
    so no chunk allocates (fresh memory costs a page fault per 4 KB on the CPU)."""
    step = max(1, CHUNK_ELEMENTS // logits.shape[1])
    buf = torch.empty(min(step, logits.shape[0]), logits.shape[1], dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], step):
        rows = slice(i, min(i + step, logits.shape[0]))
        z = buf[: rows.stop - i]
        yield rows, z.copy_(logits[rows])


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
