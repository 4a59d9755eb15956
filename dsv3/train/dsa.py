"""Training DeepSeek Sparse Attention as the V3.2 report describes (section 2.1.1), from a dense model.

1. Warm-up: attention stays dense and only the lightning indexers train, towards the main attention. For query
   t the target p[t] is the attention distribution summed over heads and L1-normalised; the indexer's loss is
   KL(p[t] || softmax(I[t])) over the keys t sees. Everything but the indexers is frozen.
2. Sparse training: attention keeps each query's top-k keys and the whole model trains on the language-model
   loss; the indexer's input is detached from the model, and its KL loss is taken over the selected keys only
   (its only gradient). The two objectives never share a gradient path.

A dense model becomes a V3.2 one by adding freshly initialised indexers (`dsa_model_config`).
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3
from dsv3.model.attention import IndexerProbe

STAGES = ("warmup", "sparse")


def dsa_model_config(cfg: ModelConfig, seq_len: int, n_heads: int | None = None, head_dim: int | None = None,
                     topk: int | None = None) -> ModelConfig:
    """`cfg` with sparse attention. A dense config gains indexers sized like V3.2's against its attention (64
    heads of 128 against MLA's 128 heads of 192: half the heads, 2/3 of the head width, at least the rope width)
    keeping a quarter of the training sequence unless told otherwise; a V3.2 config keeps its own sizes unless
    told otherwise."""
    if cfg.uses_dsa:
        return cfg.replace(index_n_heads=n_heads or cfg.index_n_heads, index_head_dim=head_dim or cfg.index_head_dim,
                           index_topk=topk or cfg.index_topk)
    width = max(cfg.qk_rope_head_dim, cfg.qk_head_dim * 2 // 3)
    return cfg.with_dsa(n_heads or max(1, cfg.num_attention_heads // 2), head_dim or width,
                        topk or max(1, seq_len // 4))


def is_indexer(name: str) -> bool:
    return ".indexer." in name


def freeze_all_but_indexers(model: DeepSeekV3) -> int:
    """The warm-up's parameters: only the indexers' train. Returns how many numbers are left trainable."""
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_indexer(name))
        trainable += p.numel() if is_indexer(name) else 0
    return trainable


def run_options(stage: str | None) -> dict[str, bool]:
    """The forward's sparse-attention switches for a stage (none outside DSA training)."""
    if stage is None:
        return {}
    return {"sparse": stage == "sparse", "probe_indexer": True}


def indexer_kl(probes: list[IndexerProbe]) -> torch.Tensor:
    """KL(p || softmax(I)) per query, averaged over queries and layers. Keys masked out of attention carry
    p = 0 and contribute nothing (their log-probability is -inf)."""
    losses = []
    for probe in probes:
        p, logq = probe.attention, probe.index_logp  # [B, T, S]
        terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), torch.zeros_like(p))
        losses.append(terms.sum(dim=-1).mean())
    return torch.stack(losses).mean()
