"""Load and save models in the Hugging Face checkpoint layout (DESIGN section 4), FP8 release format included."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

import torch

from dsv3.checkpoint import names
from dsv3.checkpoint.files import CheckpointReader, nbytes, plan_shards, write_shards
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError, InvalidValue
from dsv3.fp8 import BLOCK, SCALE_FORMATS, dequantize_blocks, fp8_nbytes, quantize_blocks
from dsv3.hardware import check_memory
from dsv3.model import DeepSeekV3

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
# tensors some checkpoints carry that are recomputed here rather than loaded
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def scale_fmt_of(cfg: ModelConfig) -> str:
    """The FP8 scale format a config.json names: "ue8m0" when its quantization_config says `scale_fmt: ue8m0`
    (DeepSeek-V3.1 and later: every block scale a power of two), else "fp32" (V3: any fp32 scale). Either way
    the scales are stored as fp32 `weight_scale_inv` tensors and loading multiplies by them."""
    qc = cfg.extra.get("quantization_config")
    return "ue8m0" if isinstance(qc, dict) and qc.get("scale_fmt") == "ue8m0" else "fp32"


def resolve_scale_fmt(scale_fmt: str | None, cfg: ModelConfig, fp8: bool) -> str:
    """The scale format an FP8 write uses: `scale_fmt` if given, else the one the config came with, so a V3.1
    checkpoint is written back with power-of-two scales. Raises InvalidValue for an unknown format or one given
    for a write that is not FP8."""
    if scale_fmt is None:
        return scale_fmt_of(cfg)
    if scale_fmt not in SCALE_FORMATS:
        raise InvalidValue("scale_fmt", scale_fmt, f"is not one of {', '.join(SCALE_FORMATS)}")
    if not fp8:
        raise InvalidValue("scale_fmt", scale_fmt, "applies only when writing FP8 weights")
    return scale_fmt


def _mtp_layers_present(reader: CheckpointReader, cfg: ModelConfig) -> set[int]:
    """The MTP modules (1-based) the checkpoint holds tensors of."""
    layers = {cfg.mtp_layer_index(k): k for k in range(1, cfg.num_nextn_predict_layers + 1)}
    present = set()
    for key in reader.keys():
        parts = key.split(".")
        if key.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) in layers:
            present.add(layers[int(parts[2])])
    return present


def read_tensor(reader: CheckpointReader, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor in `dtype`, dequantising a released FP8 weight with its block scales."""
    t = reader.get(key)
    if t.dtype == torch.float8_e4m3fn:
        scale_key = key + SCALE_SUFFIX
        if scale_key not in reader:
            raise CheckpointError(f"FP8 tensor {key} has no {scale_key} beside it; the checkpoint is incomplete")
        try:
            return dequantize_blocks(t, reader.get(scale_key), dtype)
        except ValueError as e:
            raise CheckpointError(f"FP8 tensor {key}: {e}") from None
    return t.to(dtype)


def read_slice(reader: CheckpointReader, key: str, dtype: torch.dtype, dim: int, start: int, stop: int) -> torch.Tensor:
    """Slice [start, stop) along `dim` of a tensor, reading only that part; an FP8 weight is read over the whole
    128-blocks the slice touches, dequantised with their scales, and trimmed."""
    if reader.dtype(key) != torch.float8_e4m3fn:
        return reader.get(key, dim, start, stop).to(dtype)
    scale_key = key + SCALE_SUFFIX
    if scale_key not in reader:
        raise CheckpointError(f"FP8 tensor {key} has no {scale_key} beside it; the checkpoint is incomplete")
    lo, hi = start // BLOCK * BLOCK, min(-(-stop // BLOCK) * BLOCK, reader.shape(key)[dim])
    try:
        scale = reader.get(scale_key, dim, lo // BLOCK, -(-hi // BLOCK))
        block = dequantize_blocks(reader.get(key, dim, lo, hi), scale, dtype)
    except ValueError as e:
        raise CheckpointError(f"FP8 tensor {key}: {e}") from None
    return block.narrow(dim, start - lo, stop - start)


Splits = dict[str, tuple[int, int, int]]  # parameter name -> (dim, start, stop) of the part a model holds


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    device: str | torch.device = "cpu",
    attn_impl: str = "naive",
    experts_impl: str = "grouped",
    shard: Callable[[DeepSeekV3], Splits] | None = None,
) -> DeepSeekV3:
    """Build a DeepSeekV3 from a Hugging Face model directory (config.json + safetensors, sharded or not).

    dtype: the weights' dtype (default: the checkpoint's own; bf16 for an FP8 checkpoint, whose blocks are
    dequantised on the CPU). The model is built on the meta device, allocated once, and filled tensor by
    tensor from memory-mapped files, so peak memory stays near the model's own size. The router bias stays
    fp32. MTP layers load into the MTP modules; a config that declares MTP layers whose tensors are all absent
    (as transformers saves them) loads with MTP switched off and a warning. `shard(model)`, called on the
    meta-device model, may cut its parameters to one part each (tensor or expert parallelism) and return the
    parts; only those slices are then allocated and read.
    """
    cfg = ModelConfig.from_hf(path if os.path.isdir(path) else os.path.dirname(os.fspath(path)))
    reader = CheckpointReader(path)
    if cfg.num_nextn_predict_layers and not _mtp_layers_present(reader, cfg):
        warnings.warn(
            f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint holds none "
            "of their tensors; loading without MTP",
            stacklevel=2,
        )
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = _checkpoint_dtype(reader)
    with torch.device("meta"):
        model = DeepSeekV3(cfg, attn_impl=attn_impl, experts_impl=experts_impl).to(dtype)
        splits = shard(model) if shard is not None else {}
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_memory(needed, f"the model in {path}", device, hint="load it in a smaller --dtype or on a larger machine")
    model = model.to_empty(device=device)
    _fill_all(reader, model.state_dict(keep_vars=True), cfg, path, splits=splits)
    return model


