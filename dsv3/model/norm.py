"""RMSNorm, computed in fp32 whatever the activation dtype."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight`; the statistic is taken in fp32 so bf16 activations keep precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)  # x * rsqrt(mean(x^2) + eps), fused
        return self.weight * normed.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
