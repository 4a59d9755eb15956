"""Expert load balancing: DeepSeek-V3's auxiliary-loss-free bias update, its complementary sequence-wise
loss, the classic auxiliary loss it replaces (for ablations), and MaxVio, the imbalance measure.

Shapes: B sequences of T tokens, N = B*T tokens in row-major order, E routed experts, K experts per token.
Every router of the model takes part: the MoE layers of the main model and those of the MTP modules.
"""

from __future__ import annotations

import torch

from dsv3.model import DeepSeekV3
from dsv3.model.moe import MoE, Router, Routing


def routers(model: DeepSeekV3) -> dict[int, Router]:
    """The routers the model holds, keyed by their position in the order `run()` reports their Routing (main MoE
    layers, then MTP modules): all of them, or a pipeline rank's share of them."""
    cfg = model.config
    index = {layer: i for i, layer in enumerate(cfg.router_layers())}
    blocks = [*enumerate(model.layers), *((cfg.mtp_layer_index(k), m.block) for k, m in enumerate(model.mtp, 1))]
    return {index[layer]: b.ffn.gate for layer, b in blocks if isinstance(getattr(b, "ffn", None), MoE)}


def sequence_balance_loss(r: Routing, batch: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss of one layer, before alpha, averaged over the B sequences
    (DeepSeek-V3 eq. 17-20): sum_i f_i P_i with f_i = E / (K T) * (tokens of the sequence sent to i) and
    P_i = the sequence's mean of s_i / sum_j s_j. It is 1 when every sequence spreads its tokens evenly."""
    N, E = r.scores.shape
    K, T = r.indices.shape[1], N // batch
    counts = torch.zeros(batch, E, device=r.scores.device).scatter_add_(
        1, r.indices.view(batch, T * K), torch.ones(batch, T * K, device=r.scores.device)
    )  # [B, E], no gradient: which experts were chosen is not differentiable
    f = counts * (E / (K * T))
    p = (r.scores / r.scores.sum(-1, keepdim=True)).view(batch, T, E).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


def aux_balance_loss(r: Routing) -> torch.Tensor:
    """The classic auxiliary balance loss of one layer, before alpha, over all N tokens of the batch
    (GShard, Switch, DeepSeekMoE): sum_i f_i P_i with f_i = E / (K N) * c_i and P_i = mean of the
    normalised scores. The ablations' "aux-loss" baseline, used instead of the bias."""
    N, E = r.scores.shape
    K = r.indices.shape[1]
    f = r.counts.float() * (E / (K * N))
    p = (r.scores / r.scores.sum(-1, keepdim=True)).mean(0)  # [E]
    return (f * p).sum()


def max_vio(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i c_i - mean c) / mean c along the last axis: 0 is perfect balance, E - 1 all on one expert."""
    loads = loads.float()
    mean = loads.mean(-1)
    return (loads.amax(-1) - mean) / mean.clamp_min(1e-9)


@torch.no_grad()
def update_biases(gates: dict[int, Router], loads: torch.Tensor, gamma: float) -> None:
    """After an optimizer step: bias_i += gamma * sign(mean(c) - c_i), from each router's loads c over the
    whole (accumulated) batch, loads [n_routers, E] (`gates` as `routers` gives them). Underloaded experts
    become more attractive."""
    for i, gate in gates.items():
        c = loads[i].float()
        gate.bias += gamma * torch.sign(c.mean() - c)


def relative_loads(loads: torch.Tensor) -> list[list[float]]:
    """Loads [routers, E] as multiples of each router's mean load (1.0 = balanced), rounded for JSON records."""
    rel = loads.float() / loads.float().mean(-1, keepdim=True).clamp_min(1e-9)
    return [[round(v, 3) for v in row] for row in rel.tolist()]