def load_into(model: DeepSeekV3, path: str | os.PathLike, *, subset: bool = False,
              keep: Callable[[str], bool] | None = None) -> None:
    """Fill an existing model's parameters and buffers (in their own dtypes) from the Hugging Face model
    directory `path`, whose config must be the model's. `subset`: the model holds only part of the checkpoint (a
    pipeline rank's blocks, or no MTP module), and the checkpoint's tensors with no place in it are passed over;
    every tensor of the model must still be there, except those whose keys `keep` accepts, which keep their
    values when the checkpoint lacks them (a dense model's missing indexers, for sparse-attention training)."""
    _fill_all(CheckpointReader(path), model.state_dict(keep_vars=True), model.config, path, subset=subset, keep=keep)


def _fill_all(reader: CheckpointReader, state: dict[str, torch.Tensor], cfg: ModelConfig, path, *,
              subset: bool = False, splits: Splits | None = None, keep: Callable[[str], bool] | None = None) -> None:
    with torch.no_grad():
        filled = _fill(reader, state, cfg, path, subset=subset, splits=splits or {})
    if keep is not None:
        state = {k: v for k, v in state.items() if not keep(k)}
    _check_complete(state, filled, cfg, path, splits or {})


def _checkpoint_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype the checkpoint keeps its embedding in (bf16 when that is not a float dtype we load into)."""
    if "model.embed_tokens.weight" not in reader:
        return torch.bfloat16
    emb = reader.get("model.embed_tokens.weight")
    return emb.dtype if emb.dtype in DTYPES.values() else torch.bfloat16


def _fill(reader: CheckpointReader, state: dict[str, torch.Tensor], cfg: ModelConfig, path,
          subset: bool = False, splits: Splits | None = None) -> set:
    """Copy every checkpoint tensor into its place in `state`; returns the (key, expert) pairs filled. A tensor
    with no place in this model (unless `subset`), or of the wrong shape, is an error that names it."""
    filled: set[tuple[str, int | None]] = set()
    unexpected = []
    for key in reader.keys():
        if key.endswith(SCALE_SUFFIX) or key.endswith(_IGNORED_SUFFIXES):
            continue
        target = names.hf_to_ours(key, cfg.num_hidden_layers, cfg.num_nextn_predict_layers)
        if target is None or target.key not in state:
            # transformers writes empty shared experts when there are none; a subset model skips the rest
            if 0 not in reader.shape(key) and not subset:
                unexpected.append(key)
            continue
        if target.copy_of_shared:
            continue  # MTP's copies of the embedding and head: the model shares the originals
        param = state[target.key]
        split = (splits or {}).get(target.key)
        if target.expert is not None:
            first = split[1] if split else 0
            if split and not first <= target.expert < split[2]:
                continue  # another rank's expert
            dest = param[target.expert - first] if target.expert - first < param.shape[0] else None
        else:
            dest = param
        if dest is None:
            unexpected.append(key)
            continue
        if split is not None and target.expert is None:
            t = read_slice(reader, key, param.dtype, *split)
        else:
            t = read_tensor(reader, key, param.dtype)
        if tuple(t.shape) != tuple(dest.shape):
            raise CheckpointError(f"tensor {key} has shape {tuple(t.shape)} but config.json implies "
                                  f"{tuple(dest.shape)}; the checkpoint and its config do not match")
        dest.copy_(t)
        filled.add((target.key, target.expert))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]}{more} in {path}: it has no place in a model with this config.json"
        )
    return filled


def _check_complete(state: dict[str, torch.Tensor], filled: set, cfg: ModelConfig, path,
                    splits: Splits | None = None) -> None:
    L = cfg.num_hidden_layers
    missing = []
    for key in state:
        expert_names = names.expert_names(key, L, cfg.n_routed_experts)
        if expert_names is not None:
            _, first, stop = (splits or {}).get(key, (0, 0, len(expert_names)))
            missing += [n for e, n in enumerate(expert_names) if first <= e < stop and (key, e) not in filled]
        elif (key, None) not in filled:
            missing.append(names.ours_to_hf(key, L) or key)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]}{more} missing from {path}; the checkpoint is incomplete")


def hf_layout(state_keys: Iterable[str], cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(HF name, our state-dict key, expert index or None) for every tensor of the checkpoint: one per
    expert, and for each MTP layer the release's copies of the embedding and the output head."""
    L = cfg.num_hidden_layers
    out: list[tuple[str, str, int | None]] = []
    for key in state_keys:
        expert_names = names.expert_names(key, L, cfg.n_routed_experts)
        if expert_names is not None:
            out += [(hf, key, e) for e, hf in enumerate(expert_names)]
            continue
        hf = names.ours_to_hf(key, L)
        if hf is None:
            raise RuntimeError(f"no Hugging Face name for {key}")  # a gap in the name table, not user input
        out.append((hf, key, None))
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        for suffix, ours in names.MTP_COPIES.items():
            out.append((f"model.layers.{cfg.mtp_layer_index(k)}.{suffix}", ours, None))
    return out


