"""Every stored tensor of a model, read off the model itself: the one description that parameter counts
(`dsv3 info`), memory plans (`dsv3 plan`) and FLOPs (`dsv3 cost`, MFU) are all derived from.

The model is built on the meta device (nothing is allocated; V3's 671B parameters take about a second) and
its `state_dict()` is walked once per configuration. Each tensor is classified by where it sits:

    group           tensors                                              forward FLOPs per token
    embedding       embed                                                0 (a lookup)
    attention       wq / wq_a, wq_b, wkv_a, wkv_b, wo                    2 x numel
    norm            every RMSNorm weight                                 0
    dense_mlp       w1, w2, w3 of the first_k_dense_replace blocks       2 x numel
    router          gate.weight [E, d]                                   2 x numel
    router_bias     gate.bias [E] (fp32 whatever the dtype)              0
    routed_experts  experts.w1/w2/w3 [E, out, in]                        2 x numel x K / E
    shared_experts  shared_experts.w1/w2/w3                              2 x numel
    head            head [V, d]                                          2 x numel
    mtp             an MTP module's eh_proj and its three norms          2 x numel (eh_proj)

An MTP module's block holds the usual groups, with `mtp` set to the module's number; the module also uses
the shared head, which it does not store.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from dsv3.checkpoint import names
from dsv3.config import ModelConfig
from dsv3.fp8 import block_scale_shape
from dsv3.model import DeepSeekV3

BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
_TOP = {"embed.weight": "embedding", "head.weight": "head", "norm.weight": "norm"}
MATMUL_GROUPS = ("attention", "dense_mlp", "router", "routed_experts", "shared_experts", "head", "mtp")


@dataclass(frozen=True)
class Entry:
    """One stored tensor."""

    name: str  # its state-dict key
    shape: tuple[int, ...]
    group: str  # see the module docstring
    layer: int | None  # its block (MTP module k: cfg.mtp_layer_index(k)); None: embedding, final norm, head
    mtp: int | None  # the MTP module (1-based) it belongs to; None: the main model
    fp8: bool  # e4m3 with 128x128 block scales in DeepSeek's FP8 release
    fp32: bool  # kept in fp32 whatever the precision (the router's selection bias)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_expert(self) -> bool:
        return self.group == "routed_experts"

    def nbytes(self, precision: str) -> float:
        """Bytes stored at `precision`: fp32 or bf16 throughout, or fp8 (FP8 matrices at one byte plus an fp32
        scale per 128 x 128 block, the rest bf16). The router bias is fp32 in every case."""
        if self.fp32:
            return 4.0 * self.numel
        if precision == "fp8":
            if not self.fp8:
                return 2.0 * self.numel
            rb, cb = block_scale_shape(self.shape[-2:])
            return self.numel + 4.0 * rb * cb * (self.numel // (self.shape[-1] * self.shape[-2]))
        return float(BYTES[precision] * self.numel)

    def forward_flops(self, cfg: ModelConfig) -> float:
        """Matmul FLOPs this tensor costs per token in a forward pass (a multiply-add is 2): each token goes
        through the K of E routed experts it is sent to, and through every other matrix once."""
        if self.group not in MATMUL_GROUPS or len(self.shape) < 2:
            return 0.0
        if self.is_expert:
            return 2.0 * self.numel * cfg.num_experts_per_tok / cfg.n_routed_experts
        return 2.0 * self.numel


def _group(key: str) -> str:
    if key in _TOP:
        return _TOP[key]
    inner = key.split(".", 2)[2] if key.startswith(("layers.", "mtp.")) else key
    if key.startswith("mtp.") and not inner.startswith("block."):
        return "mtp"  # enorm, hnorm, eh_proj, norm
    inner = inner.removeprefix("block.")
    if inner.endswith("norm.weight"):
        return "norm"
    if inner.startswith("attn."):
        return "attention"
    if inner.startswith("ffn.gate."):
        return "router_bias" if inner.endswith("bias") else "router"
    if inner.startswith("ffn.experts."):
        return "routed_experts"
    if inner.startswith("ffn.shared_experts."):
        return "shared_experts"
    return "dense_mlp"


def _hf_name(key: str, cfg: ModelConfig) -> str | None:
    """The HF name of the tensor (of its first expert, for stacked experts: all share one rule)."""
    first_expert = names.expert_names(key, cfg.num_hidden_layers, 1)
    return first_expert[0] if first_expert else names.ours_to_hf(key, cfg.num_hidden_layers)


@functools.lru_cache(maxsize=16)
def _inventory(config_json: str) -> tuple[Entry, ...]:
    cfg = ModelConfig.from_hf(json.loads(config_json))
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    entries = []
    for key, t in model.state_dict().items():
        parts = key.split(".")
        mtp = int(parts[1]) + 1 if parts[0] == "mtp" else None
        layer = int(parts[1]) if parts[0] == "layers" else cfg.mtp_layer_index(mtp) if mtp else None
        hf = _hf_name(key, cfg)
        group = _group(key)
        entries.append(Entry(key, tuple(t.shape), group, layer, mtp, fp8=bool(hf) and names.is_fp8_in_release(hf),
                             fp32=group == "router_bias"))
    return tuple(entries)


def inventory(cfg: ModelConfig, *, mtp: bool = True) -> list[Entry]:
    """Every stored tensor of a model with this config, in state-dict order (MTP modules last, left out when
    `mtp` is False). Cached per configuration."""
    entries = _inventory(json.dumps(cfg.to_hf(), sort_keys=True))
    return [e for e in entries if mtp or e.mtp is None]


def numel(entries: list[Entry]) -> int:
    return sum(e.numel for e in entries)


def nbytes(entries: list[Entry], precision: str) -> float:
    return sum(e.nbytes(precision) for e in entries)


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
    entries = inventory(cfg)
    main = [e for e in entries if e.mtp is None]
    embedding = numel([e for e in main if e.group == "embedding"])
    routed = numel([e for e in main if e.is_expert])
    total = numel(main)
    active = total - embedding - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return ParamCounts(total=total, embedding=embedding, routed_experts=routed, active=active,
                       mtp=numel(entries) - total)


def naive_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """What a per-head K/V cache would hold per token over the main layers: H * (nope + rope + v) numbers per
    layer (40,960 for V3), the figure MLA's latent cache is measured against."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * bytes_per_value
