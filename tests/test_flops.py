"""Analytic FLOPs against exact parameter arithmetic and against PyTorch's FlopCounterMode on real models."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from random_configs import RANDOM_SEEDS, random_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsv3 import DeepSeekV3, preset
from dsv3.flops import FlopsBreakdown, flops_per_token, mla_core_flops, mtp_module_flops

# DESIGN section 5: active parameters per token (excluding the embedding) of the v3 preset. Of those,
# norm weights (61 x (2 x 7168 + 1536 + 512) + 7168) and router biases (58 x 256) are not matmul weights.
V3_ACTIVE = 36_625_618_432
V3_NON_MATMUL = 61 * (2 * 7168 + 1536 + 512) + 7168 + 58 * 256


def test_v3_forward_flops_are_twice_the_active_matmul_weights():
    f = flops_per_token(preset("v3"), 4096)
    assert f.mtp == 0  # inference leaves the MTP modules out
    assert f.total - f.attn_core == 2 * (V3_ACTIVE - V3_NON_MATMUL)
    # MLA core at 4096: 128 heads x 2048 keys on average x (192 + 128) wide, 2 FLOPs a multiply-add, 61 layers
    assert f.attn_core == 61 * 2 * 128 * 2048 * (192 + 128)


def test_training_is_three_times_forward_in_every_component():
    cfg = preset("v3")
    fwd = flops_per_token(cfg, 4096, mtp=True)
    train = flops_per_token(cfg, 4096, training=True)
    for name, value in fwd.as_dict().items():
        assert getattr(train, name) == pytest.approx(3 * value, rel=1e-12), name
    assert train.total == pytest.approx(3 * fwd.total, rel=1e-12)


def test_mtp_counted_over_the_positions_it_predicts_from():
    cfg = preset("v3")
    T = 4096
    f = flops_per_token(cfg, T, mtp=True)
    assert f.mtp == pytest.approx((T - 1) / T * mtp_module_flops(cfg, T - 1), rel=1e-12)
    # eh_proj [2d -> d], one MoE block's matmuls (1 MLA + 9 experts + router), the head
    block = 2 * (187_107_328 - 1536 - 512 + 9 * 44_040_192 + 256 * 7168) + mla_core_flops(cfg, T - 1)
    assert mtp_module_flops(cfg, T - 1) == 2 * 2 * 7168**2 + block + 2 * 7168 * 129280
    assert flops_per_token(preset("v2-lite"), T, training=True).mtp == 0  # no MTP modules in the config


def test_causal_core_is_half_the_full_score_matrix():
    cfg = preset("small")
    causal, full = flops_per_token(cfg, 1024), flops_per_token(cfg, 1024, causal=False)
    assert causal.attn_core * 2 == full.attn_core
    assert causal.total - causal.attn_core == full.total - full.attn_core


def test_breakdown_sums_and_rejects_empty_sequences():
    f = FlopsBreakdown(attn_proj=1, attn_core=2, head=4, mtp=8)
    assert f.total == 15 and (f + f).total == 30 and f.scaled(3).total == 45
    with pytest.raises(ValueError):
        flops_per_token(preset("tiny"), 0)


# ----- agreement with PyTorch's own counter --------------------------------------------------------
#
# FlopCounterMode counts what kernels do. Two facts make the comparison like with like:
# - torch's CPU flash-attention op has no FLOP formula, so the core would go uncounted; the math backend
#   runs it as plain bmm calls over the full T x T score matrix, hence `causal=False` on our side;
# - dsv3's MLA pads v with zeros to the q/k width before SDPA when v_head_dim < qk_head_dim (a CPU
#   speed fix), so p v really costs qk_head_dim per key: 2 H S (qk - v) more per token per attention.
# With those two stated, the analytic count must agree (the issue asks for 1%; it is exact).

SHAPES = {
    "tiny": {},
    "no_q_lora_softmax_v_eq_qk": dict(
        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, scoring_func="softmax",
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    ),
    "3_layers_2_dense_2_shared_2_mtp": dict(
        num_hidden_layers=3, first_k_dense_replace=2, n_shared_experts=2, num_nextn_predict_layers=2,
        n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
    ),
    "all_moe_no_shared_wide_v": dict(first_k_dense_replace=0, n_shared_experts=0, v_head_dim=32),
}


def _padding_flops(cfg, T: int) -> float:
    """FLOPs per sequence that the zero-padded v adds to the p v products, over main layers and MTP modules."""
    pad = max(0, cfg.qk_head_dim - cfg.v_head_dim)
    lengths = [T] * cfg.num_hidden_layers + [T - k for k in range(1, cfg.num_nextn_predict_layers + 1)]
    return sum(2 * cfg.num_attention_heads * S * S * pad for S in lengths)


def _count(model, ids, backward: bool) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model.run(ids, mtp=True)
        if backward:
            V = out.logits.shape[-1]
            loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
            for k, logits in enumerate(out.mtp_logits, start=1):
                loss = loss + F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, k + 1 :].reshape(-1))
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", list(SHAPES) + [f"random-{s}" for s in RANDOM_SEEDS])
def test_agrees_with_flop_counter_mode(shape):
    torch.manual_seed(0)
    if shape.startswith("random-"):
        cfg = random_config(int(shape.removeprefix("random-")))
    else:
        cfg = dataclasses.replace(preset("tiny"), **SHAPES[shape])
    model = DeepSeekV3(cfg, attn_impl="naive", experts_impl="loop")  # torch._grouped_mm has no FLOP formula
    model.init_weights()
    B, T = 2, 48
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    for training in (False, True):
        analytic = flops_per_token(cfg, T, training=training, mtp=True, causal=False).total * B * T
        analytic += (3 if training else 1) * B * _padding_flops(cfg, T)
        counted = _count(model, ids, backward=training)
        assert counted == pytest.approx(analytic, rel=1e-9), (shape, training)
