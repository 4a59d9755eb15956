"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts (DeepSeek-V3 section 2.1.2).

The forward pass is split into route -> dispatch -> experts -> combine so expert parallelism can
replace dispatch and combine with all-to-all exchanges from outside this file. Shapes: N tokens
(B*T flattened), E routed experts, K experts per token, d hidden size, I expert width, M = N*K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig

EXPERT_IMPLS = ("grouped", "loop")


def check_experts_impl(impl: str) -> str:
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts impl {impl!r} is not one of {', '.join(EXPERT_IMPLS)}")
    return impl


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Routing:
    """What the router decided for N tokens; the training code reads balance statistics from it."""

    scores: torch.Tensor  # [N, E] fp32, unbiased affinities s (sigmoid or softmax)
    indices: torch.Tensor  # [N, K] chosen experts
    weights: torch.Tensor  # [N, K] fp32 gating weights applied to the expert outputs
    counts: torch.Tensor  # [E] tokens routed to each expert (the load c_i)


class Router(nn.Module):
    """Scores experts in fp32 and picks K per token.

    DeepSeek-V3 (topk_method "noaux_tc"): s = sigmoid(x W_g^T); the selection scores s + bias choose the experts
    (the bias only steers choice, it never weights outputs); groups are ranked by the sum of their top-2
    selection scores and only the best topk_group groups are eligible. V2 family: softmax scores, plain top-k
    ("greedy") or groups ranked by their max ("group_limited_greedy").
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))  # W_g [E, d]
        if cfg.uses_router_bias:
            # updated by the balancing rule, not by gradients: a buffer, kept in fp32 (see _apply)
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16 must not round the bias: balancing moves it in steps of ~1e-3.
        bias = self.bias
        super()._apply(fn, recurse)
        if bias is not None and bias.is_meta:  # nothing to preserve (e.g. to_empty): just keep fp32
            self.bias = self.bias.float()
        elif bias is not None:
            self.bias = bias.to(device=self.bias.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, d] -> Routing."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias  # selection-only bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)  # [N, E]
        indices = choice.topk(self.top_k, dim=-1).indices  # [N, K]
        weights = scores.gather(1, indices)  # the unbiased scores weight the outputs
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        return Routing(scores=scores, indices=indices, weights=weights, counts=counts)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs bf16/fp32 and rows aligned to 16 bytes (and, on CUDA, Hopper or newer)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.bfloat16, torch.float32) or w.dtype != x.dtype:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return all(n * x.element_size() % 16 == 0 for n in (w.shape[1], w.shape[2]))


class GroupedExperts(nn.Module):
    """E SwiGLU experts held as three [E, out, in] weights, applied to tokens sorted by expert.

    impl "grouped" runs each projection as one grouped matmul over all experts; "loop" is the readable
    reference, one matmul per expert, and the fallback where the grouped kernel cannot run.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str = "grouped"):
        super().__init__()
        self.impl = check_experts_impl(impl)
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate [E, I, d]
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down [E, d, I]
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up   [E, I, d]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d], rows sorted by expert with counts[e] rows for expert e -> [M, d]."""
        return swiglu_experts(x, counts, self.w1, self.w2, self.w3, self.impl)


def swiglu_experts(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                   impl: str = "grouped", linear: Callable | None = None) -> torch.Tensor:
    """E SwiGLU experts with weights [E, out, in] on rows x [M, d] sorted by expert (counts[e] rows for expert e)
    -> [M, d]. The experts' computation itself, apart from where the weights live: expert parallelism calls it
    with the experts one rank holds. `linear(x, w)` replaces F.linear (and the grouped kernel) for callers that
    compute the matmuls their own way (FP8 training)."""
    if linear is not None:
        return _expert_loop(x, counts, w1, w2, w3, linear)
    if torch.is_autocast_enabled(x.device.type):
        # autocast does not cover grouped matmuls; cast by hand so bf16 training runs in bf16
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2, w3 = x.to(dtype), w1.to(dtype), w2.to(dtype), w3.to(dtype)
    # With fewer routed rows than experts (decoding a few tokens) most experts are idle, and the grouped
    # kernel still pays per expert on the CPU: the loop over the busy ones is then the faster path.
    busy = x.shape[0] >= counts.shape[0]
    if impl == "grouped" and busy and _grouped_mm_ok(x, w1) and _grouped_mm_ok(x, w2):
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's block
        h = F.silu(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(
            x, w3.transpose(1, 2), offs=offs
        )  # [M, I]
        return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [M, d]
    return _expert_loop(x, counts, w1, w2, w3, F.linear)


def _expert_loop(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                 linear: Callable) -> torch.Tensor:
    out = []
    for e, xe in enumerate(x.split(counts.tolist())):
        if xe.shape[0] or (e == 0 and not x.shape[0]):
            # an idle expert contributes nothing (and its weights get a zero gradient); with no rows at all, expert
            # 0 still runs on none, so that the output stays in the graph of x and the weights (a rank that
            # received no tokens must still take part in the backward exchanges of expert parallelism)
            out.append(linear(F.silu(linear(xe, w1[e])) * linear(xe, w3[e]), w2[e]))
    return torch.cat(out)


class MoE(nn.Module):
    """output = sum_k weight_k * expert_k(x) + shared(x); no capacity limit, no dropped tokens."""

    def __init__(self, cfg: ModelConfig, experts_impl: str = "grouped"):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, experts_impl)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [B, T, d] -> ([B, T, d], Routing)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        routing = self.route(x)
        x_sorted, order = self.dispatch(x, routing)
        y_sorted = self.experts(x_sorted, routing.counts)
        y = self.combine(y_sorted, order, routing, x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), routing

    def route(self, x: torch.Tensor) -> Routing:
        return self.gate(x)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy each token once per chosen expert, sorted by expert: -> x_sorted [M, d], and `order` [M], the
        (token, k) slot, flattened as token * K + k, that each sorted row came from."""
        order = routing.indices.flatten().argsort(stable=True)  # [M] slots grouped by expert
        return x[order // routing.indices.shape[1]], order

    def combine(self, y_sorted: torch.Tensor, order: torch.Tensor, routing: Routing, x: torch.Tensor) -> torch.Tensor:
        """Weight each expert output by its gate and sum the K outputs of every token, in fp32 -> [N, d]."""
        token_of = order // routing.indices.shape[1]  # [M]
        w = routing.weights.flatten()[order]  # [M], aligned with y_sorted
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, token_of, y_sorted.float() * w[:, None])
        return y.to(x.dtype)
