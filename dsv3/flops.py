"""Matmul FLOPs per token of a DeepSeek-V3 model (and of a dense GQA transformer, for comparison).

Conventions, the same for every function here:
- A multiply-add is 2 FLOPs; an [m, k] x [k, n] matmul costs 2 m k n. Only matmuls are counted:
  norms, RoPE, softmax, SiLU, routing top-k and the weighted combine are elementwise and add well
  under 1% at any realistic size. The embedding lookup costs 0 FLOPs.
- The projections are read off the model's own tensors (`dsv3.inventory`): a weight matrix applied
  to every token costs 2 x its size per token, so parameter counts, memory plans and FLOPs describe
  one and the same set of tensors.
- The attention core (q k^T and p v) of a causal model at sequence length T is averaged over the
  T queries of a sequence: each query sees T/2 keys on average, so the core costs
  2 H T/2 (qk_dim + v_dim) per token per layer. `causal=False` counts all T keys, which is what a
  kernel that computes the full T x T score matrix and masks it afterwards does.
- Backward costs 2x forward (a gradient for the input and one for the weight of every matmul), so
  training = 3x forward, for every component.
- MTP module k (DeepSeek-V3 section 2.2) runs over the first T - k positions of a sequence: its
  eh_proj, its MLA + MoE block (attention core at length T - k) and the shared output head,
  scaled by (T - k) / T to give FLOPs per training token. MTP is counted only when asked for; by
  default it is included in training totals when the config has MTP modules and left out of
  forward (inference) totals, where the modules are usually dropped.
- MoE layers count the routed experts a token actually uses (num_experts_per_tok of them), the
  shared experts and the router's [d, E] scoring matmul; tokens are never dropped.
- Sparse attention (V3.2): the lightning indexer's projections count as attention projections; its
  scoring q . k (index_n_heads x index_head_dim against every earlier key) is `index_core`; the
  attention core sees at most index_topk keys per query: averaged over a causal sequence of T > K tokens,
  K - K^2 / 2T keys, so it stops growing with T while the indexer's core keeps growing (at 2 J D per key
  against MLA's 2 H (qk + v): 16,384 against 81,920 at V3.2's sizes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.inventory import inventory


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per token by component; `.total` is their sum (forward, or forward + backward when training)."""

    attn_proj: float = 0.0  # query, key/value (latent down + up) and output projections
    attn_core: float = 0.0  # q k^T and p v
    index_core: float = 0.0  # sparse attention: the indexer's q . k over every earlier key
    dense_mlp: float = 0.0  # SwiGLU of the first_k_dense_replace dense layers
    routed_experts: float = 0.0  # the num_experts_per_tok routed experts each token is sent to
    shared_experts: float = 0.0
    router: float = 0.0  # expert scores x W_g^T
    head: float = 0.0  # output projection to the vocabulary
    mtp: float = 0.0  # all MTP modules: eh_proj, block and their use of the shared head

    @property
    def total(self) -> float:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, float]:
        """Component name -> FLOPs per token (without the total)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def scaled(self, factor: float) -> FlopsBreakdown:
        return FlopsBreakdown(**{k: v * factor for k, v in self.as_dict().items()})

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        return FlopsBreakdown(**{k: v + getattr(other, k) for k, v in self.as_dict().items()})


def attention_keys(seq_len: int, causal: bool = True, topk: int | None = None) -> float:
    """Keys each query attends to, on average over a sequence of seq_len tokens; at most `topk` each."""
    if topk is not None and topk < seq_len:
        return topk - topk * topk / (2 * seq_len) if causal else float(topk)
    return seq_len / 2 if causal else float(seq_len)


def mla_core_flops(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one MLA's q k^T (qk_head_dim wide) and p v (v_head_dim wide), over the
    index_topk selected keys with sparse attention."""
    keys = attention_keys(seq_len, causal, cfg.index_topk if cfg.uses_dsa else None)
    return 2.0 * cfg.num_attention_heads * keys * (cfg.qk_head_dim + cfg.v_head_dim)


def index_core_flops(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one lightning indexer's scores (0 without sparse attention)."""
    if not cfg.uses_dsa:
        return 0.0
    return 2.0 * cfg.index_n_heads * cfg.index_head_dim * attention_keys(seq_len, causal)


# which component of the breakdown each inventory group's matmuls count toward (main model)
_COMPONENT = {"attention": "attn_proj", "dense_mlp": "dense_mlp", "routed_experts": "routed_experts",
              "shared_experts": "shared_experts", "router": "router", "head": "head"}


def mtp_module_flops(cfg: ModelConfig, seq_len: int, causal: bool = True, k: int = 1) -> float:
    """Forward FLOPs per token MTP module k runs on: its own matrices (eh_proj [2d -> d] and one MoE block),
    its attention core at seq_len, and the shared head."""
    entries = inventory(cfg)
    head = sum(e.forward_flops(cfg) for e in entries if e.group == "head")
    own = sum(e.forward_flops(cfg) for e in entries if e.mtp == k)
    return own + mla_core_flops(cfg, seq_len, causal) + index_core_flops(cfg, seq_len, causal) + head


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, training: bool = False, mtp: bool | None = None, causal: bool = True
) -> FlopsBreakdown:
    """FLOPs per token of `cfg` on sequences of `seq_len` tokens, by component (see the module docstring),
    counted from the model's own tensors (`dsv3.inventory`).

    training: forward + backward (3x forward) instead of forward only.
    mtp: count the MTP modules; None means "when training and the config has them".
    causal: average T/2 keys per query (True) or count all T (False, a full score matrix).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    parts = dict.fromkeys(_COMPONENT.values(), 0.0)
    for e in inventory(cfg, mtp=False):
        if e.group in _COMPONENT:
            parts[_COMPONENT[e.group]] += e.forward_flops(cfg)
    L = cfg.num_hidden_layers
    out = FlopsBreakdown(**parts, attn_core=L * mla_core_flops(cfg, seq_len, causal),
                         index_core=L * index_core_flops(cfg, seq_len, causal))
    if mtp is None:
        mtp = training and cfg.num_nextn_predict_layers > 0
    if mtp:
        # module k predicts from positions 0..T-k-1 only, at attention length T - k
        per_seq = sum(
            (seq_len - k) * mtp_module_flops(cfg, seq_len - k, causal, k)
            for k in range(1, cfg.num_nextn_predict_layers + 1)
            if seq_len > k
        )
        out = out + FlopsBreakdown(mtp=per_seq / seq_len)
    return out.scaled(3.0) if training else out


@dataclass(frozen=True)
class DenseTransformer:
    """A dense decoder with grouped-query attention and a SwiGLU MLP (Llama-style), for cost comparisons."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def dense_flops_per_token(
    model: DenseTransformer, seq_len: int, *, training: bool = False, causal: bool = True
) -> FlopsBreakdown:
    """FLOPs per token of a dense GQA transformer, with the same conventions as `flops_per_token`."""
    d, hd = model.hidden_size, model.head_dim
    q_and_o = 2 * d * model.num_heads * hd
    k_and_v = 2 * d * model.num_kv_heads * hd  # grouped-query: few key/value heads
    per_layer = FlopsBreakdown(
        attn_proj=2.0 * (q_and_o + k_and_v),
        attn_core=2.0 * model.num_heads * attention_keys(seq_len, causal) * 2 * hd,
        dense_mlp=2.0 * 3 * d * model.intermediate_size,
    )
    out = per_layer.scaled(model.num_layers) + FlopsBreakdown(head=2.0 * d * model.vocab_size)
    return out.scaled(3.0) if training else out
