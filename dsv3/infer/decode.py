"""The decode-step forward: the model's own modules and weights, arranged for a few tokens per sequence.

`DeepSeekV3.run` is written to read like the paper and to train. A decode step moves one or two tokens
per sequence, so its cost is the number of small ops, not arithmetic. `DecodeForward` computes the same
function as `run` with the absorbed attention, for that case:

- RoPE angles and the attention mask are built once per step, not once per layer;
- W_uk and W_uv are applied as one batched matmul each over all heads (laid out once, up front);
- norms, projections and MoE layers are the model's own modules (with a handful of tokens the MoE runs
  only the experts they chose).

The engine uses it for decode steps, speculative verification and MTP drafting; `model.run` stays the
reference, and tests hold the two to the same tokens.

Shapes: B batch, T tokens per row (1 or 2), S cached slots, H heads, c kv_lora_rank, n nope, r rope,
v v_head_dim, d hidden size, N = B * T, K experts per token.
"""

from __future__ import annotations

import torch

from dsv3.model import DeepSeekV3
from dsv3.model.attention import MLA
from dsv3.model.moe import MoE
from dsv3.model.transformer import Block, MTPModule


class DecodeForward:
    def __init__(self, model: DeepSeekV3):
        self.model = model
        cfg = model.config
        self.H, self.n, self.r, self.v, self.c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                  cfg.v_head_dim, cfg.kv_lora_rank)
        self.absorbed = {}  # MLA -> (W_uk [H, n, c], W_uv^T [H, c, v])
        for mla in (m for m in model.modules() if isinstance(m, MLA)):
            w = mla.wkv_b.weight.detach().view(self.H, self.n + self.v, self.c)  # head-major rows of W_ukv
            self.absorbed[mla] = (w[:, : self.n].contiguous(), w[:, self.n :].transpose(1, 2).contiguous())

    # ----- entry points ------------------------------------------------------------------------------
    def run(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, positions [B, T] -> (logits [B, T, V], hidden [B, T, d]): `model.run(ids, positions, cache)`."""
        m = self.model
        step = self._step_constants(positions)
        h = m.embed(ids)  # [B, T, d]
        for layer in m.layers:
            h = self._block(layer, h, step, positions, cache)
        return m.head(m.norm(h)), h

    def mtp(self, module: MTPModule, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
            cache) -> torch.Tensor:
        """MTP module's h^k [B, T, d] for (h_prev, next_ids) at positions: `module(h_prev, embed(next_ids), ...)`."""
        step = self._step_constants(positions)
        x = module.eh_proj(torch.cat([module.enorm(self.model.embed(next_ids)), module.hnorm(h_prev)],
                                     dim=-1))
        return self._block(module.block, x, step, positions, cache)

    # ----- pieces ------------------------------------------------------------------------------------
    def _step_constants(self, positions: torch.Tensor):
        """What every layer of a step shares: the rotation e^{i theta p} [B, T, 1, r/2] (with YaRN's attention
        factor) and the additive mask [B, T, 1, S] that hides slots past each token's position."""
        cos, sin = self.model.rope(positions)
        rotation = torch.complex(cos, sin)
        S = int(positions.max()) + 1
        slots = torch.arange(S, device=positions.device)
        mask = torch.zeros(*positions.shape, 1, S, device=positions.device)
        mask.masked_fill_(slots > positions[:, :, None, None], float("-inf"))
        return rotation, mask

    def _block(self, block: Block, x, step, positions, cache) -> torch.Tensor:
        x = x + self._attention(block.attn, block.attn_norm(x), step, positions, cache)
        y = block.ffn_norm(x)
        return x + (block.ffn(y)[0] if isinstance(block.ffn, MoE) else block.ffn(y))

    def _attention(self, a: MLA, x, step, positions, cache) -> torch.Tensor:
        B, T, _ = x.shape
        H, n, r, v, c = self.H, self.n, self.r, self.v, self.c
        rotation, mask = step
        q = a.wq(x) if hasattr(a, "wq") else a.wq_b(a.q_norm(a.wq_a(x)))
        q_nope, q_pe = q.view(B, T, H, n + r).split([n, r], dim=-1)  # [B, T, H, n], [B, T, H, r]
        c_kv, k_pe = a.wkv_a(x).split([c, r], dim=-1)  # [B, T, c], [B, T, r]
        c_kv = a.kv_norm(c_kv)
        q_pe = _rotate(q_pe, rotation)
        k_pe = _rotate(k_pe[:, :, None], rotation)[:, :, 0]
        c_all, pe_all = cache.update(a.layer_idx, positions, c_kv, k_pe)  # [B, S, c], [B, S, r]
        w_uk, w_uv_t = self.absorbed[a]
        # W_uk folded into the query, all heads in one batched matmul: [H, N, n] @ [H, n, c] -> [H, N, c]
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, n), w_uk)
        q_lat = q_lat.view(H, B, T, c).permute(1, 2, 0, 3).reshape(B, T * H, c)  # [B, T*H, c]
        scores = torch.baddbmm(  # q_lat . c_kv + q_pe . k_pe: [B, T*H, S]
            torch.bmm(q_lat, c_all.transpose(1, 2)), q_pe.reshape(B, T * H, r), pe_all.transpose(1, 2)
        )
        scores = scores.float().view(B, T, H, -1) * a.scale + mask  # [B, T, H, S]
        p = scores.softmax(dim=-1).type_as(c_all).view(B, T * H, -1)
        o_lat = torch.bmm(p, c_all)  # attend over the latent itself: [B, T*H, c]
        # W_uv folded into the output: [H, N, c] @ [H, c, v] -> [H, N, v]
        o = torch.bmm(o_lat.view(B, T, H, c).permute(2, 0, 1, 3).reshape(H, B * T, c), w_uv_t)
        return a.wo(o.view(H, B, T, v).permute(1, 2, 0, 3).reshape(B, T, H * v))  # [B, T, H*v] -> [B, T, d]


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as one complex multiply: pairs (2j, 2j+1) of x [B, T, H, r] times rotation [B, T, 1, r/2]."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, T, H, r/2]
    return torch.view_as_real(xc * rotation).flatten(-2).type_as(x)
