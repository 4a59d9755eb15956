import json

import pytest

from dsv3.config import PRESETS, ModelConfig, preset
from dsv3.errors import ConfigError
from dsv3.inventory import count_parameters

# DeepSeek-V3's released config.json (Hugging Face Hub, deepseek-ai/DeepSeek-V3), field for field.
RELEASED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

ARCH_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
    "topk_group", "routed_scaling_factor", "scoring_func", "topk_method", "norm_topk_prob",
    "num_nextn_predict_layers", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
]  # fmt: skip


def test_released_v3_config_round_trips_and_equals_the_preset():
    cfg = ModelConfig.from_hf(RELEASED_V3)
    assert cfg.to_hf() == RELEASED_V3
    v3 = preset("v3")
    for name in ARCH_FIELDS:
        assert getattr(cfg, name) == getattr(v3, name), name
    assert cfg.extra["quantization_config"]["weight_block_size"] == [128, 128]  # unused fields are kept


def test_v3_attention_scale_and_yarn_numbers():
    # DESIGN section 3: m = 0.1 * ln(40) + 1 = 1.36889, scale = 192^-0.5 * m^2 = 0.135234
    assert preset("v3").softmax_scale == pytest.approx(0.135234, abs=1e-6)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    d = preset(name).to_hf()
    assert ModelConfig.from_hf(d).to_hf() == d
    assert json.loads(json.dumps(d)) == d  # plain JSON


def test_preset_sizes():
    assert count_parameters(preset("tiny")).total + count_parameters(preset("tiny")).mtp < 1_000_000
    small = count_parameters(preset("small"))
    assert 10e6 <= small.total + small.mtp <= 40e6
    s = preset("small")
    assert s.num_nextn_predict_layers >= 1 and s.n_routed_experts > 1 and s.q_lora_rank and s.rope_type == "yarn"


def test_transformers_configs_round_trip_in_both_rope_spellings():
    transformers = pytest.importorskip("transformers")
    d = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4).to_dict()
    assert "rope_parameters" in d
    cfg = ModelConfig.from_hf(d)
    assert cfg.to_hf() == d
    # transformers 5.x writes neither scoring_func nor topk_method: deepseek_v3 implies sigmoid + bias
    assert (cfg.scoring_func, cfg.topk_method, cfg.uses_router_bias) == ("sigmoid", "noaux_tc", True)

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    d2 = {**d, "rope_parameters": yarn}
    cfg2 = ModelConfig.from_hf(d2)
    assert cfg2.to_hf() == d2
    assert cfg2.softmax_scale == pytest.approx(0.135234, abs=1e-6)  # same head dims and YaRN as V3


def test_v2_family_defaults_and_null_groups():
    transformers = pytest.importorskip("transformers")
    d = transformers.DeepseekV2Config(num_experts_per_tok=6, topk_method="group_limited_greedy").to_dict()
    assert d["n_group"] is None
    cfg = ModelConfig.from_hf(d)
    assert (cfg.scoring_func, cfg.uses_router_bias, cfg.n_group) == ("softmax", False, 1)
    assert cfg.to_hf() == d


def test_config_file_and_directory(tmp_path):
    preset("tiny").save(tmp_path / "config.json")
    assert ModelConfig.from_hf(tmp_path).to_hf() == preset("tiny").to_hf()
    assert ModelConfig.from_hf(tmp_path / "config.json").to_hf() == preset("tiny").to_hf()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts"),
        ({"topk_group": 3, "n_group": 2}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 5, "n_group": 2, "topk_group": 1}, "num_experts_per_tok"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"first_k_dense_replace": 5}, "first_k_dense_replace"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    d = {**preset("tiny").to_hf(), **changes}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(d)


def test_malformed_config_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf(bad)
    bad.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf(bad)
    with pytest.raises(ConfigError, match="no config file"):
        ModelConfig.from_hf(tmp_path / "missing")
