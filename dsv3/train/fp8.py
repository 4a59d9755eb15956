"""FP8 training as DeepSeek-V3 did it (section 3.3): every linear layer's three GEMMs in E4M3.

    forward   y  = x  @ W^T    x: 1 x 128 tiles along `in`,      W: 128 x 128 blocks
    dgrad     dx = dy @ W      dy: 1 x 128 tiles along `out`,    W: the same blocks
    wgrad     dW = dy^T @ x    dy and x: 128 x 1 tiles along the tokens (the inner dimension of this GEMM)

Each scale comes online from its tile's or block's absolute maximum; the products accumulate in fp32. What
stays in higher precision, as in the paper: the embedding, the output head, the routers, the norms and the
attention core (they run under bf16 autocast). Master weights and gradients stay fp32.

This module computes the FP8 GEMM by its definition: quantise, dequantise, multiply in fp32, which is what
an FP8 GEMM with fp32 accumulation returns (tests/test_fp8_training.py checks it against torch._scaled_mm
chunk by chunk). It is the path everywhere: on the CPU there is no other, and on GPUs torch has no
block-scaled FP8 GEMM for training yet, so a GPU runs the same emulation (the cost is in BENCHMARKS.md).
`Fp8Recipe.scaling = "tensorwise"` uses one scale per tensor instead, the baseline the paper improves on.

Applied from outside the model, by switching the class of its modules (`apply_fp8`): `nn.Linear` in the
attention projections, the dense and shared-expert MLPs and the MTP projection; the routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.errors import InvalidValue
from dsv3.fp8 import SCALE_FORMATS, fake_quant_blocks, fake_quant_tensor, fake_quant_tiles
from dsv3.model.moe import GroupedExperts, swiglu_experts

SCALINGS = ("blockwise", "tensorwise")


@dataclass(frozen=True)
class Fp8Recipe:
    scaling: str = "blockwise"  # 1x128 tiles and 128x128 blocks, or one scale per tensor
    scale_format: str = "fp32"  # or "ue8m0": power-of-two scales

    def check(self) -> None:
        if self.scaling not in SCALINGS:
            raise InvalidValue("fp8_scaling", self.scaling, f"is not one of {', '.join(SCALINGS)}")
        if self.scale_format not in SCALE_FORMATS:
            raise InvalidValue("fp8_scale_format", self.scale_format, f"is not one of {', '.join(SCALE_FORMATS)}")

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] quantised along its last (the GEMM's inner) dimension, in fp32."""
        if self.scaling == "tensorwise":
            return fake_quant_tensor(x, self.scale_format)
        return fake_quant_tiles(x, self.scale_format)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.scaling == "tensorwise":
            return fake_quant_tensor(w, self.scale_format)
        return fake_quant_blocks(w, self.scale_format)


class Fp8Matmul(torch.autograd.Function):
    """y [N, out] = x [N, in] @ w [out, in]^T with all three GEMMs in FP8 (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.recipe = recipe
        return recipe.activation(x) @ recipe.weight(w).T  # fp32 products, fp32 sums

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        r = ctx.recipe
        dx = r.activation(dy) @ r.weight(w)  # [N, out] @ [out, in]: inner dimension `out`
        dw = r.activation(dy.T) @ r.activation(x.T).T  # [out, N] @ [N, in]: tiles along the tokens
        return dx.to(x.dtype), dw.to(w.dtype), None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """x [..., in] -> [..., out] through `Fp8Matmul`, in the dtype the surrounding autocast would give."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), w, recipe)
    return y.to(dtype).view(*x.shape[:-1], w.shape[0])


class Fp8Linear(nn.Linear):
    """An nn.Linear (no bias) whose GEMMs run in FP8; made in place by `apply_fp8`."""

    recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.recipe)


class Fp8Experts(GroupedExperts):
    """The routed experts with FP8 GEMMs: each expert's rows (sorted by expert) through `fp8_linear`, so the
    wgrad tiles run along that expert's own tokens. Under expert parallelism it reads its local shards."""

    recipe: Fp8Recipe

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        return swiglu_experts(x, counts, w1, w2, w3, linear=lambda a, w: fp8_linear(a, w, self.recipe))


def apply_fp8(model: nn.Module, recipe: Fp8Recipe) -> int:
    """Switch every linear layer the paper runs in FP8 to it, in place; returns how many modules changed. The
    embedding (nn.Embedding), the head (left out by name) and the routers (a class of their own, not
    nn.Linear) stay as they are."""
    recipe.check()
    head = getattr(model, "head", None)
    changed = 0
    for m in model.modules():
        if type(m) is nn.Linear and m is not head and m.bias is None:
            m.__class__, m.recipe = Fp8Linear, recipe
            changed += 1
        elif type(m) is GroupedExperts:
            m.__class__, m.recipe = Fp8Experts, recipe
            changed += 1
    return changed
