"""Checkpoints: parity with transformers in both directions, FP8, pinned key names, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3 import DeepSeekV3, load_pretrained, preset, save_pretrained
from dsv3.checkpoint.convert import convert_checkpoint
from dsv3.errors import CheckpointError, ConfigError
from dsv3.fp8 import dequantize_blocks, quantize_blocks

YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
BASE = preset("tiny").replace(num_nextn_predict_layers=0, rope_scaling=YARN, max_position_embeddings=512)

# Shapes for parity; every sequence below is 160 tokens, past YaRN's original 64.
V3_SHAPES = {
    "q_lora+yarn+2_shared+2_dense": dict(num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2),
    "no_q_lora": dict(q_lora_rank=None),
    "4_groups_top2": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "no_rope_scaling_no_shared": dict(rope_scaling=None, n_shared_experts=0, num_hidden_layers=3),
}
V2_SHAPES = {
    "greedy": dict(topk_method="greedy", n_group=1, topk_group=1),
    "group_limited_greedy": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
}


@pytest.fixture
def transformers():
    """The numerical reference; only the tests that compare against it need it."""
    return pytest.importorskip("transformers")


def _hf_model(transformers, cfg):
    cls = transformers.DeepseekV2ForCausalLM if cfg.model_type == "deepseek_v2" else transformers.DeepseekV3ForCausalLM
    config_cls = transformers.DeepseekV2Config if cfg.model_type == "deepseek_v2" else transformers.DeepseekV3Config
    torch.manual_seed(0)
    model = cls(config_cls(**cfg.to_hf())).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # larger than the default init, so a wrong wiring cannot hide
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)  # non-zero selection bias, negative entries included
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def _compare(ref, got, name, figures):
    scale = ref.abs().max().item()
    diff = (ref - got).abs().max().item()
    figures.append(f"parity {name}: max |logit diff| = {diff:.2e} (logit scale {scale:.2f})")
    assert diff <= 1e-5 * scale, f"{name}: max |diff| {diff:.3g} at logit scale {scale:.3g}"


@pytest.mark.parametrize("name", list(V3_SHAPES) + [f"v2/{k}" for k in V2_SHAPES])
@torch.no_grad()
def test_logits_match_transformers_both_directions(name, tmp_path, transformers, figures):
    if name.startswith("v2/"):
        changes = dict(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False,
                       routed_scaling_factor=1.5, q_lora_rank=None, **V2_SHAPES[name[3:]])  # fmt: skip
    else:
        changes = V3_SHAPES[name]
    cfg = BASE.replace(**changes)
    hf = _hf_model(transformers, cfg)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, 160))
    ref = hf(ids).logits

    ours = load_pretrained(tmp_path / "hf", torch.float32)
    _compare(ref, ours(ids), name, figures)
    _compare(ref, ours.set_impl(experts="loop")(ids, attn="absorb"), name + " (absorbed, expert loop)", figures)

    save_pretrained(ours, tmp_path / "ours")  # and back: transformers loads what we write
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    _compare(ref, hf2(ids).logits, name + " (transformers loading ours)", figures)


def _tiny_model(**changes):
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny").replace(**changes))
    model.init_weights(std=0.05)
    with torch.no_grad():
        model.layers[1].ffn.gate.bias.normal_(0, 0.1)
    return model


@torch.no_grad()
def test_mtp_layers_round_trip_and_transformers_style_checkpoints_load_without_them(tmp_path, transformers,
                                                                                    figures):
    model = _tiny_model()
    save_pretrained(model, tmp_path / "m")
    keys = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert "model.layers.2.eh_proj.weight" in keys and "model.layers.2.shared_head.head.weight" in keys
    back = load_pretrained(tmp_path / "m", torch.float32)
    ids = torch.randint(0, 512, (2, 12))
    a, b = model.run(ids, mtp=True), back.run(ids, mtp=True)
    assert torch.equal(a.mtp_logits[0], b.mtp_logits[0]) and torch.equal(a.logits, b.logits)

    # transformers keeps num_nextn_predict_layers: 1 but drops the MTP tensors: load without MTP, one warning
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    _compare(a.logits, hf(ids).logits, "transformers loading a model initialised here", figures)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="MTP") as record:
        plain = load_pretrained(tmp_path / "hf", torch.float32)
    assert len(record) == 1 and len(plain.mtp) == 0
    assert torch.allclose(plain(ids), a.logits, atol=1e-6)


def test_key_names_are_pinned(tmp_path):
    save_pretrained(_tiny_model(), tmp_path)
    keys = sorted(load_file(tmp_path / "model.safetensors"))
    layer0 = [k.removeprefix("model.layers.0.") for k in keys if k.startswith("model.layers.0.")]
    assert layer0 == [
        "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "post_attention_layernorm.weight", "self_attn.kv_a_layernorm.weight", "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "self_attn.q_a_layernorm.weight",
        "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight",
    ]  # fmt: skip
    moe = sorted({k.removeprefix("model.layers.1.") for k in keys if k.startswith("model.layers.1.mlp.")})
    assert moe == sorted(
        ["mlp.gate.weight", "mlp.gate.e_score_correction_bias"]
        + [f"mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        + [f"mlp.experts.{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]
    )
    layer2 = [k.removeprefix("model.layers.2.") for k in keys if k.startswith("model.layers.2.")]
    mtp_only = sorted(k for k in layer2 if not k.startswith(("mlp.", "self_attn.")))
    assert mtp_only == ["eh_proj.weight", "embed_tokens.weight", "enorm.weight", "hnorm.weight",
                        "input_layernorm.weight", "post_attention_layernorm.weight", "shared_head.head.weight",
                        "shared_head.norm.weight"]  # fmt: skip
    assert [k for k in keys if not k.startswith("model.layers.")] == ["lm_head.weight", "model.embed_tokens.weight",
                                                                      "model.norm.weight"]  # fmt: skip
    ours = list(DeepSeekV3(preset("tiny")).state_dict())
    assert ours[:3] == ["embed.weight", "layers.0.attn_norm.weight", "layers.0.attn.wq_a.weight"]
    assert "layers.1.ffn.experts.w1" in ours and "layers.1.ffn.gate.bias" in ours and "mtp.0.eh_proj.weight" in ours


def test_fp8_block_quantiser_with_partial_edge_blocks():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # blocks of very different magnitudes
    q, scale = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)  # ceil(300/128), ceil(200/128)
    back = dequantize_blocks(q, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step (2^-9 of the block scale)
    step = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200] * 2**-9
    assert ((back - w).abs() <= w.abs() * 2**-4 + step).all()


@torch.no_grad()
def test_fp8_checkpoint_loads_back_within_rounding_and_converts_to_bf16(tmp_path):
    cfg_changes = dict(hidden_size=160, moe_intermediate_size=136, intermediate_size=200)  # partial 128-blocks
    model = _tiny_model(**cfg_changes)
    save_pretrained(model, tmp_path / "fp8", fp8=True, max_shard_size="200KB")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    shard = load_file(tmp_path / "fp8" / index["weight_map"][name])
    assert shard[name].dtype == torch.float8_e4m3fn and shard[name + "_scale_inv"].shape == (2, 2)
    assert index["weight_map"]["model.embed_tokens.weight"] and "model.layers.1.mlp.gate.weight_scale_inv" not in index[
        "weight_map"]  # fmt: skip

    with safe_open(tmp_path / "fp8" / index["weight_map"]["model.embed_tokens.weight"], "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"  # the release keeps the rest bf16
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(tmp_path / "fp8" / index["weight_map"][bias], "pt") as f:
        assert f.get_slice(bias).get_dtype() == "F32"  # ... and the router bias fp32
    loaded = load_pretrained(tmp_path / "fp8", torch.float32)
    for key, ref in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert (got - ref).abs().max() <= ref.abs().max() * 2**-4 + 1e-6, key
    router = model.layers[1].ffn.gate
    assert torch.equal(loaded.layers[1].ffn.gate.weight, router.weight.bfloat16().float())  # bf16, not FP8
    assert torch.equal(loaded.layers[1].ffn.gate.bias, router.bias)

    convert_checkpoint(str(tmp_path / "fp8"), str(tmp_path / "bf16"), dtype="bf16")
    bf16 = load_pretrained(tmp_path / "bf16")
    assert bf16.embed.weight.dtype == torch.bfloat16 and bf16.layers[1].ffn.gate.bias.dtype == torch.float32
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    ids = torch.randint(0, 512, (1, 16))
    assert torch.allclose(bf16.float()(ids), loaded(ids), atol=0.05 * loaded(ids).abs().max().item())


def _deepseek_fp8_to_bf16(src, dst):
    """DeepSeek's published conversion (inference/fp8_cast_bf16.py), redone from its description: read the
    weight map from model.safetensors.index.json (the script opens it unconditionally), walk every
    *.safetensors file, multiply each one-byte weight by its `_scale_inv` (looked up through the weight map,
    possibly in another file) block by block, keep every other tensor, and write the files and an index
    without the scales. The script leaves config.json alone; its users drop quantization_config by hand."""
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, dict] = {}

    def tensor(name):
        file = weight_map[name]
        if file not in files:
            files[file] = load_file(src / file)
        return files[file][name]

    dst.mkdir()
    for path in sorted(src.glob("*.safetensors")):
        out = {}
        for name, t in load_file(path).items():
            if name.endswith("_scale_inv"):
                continue
            if t.element_size() == 1:
                s = tensor(name + "_scale_inv")
                blocks = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
                t = (t.float() * blocks).to(torch.bfloat16)
            out[name] = t
        save_file(out, dst / path.name)
    kept = {k: v for k, v in weight_map.items() if not k.endswith("_scale_inv")}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": kept}))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("shard_size", ["5GB", "150KB"])
@torch.no_grad()
def test_fp8_checkpoints_convert_with_deepseeks_procedure(tmp_path, shard_size):
    model = _tiny_model(hidden_size=160, moe_intermediate_size=136)  # partial 128-blocks
    save_pretrained(model, tmp_path / "fp8", fp8=True, max_shard_size=shard_size)
    convert_checkpoint(str(tmp_path / "fp8"), str(tmp_path / "fp8-again"), dtype="fp8")
    for directory in ("fp8", "fp8-again"):
        index = json.loads((tmp_path / directory / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / directory).glob("*.safetensors")}
        _deepseek_fp8_to_bf16(tmp_path / directory, tmp_path / f"{directory}-bf16")
        official = load_pretrained(tmp_path / f"{directory}-bf16")
        ours = load_pretrained(tmp_path / directory, torch.bfloat16)
        for key, value in ours.state_dict().items():
            assert torch.equal(official.state_dict()[key], value), key


# ----- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save_pretrained(_tiny_model(), tmp_path / "m")
    return tmp_path / "m"


def _edit(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    os.unlink(path / "model.safetensors")
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    _edit(saved, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight.* missing"):
        load_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _edit(saved, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight"):
        load_pretrained(saved)


def test_wrong_shape_is_named(saved):
    _edit(saved, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(65,\).*\(64,\)"):
        load_pretrained(saved)


def test_partly_present_mtp_layer_is_an_error(saved):
    _edit(saved, lambda t: t.pop("model.layers.2.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.eh_proj\.weight.* missing"):
        load_pretrained(saved)


def test_malformed_and_contradictory_config(saved):
    (saved / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_pretrained(saved)
    cfg = preset("tiny").to_hf()
    (saved / "config.json").write_text(json.dumps({**cfg, "topk_group": 4, "n_group": 2}))
    with pytest.raises(ConfigError, match="topk_group"):
        load_pretrained(saved)


def test_missing_shard_and_truncated_file(tmp_path):
    save_pretrained(_tiny_model(), tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    os.unlink(tmp_path / "m" / shards[1])
    with pytest.raises(CheckpointError, match=f"shard .*{shards[1]} is listed .* but missing"):
        load_pretrained(tmp_path / "m")
    data = (tmp_path / "m" / shards[0]).read_bytes()
    (tmp_path / "m" / shards[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shards[0]} is truncated"):
        load_pretrained(tmp_path / "m")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_2_without_traceback(tmp_path, saved):
    os.unlink(saved / "model.safetensors")
    (tmp_path / "bad.json").write_text("{")
    for args in (
        ["info", "--config", str(tmp_path / "bad.json")],
        ["info", "--model", str(tmp_path / "nowhere")],
        ["convert", str(saved), str(tmp_path / "out")],
        ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")],
    ):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("dsv3 "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_cli_info_prints_the_published_v3_counts():
    r = _cli("info", "--preset", "v3")
    assert r.returncode == 0, r.stderr
    for figure in ("671,026,419,200", "36,625,618,432", "37,552,297,472", "11,610,068,224", "70,272 bytes"):
        assert figure in r.stdout


def test_no_pickle_anywhere_in_the_package():
    root = os.path.join(os.path.dirname(__file__), "..", "dsv3")
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    text = fh.read()
                assert "import pickle" not in text and "torch.load(" not in text, f


def test_slices_of_fp8_weights_read_alone_equal_slices_of_the_whole(tmp_path):
    """A rank of a split model reads only its rows or columns of an FP8 weight: the 128-blocks the slice
    touches are dequantised and trimmed, and give what dequantising the whole tensor and slicing gives."""
    from dsv3 import DeepSeekV3, preset, save_pretrained
    from dsv3.checkpoint.files import CheckpointReader
    from dsv3.checkpoint.pretrained import read_slice, read_tensor

    torch.manual_seed(0)
    model = DeepSeekV3(preset("small"))
    model.init_weights()
    save_pretrained(model, str(tmp_path), fp8=True)
    reader = CheckpointReader(str(tmp_path))
    fp8 = [k for k in reader.keys() if reader.dtype(k) == torch.float8_e4m3fn]
    assert len(fp8) > 10
    for key in fp8[:12]:
        whole = read_tensor(reader, key, torch.float32)
        for dim in (0, 1):
            n = whole.shape[dim]
            for start, stop in ((0, n // 2), (n // 2, n), (n // 3, n // 3 + max(1, n // 5))):
                got = read_slice(reader, key, torch.float32, dim, start, stop)
                assert torch.equal(got, whole.narrow(dim, start, stop - start)), (key, dim, start, stop)
