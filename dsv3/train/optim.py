"""AdamW with weight decay on matrices only, and DeepSeek-V3's learning-rate schedule scaled to any run length.

The published schedule (DeepSeek-V3 section 4.2), over 14.8T tokens: linear warm-up to the peak, constant
until 10T tokens, cosine decay to a tenth of the peak by 14.3T, then two constant tails: a tenth of the
peak for 333B tokens and 7.3e-6 / 2.2e-4 of it for the last 167B. Here the same fractions of the run's
steps are used, with the warm-up length a separate fraction (2K steps were a sliver of DeepSeek's run).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.train.config import TrainConfig

# Where each phase ends, as a fraction of the run (DeepSeek-V3's token counts divided by 14.8T).
CONSTANT_END = 10.0 / 14.8
COSINE_END = 14.3 / 14.8
TAIL_END = (14.3 + 0.333) / 14.8
LAST_TAIL_RATIO = 7.3e-6 / 2.2e-4  # the final tail's rate relative to the peak


def lr_at(step: int, max_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of `max_steps` steps."""
    warmup = max(1, round(cfg.warmup * max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = step / max_steps
    low = cfg.lr * cfg.min_lr_ratio
    if progress < CONSTANT_END:
        return cfg.lr
    if progress < COSINE_END:
        t = (progress - CONSTANT_END) / (COSINE_END - CONSTANT_END)
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * t))
    if progress < TAIL_END:
        return low
    return cfg.lr * LAST_TAIL_RATIO


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every matrix (projections, stacked experts [E, out, in], router, embedding, head); not the
    RMSNorm weights, which set a scale rather than store features."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # the fused kernel makes one pass over each tensor instead of a dozen (CPU and CUDA); eps is torch's 1e-8
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
