"""The DeepSeek-V3 language model: embedding, pre-norm blocks (MLA + dense MLP or MoE), final norm,
untied head, and D sequential Multi-Token Prediction modules (DeepSeek-V3 section 2.2).

The model runs on one device and knows nothing of training, serving, FP8 or processes; those wrap it
from outside. Shapes: B batch, T tokens, d hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import MLA
from dsv3.model.cache import LatentCache
from dsv3.model.moe import MLP, GroupedExperts, MoE, Routing
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: x += attn(attn_norm(x)); x += ffn(ffn_norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_impl: str = "naive", experts_impl: str = "grouped"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_idx, attn_impl)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer_idx < cfg.first_k_dense_replace:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.ffn = MoE(cfg, experts_impl)

    def forward(self, x, rope, positions, cache=None) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.attn(self.attn_norm(x), rope, positions, cache)
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn(self.ffn_norm(x))
            return x + y, routing
        return x + self.ffn(self.ffn_norm(x)), None


class MTPModule(nn.Module):
    """MTP module k: h' = W_eh [norm_e(emb(t_{i+k})) ; norm_h(h_i^{k-1})], h^k = Block_k(h'), and the shared
    head reads norm_k(h^k) to predict t_{i+k+1}. The embedding-first order is the one the released weights use."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_impl: str = "naive", experts_impl: str = "grouped"):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, layer_idx, attn_impl, experts_impl)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h_prev, emb_next, rope, positions, cache=None) -> tuple[torch.Tensor, Routing | None]:
        """h_prev, emb_next [B, T, d] -> h^k [B, T, d] (before norm_k) and the block's routing."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, T, 2d] -> [B, T, d]
        return self.block(h, rope, positions, cache)


@dataclass
class Output:
    logits: torch.Tensor  # [B, T, V], the main head
    hidden: torch.Tensor  # [B, T, d], last block's output before the final norm (what MTP module 1 reads)
    routing: list[Routing] = field(default_factory=list)  # one per MoE layer of the main model
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V], predicts t_{i+k+1}
    mtp_routing: list[Routing] = field(default_factory=list)  # one per MTP module


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 (and the V2 family, through the config's routing fields).

    `attn_impl` chooses "naive" (expand the latent to per-head K/V) or "absorb" (attend over the latent);
    `experts_impl` chooses "grouped" (one grouped matmul) or "loop" (the per-expert reference). Both pairs
    compute the same function; tests hold them to it.
    """

    def __init__(self, cfg: ModelConfig, attn_impl: str = "naive", experts_impl: str = "grouped"):
        super().__init__()
        self.config = cfg
        L = cfg.num_hidden_layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, attn_impl, experts_impl) for i in range(L))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # MTP module k sits at layer index L + k - 1, as in the checkpoint
        self.mtp = nn.ModuleList(
            MTPModule(cfg, L + k, attn_impl, experts_impl) for k in range(cfg.num_nextn_predict_layers)
        )
        self.rope = RotaryEmbedding(cfg)

    def set_impl(self, attn: str | None = None, experts: str | None = None) -> DeepSeekV3:
        """Switch every layer between the fast and the reference computations."""
        for m in self.modules():
            if attn is not None and isinstance(m, MLA):
                m.impl = attn
            if experts is not None and isinstance(m, GroupedExperts):
                m.impl = experts
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.006) -> None:
        """Initialise in place (DeepSeek-V3's recipe): every projection, expert, router and embedding weight
        ~ N(0, std); every RMSNorm weight = 1; router biases = 0. Works after `to_empty()` from the meta device."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for name, b in self.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: LatentCache | None = None):
        """input_ids [B, T] -> logits [B, T, V]. See `run` for the MTP logits and routing statistics."""
        return self.run(input_ids, positions, cache).logits

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        mtp: bool = False,
    ) -> Output:
        """One forward pass returning everything the caller may need.

        positions [B, T]: absolute position of each token (default 0..T-1). With `cache`, tokens are written to
        the latent cache at those positions and attend to everything cached before them. With `mtp`, the MTP
        modules run over the same pass (training): module k reads the hidden states of positions 0..T-k-1 and
        the embeddings of tokens k..T-1.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        rope = self.rope(positions)
        h = self.embed(input_ids)  # [B, T, d]
        routing = []
        for layer in self.layers:
            h, r = layer(h, rope, positions, cache)
            if r is not None:
                routing.append(r)
        out = Output(logits=self.head(self.norm(h)), hidden=h, routing=routing)
        if mtp:
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                pos_k = positions[:, : T - k]
                rope_k = (rope[0][:, : T - k], rope[1][:, : T - k])
                h_prev, r = module(h_prev[:, : T - k], self.embed(input_ids[:, k:]), rope_k, pos_k, cache)
                out.mtp_logits.append(self.head(module.norm(h_prev)))  # [B, T-k, V]
                out.mtp_routing.append(r)
        return out
