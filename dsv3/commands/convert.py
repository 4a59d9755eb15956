"""`dsv3 convert SRC DST`: rewrite a Hugging Face checkpoint in another dtype or sharding, shard by shard."""

from __future__ import annotations

import argparse
import time

HELP = "convert a checkpoint: FP8 -> bf16, another dtype, bf16 -> the release's FP8 format, or re-shard"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source model directory (config.json + safetensors)")
    parser.add_argument("dst", help="destination directory: created whole beside its final place and moved there "
                        "at the end; it must not be, hold or lie inside src")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32", "fp8"],
        default="bf16",
        help="weight dtype of the result (default bf16; fp8 writes e4m3 with 128x128 block scales)",
    )
    parser.add_argument(
        "--scale-fmt",
        choices=["fp32", "ue8m0"],
        default=None,
        help="with --dtype fp8: the block scales, any fp32 number (DeepSeek-V3's) or a power of two (V3.1's "
        "ue8m0); default: the source config's format, fp32 for a source that is not FP8",
    )
    parser.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="re-shard at this size (e.g. 5GB); default: one output shard per input shard",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a destination that already holds files")


def run(args: argparse.Namespace) -> int:
    from dsv3.checkpoint.convert import convert_checkpoint
    from dsv3.checkpoint.pretrained import scale_fmt_of
    from dsv3.config import ModelConfig

    start = time.perf_counter()
    weight_map = convert_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    overwrite=args.overwrite, scale_fmt=args.scale_fmt)
    n_files = len(set(weight_map.values()))
    what = args.dtype
    if args.dtype == "fp8":
        what += f", {scale_fmt_of(ModelConfig.from_hf(args.dst))} block scales"
    print(
        f"wrote {len(weight_map)} tensors in {n_files} file(s) to {args.dst} ({what}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0
