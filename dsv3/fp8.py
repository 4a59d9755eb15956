"""FP8 (float8_e4m3fn) with fine-grained scales: the one quantiser behind FP8 checkpoints and the FP8 cache.

DeepSeek-V3 (section 3.3) scales FP8 values per small group instead of per tensor, so one outlier costs
the precision of its own group only:
- tiles: 1 x 128 values along the last dimension (activations, the latent cache), one scale per tile;
- blocks: 128 x 128 values of a weight matrix, one scale per block (the released checkpoint's format).
Each scale is amax / 448, so the group's largest value lands on e4m3's largest finite number; with the
"ue8m0" format (DeepSeek-V3.1's) it is that rounded up to a power of two, which a GEMM applies exactly
and which never overflows (DeepSeek's kernel.py: `s = 2^ceil(log2(amax / 448))`). A last tile or block
narrower than 128 (a dimension that is not a multiple of 128) gets a scale of its own. Values are recovered
by multiplying by the scale; DeepSeek stores that factor as `weight_scale_inv`. Training quantises and
dequantises at once (`fake_quant_*`): the values an FP8 GEMM multiplies, in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 128  # values that share one scale along each quantised dimension
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FORMATS = ("fp32", "ue8m0")  # any fp32 scale, or a power of two (an 8-bit exponent)
_TINY = torch.finfo(torch.float32).tiny  # the scale of an all-zero group: anything positive works


def _scale(amax: torch.Tensor, scale_format: str = "fp32") -> torch.Tensor:
    scale = (amax.float() / E4M3_MAX).clamp(min=_TINY)
    if scale_format == "ue8m0":
        return torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


Quantized = tuple[torch.Tensor, torch.Tensor]  # e4m3 values and their fp32 scales


def quantize_tiles(x: torch.Tensor, block: int = BLOCK, scale_format: str = "fp32") -> Quantized:
    """x [..., c] -> (e4m3 [..., c], fp32 scales [..., ceil(c / block)]): one scale per 1 x block tile."""
    c = x.shape[-1]
    tiles = F.pad(x.float(), (0, -c % block)).unflatten(-1, (-1, block))  # [..., nb, block]
    scale = _scale(tiles.abs().amax(dim=-1), scale_format)  # [..., nb]
    q = (tiles / scale[..., None]).flatten(-2)[..., :c].to(torch.float8_e4m3fn)  # the cast saturates at +-448
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """Inverse of quantize_tiles: e4m3 [..., c] and scales [..., nb] -> [..., c] in `dtype`."""
    c = q.shape[-1]
    tiles = F.pad(q.float(), (0, -c % block)).unflatten(-1, (-1, block))  # [..., nb, block]
    return (tiles * scale[..., None]).flatten(-2)[..., :c].to(dtype)


def block_scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    """The scales of an [out, in] weight: [ceil(out / block), ceil(in / block)]."""
    out_dim, in_dim = shape
    return math.ceil(out_dim / block), math.ceil(in_dim / block)


def fp8_nbytes(shape: tuple[int, ...], block: int = BLOCK) -> int:
    """Bytes an [out, in] weight takes in the block format: one byte a value plus an fp32 scale a block."""
    rb, cb = block_scale_shape(shape, block)
    return shape[0] * shape[1] + 4 * rb * cb


def quantize_blocks(w: torch.Tensor, block: int = BLOCK, scale_format: str = "fp32") -> Quantized:
    """w [..., out, in] -> (e4m3 [..., out, in], fp32 scales [..., ceil(out/block), ceil(in/block)]): one per
    block (leading dimensions, such as stacked experts, are quantised matrix by matrix)."""
    *lead, out_dim, in_dim = w.shape
    rb, cb = block_scale_shape((out_dim, in_dim), block)
    padded = F.pad(w.float(), (0, cb * block - in_dim, 0, rb * block - out_dim))
    tiles = padded.view(*lead, rb, block, cb, block)  # [..., rb, b, cb, b]
    scale = _scale(tiles.abs().amax(dim=(-3, -1)), scale_format)  # [..., rb, cb]
    q = (tiles / scale[..., :, None, :, None]).to(torch.float8_e4m3fn)  # the cast saturates at +-448
    if scale_format == "ue8m0":
        q, scale = _smallest_power_of_two(q, scale)
    return q.view(*lead, rb * block, cb * block)[..., :out_dim, :in_dim].contiguous(), scale


def _smallest_power_of_two(q: torch.Tensor, scale: torch.Tensor) -> Quantized:
    """Blocks q [..., rb, b, cb, b] with power-of-two scales [..., rb, cb], rewritten at the smallest power of two
    that still holds their values (the same values, other bytes).

    Rounding to e4m3 can leave a block's largest code at 224 (amax / scale in (224, 232) rounds down), and its
    values then also fit half the scale with every code doubled, exactly. Quantising those values again, as a
    load and an FP8 save do, picks the half scale, so without this step 1 block in ~20 would come back with
    other bytes; with it, quantising what a ue8m0 checkpoint holds gives its bytes back."""
    top = q.float().abs().amax(dim=(-3, -1))  # [..., rb, cb], largest code: 0 or in [2^-9, 448]
    fitted = (scale * torch.exp2(torch.ceil(torch.log2(top / E4M3_MAX)))).clamp(min=_TINY)  # <= scale
    fitted = torch.where(top > 0, fitted, scale)  # an all-zero block keeps its scale
    factor = (scale / fitted)[..., :, None, :, None]  # a power of two >= 1: codes scale up exactly
    return (q.float() * factor).to(torch.float8_e4m3fn), fitted


def quantize_tensor(x: torch.Tensor, scale_format: str = "fp32") -> Quantized:
    """One scale for the whole tensor (the common FP8 recipe DeepSeek-V3's fine-grained one improves on)."""
    scale = _scale(x.abs().amax(), scale_format)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


# ----- quantise and dequantise at once: what an FP8 GEMM multiplies ----------------------------------------


def fake_quant_tiles(x: torch.Tensor, scale_format: str = "fp32") -> torch.Tensor:
    """x [..., c] as 1 x 128 tiles of e4m3 would hold it, back in fp32."""
    q, scale = quantize_tiles(x, scale_format=scale_format)
    return dequantize_tiles(q, scale, torch.float32)


def fake_quant_blocks(w: torch.Tensor, scale_format: str = "fp32") -> torch.Tensor:
    """w [..., out, in] as 128 x 128 blocks of e4m3 would hold it, back in fp32."""
    *lead, out_dim, in_dim = w.shape
    q, scale = quantize_blocks(w, scale_format=scale_format)
    full = scale.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :out_dim, :in_dim]
    return q.float() * full


def fake_quant_tensor(x: torch.Tensor, scale_format: str = "fp32") -> torch.Tensor:
    q, scale = quantize_tensor(x, scale_format)
    return q.float() * scale


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK
) -> torch.Tensor:
    """Inverse of quantize_blocks, one row of blocks at a time so the fp32 intermediate stays small.
    Raises ValueError when the scales do not fit the weight's shape."""
    expected = block_scale_shape(q.shape, block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
                         f"(expected {expected})")
    out_dim, in_dim = q.shape
    out = torch.empty(out_dim, in_dim, dtype=dtype)
    for rb in range(expected[0]):
        rows = slice(rb * block, min((rb + 1) * block, out_dim))
        col_scale = scale[rb].float().repeat_interleave(block)[:in_dim]  # [in]
        out[rows] = (q[rows].float() * col_scale).to(dtype)
    return out
