"""DeepSeek Sparse Attention (V3.2): logits and selections against transformers' DeepseekV32ForCausalLM in both
directions, prefill and token-by-token decoding with the latent and index caches, the config round trip, FP8
checkpoints with the indexer, and serving through the paged cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dsv3 import DeepSeekV3, load_pretrained, preset, save_pretrained
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.inventory import count_parameters
from dsv3.model.cache import PagedLatentCache, bytes_per_token, new_cache
from dsv3.model.indexer import Indexer

YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
# index_topk 8 against 48-token sequences: most queries drop most keys
BASE = preset("tiny-dsa").replace(num_nextn_predict_layers=0, max_position_embeddings=512)
T = 48


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _hf_model(transformers, cfg: ModelConfig):
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**cfg.to_hf())).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights and the indexer's LayerNorm weight and bias
                p.copy_((1 if name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
    return model


def _compare(ref, got, name, figures):
    scale = ref.abs().max().item()
    diff = (ref - got).abs().max().item()
    figures.append(f"dsa parity {name}: max |logit diff| = {diff:.2e} (logit scale {scale:.2f})")
    assert diff <= 1e-5 * scale, f"{name}: max |diff| {diff:.3g} at logit scale {scale:.3g}"


def _decode(model: DeepSeekV3, ids: torch.Tensor, attn: str, prefix: int = 0) -> torch.Tensor:
    """Prefill `prefix` tokens, then one token at a time through the latent and index caches: logits [B, T, V]."""
    B, n = ids.shape
    cache = new_cache(model.config, B, n, dtype="fp32")
    out = [model(ids[:, :prefix], None, cache, attn=attn)] if prefix else []
    for t in range(prefix, n):
        out.append(model(ids[:, t : t + 1], torch.full((B, 1), t), cache, attn=attn))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("rope", ["yarn", "plain"])
@torch.no_grad()
def test_logits_match_transformers_v32_both_directions_prefill_and_decode(rope, tmp_path, transformers, figures):
    cfg = BASE.replace(rope_scaling=YARN if rope == "yarn" else None)
    hf = _hf_model(transformers, cfg)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    ref = hf(ids).logits

    ours = load_pretrained(tmp_path / "hf", torch.float32)
    assert ours.config.uses_dsa and ours.config.index_topk < T
    _compare(ref, ours(ids), f"{rope} prefill", figures)
    _compare(ref, ours(ids, attn="absorb"), f"{rope} prefill, absorbed", figures)
    _compare(ref, _decode(ours, ids, "naive"), f"{rope} token by token", figures)
    _compare(ref, _decode(ours, ids, "absorb", prefix=12), f"{rope} 12-token prefill then decode, absorbed", figures)
    dense = ours.run(ids, sparse=False).logits
    assert (dense - ref).abs().max() > 1e-2, "with 8 of 48 keys kept, dense attention must differ"

    save_pretrained(ours, tmp_path / "ours")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(hf2).__name__ == "DeepseekV32ForCausalLM"
    _compare(ref, hf2(ids).logits, f"{rope} transformers loading ours", figures)


@torch.no_grad()
def test_selected_indices_equal_transformers(tmp_path, transformers, monkeypatch):
    cfg = BASE.replace(rope_scaling=YARN)
    hf = _hf_model(transformers, cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, T))

    theirs = []
    for layer in hf.model.layers:
        layer.self_attn.indexer.register_forward_hook(lambda m, args, kwargs, out: theirs.append(out.long()),
                                                      with_kwargs=True)
    hf(ids)
    mine, select = [], Indexer.select

    def recording(self, scores):
        idx, visible = select(self, scores)
        mine.append((idx, visible))
        return idx, visible

    monkeypatch.setattr(Indexer, "select", recording)
    ours(ids)
    assert len(mine) == len(theirs) == cfg.num_hidden_layers
    for (idx, visible), ref in zip(mine, theirs):
        for b in range(2):
            for t in range(T):
                got = set(idx[b, t][visible[b, t]].tolist())
                want = {s for s in ref[b, t].tolist() if s <= t}  # a short row pads its list with masked keys
                assert got == want, f"row {b}, query {t}: ours {sorted(got)}, transformers {sorted(want)}"
                assert len(got) == min(t + 1, cfg.index_topk)


def test_v32_config_round_trips_and_the_preset_counts():
    released = {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "hidden_size": 7168,
        "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "vocab_size": 129280,
        "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }  # fmt: skip
    cfg = ModelConfig.from_hf(released)
    assert cfg.uses_dsa and cfg.to_hf() == released and json.dumps(cfg.to_hf()) == json.dumps(released)
    assert cfg == preset("v3.2").replace(extra=cfg.extra)
    assert not preset("v3").uses_dsa and "index_topk" not in preset("v3").to_hf()
    # the indexer adds per layer wq_b (1536 x 8192), wk (7168 x 128), k_norm (2 x 128), weights_proj (7168 x 64)
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    v3, v32 = count_parameters(preset("v3")), count_parameters(preset("v3.2"))
    assert v32.total - v3.total == 61 * per_layer and v32.mtp - v3.mtp == per_layer  # the MTP block has one too
    # the index key cache: 128 more numbers per token and layer
    assert bytes_per_token(preset("v3.2"), "bf16") - bytes_per_token(preset("v3"), "bf16") == 61 * 128 * 2


@pytest.mark.parametrize("bad", [dict(index_topk=0), dict(index_head_dim=4), dict(q_lora_rank=None),
                                 dict(model_type="deepseek_v3")])  # fmt: skip
def test_bad_dsa_configs_are_named(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)) if "model_type" not in bad else "index_n_heads"):
        preset("tiny-dsa").replace(**bad)


@torch.no_grad()
def test_fp8_checkpoint_keeps_the_indexer_head_weights_in_high_precision(tmp_path):
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny-dsa"))
    model.init_weights(std=0.05)
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(tmp_path / "fp8" / index["model.layers.0.self_attn.indexer.wk.weight"], "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.indexer.wk.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.self_attn.indexer.wq_b.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.self_attn.indexer.weights_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.indexer.k_norm.bias").dtype == torch.bfloat16
    assert "model.layers.2.self_attn.indexer.wk.weight_scale_inv" in index  # the MTP block has one too
    back = load_pretrained(tmp_path / "fp8", torch.float32)
    w, w8 = model.layers[0].attn.indexer.wk.weight, back.layers[0].attn.indexer.wk.weight
    assert (w - w8).abs().max() <= 0.07 * w.abs().max()  # e4m3 rounding


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_index_keys_live_in_every_cache_format(dtype):
    cfg = preset("tiny-dsa")
    cache = new_cache(cfg, 2, 16, dtype=dtype)
    k = torch.randn(2, 3, cfg.index_head_dim)
    got = cache.update_index(0, torch.tensor([[0, 1, 2], [4, 5, 6]]), k)
    assert got.shape == (2, 7, cfg.index_head_dim)
    tol = {"fp32": 0, "bf16": 1e-2, "fp8": 7e-2}[dtype]
    assert torch.allclose(got[0, :3], k[0], atol=tol * 4, rtol=tol) and torch.allclose(got[1, 4:], k[1], atol=tol * 4,
                                                                                        rtol=tol)
    paged = PagedLatentCache(cfg, block_size=4, dtype=dtype, n_blocks=4)
    got = paged.rows([[2, 3]]).update_index(0, torch.tensor([[4, 5, 6]]), k[:1])
    assert torch.allclose(got[0, 4:], k[0], atol=tol * 4, rtol=tol)


@torch.no_grad()
def test_engine_greedy_tokens_equal_full_forwards_with_paged_cache_and_speculation():
    from dsv3.infer import Engine, SamplingParams

    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny-dsa").replace(max_position_embeddings=256)).eval()
    model.init_weights(std=0.05)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 21, 30)]

    def reference(prompt, n):
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt):]

    want = [reference(p, 12) for p in prompts]
    for speculative in (False, True):
        engine = Engine(model, None, max_batch=3, cache_dtype="fp32", block_size=8, speculative=speculative,
                        draft_policy="always")
        got = [s.tokens for s in engine.generate(prompts, SamplingParams(max_new_tokens=12))]
        assert got == want, f"speculative={speculative}"


def test_flops_of_sparse_attention_stop_growing_in_the_core_but_not_in_the_indexer():
    from dsv3.flops import flops_per_token

    T, K = 131072, 2048
    v3, v32 = flops_per_token(preset("v3"), T), flops_per_token(preset("v3.2"), T)
    assert v32.attn_core == 61 * 2 * 128 * (K - K * K / (2 * T)) * (192 + 128)  # each query: min(t, K) keys
    assert v32.index_core == 61 * 2 * 64 * 128 * T / 2 and v3.index_core == 0
    assert v3.attn_core / v32.attn_core > 30
    short = flops_per_token(preset("v3.2"), 1024)  # shorter than K: attention is dense
    assert short.attn_core == flops_per_token(preset("v3"), 1024).attn_core
