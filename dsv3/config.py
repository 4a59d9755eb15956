"""The model configuration: one dataclass, named presets, and an exact Hugging Face round trip.

Field names are the Hugging Face `config.json` names, so a reader of DeepSeek's config files finds
every value under the name they know. `ModelConfig.from_hf(d).to_hf() == d` for any config that
transformers writes or DeepSeek released: fields the model does not use are kept in `extra`, the
RoPE settings are written back in the spelling they came in (`rope_scaling` + `rope_theta`, or the
newer `rope_parameters`), and fields a config left out are not added on the way back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from dsv3.errors import ConfigError

SCORING_FUNCS = ("sigmoid", "softmax")
_YARN_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "attention_factor")
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
)
# noaux_tc: DeepSeek-V3's sigmoid router with the selection-only bias, groups scored by their top-2 sum.
# greedy: plain top-k over all experts.  group_limited_greedy: DeepSeek-V2's groups scored by their max.
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass
class ModelConfig:
    """Every architectural value of a DeepSeek-V3 (or V2-family) model; defaults are the 671B model."""

    vocab_size: int = 129280
    hidden_size: int = 7168  # d
    intermediate_size: int = 18432  # dense SwiGLU width, layers [0, first_k_dense_replace)
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128  # H
    q_lora_rank: int | None = 1536  # None: queries are not compressed
    kv_lora_rank: int = 512  # latent width d_c
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # decoupled RoPE width, one key shared by all heads
    v_head_dim: int = 128
    n_routed_experts: int = 256  # E
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # K
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1  # MTP depth D
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN settings as found in config.json (keys: type/rope_type, factor, original_max_position_embeddings,
    # beta_fast, beta_slow, mscale, mscale_all_dim, ...); None for plain RoPE.
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    # DeepSeek Sparse Attention (V3.2): a lightning indexer per attention layer with index_n_heads heads of
    # index_head_dim scores every earlier token; attention keeps the index_topk best. None: dense MLA (V3).
    index_n_heads: int | None = None
    index_head_dim: int = 128
    index_topk: int = 2048
    model_type: str = "deepseek_v3"
    # config.json fields the model does not use (architectures, token ids, quantization_config, ...),
    # kept so that to_hf() gives them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)
    # how the source spelled RoPE ("rope_scaling" or "rope_parameters") and which fields it listed;
    # None for a config built in Python, which then writes every field.
    _hf_spelling: str = field(default="rope_scaling", repr=False, compare=False)
    _hf_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    _hf_nulls: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # n_group: null

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived sizes -----------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        """Block `layer` has an MoE feed-forward; the first `first_k_dense_replace` blocks have a dense one.
        MTP blocks (layer >= num_hidden_layers) are MoE blocks."""
        return layer >= self.first_k_dense_replace

    def mtp_layer_index(self, k: int) -> int:
        """MTP module k (1-based) is layer num_hidden_layers + k - 1: its index in the checkpoint and the cache."""
        return self.num_hidden_layers + k - 1

    def router_layers(self) -> list[int]:
        """The layers with a router, in the order the model reports their routing: MoE blocks, then MTP modules."""
        return [i for i in range(self.n_layers_with_mtp) if self.is_moe_layer(i)]

    @property
    def n_layers_with_mtp(self) -> int:
        """Main blocks plus MTP blocks: the layers a cache for speculative decoding holds."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def uses_router_bias(self) -> bool:
        """The aux-loss-free selection bias exists only for DeepSeek-V3's routing."""
        return self.topk_method == "noaux_tc"

    @property
    def uses_dsa(self) -> bool:
        """Whether attention is DeepSeek Sparse Attention (V3.2): an indexer picks the keys each query sees."""
        return self.index_n_heads is not None

    def with_dsa(self, index_n_heads: int = 64, index_head_dim: int = 128, index_topk: int = 2048) -> ModelConfig:
        """This (dense V3) architecture as V3.2: the same model plus an indexer per attention layer."""
        return self.replace(model_type="deepseek_v32", index_n_heads=index_n_heads, index_head_dim=index_head_dim,
                            index_topk=index_topk)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def yarn(self) -> dict[str, float]:
        """The YaRN parameters with their defaults filled in (only meaningful when rope_type is yarn)."""
        rs = self.rope_scaling or {}
        return {
            "factor": float(rs.get("factor", 1.0)),
            "original_max_position_embeddings": int(
                rs.get("original_max_position_embeddings", self.max_position_embeddings)
            ),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": float(rs.get("mscale") or 0.0),
            "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0),
            "attention_factor": rs.get("attention_factor"),
            "truncate": bool(rs.get("truncate", True)),
        }

    @property
    def softmax_scale(self) -> float:
        """(nope + rope)^-1/2, times m^2 with m = yarn_mscale(factor, mscale_all_dim) under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            y = self.yarn()
            if y["mscale_all_dim"]:
                scale *= yarn_mscale(y["factor"], y["mscale_all_dim"]) ** 2
        return scale

    # ----- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is invalid or contradicts another."""
        self._validate_sizes()
        self._validate_routing()
        self._validate_rope()
        self._validate_dsa()
        self._validate_unsupported()

    def _bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"config field {name}={getattr(self, name)!r} {why}")

    def _validate_sizes(self) -> None:
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise self._bad(name, "must be a positive integer")
        for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise self._bad(name, "must be a non-negative integer")
        q = self.q_lora_rank
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q <= 0):
            raise self._bad("q_lora_rank", "must be a positive integer, or null for uncompressed queries")
        if self.qk_rope_head_dim % 2:
            raise self._bad("qk_rope_head_dim", "must be even: RoPE rotates pairs of dimensions")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise self._bad("first_k_dense_replace", f"exceeds num_hidden_layers={self.num_hidden_layers}")
        for name in ("rms_norm_eps", "routed_scaling_factor"):
            if not _finite(getattr(self, name)) or not getattr(self, name) > 0:
                raise self._bad(name, "must be a positive number")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise self._bad(name, "must be true or false")

    def _validate_routing(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise self._bad("scoring_func", f"is not one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise self._bad("topk_method", f"is not one of {', '.join(TOPK_METHODS)}")
        if self.n_routed_experts % self.n_group:
            raise self._bad("n_routed_experts", f"must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise self._bad("topk_group", f"exceeds n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise self._bad("num_experts_per_tok", f"exceeds n_routed_experts={self.n_routed_experts}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.num_experts_per_tok > self.topk_group * per_group:
            raise self._bad("num_experts_per_tok", f"exceeds the {self.topk_group * per_group} experts in the "
                            f"topk_group={self.topk_group} groups it may choose from")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            raise self._bad("n_group", "leaves fewer than 2 experts per group; noaux_tc scores a group by its top 2")

    def _validate_rope(self) -> None:
        if not _finite(self.rope_theta) or not self.rope_theta > 1:
            raise self._bad("rope_theta", "must be a number greater than 1")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise self._bad("rope_scaling", "must be a mapping or null")
        for key, value in (self.rope_scaling or {}).items():
            if key in _YARN_NUMBERS and value is not None and not _finite(value):
                raise ConfigError(f"config field rope_scaling.{key}={value!r} must be a finite number")
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(f"config field rope_scaling has rope type {self.rope_type!r}; only yarn is supported")
        if self.rope_type == "yarn":
            y = self.yarn()
            if y["factor"] < 1:
                raise ConfigError(f"config field rope_scaling.factor={y['factor']} must be at least 1")
            if y["original_max_position_embeddings"] <= 0:
                raise ConfigError("config field rope_scaling.original_max_position_embeddings must be positive")

    def _validate_dsa(self) -> None:
        if (self.model_type == "deepseek_v32") != self.uses_dsa:
            raise self._bad("index_n_heads", "must be set exactly when model_type is deepseek_v32 (sparse attention)")
        if not self.uses_dsa:
            return
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise self._bad(name, "must be a positive integer")
        if self.q_lora_rank is None:
            raise self._bad("q_lora_rank", "must be set for sparse attention: the indexer's queries read c_q")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise self._bad("index_head_dim", f"is narrower than qk_rope_head_dim={self.qk_rope_head_dim}, which "
                            "the indexer rotates")

    def _validate_unsupported(self) -> None:
        """Fields kept in `extra` whose other values the model cannot honour."""
        if self.extra.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field hidden_act={self.extra['hidden_act']!r} is not supported; use silu")
        if self.extra.get("rope_interleave", True) is not True:
            raise ConfigError(
                "config field rope_interleave=false is not supported: DeepSeek weights expect interleaved RoPE"
            )
        for name in ("attention_bias", "mlp_bias"):
            if self.extra.get(name):
                raise ConfigError(f"config field {name}=true is not supported: DeepSeek models have no biases")
        if self.tie_word_embeddings:
            raise self._bad("tie_word_embeddings", "is not supported: DeepSeek models keep a separate output head")

    # ----- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | os.PathLike) -> ModelConfig:
        """Read a Hugging Face config: a dict, a config.json path, or a model directory."""
        if not isinstance(source, dict):
            source = _read_config_json(source)
        try:
            d = copy.deepcopy(source)
        except RecursionError:
            raise ConfigError("the config is nested too deeply to be a model configuration") from None
        model_type = d.get("model_type", "deepseek_v3")
        if not isinstance(model_type, str) or model_type not in _HF_DEFAULTS:
            raise ConfigError(
                f"config field model_type={model_type!r} is not a DeepSeek model; expected deepseek_v3, deepseek_v32 "
                "or deepseek_v2"
            )
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} - {"extra", "model_type"}
        values: dict[str, Any] = dict(_HF_DEFAULTS[model_type])
        spelling = "rope_scaling"
        if "rope_parameters" in d:
            spelling = "rope_parameters"
            rp = d["rope_parameters"]
            if not isinstance(rp, dict):
                raise ConfigError("config field rope_parameters must be a mapping")
            rp = dict(rp)
            if "rope_theta" in rp:
                values["rope_theta"] = rp.pop("rope_theta")
            values["rope_scaling"] = rp
        for key in list(d):
            if key in names and not (spelling == "rope_parameters" and key == "rope_scaling"):
                values[key] = d.pop(key)
        d.pop("model_type", None)
        d.pop("rope_parameters", None)
        nulls = frozenset(k for k in ("n_group", "topk_group") if values.get(k) is None)
        for key in nulls:  # transformers' V2 config writes null for "no expert groups"
            values[key] = 1
        return cls(
            **values, model_type=model_type, extra=d, _hf_spelling=spelling, _hf_keys=tuple(source), _hf_nulls=nulls
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict; for a config read with from_hf, equal to what was read."""
        defaults = _HF_DEFAULTS[self.model_type]
        out: dict[str, Any] = {}
        source_keys = self._hf_keys
        for f in dataclasses.fields(self):
            name = f.name
            if name.startswith("_") or name in ("extra", "rope_scaling", "rope_theta"):
                continue
            if name.startswith("index_") and not self.uses_dsa:
                continue
            value = getattr(self, name)
            if source_keys is not None and name not in source_keys and value == defaults.get(name, _MISSING):
                continue  # the source left it out and meant the default
            out[name] = None if (name in self._hf_nulls and value == 1) else value
        if self._hf_spelling == "rope_parameters":
            out["rope_parameters"] = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
            if source_keys is not None and "rope_scaling" not in source_keys and self.rope_scaling is None:
                del out["rope_scaling"]
            if (
                source_keys is not None
                and "rope_theta" not in source_keys
                and self.rope_theta == defaults["rope_theta"]
            ):
                del out["rope_theta"]
        out.update(copy.deepcopy(self.extra))
        if source_keys is None:
            out.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
            # unused by MLA, but transformers derives its attention grouping from it
            out.setdefault("num_key_value_heads", self.num_attention_heads)
        order = list(source_keys or ())
        return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again); keeps the source's spelling of config.json."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json atomically (temporary name, then rename)."""
        from dsv3.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_hf(), indent=2) + "\n")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * m * ln(s) + 1 for a context stretched s times (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_MISSING = object()

_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                  "deepseek_v2": "DeepseekV2ForCausalLM"}

# What transformers assumes for a field that a config.json leaves out, per model_type.
# fmt: off
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "deepseek_v2": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
        "num_hidden_layers": 32, "first_k_dense_replace": 0, "num_attention_heads": 32, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
        "num_nextn_predict_layers": 0, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
}
# fmt: on
# V3.2 is V3 with the indexer; transformers' defaults for it differ only there and in the context length
_HF_DEFAULTS["deepseek_v32"] = {**_HF_DEFAULTS["deepseek_v3"], "max_position_embeddings": 163840, "index_n_heads": 64,
                                "index_head_dim": 128, "index_topk": 2048}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number; write a finite value")


def _read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config file at {path}; pass a config.json or a model directory that has one")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, NaN/Infinity, or absurdly nested
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or regenerate the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(d).__name__}")
    return d


