"""DeepSeek-V3.1's FP8 checkpoints: V3's layout with `"scale_fmt": "ue8m0"`, every 128x128 block scale a power of
two (stored as fp32 `weight_scale_inv`). Writing them, reading them, writing them back byte for byte, and
transformers reading what we write."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_checkpoint import _tiny_model as checkpoint_tiny_model

from dsv3 import load_pretrained, preset, save_pretrained
from dsv3.checkpoint.convert import convert_checkpoint
from dsv3.checkpoint.files import CheckpointReader
from dsv3.checkpoint.pretrained import SCALE_SUFFIX, hf_layout, quantization_config, scale_fmt_of
from dsv3.config import ModelConfig
from dsv3.errors import InvalidValue
from dsv3.fp8 import BLOCK, E4M3_MAX, dequantize_blocks, quantize_blocks

# config.json of deepseek-ai/DeepSeek-V3.1 on the Hugging Face Hub, byte for byte
V31_CONFIG = os.path.join(os.path.dirname(__file__), "data", "deepseek_v3_1_config.json")
PARTIAL = dict(hidden_size=160, moe_intermediate_size=136, intermediate_size=200)  # partial 128-blocks


def _tiny_model(**changes):
    model = checkpoint_tiny_model(**changes)
    with torch.no_grad():  # blocks of very different magnitudes, so the scales span many powers of two
        model.layers[1].ffn.experts.w2.mul_(torch.logspace(-3, 1, model.layers[1].ffn.experts.w2.shape[-1]))
    return model


def _tensors(path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {key: reader.get(key) for key in reader.keys()}


def _fp8_pairs(tensors):
    return {k: (t, tensors[k + SCALE_SUFFIX]) for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, t in a.items():
        assert t.dtype == b[key].dtype and t.shape == b[key].shape, key
        assert torch.equal(t.view(torch.uint8), b[key].view(torch.uint8)), key


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """[out, in] -> its 128 x 128 blocks [rb, cb, 128, 128], edges padded with zeros."""
    out_dim, in_dim = t.shape
    padded = F.pad(t.float(), (0, -in_dim % BLOCK, 0, -out_dim % BLOCK))
    return padded.unflatten(0, (-1, BLOCK)).unflatten(2, (-1, BLOCK)).transpose(1, 2)


def _full(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: shape[0], : shape[1]]


def _deepseek_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-of-two block scales as DeepSeek's inference/kernel.py computes them (act_quant with scale_fmt="ue8m0":
    amax clamped to 1e-4, s = 2^ceil(log2(amax / 448)), q = x / s), here per 128 x 128 block of a weight."""
    tiles = _blocks(w)  # [rb, cb, b, b]
    s = torch.exp2(torch.ceil(torch.log2(tiles.abs().amax(dim=(-2, -1)).clamp(min=1e-4) / E4M3_MAX)))
    q = (tiles / s[..., None, None]).to(torch.float8_e4m3fn).transpose(1, 2).flatten(2, 3).flatten(0, 1)
    return q[: w.shape[0], : w.shape[1]].contiguous(), s


# ----- the config ------------------------------------------------------------------------------------------------


def test_released_v31_config_round_trips_key_for_key():
    with open(V31_CONFIG) as f:
        text = f.read()
    released = json.loads(text)
    cfg = ModelConfig.from_hf(released)
    out = cfg.to_hf()
    assert out == released
    assert list(out) == list(released)  # key order as released
    assert list(out["quantization_config"]) == list(released["quantization_config"])  # scale_fmt last, as released
    assert json.dumps(out, indent=2) + "\n" == text  # what cfg.save writes is the released file
    assert scale_fmt_of(cfg) == "ue8m0" and scale_fmt_of(preset("v3")) == "fp32"
    v3 = preset("v3")
    for name in ("hidden_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank", "rope_scaling",
                 "routed_scaling_factor", "num_nextn_predict_layers", "topk_method"):
        assert getattr(cfg, name) == getattr(v3, name), name  # V3's architecture


def test_written_quantization_config_is_the_released_one():
    with open(V31_CONFIG) as f:
        released = json.load(f)["quantization_config"]
    assert list(quantization_config("ue8m0").items()) == list(released.items())
    v3 = quantization_config("fp32")  # DeepSeek-V3's: the same four keys, no scale_fmt
    assert list(v3.items()) == [(k, v) for k, v in released.items() if k != "scale_fmt"]


