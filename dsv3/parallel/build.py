"""This rank's part of a model under a layout, made from the config alone: built on the meta device,
materialised on the rank's device, initialised parameter by parameter from the seed (so every layout starts
from the same weights as one process would), then parallelised from outside in torchtitan's order: expert
parallelism, then regional compilation, then FSDP2."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3
from dsv3.model.moe import GroupedExperts
from dsv3.model.transformer import Block
from dsv3.parallel.dist import Dist
from dsv3.parallel.expert import apply_expert_parallel
from dsv3.parallel.fsdp import apply_fsdp
from dsv3.parallel.pipeline import prune


def build_model(cfg: ModelConfig, d: Dist, *, init_std: float, seed: int, bf16: bool, reshard: bool = True,
                convert: Callable[[DeepSeekV3], object] | None = None, compile: bool = False) -> DeepSeekV3:
    """This rank's model: the whole model, or with pipeline parallelism the parts of its stages (the others are
    placeholders, see `dsv3.parallel.pipeline`), parallelised over the data-parallel ranks of `d`. `convert`
    swaps modules after initialisation and before the parallelisms (FP8 training); `compile` compiles each
    block (`apply_compile`)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    if d.layout.pp > 1:
        prune(model, d.layout, d.pp_rank)
    model = model.to_empty(device=d.device)
    model.init_weights(init_std, seed=seed)
    if convert is not None:
        convert(model)
    parallelize(model, d, bf16=bf16, root=d.layout.pp == 1, reshard=reshard, compile=compile)
    return model


def parallelize(model: DeepSeekV3, d: Dist, *, bf16: bool, root: bool, reshard: bool = True,
                compile: bool = False) -> None:
    if d.layout.ep > 1:
        apply_expert_parallel(model, d.submesh("ep"))
    if compile:
        apply_compile(model)
    if d.layout.data_parallel > 1:
        apply_fsdp(model, d, bf16, root=root, reshard=reshard)


def apply_compile(model: DeepSeekV3) -> None:
    """Regional compilation, as torchtitan does it: each transformer block (the MTP modules' too) is compiled on
    its own, in place (`Module.compile`, so parameter names and checkpoints do not change); the embedding, head
    and loss stay eager. Every block runs the same code and dynamo treats parameters as inputs, so one compiled
    graph serves all the MoE layers of a pass (another the dense layers, another the MTP block, whose inputs
    differ): compile time does not grow with depth.

    Shapes are static (`dynamic=False`): a training run's shapes never change. What is data-dependent stays out
    of the graphs: the router's `torch.bincount` (its output shape depends on the data, so dynamo breaks the
    graph there) and the routed experts themselves (`torch.compiler.disable`): their grouped matmuls are library
    kernels either way, and eagerly they also run where inductor cannot trace them (fp32, whose grouped matmul
    has no fake-tensor rule; FP8's per-expert loop; expert parallelism's exchanges). Measured on the CPU at the
    small preset, leaving them out costs nothing. Passes of other shapes (evaluation's last batch, sampling)
    should run under `torch.compiler.set_stance("force_eager")` rather than compile a graph per shape."""
    for m in model.modules():
        if isinstance(m, Block):
            m.compile(dynamic=False)
        elif isinstance(m, GroupedExperts):
            m.forward = torch.compiler.disable(m.forward)
