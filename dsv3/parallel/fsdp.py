"""FSDP2 (`fully_shard`) over the data-parallel ranks, applied after expert parallelism (torchtitan's order).

Every block is one FSDP unit sharded over all dp x ep data-parallel ranks, and so are the embedding, the
final norm, the head and each MTP module. Routed experts that expert parallelism has split stay out of FSDP:
expert parallelism already divides them E ways, the dp ranks holding the same ones keep a copy each, and
`reduce_expert_grads` averages their gradients (as the DeepSeek-V3 layout keeps experts under EP and only
the rest under data-parallel sharding). Under bf16 the parameters are gathered in bf16 and the gradients
reduced in fp32; the master weights stay fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from dsv3.model.moe import MoE
from dsv3.model.transformer import Block, MTPModule
from dsv3.parallel.dist import Dist


def apply_fsdp(model: nn.Module, d: Dist, bf16: bool, *, root: bool = True, reshard: bool = True) -> None:
    """Shard `model` (the whole model, or the part a pipeline rank holds) over the data-parallel ranks of `d`:
    one unit per block, per MTP module, and for the embedding, the final norm and the head. `root` also wraps
    the model itself (when it is called as a whole: not under pipelining, where the stages call its parts).
    `reshard` frees each unit's gathered weights after its forward pass and gathers them again for the backward
    (ZeRO-3); without, they stay from the forward to the backward pass (ZeRO-2's memory, half the gathers)."""
    layout = d.layout
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    data = d.submesh("dp", "ep")
    expert_params = {p for m in model.modules() if isinstance(m, MoE) and layout.ep > 1
                     for p in m.experts.parameters()}
    # inner units first: an MTP module's block before the module. Its output norm is a unit of its own: the
    # shared head reads it outside the module's forward.
    units = []
    for m in reversed(list(model.modules())):
        if isinstance(m, MTPModule):
            units.append(m.norm)
        if isinstance(m, (Block, MTPModule)):
            units.append(m)
    units += [m for m in (getattr(model, name, None) for name in ("embed", "norm", "head")) if m is not None]
    for unit in units:
        if any(p not in expert_params for p in unit.parameters()):
            fully_shard(unit, mesh=data, mp_policy=mp, ignored_params=expert_params & set(unit.parameters()) or None,
                        reshard_after_forward=reshard)
    if root:
        fully_shard(model, mesh=data, mp_policy=mp, ignored_params=expert_params or None, reshard_after_forward=reshard)
        for method in ("run", "mtp_step"):
            register_fsdp_forward_method(model, method)


def reduce_expert_grads(model: nn.Module, d: Dist) -> None:
    """After the backward pass: average the expert-parallel gradients over every data-parallel rank. Each
    expert's gradient already sums the contributions of its expert group's ep ranks; the dp ranks holding the
    same experts add theirs here, and the sum is divided by all dp x ep ranks, as the loss is their mean."""
    if d.layout.ep == 1 or not d.distributed:
        return
    group = d.group("dp") if d.layout.dp_shard > 1 else None
    for m in model.modules():
        if isinstance(m, MoE):
            for p in m.experts.parameters():
                if p.grad is None:
                    continue
                local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                if group is not None:
                    dist.all_reduce(local, group=group)
                local.div_(d.layout.data_parallel)