# ----- writing ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_ue8m0_checkpoint_has_power_of_two_scales_that_never_overflow(tmp_path):
    model = _tiny_model(**PARTIAL)
    save_pretrained(model, tmp_path / "m", fp8=True, scale_fmt="ue8m0", max_shard_size="200KB")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert list(config["quantization_config"].items()) == list(quantization_config("ue8m0").items())
    pairs = _fp8_pairs(_tensors(tmp_path / "m"))
    assert len(pairs) > 10
    state = model.state_dict()
    for name, (q, scale) in pairs.items():
        assert scale.dtype == torch.float32
        mantissa, _ = torch.frexp(scale)
        assert (mantissa == 0.5).all(), name  # 2^k exactly
        assert (dequantize_blocks(q, scale, torch.float32).abs() <= E4M3_MAX * _full(scale, q.shape)).all(), name
        # the smallest power of two that holds the block: its largest code is above 448 / 2
        assert (_blocks(q).abs().amax(dim=(-2, -1)) > E4M3_MAX / 2).all(), name
    # scales rounded up, never down: every weight is within e4m3's rounding (half a step), none clipped at 448
    w2 = state["layers.1.ffn.experts.w2"]
    for e in range(model.config.n_routed_experts):
        q, scale = pairs[f"model.layers.1.mlp.experts.{e}.down_proj.weight"]
        full = _full(scale, q.shape)
        err = (dequantize_blocks(q, scale, torch.float32) - w2[e]).abs()
        assert (err <= w2[e].abs() * 2**-4 + full * 2**-10).all()  # 3 mantissa bits; the subnormal step 2^-9


@torch.no_grad()
def test_values_are_deepseeks_and_scales_the_smallest_power_of_two():
    torch.manual_seed(0)
    w = torch.randn(16 * BLOCK, 8 * BLOCK) * torch.exp(2 * torch.randn(16 * BLOCK, 1))
    w[:BLOCK, :BLOCK] *= 226 * 2.0**-8 / w[:BLOCK, :BLOCK].abs().max()  # amax / s = 226: its code rounds to 224
    q, scale = quantize_blocks(w, scale_format="ue8m0")
    q_ds, scale_ds = _deepseek_quantize(w)
    # the same values as DeepSeek's rule ...
    assert torch.equal(dequantize_blocks(q, scale, torch.float32), dequantize_blocks(q_ds, scale_ds, torch.float32))
    # ... stored at the same scale, or at half of it where the block's codes all fit doubled
    halved = scale != scale_ds
    assert torch.equal(scale[halved] * 2, scale_ds[halved]) and halved[0, 0]
    assert 0 < halved.float().mean() < 0.15  # ~1 block in 20: amax / s in (224, 232) rounds down to 224


# ----- reading and writing back ----------------------------------------------------------------------------------


@torch.no_grad()
def test_load_and_save_again_gives_the_same_bytes(tmp_path):
    model = _tiny_model(**PARTIAL)
    save_pretrained(model, tmp_path / "a", fp8=True, scale_fmt="ue8m0", max_shard_size="200KB")
    original = _tensors(tmp_path / "a")
    for dtype in (torch.bfloat16, torch.float32):  # power-of-two scales dequantise exactly in either
        loaded = load_pretrained(tmp_path / "a", dtype)
        assert scale_fmt_of(loaded.config) == "ue8m0"
        out = tmp_path / f"b-{dtype}".replace("torch.", "")
        save_pretrained(loaded, out, fp8=True)  # the scale format follows the config it came with
        _assert_bitwise_equal(original, _tensors(out))
        written = json.loads((out / "config.json").read_text())["quantization_config"]
        assert list(written.items()) == list(quantization_config("ue8m0").items())
    # FP8 -> bf16 -> FP8 again through convert: the bf16 copy is exact, so are the bytes written from it
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "bf16"), dtype="bf16")
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    convert_checkpoint(str(tmp_path / "bf16"), str(tmp_path / "c"), dtype="fp8", scale_fmt="ue8m0")
    _assert_bitwise_equal(original, _tensors(tmp_path / "c"))
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "d"), dtype="fp8", max_shard_size="5GB")  # re-shard
    _assert_bitwise_equal(original, _tensors(tmp_path / "d"))
    # an explicit fp32 request requantises: V3's scales, V3's config
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "e"), dtype="fp8", scale_fmt="fp32")
    assert "scale_fmt" not in json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]
    assert any(torch.frexp(s)[0].ne(0.5).any() for _, s in _fp8_pairs(_tensors(tmp_path / "e")).values())


