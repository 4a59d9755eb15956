"""This rank's part of a model under a layout, made from the config alone: built on the meta device,
materialised on the rank's device, initialised parameter by parameter from the seed (so every layout starts
from the same weights as one process would), then parallelised from outside in torchtitan's order: expert
parallelism, then FSDP2."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3
from dsv3.parallel.dist import Dist
from dsv3.parallel.expert import apply_expert_parallel
from dsv3.parallel.fsdp import apply_fsdp
from dsv3.parallel.pipeline import prune


def build_model(cfg: ModelConfig, d: Dist, *, init_std: float, seed: int, bf16: bool, reshard: bool = True,
                convert: Callable[[DeepSeekV3], object] | None = None) -> DeepSeekV3:
    """This rank's model: the whole model, or with pipeline parallelism the parts of its stages (the others are
    placeholders, see `dsv3.parallel.pipeline`), parallelised over the data-parallel ranks of `d`. `convert`
    swaps modules after initialisation and before the parallelisms (FP8 training)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    if d.layout.pp > 1:
        prune(model, d.layout, d.pp_rank)
    model = model.to_empty(device=d.device)
    model.init_weights(init_std, seed=seed)
    if convert is not None:
        convert(model)
    parallelize(model, d, bf16=bf16, root=d.layout.pp == 1, reshard=reshard)
    return model


def parallelize(model: DeepSeekV3, d: Dist, *, bf16: bool, root: bool, reshard: bool = True) -> None:
    if d.layout.ep > 1:
        apply_expert_parallel(model, d.submesh("ep"))
    if d.layout.data_parallel > 1:
        apply_fsdp(model, d, bf16, root=root, reshard=reshard)
