"""Rotary position embedding with YaRN frequency scaling, in DeepSeek's interleaved layout.

DeepSeek rotates dimensions (2j, 2j+1) together, as a complex multiplication would; the checkpoint's
projection rows are laid out for that pairing, so the half-split RoPE of Llama gives wrong results here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    # YaRN's attention temperature: 0.1 * m * ln(s) + 1
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [rope/2] (fp32) and the factor that scales cos and sin."""
    r, theta = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    inv_freq = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float32, device="cpu") / r)  # f_i = theta^(-2i/r)
    if cfg.rope_type != "yarn":
        return inv_freq, 1.0
    y = cfg.yarn()
    factor = y["factor"]

    def corr(n_rotations: float) -> float:
        # the pair index whose wavelength fits n_rotations times into the original context
        return r * math.log(y["original_max_position_embeddings"] / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(y["beta_fast"]), corr(y["beta_slow"])
    if y["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # YaRN: blend frequencies between pair indices low..high, from original (fast) to interpolated (slow)
    ramp = ((torch.arange(r // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # g_i
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if y["attention_factor"] is not None:
        attention_factor = float(y["attention_factor"])
    elif y["mscale"] and y["mscale_all_dim"]:
        attention_factor = _yarn_mscale(factor, y["mscale"]) / _yarn_mscale(factor, y["mscale_all_dim"])
    else:
        attention_factor = _yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Turns absolute positions into the (cos, sin) pair every attention layer rotates by.

    The frequencies are a plain attribute rebuilt from the config, not a buffer: a model built on the meta
    device and materialised later needs no re-initialisation of them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, rope/2] (fp32; the 1 broadcasts over heads)."""
        inv_freq = self.inv_freq.to(positions.device)
        angles = positions[..., None].float() * inv_freq  # [B, T, rope/2]
        return (angles.cos() * self.attention_factor)[:, :, None], (angles.sin() * self.attention_factor)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, rope] by cos, sin [B, T, 1, rope/2]; computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, rope/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)  # (a+ib)(cos+isin)
    return out.flatten(-2).type_as(x)
