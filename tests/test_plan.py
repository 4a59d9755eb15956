"""Memory planning: the known serving answers for DeepSeek-V3, training layouts, and the command."""

import dataclasses
import json

import pytest
import torch

from dsv3 import DeepSeekV3, preset
from dsv3.cli import main
from dsv3.errors import InvalidValue
from dsv3.hardware import GPUS
from dsv3.inventory import inventory, numel
from dsv3.model.attention import AttentionContext
from dsv3.plan import (
    GpuLayout,
    TrainPrecision,
    block_activation_numbers,
    cache_bytes_per_token,
    min_gpus_table,
    plan_serving,
    plan_training,
)

GiB = 2**30


def test_v3_fp8_serves_on_8_h200_not_on_8_h100():
    v3 = preset("v3")
    h200 = plan_serving(v3, GPUS["h200"], 8, weights="fp8")
    h100 = plan_serving(v3, GPUS["h100"], 8, weights="fp8")
    assert h200.fits and not h100.fits
    assert h100.cache_tokens == 0
    assert 600 * GiB < h200.weight_bytes < 640 * GiB  # ~671B one-byte weights + bf16 embedding/head + scales
    assert h200.cache_tokens * h200.cache_bytes_per_token <= h200.cache_budget_bytes
    assert not plan_serving(v3, GPUS["h200"], 8, weights="bf16").fits  # 1.34 TB of bf16 weights
    table = min_gpus_table(h200)
    assert table["h200"] <= 8 < table["h100"] and table["b200"] <= table["h200"]


def test_min_gpus_is_the_smallest_count_that_fits():
    v3 = preset("v3")
    for gpu in GPUS.values():
        ask = dict(weights="fp8", cache="fp8", context=131072, batch=16)
        n = plan_serving(v3, gpu, 1, **ask).min_gpus(gpu)
        assert plan_serving(v3, gpu, n, **ask).fits
        assert n == 1 or not plan_serving(v3, gpu, n - 1, **ask).fits


def test_latent_cache_bytes():
    v3 = preset("v3")
    assert cache_bytes_per_token(v3) == 70_272  # 61 layers x 576 numbers x 2 bytes (DESIGN section 3)
    assert cache_bytes_per_token(v3, "fp8") == 61 * (512 + 4 * 4 + 2 * 64)
    assert cache_bytes_per_token(v3, mtp=True) == 62 * 576 * 2
    plan = plan_serving(v3, GPUS["h200"], 8, context=4096, batch=10)
    assert plan.needed_bytes == plan.weight_bytes + 4096 * 10 * 70_272


def test_training_states_follow_the_zero_stage():
    cfg = preset("small")
    n = numel(inventory(cfg))
    fp32_bias = sum(w.numel for w in inventory(cfg) if w.fp32)
    full = plan_training(cfg, GPUS["h100"], GpuLayout(8, zero=0)).stages[0]
    assert full.master == 4 * n and full.grads == 4 * n
    assert full.optimizer == 2 * (2 * (n - fp32_bias) + 4 * fp32_bias)  # two bf16 moments; the bias stays fp32
    for zero in (1, 2, 3):
        s = plan_training(cfg, GPUS["h100"], GpuLayout(8, zero=zero)).stages[0]
        assert s.optimizer == pytest.approx(full.optimizer / 8)
        assert s.grads == pytest.approx(full.grads / (8 if zero >= 2 else 1))
        assert s.master == pytest.approx(full.master / (8 if zero >= 3 else 1))
    # experts split 4 ways and then sharded over the 2 ranks holding the same experts: still 1/8 of everything
    ep = plan_training(cfg, GPUS["h100"], GpuLayout(8, ep=4, zero=3)).stages[0]
    assert ep.master == pytest.approx(full.master / 8)
    # without sharding, expert parallelism alone divides only the experts
    ep0 = plan_training(cfg, GPUS["h100"], GpuLayout(8, ep=4, zero=0)).stages[0]
    experts = sum(w.numel for w in inventory(cfg) if w.is_expert)
    assert ep0.master == pytest.approx(4 * (n - experts + experts / 4))


