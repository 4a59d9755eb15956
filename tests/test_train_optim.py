"""The learning-rate schedule (DeepSeek-V3's shape scaled to the run) and AdamW's parameter groups."""

import math

import pytest
import torch

from dsv3 import DeepSeekV3, preset
from dsv3.train import TrainConfig
from dsv3.train.optim import CONSTANT_END, COSINE_END, LAST_TAIL_RATIO, TAIL_END, build_optimizer, lr_at, param_groups


def test_schedule_matches_the_published_shape_at_deepseek_scale():
    # DeepSeek-V3: peak 2.2e-4 after 2K warm-up steps, constant to 10T tokens, cosine to 2.2e-5 at 14.3T,
    # 2.2e-5 for 333B tokens, then 7.3e-6. One step per billion tokens here: 14,800 steps.
    cfg = TrainConfig(lr=2.2e-4, min_lr_ratio=0.1, warmup=2000 / 14800)
    n = 14800
    assert lr_at(0, n, cfg) == pytest.approx(2.2e-4 / 2000)
    assert lr_at(999, n, cfg) == pytest.approx(2.2e-4 / 2)
    assert lr_at(1999, n, cfg) == pytest.approx(2.2e-4)
    assert lr_at(9999, n, cfg) == pytest.approx(2.2e-4)  # constant until 10T
    assert lr_at(10000, n, cfg) == pytest.approx(2.2e-4)  # cosine starts at the peak
    assert lr_at(12150, n, cfg) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-3)  # cosine midpoint
    assert lr_at(14299, n, cfg) == pytest.approx(2.2e-5, rel=1e-3)
    assert lr_at(14300, n, cfg) == pytest.approx(2.2e-5)
    assert lr_at(14632, n, cfg) == pytest.approx(2.2e-5)
    assert lr_at(14634, n, cfg) == pytest.approx(7.3e-6)
    assert lr_at(14799, n, cfg) == pytest.approx(7.3e-6)


def test_schedule_phases_scale_with_the_run_and_never_increase_after_warmup():
    cfg = TrainConfig(lr=1e-3, warmup=0.05)
    n = 200
    lrs = [lr_at(s, n, cfg) for s in range(n)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert all(b <= a + 1e-15 for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[math.ceil(CONSTANT_END * n) - 1] == pytest.approx(1e-3)
    assert lrs[math.ceil(COSINE_END * n)] == pytest.approx(1e-4)
    assert lrs[math.ceil(TAIL_END * n)] == pytest.approx(1e-3 * LAST_TAIL_RATIO)


def test_one_step_run_warms_up_in_one_step():
    assert lr_at(0, 1, TrainConfig(lr=1e-3, warmup=0.03)) == pytest.approx(1e-3)


def test_weight_decay_applies_to_matrices_only():
    model = DeepSeekV3(preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"embed.weight", "head.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.gate.weight"} <= decayed
    assert "layers.0.attn_norm.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_uses_published_betas():
    opt = build_optimizer(DeepSeekV3(preset("tiny")), TrainConfig())
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert isinstance(opt, torch.optim.AdamW)
