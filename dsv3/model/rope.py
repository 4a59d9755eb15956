"""Rotary position embedding with YaRN frequency scaling, in DeepSeek's interleaved layout.

DeepSeek rotates dimensions (2j, 2j+1) together, as a complex multiplication would; the checkpoint's
projection rows are laid out for that pairing, so the half-split RoPE of Llama gives wrong results here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig, yarn_mscale


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
        attention_factor = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Turns absolute positions into the rotation e^{i theta p} every attention layer applies.

    The frequencies are a plain attribute rebuilt from the config, not a buffer: a model built on the meta
    device and materialised later needs no re-initialisation of them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] -> rotation [B, T, 1, rope/2], complex64, YaRN's attention factor folded in (the 1
        broadcasts over heads)."""
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)  # [B, T, rope/2]
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)[:, :, None]


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x [B, T, H, rope] by rotation [B, T, 1, rope/2]: one complex
    multiply (a + ib)(cos + i sin), in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, T, H, rope/2]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def apply_rope_halves(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, rope] in the half-split layout: dimension j pairs with j + rope/2 (the layout of the
    V3.2 indexer's keys and queries, unlike MLA's interleaved pairs). Same rotation [B, T, 1, rope/2], fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, T, H, rope/2] each
    rotated = torch.complex(x1, x2) * rotation
    return torch.cat([rotated.real, rotated.imag], dim=-1).type_as(x)
