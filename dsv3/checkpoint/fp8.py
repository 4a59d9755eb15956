"""DeepSeek's released FP8 weight format: float8_e4m3fn tensors with one fp32 scale per 128x128 block.

`X.weight_scale_inv` [ceil(out/128), ceil(in/128)] multiplies each block back to full precision (the name
is DeepSeek's; the stored value is the dequantisation factor). Edge blocks may be partial.
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_nbytes(shape: tuple[int, ...], block: int = BLOCK) -> int:
    """Bytes a [out, in] weight takes in the FP8 format: one byte per value plus an fp32 scale per block."""
    out_dim, in_dim = shape
    return out_dim * in_dim + 4 * -(-out_dim // block) * -(-in_dim // block)


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 weight [out, in], fp32 scale [ceil(out/b), ceil(in/b)]) with per block
    scale = amax / 448, so each block uses the whole e4m3 range."""
    out_dim, in_dim = w.shape
    rb, cb = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rb * block, cb * block, dtype=torch.float32)
    padded[:out_dim, :in_dim] = w.float()
    tiles = padded.view(rb, block, cb, block)  # [rb, b, cb, b]
    amax = tiles.abs().amax(dim=(1, 3))  # [rb, cb]
    scale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero block keeps scale > 0
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)  # the cast saturates at +-448
    return q.view(rb * block, cb * block)[:out_dim, :in_dim].contiguous(), scale


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK
) -> torch.Tensor:
    """Inverse of quantize_blockwise, one row of blocks at a time so the fp32 intermediate stays small."""
    out_dim, in_dim = q.shape
    expected = (-(-out_dim // block), -(-in_dim // block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} (expected {expected})"
        )
    out = torch.empty(out_dim, in_dim, dtype=dtype)
    for rb in range(expected[0]):
        rows = slice(rb * block, min((rb + 1) * block, out_dim))
        col_scale = scale[rb].float().repeat_interleave(block)[:in_dim]  # [in]
        out[rows] = (q[rows].float() * col_scale).to(dtype)
    return out
