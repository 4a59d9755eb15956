"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Suffixes in shape comments: B batch, T query tokens, S key tokens, H heads, c = kv_lora_rank,
n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim, d = hidden_size.

Two computations give the same result:
- "naive" expands the latent to per-head keys and values (what training and prefill want);
- "absorb" folds W_uk into the query and W_uv into the output and attends over the cached latent
  directly, so decoding never re-expands the cache.

With DeepSeek Sparse Attention (V3.2, `cfg.uses_dsa`) a lightning indexer (`dsv3.model.indexer`) picks, for
each query, the index_topk keys it attends to: the naive form masks the others out, the absorbed form
gathers only the selected latent rows, so its cost stops growing once the context passes index_topk.
K in shape comments is the number of selected keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.cache import LatentCache
from dsv3.model.indexer import Indexer
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope

ATTN_IMPLS = ("naive", "absorb")


def check_attn_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {', '.join(ATTN_IMPLS)}")
    return impl


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares, built once per pass rather than once per layer.

    positions [B, T]: each token's absolute position; rotation [B, T, 1, r/2]: its RoPE rotation (complex);
    mask [B, T, S]: 0 where a token may attend to cache slot s (s <= its position), -inf elsewhere; None when
    there is no cache and the T tokens attend causally among themselves (positions then are 0..T-1).
    Sparse attention only: `sparse` False attends densely (the indexer still runs); a list in `probes`
    collects every layer's `IndexerProbe`, with the indexer's inputs detached from the rest of the model.
    """

    positions: torch.Tensor
    rotation: torch.Tensor
    mask: torch.Tensor | None = None
    sparse: bool = True
    probes: list[IndexerProbe] | None = None

    @classmethod
    def build(cls, positions: torch.Tensor, rotation: torch.Tensor, cached: bool, **dsa) -> AttentionContext:
        if not cached:
            return cls(positions, rotation, **dsa)
        slots = torch.arange(int(positions.max()) + 1, device=positions.device)
        mask = torch.zeros(*positions.shape, slots.numel(), device=positions.device)
        return cls(positions, rotation, mask.masked_fill_(slots > positions[..., None], float("-inf")), **dsa)

    def first(self, n: int) -> AttentionContext:
        """The context of the first n tokens of each row (what MTP module k sees: positions 0..T-k-1)."""
        mask = None
        if self.mask is not None:
            mask = self.mask[:, :n, : int(self.positions[:, :n].max()) + 1]
        return AttentionContext(self.positions[:, :n], self.rotation[:, :n], mask, self.sparse, self.probes)

    @functools.cached_property
    def causal_mask(self) -> torch.Tensor:
        """`mask`, or for tokens attending among themselves the causal one: [B or 1, T, S]. Built once per
        forward, when a sparse-attention layer first needs it."""
        if self.mask is not None:
            return self.mask
        T = self.positions.shape[1]
        return torch.full((T, T), float("-inf"), device=self.positions.device).triu_(1)[None]


@dataclass
class IndexerProbe:
    """What training the indexer needs from one layer (DeepSeek-V3.2 section 2.1.1): the index scores as
    log-probabilities over the keys attention used, and the attention distribution itself (summed over heads
    and normalised, detached), both [B, T, S]; -inf and 0 where a key was masked."""

    index_logp: torch.Tensor
    attention: torch.Tensor


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
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
        self.indexer = Indexer(cfg) if cfg.uses_dsa else None

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, cache: LatentCache | None = None, impl: str = "naive"
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]. Without a cache the T tokens attend causally among themselves; with one,
        they are written at ctx.positions and each attends to its row's cached slots 0..its position."""
        B, T, _ = x.shape
        if hasattr(self, "wq"):
            q_c, q = None, self.wq(x)
        else:
            q_c = self.q_norm(self.wq_a(x))  # [B, T, q]
            q = self.wq_b(q_c)
        q_nope, q_pe = q.view(B, T, self.n_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, ctx.rotation)  # [B, T, H, r]
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)  # [B, T, c], [B, T, r]
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe[:, :, None], ctx.rotation)[:, :, 0]  # one rotated key shared by all heads
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer_idx, ctx.positions, c_kv, k_pe)  # [B, S, c], [B, S, r]
        mask, selected = ctx.mask, None
        if self.indexer is not None:
            selected, scores = self._select(x, q_c, ctx, cache, c_kv.shape[1])
            if selected is not None and (impl != "absorb" or ctx.probes is not None):
                # the naive form (and the probe) masks what the selection dropped; the absorbed one gathers
                dropped = torch.full_like(scores, float("-inf")).scatter_(-1, selected[0], 0.0)  # [B, T, S]
                mask, scores = ctx.causal_mask + dropped, scores + dropped
            if ctx.probes is not None:
                full = ctx.causal_mask if mask is None else mask
                target = self._attention_distribution(q_nope, q_pe, c_kv, k_pe, full)
                ctx.probes.append(IndexerProbe(scores.log_softmax(dim=-1), target))
        if impl == "absorb":
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, selected)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, mask)
        return self.wo(out.flatten(2))  # [B, T, H*v] -> [B, T, d]

    def _select(self, x, q_c, ctx: AttentionContext, cache, S: int):
        """Sparse attention: cache the index keys, score every visible key, keep the top K per query.

        Returns the selection ((indices, visible), each [B, T, K]; None when nothing is dropped: S <= K, or
        dense attention was asked for) and the index scores [B, T, S] under the causal mask (None when no
        scoring was needed: nothing dropped and no probe). While probing, the indexer's inputs are detached:
        it is trained by its own loss only."""
        if ctx.probes is not None:
            x, q_c = x.detach(), q_c.detach()
        k_index = self.indexer.key(x, ctx.rotation)  # [B, T, D]
        if cache is not None:
            k_index = cache.update_index(self.layer_idx, ctx.positions, k_index)  # [B, S, D]
        drops = ctx.sparse and self.indexer.topk < S  # else every visible key is among the top K
        if not drops and ctx.probes is None:
            return None, None
        scores = self.indexer.scores(x, q_c, ctx.rotation, k_index, ctx.causal_mask)
        return (self.indexer.select(scores) if drops else None), scores

    @torch.no_grad()
    def _attention_distribution(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Main attention's probabilities summed over heads and normalised over keys: [B, T, S]."""
        B, S, H = c_kv.shape[0], c_kv.shape[1], self.n_heads
        k_nope = self.wkv_b(c_kv).view(B, S, H, self.nope + self.v_dim)[..., : self.nope]  # [B, S, H, n]
        logits = torch.einsum("bthn,bshn->bhts", q_nope.float(), k_nope.float())
        logits = logits + torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
        p = (logits * self.scale + mask[:, None]).softmax(dim=-1).sum(dim=1)  # [B, T, S]
        return p / p.sum(dim=-1, keepdim=True)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Expand the latent to per-head keys and values, then one SDPA call: [B, T, H, v]."""
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
            attn_mask=None if mask is None else mask[:, None].to(q.dtype),  # [B, 1, T, S]
            is_causal=mask is None and q.shape[2] > 1,
            scale=self.scale,
        )  # [B, H, T, v(+pad)]
        return out[..., : self.v_dim].transpose(1, 2)  # [B, T, H, v]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, selected=None) -> torch.Tensor:
        """Attend over the latent itself: W_uk folded into the query, W_uv into the output. Every head is one
        batch of a bmm, read straight from the live wkv_b weight (views, no copies): [B, T, H, v]. With a
        sparse selection, each query reads only its K selected latent rows."""
        B, T, H, n = q_nope.shape
        S, c, r, v = c_kv.shape[1], self.kv_lora_rank, self.rope, self.v_dim
        w = self.wkv_b.weight.view(H, n + v, c)
        w_uk, w_uv = w[:, :n], w[:, n:]  # [H, n, c], [H, v, c]
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, n), w_uk)  # [H, B*T, c]
        if selected is not None:
            o_lat = self._attend_selected(q_lat.view(H, B, T, c).permute(1, 2, 0, 3), q_pe, c_kv, k_pe, *selected)
            o = torch.bmm(w_uv, o_lat.permute(2, 3, 0, 1).reshape(H, c, B * T))  # [H, v, B*T]
            return o.view(H, v, B, T).permute(2, 3, 0, 1)  # [B, T, H, v]
        q_lat = q_lat.view(H, B, T, c).permute(1, 2, 0, 3).reshape(B, T * H, c)  # [B, T*H, c]
        # q_lat . c_kv + q_pe . k_pe for every (token, head) row: [B, T*H, S]
        scores = torch.baddbmm(torch.bmm(q_lat, c_kv.transpose(1, 2)), q_pe.reshape(B, T * H, r), k_pe.transpose(1, 2))
        if mask is None:
            mask = torch.full((T, T), float("-inf"), device=scores.device).triu_(1)[None]  # [1, T, S=T]
        scores = scores.float().view(B, T, H, S) * self.scale + mask[:, :, None]  # [B, T, H, S]
        p = scores.softmax(dim=-1).type_as(c_kv).view(B, T * H, S)
        o_lat = torch.bmm(p, c_kv)  # [B, T*H, c]
        # W_uv [H, v, c] times the latent outputs laid out [H, c, B*T]: both read in place, no transposed copy
        o = torch.bmm(w_uv, o_lat.view(B, T, H, c).permute(2, 3, 0, 1).reshape(H, c, B * T))  # [H, v, B*T]
        return o.view(H, v, B, T).permute(2, 3, 0, 1)  # [B, T, H, v]

    def _attend_selected(self, q_lat, q_pe, c_kv, k_pe, idx, visible) -> torch.Tensor:
        """Absorbed attention over each query's selected rows: q_lat [B, T, H, c], q_pe [B, T, H, r] against
        the latent rows idx [B, T, K] (visible [B, T, K] False for padding picks): o_lat [B, T, H, c]."""
        B, T, K = idx.shape
        rows = idx.reshape(B, T * K, 1)
        c_sel = c_kv.gather(1, rows.expand(-1, -1, c_kv.shape[-1])).view(B, T, K, -1)  # [B, T, K, c]
        k_sel = k_pe.gather(1, rows.expand(-1, -1, k_pe.shape[-1])).view(B, T, K, -1)  # [B, T, K, r]
        scores = torch.matmul(q_lat, c_sel.transpose(-1, -2)) + torch.matmul(q_pe, k_sel.transpose(-1, -2))
        skip = torch.zeros(visible.shape, device=idx.device).masked_fill_(~visible, float("-inf"))
        p = (scores.float() * self.scale + skip[:, :, None]).softmax(dim=-1).type_as(c_kv)  # [B, T, H, K]
        return torch.matmul(p, c_sel)  # [B, T, H, c]
