"""bf16 weights reordered once into oneDNN's blocked layout, for inference on the CPU.

`F.linear` on bf16 CPU tensors hands oneDNN a plain row-major weight on every call, and at decoding's sizes
(one row of activations against a matrix of a few hundred KB) that per-call cost is larger than the time the
halved bytes save: plain bf16 decodes slower than fp32 on a CPU without AMX. A weight reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing does) and multiplied by
`torch.ops.mkldnn._linear_pointwise` gives the same numbers, bit for bit, in 0.45-0.76x the time (1 row,
256 to 8192 outputs, measured on the 2-core EPYC of BENCHMARKS.md). The reordered tensors replace the plain
ones, so a packed model holds no second copy of its weights; it runs forwards only (no gradients), on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.model.attention import MLA
from dsv3.model.moe import GroupedExperts, MoE, _expert_loop


def packable(model: nn.Module) -> bool:
    """Whether `pack` applies: bf16 weights on the CPU, and a oneDNN that multiplies bf16."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(model: nn.Module) -> int:
    """Reorder, in place, every bf16 projection of `model` whose weight is only ever multiplied (all nn.Linear
    but MLA's wkv_b, which the absorbed attention reads as a tensor) and the routed experts' weights; return
    how many matrices were reordered. A model that is not `packable` is left as it is (0)."""
    if not packable(model):
        return 0
    kept = {id(m.wkv_b) for m in model.modules() if isinstance(m, MLA)}
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in kept and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child))
                n += 1
            elif isinstance(parent, MoE) and isinstance(child, GroupedExperts):
                setattr(parent, name, PackedExperts(child))
                n += 3 * child.w1.shape[0]
    return n


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # laid out for one-row inputs


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] times a reordered weight [out, in] (plus bias) -> [..., out], as F.linear."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight is reordered for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", _reorder(linear.weight), persistent=False)  # [out, in], blocked
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedExperts(nn.Module):
    """GroupedExperts with each expert's three matrices reordered for oneDNN; its experts run one after another
    (on the CPU the grouped kernel is such a loop too), the idle ones skipped."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        # one reordered [out, in] matrix per expert (plain lists: the module only ever runs on the CPU)
        self.w1, self.w2, self.w3 = ([_reorder(w) for w in ws] for ws in (experts.w1, experts.w2, experts.w3))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d], rows sorted by expert with counts[e] rows for expert e -> [M, d]."""
        return _expert_loop(x, counts, self.w1, self.w2, self.w3, _linear)

    def extra_repr(self) -> str:
        return f"{len(self.w1)} experts"