# ----- presets ---------------------------------------------------------------------------------


def _v2_lite() -> ModelConfig:
    return ModelConfig(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        num_nextn_predict_layers=0,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        max_position_embeddings=163840,
        model_type="deepseek_v2",
    )


def _tiny() -> ModelConfig:
    """A ~0.25M-parameter model with every V3 mechanism switched on, for tests."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_nextn_predict_layers=1,
        rope_scaling={
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=512,
    )


def _small() -> ModelConfig:
    """~26M parameters (~9M active): the CPU-trainable quick-start model, all V3 features on."""
    return ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_nextn_predict_layers=1,
        rope_scaling={
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=4096,
    )


def _v32() -> ModelConfig:
    """DeepSeek-V3.2: V3 with DeepSeek Sparse Attention (64 indexer heads of 128, top 2,048 tokens)."""
    return ModelConfig().with_dsa()


def _tiny_dsa() -> ModelConfig:
    """tiny with sparse attention keeping 8 tokens, so sequences of a few dozen tokens are sparse, for tests."""
    return _tiny().with_dsa(index_n_heads=16, index_head_dim=16, index_topk=8)


PRESETS = {"v3": ModelConfig, "v3.2": _v32, "v2-lite": _v2_lite, "tiny": _tiny, "tiny-dsa": _tiny_dsa,
           "small": _small}


def preset(name: str) -> ModelConfig:
    """A named preset: v3 (671B), v3.2 (671B, sparse attention), v2-lite (16B), small (quick start), tiny and
    tiny-dsa (tests)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
