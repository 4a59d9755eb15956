"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, section 2.1).

For query token t and an earlier token s, the index score is

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] / sqrt(D))

with index_n_heads heads j of width D = index_head_dim: q[t, j] = W_q^I c_q[t] (from the same compressed query
c_q as MLA), one key k[s] = LayerNorm(W_k^I h[s]) shared by all heads, and per-head weights
w[t, j] = W_w^I h[t] / sqrt(n_heads). The first qk_rope_head_dim dimensions of q and k are rotated by RoPE
in the half-split layout (dimension i pairs with i + r/2). Attention then keeps, per query, the index_topk
tokens with the highest scores.

DeepSeek's kernels rotate q and k by a Hadamard matrix and score in FP8; the rotation is orthogonal (it
leaves every q . k unchanged) and FP8 is a precision choice, so this is the function itself, in fp32.

Suffixes: B batch, T query tokens, S key tokens, J index heads, D index_head_dim, d hidden, q c_q width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.rope import apply_rope_halves


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def key(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """The index key of every token: x [B, T, d] -> k [B, T, D] (normalised, its rope part rotated)."""
        k = self.k_norm(self.wk(x))[:, :, None]  # [B, T, 1, D]
        k = torch.cat([apply_rope_halves(k[..., : self.rope], rotation), k[..., self.rope :]], dim=-1)
        return k[:, :, 0]

    def scores(self, x: torch.Tensor, q_c: torch.Tensor, rotation: torch.Tensor, k: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, T, S] (fp32) of queries x [B, T, d], c_q [B, T, q] against keys k [B, S, D]; mask
        [B or 1, T, S] is added (-inf where a query may not look)."""
        B, T, _ = x.shape
        q = self.wq_b(q_c).view(B, T, self.n_heads, self.head_dim)  # [B, T, J, D]
        q = torch.cat([apply_rope_halves(q[..., : self.rope], rotation), q[..., self.rope :]], dim=-1)
        # ReLU(q . k) per head: [B, T*J, D] x [B, D, S] -> [B, T, J, S]
        qk = torch.bmm(q.float().reshape(B, T * self.n_heads, self.head_dim), k.float().transpose(1, 2))
        qk = F.relu(qk.view(B, T, self.n_heads, -1) * self.head_dim**-0.5)
        w = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, T, J]
        return torch.matmul(w[:, :, None], qk)[:, :, 0] + mask  # [B, T, 1, J] x [B, T, J, S] -> [B, T, S]

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top index_topk keys of each query: indices [B, T, K] and whether each is a key the query may see
        (a query with fewer than K visible keys fills its list with masked ones), K = min(index_topk, S)."""
        top, idx = scores.topk(min(self.topk, scores.shape[-1]), dim=-1)
        return idx, top > float("-inf")
