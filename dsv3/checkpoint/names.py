"""The one table between this model's parameter names and the Hugging Face checkpoint's.

Hugging Face (and DeepSeek's release) name tensors per layer as `model.layers.{i}.<suffix>`; routed experts
are stored one tensor per expert (`mlp.experts.{e}.gate_proj.weight`) and stacked here into [E, out, in];
MTP module k is stored as layer `num_hidden_layers + k - 1`, with copies of the embedding and output head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# per-layer suffix: HF -> ours (inside a Block)
BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    # V3.2's lightning indexer (sparse attention)
    "self_attn.indexer.wq_b.weight": "attn.indexer.wq_b.weight",
    "self_attn.indexer.wk.weight": "attn.indexer.wk.weight",
    "self_attn.indexer.k_norm.weight": "attn.indexer.k_norm.weight",
    "self_attn.indexer.k_norm.bias": "attn.indexer.k_norm.bias",
    "self_attn.indexer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
# mlp.experts.{e}.<proj>.weight -> slice e of ffn.experts.<w>
EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# MTP-only tensors of layer L + k - 1 -> mtp.{k-1}.<name>
MTP = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "norm.weight",
}
# copies of shared tensors that the release stores with every MTP layer
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}

# Tensors the release quantises to FP8 (with a sibling `weight_scale_inv`): attention projections (V3.2's
# indexer wq_b and wk among them), dense MLPs, routed and shared experts. Embeddings, heads, norms, the router,
# the indexer's head weights and MTP's own projections stay bf16/fp32.
_FP8_SUFFIXES = tuple(
    s for s in BLOCK if s.startswith(("self_attn.", "mlp.")) and "norm" not in s and not s.startswith("mlp.gate.")
    and not s.endswith("weights_proj.weight")
)

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


@dataclass(frozen=True)
class Target:
    """Where an HF tensor goes: our state-dict key, the expert slice it fills (or None), and whether it is
    a redundant copy of a shared tensor (MTP's embedding and head) that loading skips."""

    key: str
    expert: int | None = None
    copy_of_shared: bool = False


def hf_to_ours(name: str, n_layers: int, n_mtp: int) -> Target | None:
    """Map an HF tensor name to our state dict; None if the name means nothing to this model."""
    if name in TOP:
        return Target(TOP[name])
    m = _LAYER.fullmatch(name)
    if not m:
        return None
    i, suffix = int(m.group(1)), m.group(2)
    if i < n_layers:
        prefix = f"layers.{i}."
    elif i < n_layers + n_mtp:
        k = i - n_layers
        if suffix in MTP:
            return Target(f"mtp.{k}.{MTP[suffix]}")
        if suffix in MTP_COPIES:
            return Target(MTP_COPIES[suffix], copy_of_shared=True)
        prefix = f"mtp.{k}.block."
    else:
        return None
    if suffix in BLOCK:
        return Target(prefix + BLOCK[suffix])
    e = _EXPERT.fullmatch(suffix)
    if e:
        return Target(f"{prefix}ffn.experts.{EXPERT[e.group(2)]}", expert=int(e.group(1)))
    return None


def ours_to_hf(key: str, n_layers: int) -> str | None:
    """Inverse of hf_to_ours for everything but stacked experts (see `expert_names`)."""
    for hf, ours in TOP.items():
        if key == ours:
            return hf
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        i, rest = m.group(1), m.group(2)
    else:
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
        if not m:
            return None
        i, rest = str(n_layers + int(m.group(1))), m.group(2)
        for hf, ours in MTP.items():
            if rest == ours:
                return f"model.layers.{i}.{hf}"
        if not rest.startswith("block."):
            return None
        rest = rest[len("block.") :]
    for hf, ours in BLOCK.items():
        if rest == ours:
            return f"model.layers.{i}.{hf}"
    return None


def expert_names(key: str, n_layers: int, n_experts: int) -> list[str] | None:
    """For a stacked expert weight (`...ffn.experts.w1`), the HF names of its E slices, in order."""
    m = re.fullmatch(r"(layers|mtp)\.(\d+)\.(?:block\.)?ffn\.experts\.(w[123])", key)
    if not m:
        return None
    i = int(m.group(2)) + (n_layers if m.group(1) == "mtp" else 0)
    proj = {v: k for k, v in EXPERT.items()}[m.group(3)]
    return [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(n_experts)]


def is_fp8_in_release(name: str) -> bool:
    """Whether the released FP8 checkpoint stores this HF tensor in float8_e4m3fn with block scales."""
    m = _LAYER.fullmatch(name)
    return bool(m) and (m.group(2).endswith(_FP8_SUFFIXES) or bool(_EXPERT.fullmatch(m.group(2))))
