"""Exact parameter and cache-size accounting, read off a model built on the meta device (no weights allocated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3
from dsv3.model.moe import GroupedExperts


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model: embedding, blocks, final norm, head; router biases included
    embedding: int
    routed_experts: int  # every routed expert of the main model
    active: int  # per token, excluding the embedding lookup: only K of E routed experts run
    mtp: int  # all MTP modules (eh_proj, block, norms); their embedding and head are the main model's

    @property
    def active_with_embedding(self) -> int:
        return self.active + self.embedding


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Count every stored tensor (parameters and the router's bias buffer) of a model with this config."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)

    def numel(module: torch.nn.Module) -> int:
        return sum(t.numel() for t in module.state_dict().values())

    mtp = sum(numel(m) for m in model.mtp)
    total = numel(model) - mtp
    routed = sum(numel(m) for m in model.layers.modules() if isinstance(m, GroupedExperts))
    embedding = model.embed.weight.numel()
    active = total - embedding - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return ParamCounts(total=total, embedding=embedding, routed_experts=routed, active=active, mtp=mtp)


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> tuple[int, int]:
    """Inference cache per token over all main layers: (absorbed latent cache, naive per-head K/V cache).

    absorbed: c_kv and k_pe, kv_lora_rank + rope numbers per layer (576 for V3);
    naive: every head's key (nope + rope) and value (v), H * (nope + rope + v) per layer (40,960 for V3).
    """
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_head = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    L = cfg.num_hidden_layers
    return L * latent * bytes_per_value, L * per_head * bytes_per_value
