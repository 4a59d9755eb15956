"""AdamW with weight decay on matrices only, and DeepSeek-V3's learning-rate schedule scaled to any run length
(or, for fine-tuning, warm-up then one cosine decay to the floor: `schedule="cosine"`).

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
    if cfg.schedule == "cosine":  # fine-tuning: from the peak straight down to the floor over the rest
        t = (step - warmup) / max(1, max_steps - warmup)
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * t))
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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as the config says: torch's fused kernel with fp32 moments, or `LowPrecisionAdamW` with the moments
    in bf16 (DeepSeek-V3's choice; the default under --dtype fp8)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.moments_dtype == "bf16":
        return LowPrecisionAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), state_dtype=torch.bfloat16)
    # the fused kernel makes one pass over each tensor instead of a dozen (CPU and CUDA); eps is torch's 1e-8
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class LowPrecisionAdamW(torch.optim.Optimizer):
    """torch's AdamW update (decoupled weight decay, bias correction, eps outside the square root) with its two
    moments stored in `state_dtype`: each step reads them into fp32, updates and stores them back, so only the
    storage is narrow. The master weights are whatever the parameters are (fp32 in training)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype
        self.register_load_state_dict_post_hook(LowPrecisionAdamW._narrow_loaded_moments)

    @staticmethod
    def _narrow_loaded_moments(optimizer: LowPrecisionAdamW) -> None:
        """torch's load_state_dict casts every state tensor to its parameter's dtype; store the moments narrow
        again (exactly: they were saved narrow), so a resumed run continues as the uninterrupted one."""
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(optimizer.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        return loss
