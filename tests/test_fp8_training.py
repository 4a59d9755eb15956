"""FP8 training: the quantisers against their definition, the emulated GEMM against torch's FP8 GEMM, the FP8
linear against the exact one, bf16 AdamW moments, exact resume, the release-layout export, and the refusals."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from dsv3 import DeepSeekV3, load_pretrained, preset
from dsv3.cli import main
from dsv3.fp8 import (
    E4M3_MAX,
    fake_quant_blocks,
    fake_quant_tensor,
    fake_quant_tiles,
    quantize_blocks,
    quantize_tiles,
)
from dsv3.model.moe import GroupedExperts
from dsv3.train import TrainConfig, train
from dsv3.train import checkpoint as ckpt
from dsv3.train.fp8 import Fp8Experts, Fp8Linear, Fp8Matmul, Fp8Recipe, apply_fp8
from dsv3.train.optim import LowPrecisionAdamW


def reference_quant(group: torch.Tensor, scale_format: str = "fp32") -> torch.Tensor:
    """One group of values as e4m3 holds them, from the definition: scale = amax / 448 (ue8m0: the next power
    of two up), values / scale rounded to e4m3, times the scale."""
    amax = group.abs().max().item()
    scale = max(amax / E4M3_MAX, torch.finfo(torch.float32).tiny)
    if scale_format == "ue8m0":
        scale = 2.0 ** math.ceil(math.log2(scale))
    scale = torch.tensor(scale, dtype=torch.float32)
    return (group.float() / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_tiles_and_blocks_against_the_definition_with_partial_edges(scale_format):
    torch.manual_seed(0)
    x = torch.randn(3, 300) * torch.logspace(-3, 3, 300)  # 2 full tiles and one of 44, values over 6 decades
    got = fake_quant_tiles(x, scale_format)
    for start in range(0, 300, 128):
        cols = slice(start, min(start + 128, 300))
        for r in range(3):
            assert torch.equal(got[r, cols], reference_quant(x[r, cols], scale_format))
    w = torch.randn(200, 300)  # blocks of 128 x 128, 72 x 128, 128 x 44, 72 x 44
    got = fake_quant_blocks(w, scale_format)
    for r0 in range(0, 200, 128):
        for c0 in range(0, 300, 128):
            block = (slice(r0, min(r0 + 128, 200)), slice(c0, min(c0 + 128, 300)))
            assert torch.equal(got[block], reference_quant(w[block], scale_format))
    assert torch.equal(fake_quant_tensor(w), reference_quant(w))
    if scale_format == "ue8m0":
        _, scale = quantize_tiles(x, scale_format="ue8m0")
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two


def test_emulated_gemm_equals_torchs_fp8_gemm_chunk_by_chunk():
    """The emulation (dequantise, multiply in fp32) against torch._scaled_mm on the e4m3 values themselves, one
    128-wide chunk of the inner dimension at a time with its row-wise scales, summed in fp32: DeepSeek-V3's
    promotion of partial sums every 128 elements."""
    torch.manual_seed(0)
    M, K, N = 64, 384, 256
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.02
    emulated = fake_quant_tiles(x) @ fake_quant_blocks(w).T
    xq, sx = quantize_tiles(x)  # [M, K], [M, K/128]
    wq, sw = quantize_blocks(w)  # [N, K], [N/128, K/128]
    total = torch.zeros(M, N)
    for c in range(K // 128):
        cols = slice(c * 128, (c + 1) * 128)
        scale_b = sw[:, c].repeat_interleave(128)[None, :N]  # each output row's block scale for this chunk
        total += torch._scaled_mm(xq[:, cols], wq[:, cols].T, scale_a=sx[:, c:c + 1].contiguous(),
                                  scale_b=scale_b.contiguous(), out_dtype=torch.float32)
    torch.testing.assert_close(emulated, total, rtol=1e-5, atol=1e-6)


def test_fp8_linear_is_close_to_the_exact_one_but_not_equal():
    torch.manual_seed(0)
    x = torch.randn(256, 320, requires_grad=True)
    w = (torch.randn(192, 320) * 0.05).requires_grad_()
    dy = torch.randn(256, 192)
    exact = x @ w.T
    dx, dw = torch.autograd.grad(exact, (x, w), dy)
    for recipe, bound in ((Fp8Recipe(), 0.05), (Fp8Recipe("tensorwise"), 0.1), (Fp8Recipe(scale_format="ue8m0"), 0.05)):
        y = Fp8Matmul.apply(x, w, recipe)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        for got, want in ((y, exact), (gx, dx), (gw, dw)):
            rel = ((got - want).norm() / want.norm()).item()
            assert 1e-4 < rel < bound, (recipe, rel)  # quantised for real, and within e4m3's precision


def test_apply_fp8_switches_the_linear_layers_the_paper_does():
    model = DeepSeekV3(preset("tiny"))
    apply_fp8(model, Fp8Recipe())
    assert type(model.head) is torch.nn.Linear and type(model.embed) is torch.nn.Embedding
    attn = model.layers[0].attn
    assert all(isinstance(m, Fp8Linear) for m in (attn.wkv_a, attn.wkv_b, attn.wo, model.layers[0].ffn.w1,
                                                  model.mtp[0].eh_proj, model.layers[1].ffn.shared_experts.w2))
    assert isinstance(model.layers[1].ffn.experts, Fp8Experts)
    assert not any(type(m) is GroupedExperts for m in model.modules())
    model.init_weights(0.02, seed=0)
    x = torch.randint(0, 512, (2, 16))
    out = model.run(x, mtp=True)
    (out.logits.float().square().mean() + out.mtp_logits[0].float().square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_moments_follow_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    c = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    same = LowPrecisionAdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.float32)
    low = LowPrecisionAdamW([c], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(64, 32)
        for p, opt in ((a, ref), (b, same), (c, low)):
            p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)  # the same update when the moments are fp32
    assert low.state[c]["exp_avg"].dtype == torch.bfloat16
    assert 0 < (c - a).abs().max() < 1e-3  # bf16 moments move the weights by a hair


def fp8_config(tmp_path, data, **changes):
    base = dict(preset="tiny", data=[data.path], out=str(tmp_path / "run"), batch_size=2, seq_len=32, max_steps=6,
                log_every=1, eval_every=6, eval_windows=2, save_every=3, samples=0, peak_tflops=1.0,
                tensorboard=False, dtype="fp8")
    return TrainConfig(**{**base, **changes})


def test_fp8_run_resumes_exactly_and_exports_the_release_layout(tmp_path, data):
    torch.set_num_threads(1)
    whole = train(fp8_config(tmp_path / "whole", data), log=lambda _: None, progress=False)
    cfg = fp8_config(tmp_path / "resumed", data)
    train(cfg, log=lambda _: None, progress=False)
    ckpt.remove_leftovers(cfg.out)
    last = ckpt.latest_checkpoint(cfg.out)
    os.rename(last, os.path.join(os.path.dirname(last), ".trash-last"))  # as if killed before step 6 was saved
    train(cfg.replace(resume=True), log=lambda _: None, progress=False)
    a, b = load_pretrained(whole.run_dir, torch.float32), load_pretrained(cfg.out, torch.float32)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name

    with open(os.path.join(cfg.out, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    state = ckpt._chunks(ckpt._state_files(ckpt.latest_checkpoint(cfg.out)))
    assert "optim.layers.0.attn.wkv_a.weight.exp_avg" in state  # bf16 moments were saved ...
    file, _ = state["optim.layers.0.attn.wkv_a.weight.exp_avg"][0]
    with safe_open(file, "pt") as f:
        assert f.get_tensor("optim.layers.0.attn.wkv_a.weight.exp_avg").dtype == torch.bfloat16
        master = f.get_tensor("model.layers.0.attn.wkv_a.weight")
    # ... and the exported e4m3 weights are the training run's master weights, quantised in 128 x 128 blocks
    torch.testing.assert_close(b.layers[0].attn.wkv_a.weight, fake_quant_blocks(master), rtol=0, atol=0)

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        cfg.out, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32)
    x = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(hf(x).logits, b(x), atol=1e-4, rtol=1e-4)


def test_fp8_options_without_fp8_are_refused(capsys, data, tmp_path):
    code = main(["train", "--preset", "tiny", "--data", data.path, "--out", str(tmp_path / "x"),
                 "--fp8-scaling", "tensorwise"])
    assert code == 2
    assert "--fp8-scaling 'tensorwise' only applies with --dtype fp8" in capsys.readouterr().err
    with pytest.raises(Exception, match="is not one of bf16, fp32"):
        TrainConfig(optimizer_state_dtype="fp16")


def test_plan_and_cost_take_the_training_dtype(capsys):
    assert main(["plan", "train", "--preset", "v3", "--gpus", "2048", "--pp", "16", "--ep", "64", "--zero", "1",
                 "--dtype", "fp8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["precision"] == {"master": "fp32", "grads": "fp32", "moments": "bf16", "compute": "fp8"}
    assert main(["cost", "--dtype", "fp8", "--json"]) == 0
    bf16 = main(["cost", "--json"])
    out = capsys.readouterr().out
    assert bf16 == 0 and '"precision": "fp8"' in out
