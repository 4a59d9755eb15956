"""The DeepSeek-V3 language model: embedding, pre-norm blocks (MLA + dense MLP or MoE), final norm,
untied head, and D sequential Multi-Token Prediction modules (DeepSeek-V3 section 2.2).

The model runs on one device and knows nothing of training, serving, FP8 or processes; those wrap it
from outside. Shapes: B batch, T tokens, d hidden size, V vocabulary.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import MLA, AttentionContext, IndexerProbe, check_attn_impl
from dsv3.model.cache import LatentCache
from dsv3.model.moe import MLP, GroupedExperts, MoE, Routing, check_experts_impl
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: x += attn(attn_norm(x)); x += ffn(ffn_norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, experts_impl: str = "grouped"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.ffn = MoE(cfg, experts_impl)
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LatentCache | None = None,
                attn: str = "naive") -> tuple[torch.Tensor, Routing | None]:
        x = x + self.attn(self.attn_norm(x), ctx, cache, attn)
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn(self.ffn_norm(x))
            return x + y, routing
        return x + self.ffn(self.ffn_norm(x)), None


class MTPModule(nn.Module):
    """MTP module k: h' = W_eh [norm_e(emb(t_{i+k})) ; norm_h(h_i^{k-1})], h^k = Block_k(h'), and the shared
    head reads norm_k(h^k) to predict t_{i+k+1}. The embedding-first order is the one the released weights use."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, experts_impl: str = "grouped"):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, layer_idx, experts_impl)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, ctx: AttentionContext,
                cache: LatentCache | None = None, attn: str = "naive") -> tuple[torch.Tensor, Routing | None]:
        """h_prev, emb_next [B, T, d] -> h^k [B, T, d] (before norm_k) and the block's routing."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, T, 2d] -> [B, T, d]
        return self.block(h, ctx, cache, attn)


@dataclass
class Output:
    logits: torch.Tensor  # [B, T, V], the main head (or [B, K, V] at the columns `logits_at` chose)
    hidden: torch.Tensor  # [B, T, d], last block's output before the final norm (what MTP module 1 reads)
    routing: list[Routing] = field(default_factory=list)  # one per MoE layer of the main model
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V], predicts t_{i+k+1}
    mtp_routing: list[Routing] = field(default_factory=list)  # one per MTP module
    indexer: list[IndexerProbe] = field(default_factory=list)  # sparse attention, when probed: one per layer run


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 (and the V2 family, through the config's routing fields).

    Two pairs of computations give the same function; tests hold them to it:
    - attention "naive" (expand the latent to per-head K/V: training, prefill) or "absorb" (attend over the
      latent: decoding), chosen per call with `attn=` (default: `attn_impl`);
    - experts "grouped" (one grouped matmul per projection) or "loop" (the per-expert reference).
    """

    def __init__(self, cfg: ModelConfig, attn_impl: str = "naive", experts_impl: str = "grouped"):
        super().__init__()
        self.config = cfg
        self.attn_impl = check_attn_impl(attn_impl)
        check_experts_impl(experts_impl)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, experts_impl) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.mtp_layer_index(k), experts_impl) for k in range(1, cfg.num_nextn_predict_layers + 1)
        )
        self.rope = RotaryEmbedding(cfg)

    def set_impl(self, attn: str | None = None, experts: str | None = None) -> DeepSeekV3:
        """Switch the default attention and every MoE layer's experts between the fast and the reference forms."""
        if attn is not None:
            self.attn_impl = check_attn_impl(attn)
        if experts is not None:
            check_experts_impl(experts)
            for m in self.modules():
                if isinstance(m, GroupedExperts):
                    m.impl = experts
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.006, seed: int | None = None) -> None:
        """Initialise in place (DeepSeek-V3's recipe): every projection, expert, router and embedding weight
        ~ N(0, std); every norm weight = 1 (and the indexer's LayerNorm bias = 0); router biases = 0. Works
        after `to_empty()` from the meta device.

        With `seed`, each parameter draws from its own generator, seeded by `seed` and the parameter's name: its
        values then depend on nothing else, so a model built in parts (pipeline stages, each on its own
        process) initialises every part exactly as the whole model would be. Without, from torch's global RNG.
        """
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("norm.bias"):
                p.zero_()
            elif seed is None:
                p.normal_(0.0, std)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, std, generator=g)
        for name, b in self.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, *, attn: str | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. See `run` for the MTP logits and routing statistics."""
        return self.run(input_ids, positions, cache, attn=attn).logits

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        mtp: bool = False,
        attn: str | None = None,
        logits_at: torch.Tensor | None = None,
        sparse: bool = True,
        probe_indexer: bool = False,
    ) -> Output:
        """One forward pass returning everything the caller may need.

        positions [B, T]: absolute position of each token (default 0..T-1). With `cache`, tokens are written to
        the latent cache at those positions and attend to everything cached before them. With `mtp`, the MTP
        modules run over the same pass (training): module k reads the hidden states of positions 0..T-k-1 and
        the embeddings of tokens k..T-1. `attn` picks the attention form for this call. `logits_at` [B, K]
        computes the main head at those columns only ([B, K, V]; decoding wants one column of a long prompt).
        Sparse attention (V3.2) only: `sparse=False` attends densely though the indexers run; `probe_indexer`
        fills `Output.indexer` with what training the indexers needs (their inputs then detached).
        """
        B, T = input_ids.shape
        attn = self.attn_impl if attn is None else check_attn_impl(attn)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        probes: list[IndexerProbe] | None = [] if probe_indexer else None
        ctx = AttentionContext.build(positions, self.rope(positions), cache is not None, sparse=sparse, probes=probes)
        h = self.embed(input_ids)  # [B, T, d]
        routing = []
        for layer in self.layers:
            h, r = layer(h, ctx, cache, attn)
            if r is not None:
                routing.append(r)
        out = Output(logits=self._head(self.norm, h, logits_at), hidden=h, routing=routing, indexer=probes or [])
        if mtp:
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                h_prev, r = module(h_prev[:, : T - k], self.embed(input_ids[:, k:]), ctx.first(T - k), cache, attn)
                out.mtp_logits.append(self.head(module.norm(h_prev)))  # [B, T-k, V]
                out.mtp_routing.append(r)
        return out

    def mtp_step(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: LatentCache | None = None,
        *,
        depth: int = 1,
        attn: str | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> Output:
        """MTP module `depth` on its own, as speculative decoding drafts with it.

        hidden [B, T, d]: the previous depth's states at `positions` (for depth 1, `run(...).hidden`);
        next_ids [B, T]: the token after each position. Returns Output with h^depth as `hidden` and, as
        `logits`, the shared head's prediction of the token after next ([B, T, V], or [B, K, V] at
        `logits_at`). With `cache`, the module's own layer of the cache is written at `positions`.
        """
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"MTP depth {depth} is not one of this model's {len(self.mtp)} module(s)")
        attn = self.attn_impl if attn is None else check_attn_impl(attn)
        module = self.mtp[depth - 1]
        ctx = AttentionContext.build(positions, self.rope(positions), cache is not None)
        h, r = module(hidden, self.embed(next_ids), ctx, cache, attn)
        return Output(logits=self._head(module.norm, h, logits_at), hidden=h, routing=[r])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The main head's logits [..., V] of last-block states hidden [..., d] (`Output.hidden`): for the
        positions a caller wants after a forward that computed only some (scoring a prompt after prefill)."""
        return self.head(self.norm(hidden))

    def _head(self, norm: RMSNorm, h: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
        """The shared output head after `norm`, at every column of h [B, T, d] or only at logits_at [B, K]."""
        if logits_at is not None:
            h = torch.take_along_dim(h, logits_at[..., None], dim=1)  # [B, K, d]
        return self.head(norm(h))
