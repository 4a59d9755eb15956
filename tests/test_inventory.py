"""The tensor inventory: DESIGN's published counts, the release's FP8 choices, and `dsv3 info`, `dsv3 plan`
and `dsv3 cost` agreeing with each other and with counts derived here from the config alone."""

import json

import pytest
import torch
from random_configs import RANDOM_SEEDS, random_config
from safetensors import safe_open

from dsv3 import DeepSeekV3, preset, save_pretrained
from dsv3.cli import main
from dsv3.inventory import count_parameters, inventory, numel


def test_v3_matches_the_published_counts():
    v3 = preset("v3")
    entries = inventory(v3)
    assert numel(inventory(v3, mtp=False)) == 671_026_419_200
    assert numel(entries) == 682_636_487_424
    assert numel([e for e in entries if e.mtp == 1]) == 11_610_068_224
    mla = [e for e in entries if e.layer == 10 and e.name.startswith("layers.10.attn.")]
    assert numel(mla) == 187_107_328
    assert numel([e for e in entries if e.layer == 10 and e.is_expert]) == 256 * 44_040_192
    # The Hub's 684,531,386,000: main + MTP, MTP's copies of the embedding and head, and one fp32 scale per
    # 128 x 128 block of every FP8 matrix; the scale bytes are what nbytes("fp8") adds beyond 1 byte a weight.
    fp8 = [e for e in entries if e.fp8]
    scale_bytes = sum(e.nbytes("fp8") for e in fp8) - numel(fp8)
    assert numel(entries) + 2 * 129280 * 7168 + scale_bytes / 4 == 684_531_386_000
    counts = count_parameters(v3)
    assert (counts.active, counts.active_with_embedding) == (36_625_618_432, 37_552_297_472)


def test_fp8_flags_are_what_an_fp8_save_quantises(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = DeepSeekV3(cfg)
    model.init_weights()
    save_pretrained(model, tmp_path, fp8=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        quantised = {k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"}
    flagged = set()
    for e in inventory(cfg):
        if e.fp8:  # one HF tensor per expert on disk
            n = cfg.n_routed_experts if e.is_expert else 1
            flagged.add((e.name, n))
    assert len(quantised) == sum(n for _, n in flagged)
    assert all(not e.fp8 for e in inventory(cfg) if e.group in ("embedding", "head", "norm", "router", "mtp"))


def _non_matmul(cfg) -> int:
    """Norm weights and router biases, counted from the config alone: what active parameters hold beyond the
    matrices a token is multiplied by."""
    q_norm = cfg.q_lora_rank or 0
    norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + q_norm + cfg.kv_lora_rank) + cfg.hidden_size
    bias = cfg.n_moe_layers * cfg.n_routed_experts if cfg.uses_router_bias else 0
    return norms + bias


def _cli_json(capsys, *args):
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


CONFIGS = {"v3": preset("v3"), "v2-lite": preset("v2-lite"), **{f"random-{s}": random_config(s) for s in RANDOM_SEEDS}}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_info_plan_and_cost_agree(name, tmp_path, capsys):
    cfg = CONFIGS[name]
    cfg.save(tmp_path / "config.json")
    source = ["--config", str(tmp_path / "config.json")]
    info = _cli_json(capsys, "info", *source, "--seq-len", "64")
    serve = _cli_json(capsys, "plan", "serve", *source, "--weights", "bf16", "--gpus", "1", "--mtp")
    cost = _cli_json(capsys, "cost", *source, "--seq-len", "64", "--tokens", "1M", "--mfu", "0.5")
    # the stored tensors: every one at 2 bytes in bf16, the router bias at 4
    moe_blocks = cfg.n_moe_layers + cfg.num_nextn_predict_layers  # MTP blocks are MoE blocks
    bias = moe_blocks * cfg.n_routed_experts if cfg.uses_router_bias else 0
    assert serve["weight_bytes"] == 2 * info["total_with_mtp_params"] + 2 * bias
    assert serve["cache_bytes_per_token"] == info["cache_bytes_per_token_absorbed_bf16"] * cfg.n_layers_with_mtp / \
        cfg.num_hidden_layers
    # FLOPs: forward without MTP is what info prints; cost's training FLOPs are 3x forward with MTP
    forward = {k: v / 3 for k, v in cost["flops_per_token_breakdown"].items()}
    assert info["forward_flops_per_token"] == pytest.approx(sum(forward.values()) - forward["mtp"], rel=1e-12)
    # and, from the config alone: 2 FLOPs per active matrix weight plus the attention core at T/2 keys
    core = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * 32 * (cfg.qk_head_dim + cfg.v_head_dim)
    assert forward["attn_core"] == pytest.approx(core, rel=1e-12)
    assert info["forward_flops_per_token"] - core == 2 * (info["active_params"] - _non_matmul(cfg))