def save_pretrained(
    model: DeepSeekV3,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    fp8: bool = False,
    scale_fmt: str | None = None,
) -> None:
    """Write `model` as a Hugging Face checkpoint that transformers' AutoModelForCausalLM loads.

    One tensor per expert, MTP module k as layer num_hidden_layers + k - 1 (with the release's copies of the
    embedding and head), sharded with an index above `max_shard_size`. With fp8, the release's layout: the
    tensors it quantises as float8_e4m3fn with 128x128 block scales, the rest in bf16 (unless `dtype` says
    otherwise), the router bias in fp32, an index even for one file, and the release's quantization_config
    in config.json. `scale_fmt` (fp8 only): "fp32" (V3's scales, amax / 448) or "ue8m0" (V3.1's: powers of
    two, `"scale_fmt": "ue8m0"` in config.json); default: the format the model's config came with. Every file
    is written under a temporary name and renamed.
    """
    state = model.state_dict()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    write_pretrained(path, model.config, shapes, state.__getitem__, max_shard_size=max_shard_size, dtype=dtype,
                     fp8=fp8, scale_fmt=scale_fmt)


def write_pretrained(
    path: str | os.PathLike,
    cfg: ModelConfig,
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    fetch: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    fp8: bool = False,
    scale_fmt: str | None = None,
) -> None:
    """`save_pretrained` from any source of tensors: `shapes` gives each state-dict key's shape and dtype,
    `fetch(key)` the whole tensor, asked for one shard's tensors at a time (a distributed checkpoint is read
    that way, without holding the model in one process)."""
    scale_fmt = resolve_scale_fmt(scale_fmt, cfg, fp8)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if fp8 and dtype is None:
        dtype = torch.bfloat16
    layout = {hf: (key, e) for hf, key, e in hf_layout(shapes, cfg)}

    def final_dtype(name: str, key: str) -> torch.dtype:
        if name.endswith("e_score_correction_bias"):
            return torch.float32
        return dtype or shapes[key][1]

    def shape(key: str, e: int | None) -> tuple[int, ...]:
        return shapes[key][0] if e is None else shapes[key][0][1:]

    planned = [(name, fp8_nbytes(shape(key, e)) if fp8 and names.is_fp8_in_release(name)
                else nbytes(shape(key, e), final_dtype(name, key))) for name, (key, e) in layout.items()]

    def materialize(shard_names):
        out, cache = {}, {}
        for name in shard_names:
            key, e = layout[name]
            if key not in cache:
                cache.clear()  # one stacked tensor at a time: an expert tensor's E slices are neighbours
                cache[key] = fetch(key)
            t = cache[key] if e is None else cache[key][e]
            if fp8 and names.is_fp8_in_release(name):
                out[name], out[name + SCALE_SUFFIX] = quantize_blocks(t, scale_format=scale_fmt)
            else:
                out[name] = t.detach().to("cpu", final_dtype(name, key)).clone()
        return out

    write_shards(path, plan_shards(planned, max_shard_size), materialize, always_index=fp8)
    write_config(path, cfg, dtype or shapes["embed.weight"][1], fp8, scale_fmt)


def quantization_config(scale_fmt: str = "fp32") -> dict:
    """config.json's quantization_config for the FP8 block format, key for key and in order as released:
    DeepSeek-V3's four keys, and for power-of-two scales DeepSeek-V3.1's `scale_fmt` after them."""
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    if scale_fmt == "ue8m0":
        qc["scale_fmt"] = "ue8m0"
    return qc


def write_config(path: str, cfg: ModelConfig, dtype: torch.dtype, fp8: bool, scale_fmt: str = "fp32") -> None:
    """config.json with the weights' dtype, and the release's quantization_config when FP8."""
    extra = dict(cfg.extra)
    extra["dtype"] = str(dtype).removeprefix("torch.")
    extra.pop("torch_dtype", None)
    if fp8:
        extra["quantization_config"] = quantization_config(scale_fmt)
    else:
        extra.pop("quantization_config", None)
    cfg.replace(extra=extra).save(os.path.join(path, "config.json"))