def test_pipeline_stages_and_activations():
    v3 = preset("v3")
    plan = plan_training(v3, GPUS["h800"], GpuLayout(2048, pp=16, ep=64, zero=1), TrainPrecision(compute="fp8"))
    blocks = [i for s in plan.stages for i in s.blocks]
    assert blocks == list(range(62))  # 61 blocks, then the MTP module on the last stage
    assert all(s.activations_recompute < s.activations for s in plan.stages)
    assert plan.fits(recompute=True)
    one = plan_training(v3, GPUS["h800"], GpuLayout(2048, pp=16, ep=64, zero=1, micro_batch=1)).stages[1]
    two = plan_training(v3, GPUS["h800"], GpuLayout(2048, pp=16, ep=64, zero=1, micro_batch=2)).stages[1]
    assert two.activations == pytest.approx(2 * one.activations)  # a middle stage: no logits
    assert one.activations == pytest.approx(2 * 4096 * 15 * sum(block_activation_numbers(v3, i) for i in one.blocks))


def test_activation_estimate_against_what_the_eager_model_keeps():
    """The estimate counts what a fused implementation keeps; dsv3's eager blocks keep more (fp32 copies in
    RMSNorm, the fp32 router and combine), measured here from the tensors autograd saves: 1-2.5x the estimate."""
    cfg = dataclasses.replace(preset("small"), num_hidden_layers=2)
    model = DeepSeekV3(cfg).to(torch.bfloat16)
    model.init_weights()
    B, T = 2, 128
    positions = torch.arange(T).expand(B, T)
    ctx = AttentionContext.build(positions, model.rope(positions), cached=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {ctx.rotation.untyped_storage().data_ptr()}
    for i, block in enumerate(model.layers):
        saved = {}

        def pack(t, saved=saved):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(B, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, ctx)
        ratio = sum(saved.values()) / (2 * B * T * block_activation_numbers(cfg, i))
        assert 1.0 <= ratio < 2.5, (i, ratio)


def test_layout_errors_name_the_field():
    v3 = preset("v3")
    with pytest.raises(InvalidValue, match="gpus=10 must be a multiple of the 4 pipeline stages"):
        plan_training(v3, GPUS["h800"], GpuLayout(10, pp=4))
    with pytest.raises(InvalidValue, match="ep=3 must divide"):
        plan_training(v3, GPUS["h800"], GpuLayout(12, ep=3))
    with pytest.raises(InvalidValue, match="ep=512 must divide the model's 256 routed experts"):
        plan_training(v3, GPUS["h800"], GpuLayout(1024, ep=512))
    with pytest.raises(InvalidValue, match="memory_utilization=1.5"):
        plan_serving(v3, GPUS["h200"], 8, memory_utilization=1.5)


@pytest.mark.parametrize("args, message", [
    (["train", "--gpus", "10", "--pp", "4"], "--gpus 10 must be a multiple of the 4 pipeline stages"),
    (["train", "--gpus", "1024", "--ep", "512"], "--ep 512 must divide the model's 256 routed experts"),
    (["serve", "--memory-utilization", "1.5"], "--memory-utilization 1.5 must be a fraction in (0, 1]"),
    (["serve", "--context", "0"], "--context 0 must be at least 1"),
])
def test_cli_errors_name_the_flag(args, message, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ----- the command ------------------------------------------------------------------------------------


def test_cli_serve(capsys):
    assert main(["plan", "serve", "--preset", "v3", "--gpu", "h200", "--gpus", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["min_gpus"]["h200"] <= 8 and out["cache_bytes_per_token"] == 70_272
    assert main(["plan", "serve", "--preset", "v3", "--gpu", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "GiB" in out and "h200" in out


def test_cli_train(capsys):
    args = ["plan", "train", "--preset", "v3", "--gpu", "h800", "--gpus", "2048", "--pp", "16", "--ep", "64",
            "--zero", "1", "--compute", "fp8"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"]["full_recompute"] and len(out["stages"]) == 16 and out["dp"] == 128
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "full recomputation" in out and "AdamW moments (2 x bf16)" in out and "working weights (fp8)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--gpu", "tpu"], "--gpu 'tpu' is not a GPU of the table"),
        (["serve", "--gpus", "0"], "--gpus 0 must be at least 1"),
        (["train", "--pp", "3"], "--gpus 2048 must be a multiple of the 3 pipeline stages"),
        (["serve", "--config", "/nonexistent/config.json"], "no config file"),
    ],
)
def test_cli_bad_input_exits_2(args, message, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_traffic_per_step_by_hand():
    """The bytes each GPU sends, recomputed here from the config: the all-to-all from K copies per token and
    MoE layer, plain data parallelism from the gradients, and the pipeline boundaries each schedule crosses."""
    tiny = preset("tiny")  # 2 blocks (1 dense, 1 MoE) and 1 MTP module (MoE): 2 routers
    lay = GpuLayout(4, ep=2, zero=0, micro_batch=2, seq_len=32, micro_batches=4)
    t = plan_training(tiny, GPUS["h100"], lay).traffic[0]
    tokens, d, K = 4 * 2 * 32, tiny.hidden_size, tiny.num_experts_per_tok
    assert t.all_to_all == pytest.approx(tokens * 2 * K * (1 / 2) * d * (2 + 2 + 2 + 2))
    entries = inventory(tiny)
    dense = sum(4 * e.numel for e in entries if not e.is_expert)  # fp32 gradients, all-reduced over 4 ranks
    experts = sum(4 * e.numel for e in entries if e.is_expert) / 2  # this rank's half, over the 2 holding it
    assert t.data_parallel == pytest.approx(2 * (3 / 4) * dense + 2 * (1 / 2) * experts)
    assert t.pipeline == 0
    hidden = 4 * 2 * 32 * d * 2.0  # bf16 hidden states of every micro-batch
    cfg4 = tiny.replace(num_hidden_layers=4)
    for schedule, sends in (("1f1b", [1, 1]), ("dualpipev", [2, 2])):
        plan = plan_training(cfg4, GPUS["h100"], GpuLayout(2, pp=2, micro_batch=2, seq_len=32, micro_batches=4,
                                                           pp_schedule=schedule))
        assert [t.pipeline for t in plan.traffic] == [n * hidden for n in sends]
    v = plan_training(cfg4, GPUS["h100"], GpuLayout(2, pp=2, micro_batches=4, pp_schedule="dualpipev"))
    assert v.stages[0].blocks == (0, 3, 4)  # stages 0 and 3 of 4, and the MTP module, beside the embedding


def test_deepseek_v3_published_layout_fits_with_recomputation_and_its_all_to_all_per_token():
    v3 = preset("v3")
    lay = GpuLayout(2048, pp=16, ep=64, zero=1, micro_batches=120)
    plan = plan_training(v3, GPUS["h800"], lay, TrainPrecision(compute="fp8"))
    assert plan.fits(recompute=True) and not plan.fits(recompute=False)
    moe_layers = v3.num_hidden_layers - v3.first_k_dense_replace + v3.num_nextn_predict_layers  # 58 + 1 MTP
    copy = v3.hidden_size * ((1 + 4 / 128) + 2 + 2 + 2)  # FP8 dispatch, bf16 combine, both gradients bf16
    per_token = moe_layers * v3.num_experts_per_tok * (63 / 64) * copy
    assert plan.traffic_per_token().all_to_all == pytest.approx(per_token)
    assert 20e6 < per_token < 25e6  # ~23 MB per token: the all-to-all dwarfs ZeRO-1's and the pipeline's traffic
    assert plan.traffic_per_token().data_parallel < per_token / 50


def test_plan_train_takes_the_train_layout_flags(capsys):
    assert main(["plan", "train", "--preset", "small", "--gpu", "h100", "--dp-shard", "2", "--ep", "2", "--pp", "2",
                 "--pp-schedule", "dualpipev", "--seq-len", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["gpus"], out["dp"], out["ep"], out["pp"], out["pp_schedule"]) == (8, 4, 2, 2, "dualpipev")
    assert out["micro_batches"] == 4 and set(out["stages"][0]["sent"]) == {"all_to_all", "data_parallel", "pipeline"}
    assert out["sent_per_token"]["all_to_all"] > 0


def test_per_rank_serving_memory_is_what_the_split_model_holds():
    """`plan serve`'s per-rank weights equal the bytes one rank of `dsv3 serve --nproc N` holds."""
    import torch

    from dsv3 import DeepSeekV3
    from dsv3.parallel.inference import plan_splits

    cfg = preset("small")
    with torch.device("meta"):
        model = DeepSeekV3(cfg).to(torch.bfloat16)
    splits = plan_splits(model, 0, 4)
    held = sum(p.numel() * 2 * ((splits[n].stop - splits[n].start) / p.shape[splits[n].dim] if n in splits else 1)
               for n, p in model.named_parameters())
    plan = plan_serving(cfg, GPUS["h200"], 4, weights="bf16", mtp=True, context=1000, batch=3)
    assert plan.rank_weight_bytes == pytest.approx(held + 4 * sum(b.numel() for b in model.buffers()), rel=1e-3)
    assert plan.rank_needed_bytes == pytest.approx(plan.rank_weight_bytes + 3000 * plan.cache_bytes_per_token)
    v3 = plan_serving(preset("v3"), GPUS["h200"], 8, context=32768, batch=16)
    assert v3.rank_fits and 75 * GiB < v3.rank_weight_bytes < 85 * GiB  # 1/8 of the split weights + ~1 GiB
