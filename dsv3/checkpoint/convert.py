"""Convert a Hugging Face checkpoint tensor by tensor: FP8 -> bf16 (or fp16/fp32), a dtype change, bf16 -> FP8
(V3's fp32 block scales or V3.1's power-of-two ones), or re-sharding. Names stay the same; only one shard of new
tensors is held in memory at a time. FP8 blocks already in the format asked for are copied, bytes unchanged.

The result is built in a temporary folder beside the destination and put in its place at the end, so a
conversion that fails or is killed leaves no destination or a complete one; the source is only read, and a
destination that is, holds or lies inside the source (through links too) is refused.
"""

from __future__ import annotations

import os
import shutil

import torch

from dsv3.checkpoint import names
from dsv3.checkpoint.files import CheckpointReader, nbytes, plan_shards, write_shards
from dsv3.checkpoint.pretrained import (
    DTYPES,
    SCALE_SUFFIX,
    read_tensor,
    resolve_scale_fmt,
    scale_fmt_of,
    write_config,
)
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError, InvalidValue
from dsv3.fp8 import block_scale_shape, fp8_nbytes, quantize_blocks
from dsv3.utils import check_destination, staged_directory

# files beside the weights that a model directory carries along
SIDECARS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _stored_blocks(reader: CheckpointReader, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An FP8 source tensor and its scales as stored, when it has them (then they can be copied unchanged)."""
    scale_key = key + SCALE_SUFFIX
    if reader.dtype(key) != torch.float8_e4m3fn or scale_key not in reader:
        return None
    if tuple(reader.shape(scale_key)) != block_scale_shape(reader.shape(key)):
        raise CheckpointError(f"FP8 tensor {key}: scale shape {tuple(reader.shape(scale_key))} does not match "
                              f"weight {tuple(reader.shape(key))}")
    return reader.get(key), reader.get(scale_key)


def convert_checkpoint(
    src: str, dst: str, *, dtype: str = "bf16", max_shard_size: int | str | None = None, overwrite: bool = False,
    scale_fmt: str | None = None,
) -> dict[str, str]:
    """Write `src` to `dst` with weights in `dtype` ("bf16", "fp16", "fp32" or "fp8", the release's block format).

    The router bias stays fp32; with fp8, only the tensors the release quantises become e4m3, with block scales
    in `scale_fmt` ("fp32" or "ue8m0"; default: the source config's, fp32 for a source that is not FP8). Source
    FP8 blocks whose scale format is the one asked for are copied as they are. Shards follow the source's,
    unless max_shard_size is given. A `dst` that already holds files is replaced only with `overwrite`.
    Returns the new weight map.
    """
    if dtype not in (*DTYPES, "fp8"):
        raise InvalidValue("dtype", dtype, f"is not one of {', '.join((*DTYPES, 'fp8'))}")
    fp8 = dtype == "fp8"
    check_destination(dst, overwrite=overwrite, sources=(src,))
    cfg = ModelConfig.from_hf(src)
    scale_fmt = resolve_scale_fmt(scale_fmt, cfg, fp8)
    copy_blocks = fp8 and "quantization_config" in cfg.extra and scale_fmt_of(cfg) == scale_fmt
    reader = CheckpointReader(src)
    target = torch.bfloat16 if fp8 else DTYPES[dtype]
    keys = [k for k in reader.keys() if not k.endswith(SCALE_SUFFIX)]

    def out_dtype(key: str) -> torch.dtype:
        return torch.float32 if key.endswith("e_score_correction_bias") else target

    def planned_bytes(key: str) -> int:
        shape = reader.shape(key)
        return fp8_nbytes(shape) if fp8 and names.is_fp8_in_release(key) else nbytes(shape, out_dtype(key))

    def materialize(shard_keys):
        out = {}
        for key in shard_keys:
            if fp8 and names.is_fp8_in_release(key):
                blocks = _stored_blocks(reader, key) if copy_blocks else None
                if blocks is None:  # quantise from fp32: a bf16 copy of V3's dequantised blocks would round twice
                    blocks = quantize_blocks(read_tensor(reader, key, torch.float32), scale_format=scale_fmt)
                out[key], out[key + SCALE_SUFFIX] = blocks
            else:
                out[key] = read_tensor(reader, key, out_dtype(key))
        return out

    if max_shard_size is None:  # keep the source's grouping: one destination shard per source shard
        shards = [[k for k in reader.keys_in(f) if not k.endswith(SCALE_SUFFIX)] for f in reader.files()]
    else:
        shards = plan_shards([(k, planned_bytes(k)) for k in keys], max_shard_size)
    with staged_directory(dst, "convert") as tmp:
        weight_map = write_shards(tmp, [s for s in shards if s], materialize, always_index=fp8)
        write_config(tmp, cfg, target, fp8, scale_fmt)
        for name in SIDECARS:
            if os.path.exists(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    return weight_map