@torch.no_grad()
def test_blocks_deepseeks_rule_leaves_at_twice_the_smallest_scale_keep_their_values(tmp_path):
    """What holds for any V3.1-style file: DeepSeek's rule can store a block whose largest code is 224 at scale s;
    the same values are also (doubled codes, s / 2), and a save from the dequantised values (ours or DeepSeek's
    rule run again) writes that. No function of the values can give back both, so such blocks keep their values
    but not their bytes; every other block, and `dsv3 convert` to fp8 (which copies the blocks), keeps both."""
    model = _tiny_model(hidden_size=256, moe_intermediate_size=128, intermediate_size=256)  # whole blocks
    save_pretrained(model, tmp_path / "ours", fp8=True, scale_fmt="ue8m0")
    tensors = _tensors(tmp_path / "ours")
    name = "model.layers.0.mlp.down_proj.weight"
    state = model.state_dict()
    w = state["layers.0.ffn.w2.weight"].clone()
    w[:BLOCK, :BLOCK] *= 226 * 2.0**-10 / w[:BLOCK, :BLOCK].abs().max()
    state["layers.0.ffn.w2.weight"].copy_(w)
    layout = {hf: (ours, e) for hf, ours, e in hf_layout(state, model.config)}
    for key in _fp8_pairs(tensors):  # every FP8 tensor as DeepSeek's rule stores it
        ours, e = layout[key]
        tensors[key], tensors[key + SCALE_SUFFIX] = _deepseek_quantize(state[ours] if e is None else state[ours][e])
    src = tmp_path / "deepseek"
    src.mkdir()
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())

    save_pretrained(load_pretrained(src, torch.bfloat16), tmp_path / "again", fp8=True)
    again = _tensors(tmp_path / "again")
    changed = 0
    for key, (q, s) in _fp8_pairs(tensors).items():
        q2, s2 = again[key], again[key + SCALE_SUFFIX]
        assert torch.equal(dequantize_blocks(q, s, torch.float32), dequantize_blocks(q2, s2, torch.float32)), key
        same = s2 == s
        assert torch.equal(s2[~same] * 2, s[~same]), key  # otherwise exactly half the scale
        assert torch.equal(_blocks(q.view(torch.uint8))[same], _blocks(q2.view(torch.uint8))[same]), key  # same bytes
        changed += int((~same).sum())
    assert not torch.equal(again[name + SCALE_SUFFIX], tensors[name + SCALE_SUFFIX])  # the block made to round
    assert changed > 0
    convert_checkpoint(str(src), str(tmp_path / "converted"), dtype="fp8")  # copies: every byte kept
    _assert_bitwise_equal(tensors, _tensors(tmp_path / "converted"))


def test_scale_fmt_is_checked(tmp_path):
    model = _tiny_model()
    with pytest.raises(InvalidValue, match="scale_fmt"):
        save_pretrained(model, tmp_path / "a", fp8=True, scale_fmt="e8m0")
    with pytest.raises(InvalidValue, match="only when writing FP8 weights"):
        save_pretrained(model, tmp_path / "b", scale_fmt="ue8m0")


# ----- transformers ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_transformers_loads_a_ue8m0_checkpoint_we_wrote(tmp_path, figures):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    # sides that are whole 128-blocks: transformers infers the block size from the scale grid's shape
    model = _tiny_model(hidden_size=256, moe_intermediate_size=128, intermediate_size=256, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path / "m", fp8=True, scale_fmt="ue8m0")
    ours = load_pretrained(tmp_path / "m", torch.float32)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m").quantization_config["scale_fmt"] == "ue8m0"
    # on a CPU transformers dequantises the FP8 blocks as it loads them (scales multiplied, as here)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    ref, got = ours(ids), hf(ids).logits
    diff, scale = (ref - got).abs().max().item(), ref.abs().max().item()
    figures.append(f"ue8m0 FP8 checkpoint, transformers vs ours: max |logit diff| = {diff:.2e} (scale {scale:.2f})")
    assert diff <= 1e-5 * scale
