"""Tensor- and expert-parallel inference: one model split over the W ranks of a process group, each rank
holding and reading only its own slices.

What each rank holds, and the one collective after each part (DeepSeek's own inference code splits V3 the
same way):

- embedding: rows by vocabulary; rank r looks up the ids in its range, zeros elsewhere; then an all-reduce.
- attention (MLA): heads. The query's and wkv_b's rows of H/W heads (column-parallel), wo's columns
  (row-parallel); the down-projections, norms and the shared RoPE key are small and replicated. All-reduce.
- dense MLP, shared experts: the intermediate dimension (w1/w3 rows, w2 columns). All-reduce (in an MoE
  layer the experts' one).
- routed experts: rank r holds E/W of them. The router is replicated, so every rank routes every token
  alike and runs its own experts on the rows sent to them. All-reduce.
- head: rows by vocabulary; the ranks' logits are all-gathered.

The routed experts use an all-reduce rather than all-to-all exchanges: every rank already holds every
token (attention's output is reduced everywhere), so each computes its experts' weighted outputs for the
tokens routed to them and one all-reduce sums them with the shared experts' partial sums, the collective the
layer needs anyway. All-to-all pays off when the tokens themselves are split over ranks (data-parallel
attention), which this layout does not do.

The latent cache is replicated: the absorbed attention reads one latent per token shared by all heads, so
there is nothing per head to split; every rank keeps the whole cache (small: 576 numbers per token per layer
at V3's size). The model's code is untouched: parameters are narrowed in place, the embedding and head are
swapped for vocabulary-split modules with the same parameter names, and the reductions are forward hooks.
"""

from __future__ import annotations

import functools
import json
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3
from dsv3.model.attention import MLA
from dsv3.model.moe import MLP, MoE


class Split(NamedTuple):
    """A parameter's slice on one rank: `dim` cut into W equal parts, this rank's being [start, stop)."""

    dim: int
    start: int
    stop: int


def plan_splits(model: DeepSeekV3, rank: int, world: int) -> dict[str, Split]:
    """Parameter name -> this rank's slice, for every parameter that is split (the rest are replicated)."""
    cfg = model.config
    check_divisible(cfg, world)

    def part(n: int, dim: int) -> Split:
        size = n // world
        return Split(dim, rank * size, (rank + 1) * size)

    splits = {"embed.weight": part(cfg.vocab_size, 0), "head.weight": part(cfg.vocab_size, 0)}
    for name, module in model.named_modules():
        prefix = name + "."
        if isinstance(module, MLA):
            q = "wq" if hasattr(module, "wq") else "wq_b"
            splits[prefix + q + ".weight"] = part(getattr(module, q).weight.shape[0], 0)
            splits[prefix + "wkv_b.weight"] = part(module.wkv_b.weight.shape[0], 0)
            splits[prefix + "wo.weight"] = part(module.wo.weight.shape[1], 1)
        elif isinstance(module, MLP):  # dense layers and shared experts
            inter = module.w1.weight.shape[0]
            splits[prefix + "w1.weight"] = splits[prefix + "w3.weight"] = part(inter, 0)
            splits[prefix + "w2.weight"] = part(inter, 1)
        elif isinstance(module, MoE):
            for w in ("w1", "w2", "w3"):
                splits[prefix + f"experts.{w}"] = part(cfg.n_routed_experts, 0)
    return splits


@functools.cache
def _split_names(hf_config: str) -> frozenset[str]:
    with torch.device("meta"):
        model = DeepSeekV3(ModelConfig.from_hf(json.loads(hf_config)))
    return frozenset(plan_splits(model, 0, 1))


def split_names(cfg: ModelConfig) -> frozenset[str]:
    """The parameters that ranks split (the rest every rank holds whole), for memory planning."""
    return _split_names(json.dumps(cfg.to_hf(), sort_keys=True))


def check_divisible(cfg: ModelConfig, world: int) -> None:
    sizes = {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
             "intermediate_size": cfg.intermediate_size}
    if cfg.n_routed_experts:
        sizes["n_routed_experts"] = cfg.n_routed_experts
        sizes["moe_intermediate_size x n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    for name, n in sizes.items():
        if n % world:
            raise ValueError(f"{name}={n} does not split over {world} ranks; use a number of ranks that divides it")


def shard(model: DeepSeekV3, group: dist.ProcessGroup | None = None) -> dict[str, Split]:
    """Split `model` in place over `group`'s ranks (the default group when None): every split parameter is
    narrowed to this rank's slice (on the meta device this only changes shapes), and the reductions are hooked
    in. Returns the splits, which `load_slices` reads from a checkpoint."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    splits = plan_splits(model, rank, world)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = splits.get(name)
            if s is not None:
                p.data = p.data.narrow(s.dim, s.start, s.stop - s.start).clone()
    cfg = model.config
    e = splits["embed.weight"]
    model.embed = VocabEmbedding(model.embed.weight, e.start, group)
    model.head = VocabHead(model.head.weight, group)

    def reduce(module, inputs, output):
        dist.all_reduce(output, group=group)
        return output

    for module in model.modules():
        if isinstance(module, MLA):
            module.n_heads = cfg.num_attention_heads // world
            module.register_forward_hook(reduce)
        elif isinstance(module, MoE):
            module.__class__ = ExpertShardMoE
            module.group, module.first = group, rank * (cfg.n_routed_experts // world)
            module.n_local = cfg.n_routed_experts // world
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        if isinstance(block.ffn, MLP):
            block.ffn.register_forward_hook(reduce)
    return splits


class VocabEmbedding(nn.Module):
    """Rows [first, first + n) of the embedding: ids outside look up zeros, and an all-reduce completes them."""

    def __init__(self, weight: nn.Parameter, first: int, group):
        super().__init__()
        self.weight, self.first, self.group = weight, first, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # [B, T, d]
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


class VocabHead(nn.Module):
    """Rows of the output head for this rank's vocabulary range; the ranks' logits are gathered in order."""

    def __init__(self, weight: nn.Parameter, group):
        super().__init__()
        self.weight, self.group = weight, group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight).contiguous()  # [..., V / W]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)  # [..., V]


class ExpertShardMoE(MoE):
    """An MoE whose `experts` hold experts [first, first + n_local) of the layer. Every rank routes every token
    (the router is replicated), runs its experts on the rows sent to them, and one all-reduce sums the ranks'
    weighted outputs and the shared experts' partial sums."""

    group: dist.ProcessGroup | None
    first: int
    n_local: int

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        routing = self.route(x)
        x_sorted, order = self.dispatch(x, routing)  # sorted by expert: this rank's experts are one run of rows
        counts = routing.counts
        ends = counts.cumsum(0)
        lo = int(ends[self.first - 1]) if self.first else 0
        hi = int(ends[self.first + self.n_local - 1])
        y_local = self.experts(x_sorted[lo:hi], counts[self.first : self.first + self.n_local])
        y = self.combine(y_local, order[lo:hi], routing, x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        dist.all_reduce(y, group=self.group)
        return y.view(shape), routing


def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
