"""Expert parallelism: the routed experts of every MoE layer split over the E ranks of an expert group.

Rank e holds experts [e * E_r, (e + 1) * E_r), E_r = n_routed_experts / E: with expert groups, a whole
number of groups, so group-limited routing (DeepSeek's node-limited routing, one group per node) sends a
token to at most `topk_group` ranks. Each rank routes its own tokens, then

    dispatch   its token copies, sorted by expert, go to the ranks holding those experts (all_to_all_single,
               uneven splits; a rank may receive nothing)
    experts    each rank runs its experts on what it received, regrouped by expert
    combine    the outputs go back the same way (all_to_all_single) and are weighted and summed as usual

Both exchanges are differentiable (the backward pass sends the gradients back the other way). The expert
weights become DTensors sharded on dim 0 over the expert mesh, so checkpoints hold whole [E, out, in]
tensors and can be resumed on any other layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dsv3.model.moe import GroupedExperts, MoE, swiglu_experts


class ExpertParallelMoE(MoE):
    """An MoE whose `experts` hold this rank's share of the routed experts (see the module docstring). Made by
    `apply_expert_parallel` from an ordinary MoE, in place: same parameters, same names."""

    ep_group: dist.ProcessGroup
    ep_size: int
    # per-step statistics the trainer reads and resets: the most ranks one token's experts were spread over,
    # and the bytes of token rows this rank sent to other ranks in the forward dispatch and combine
    max_ranks_per_token: int = 0
    sent_bytes: int = 0

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        routing = self.route(x)
        x_sorted, order = self.dispatch(x, routing)
        y_sorted = self._remote_experts(x_sorted, routing.counts)
        y = self.combine(y_sorted, order, routing, x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        n_local = self.gate.n_experts // self.ep_size
        ranks = torch.zeros(x.shape[0], self.ep_size, device=x.device)
        ranks.scatter_(1, routing.indices // n_local, 1.0)
        self.max_ranks_per_token = max(self.max_ranks_per_token, int(ranks.sum(1).max()))
        return y.view(shape), routing

    def _remote_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, d] sorted by global expert, counts [E] -> the experts' outputs [M, d], same order."""
        R, n_local = self.ep_size, self.gate.n_experts // self.ep_size
        send = counts.view(R, n_local)  # rows for each rank, per expert of that rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(-1), send.reshape(-1).contiguous(), group=self.ep_group)
        # recv[r, j]: rows rank r sends for local expert j
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = fc.all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.ep_group)  # [R rows, d]
        me = dist.get_rank(self.ep_group)  # rows for this rank's own experts never reach the wire
        row = x_sorted.shape[1] * x_sorted.element_size()
        self.sent_bytes += (sum(send_splits) - send_splits[me] + sum(recv_splits) - recv_splits[me]) * row
        # rows arrive grouped by source rank then expert; the experts want them grouped by expert
        key = torch.arange(n_local, device=recv.device).repeat(R) * R + torch.arange(R, device=recv.device
                                                                                  ).repeat_interleave(n_local)
        order = torch.repeat_interleave(key, recv.reshape(-1)).argsort(stable=True)  # [received rows]
        y_local = self.experts(x_recv[order], recv.sum(0))  # through the module: FSDP gathers its weights
        y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)  # back to source-rank order
        return fc.all_to_all_single_autograd(y_recv, send_splits, recv_splits, self.ep_group)


class LocalExperts(GroupedExperts):
    """This rank's experts: the local shards of the expert-sharded weights."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        return swiglu_experts(x, counts, w1, w2, w3, self.impl)


def apply_expert_parallel(module: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Parameter]:
    """Make every MoE in `module` expert-parallel over `ep_mesh`: its expert weights become DTensors sharded
    on dim 0 (each rank keeps its share of the full weights it was initialised with). Returns the expert
    parameters."""
    params = []
    for m in module.modules():
        if isinstance(m, MoE) and not isinstance(m, ExpertParallelMoE):
            for name in ("w1", "w2", "w3"):
                full = getattr(m.experts, name)
                sharded = nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)]))
                setattr(m.experts, name, sharded)
                params.append(sharded)
            m.__class__ = ExpertParallelMoE
            if type(m.experts) is GroupedExperts:  # a subclass (FP8's experts) reads its local shards itself
                m.experts.__class__ = LocalExperts
            m.ep_group, m.ep_size = ep_mesh.get_group(), ep_mesh.size()
    return params


def expert_stats(module: nn.Module) -> tuple[int, int]:
    """(most ranks one token reached, bytes sent) since the last call, over the MoE layers of `module`; resets."""
    ranks = sent = 0
    for m in module.modules():
        if isinstance(m, ExpertParallelMoE):
            ranks, sent = max(ranks, m.max_ranks_per_token), sent + m.sent_bytes
            m.max_ranks_per_token = m.sent_bytes = 0
    return ranks, sent
