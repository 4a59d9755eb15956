"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Suffixes in shape comments: B batch, T query tokens, S key tokens, H heads, c = kv_lora_rank,
n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim, d = hidden_size.

Two computations give the same result:
- "naive" expands the latent to per-head keys and values (what training and prefill want);
- "absorb" folds W_uk into the query and W_uv into the output and attends over the cached latent
  directly, so decoding never re-expands the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.cache import LatentCache
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope

ATTN_IMPLS = ("naive", "absorb")


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, impl: str = "naive"):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {ATTN_IMPLS}")
        self.impl = impl
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        d, H, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(d, H * qk, bias=False)
        else:  # c_q = norm_q(W_dq h), q = W_uq c_q
            self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        # [c_kv ; k_pe] = W_dkv h; only c_kv is normalised
        self.wkv_a = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        # [k_nope ; v] = W_ukv c_kv, head-major: each head's nope rows, then its v rows
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(H * cfg.v_head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]. Without a cache the T tokens attend causally among themselves
        (positions must then be 0..T-1 in order); with one, each query at position p sees cached slots 0..p."""
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)  # [B, T, H, n+r]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, *rope)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)  # [B, T, c], [B, T, r]
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe[:, :, None], *rope)[:, :, 0]  # one rotated key shared by all heads

        mask = None  # None: causal over the T tokens themselves
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer_idx, positions, c_kv, k_pe)  # [B, S, c], [B, S, r]
            slots = torch.arange(c_kv.shape[1], device=x.device)
            mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
        if self.impl == "absorb":
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, mask)
        return self.wo(out.flatten(2))  # [B, T, H*v] -> [B, T, d]

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        B, S, H = c_kv.shape[0], c_kv.shape[1], self.n_heads
        kv = self.wkv_b(c_kv).view(B, S, H, self.nope + self.v_dim)  # [B, S, H, n+v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, n+r]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, H, -1)], dim=-1).transpose(1, 2)  # [B, H, S, n+r]
        v = v.transpose(1, 2)  # [B, H, S, v]
        qk_dim = self.nope + self.rope
        # CPU SDPA falls back to a slow path materialising all scores when v's width differs from q/k's;
        # padding v with zeros to the q/k width and slicing the output afterwards keeps the fast kernel.
        pad = qk_dim - self.v_dim if self.v_dim < qk_dim else 0
        if pad:
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None and q.shape[2] > 1,
            scale=self.scale,
        )  # [B, H, T, v(+pad)]
        return out[..., : self.v_dim].transpose(1, 2)  # [B, T, H, v]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        H, T = self.n_heads, q_nope.shape[1]
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, n, c], [H, v, c]
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # W_uk folded into the query
        scores = (
            torch.einsum("bthc,bsc->bhts", q_lat, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        ).float() * self.scale  # [B, H, T, S]
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()[None]  # [1, T, T]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        p = scores.softmax(dim=-1).type_as(c_kv)
        o_lat = torch.einsum("bhts,bsc->bthc", p, c_kv)  # attend over the latent itself
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # W_uv folded into the output: [B, T, H, v]
