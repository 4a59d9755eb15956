"""`dsv3 cost`: FLOPs, GPU-hours, days and dollars to train a model on so many tokens.

    dsv3 cost --preset v3 --tokens 14.8T --gpu h800 --precision fp8 --gpus 2048
    dsv3 cost --reproduce            # DeepSeek-V3's and Llama 3.1 405B's published figures, recomputed

`--json` prints one object with the keys: model, tokens, seq_len, gpu, precision, peak_flops (FLOP/s),
mfu, mfu_source, flops_per_token (training, forward + backward), flops_per_token_breakdown
(component -> FLOPs per token), total_flops, gpu_hours, gpus, days, usd_per_gpu_hour, usd.
With --reproduce, `--json` prints a list of rows with: name, gpu, tokens, seq_len (one per stage),
total_flops, flops_reported, gpu_hours_reported, implied_mfu ({"bf16": .., "fp8": ..}) and
gpu_hours_per_trillion_tokens (null where the source reports no hours for that row).
"""

from __future__ import annotations

import argparse
import json

from dsv3.commands import options
from dsv3.cost import (
    DEEPSEEK_V3_GPU_HOURS,
    DEFAULT_USD_PER_GPU_HOUR,
    CostEstimate,
    default_mfu,
    estimate,
    mfu_from_run,
    parse_count,
    published_runs,
)
from dsv3.hardware import NAMES, PRECISIONS, accelerator
from dsv3.utils import human

HELP = "FLOPs, GPU-hours, days and dollars to train a model (--reproduce: DeepSeek-V3's published figures)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_config_source(parser, required=False, default="v3")
    parser.add_argument("--tokens", default="14.8T", help="training tokens, with K/M/B/T suffixes (default 14.8T)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (default 4096)")
    parser.add_argument("--gpu", default="h800", help=f"accelerator: {', '.join(NAMES)} (default h800)")
    parser.add_argument("--precision", "--dtype", dest="precision", choices=PRECISIONS, default="bf16",
                        help="the training's matmul precision, whose peak the MFU is measured against: bf16, or fp8 "
                             "as `dsv3 train --dtype fp8` and DeepSeek-V3 train (default bf16)")
    mfu = parser.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=float,
                     help="model FLOPs utilisation in (0, 1] (default: what DeepSeek-V3's published hours imply)")
    mfu.add_argument("--from-run", metavar="RUN_DIR", help="take the mean MFU a training run logged in metrics.jsonl")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=DEFAULT_USD_PER_GPU_HOUR,
                        help=f"rental price (default {DEFAULT_USD_PER_GPU_HOUR:g})")
    parser.add_argument("--gpus", type=int, default=2048, help="GPUs training together, for the days (default 2048)")
    parser.add_argument("--reproduce", action="store_true",
                        help="print DeepSeek-V3's and Llama 3.1 405B's published figures next to computed ones")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.reproduce:
        return _reproduce(args.json)
    name, cfg = options.config_from_args(args, default="v3")
    gpu = accelerator(args.gpu)
    if args.from_run:
        mfu, source = mfu_from_run(args.from_run), f"mean of {args.from_run}/metrics.jsonl"
    elif args.mfu is not None:
        mfu, source = args.mfu, "--mfu"
    else:
        mfu, source = default_mfu(args.precision), "DeepSeek-V3 pre-training's, implied by its published hours"
    est = estimate(
        cfg, parse_count(args.tokens), args.seq_len, gpu, precision=args.precision, mfu=mfu,
        gpus=args.gpus, usd_per_gpu_hour=args.usd_per_gpu_hour,
    )
    if args.json:
        print(json.dumps(_as_json(name, est, source), indent=2))
    else:
        print(_table(name, est, source))
    return 0


def _as_json(name: str, est: CostEstimate, mfu_source: str) -> dict:
    return {
        "model": name,
        "tokens": est.tokens,
        "seq_len": est.seq_len,
        "gpu": est.gpu.name,
        "precision": est.precision,
        "peak_flops": est.peak_flops,
        "mfu": est.mfu,
        "mfu_source": mfu_source,
        "flops_per_token": est.flops.total,
        "flops_per_token_breakdown": est.flops.as_dict(),
        "total_flops": est.total_flops,
        "gpu_hours": est.gpu_hours,
        "gpus": est.gpus,
        "days": est.days,
        "usd_per_gpu_hour": est.usd_per_gpu_hour,
        "usd": est.usd,
    }


def human4(x: float) -> str:
    """2664000 -> '2.664M': four significant digits, enough to show published figures as published."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def flop(x: float) -> str:
    """2.606e11 -> '260.6 GFLOP'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}FLOP"
    return f"{x:.4g} FLOP"


def sci(x: float) -> str:
    """3.857e24 -> '3.86e24' (what people write for FLOP totals)."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _table(name: str, est: CostEstimate, mfu_source: str) -> str:
    f = est.flops
    rows = [
        ("model", f"{name}: {human(est.tokens)} tokens in sequences of {est.seq_len}"),
        ("training FLOPs per token", f"{flop(f.total)} (forward + backward)"),
    ]
    for component, value in f.as_dict().items():
        if value:
            rows.append((f"  {component}", f"{flop(value)} ({100 * value / f.total:.1f}%)"))
    rows += [
        ("total FLOPs", sci(est.total_flops)),
        ("GPU", f"{est.gpu.description}, {est.precision} peak {est.peak_flops / 1e12:.4g} TFLOP/s"),
        ("MFU", f"{est.mfu:.3f} ({mfu_source})"),
        ("GPU-hours", human4(est.gpu_hours)),
        (f"days on {est.gpus} GPU{'s' if est.gpus > 1 else ''}", f"{est.days:.3g}"),
        (f"cost at ${est.usd_per_gpu_hour:g}/GPU-hour", "$" + human4(est.usd)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _reproduce(as_json: bool) -> int:
    runs = published_runs()
    if as_json:
        print(json.dumps([r.as_dict() for r in runs], indent=2))
        return 0

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    header = ("run", "GPU", "tokens", "seq", "FLOPs", "reported", "GPU-hours", "MFU bf16", "MFU fp8", "GPU-h/T tok")
    rows = [header]
    for r in runs:
        rows.append((
            r.name,
            accelerator(r.gpu).name.upper(),
            human(r.tokens),
            "+".join(f"{s.seq_len // 1024}K" for s in r.stages),
            sci(r.total_flops),
            "-" if r.flops_reported is None else sci(r.flops_reported),
            "-" if r.gpu_hours_reported is None else human4(r.gpu_hours_reported),
            pct(r.implied_mfu("bf16")),
            pct(r.implied_mfu("fp8")),
            "-" if r.gpu_hours_per_trillion_tokens is None else human4(r.gpu_hours_per_trillion_tokens),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    hours = DEEPSEEK_V3_GPU_HOURS
    total = sum(hours.values())
    parts = " + ".join(f"{k} {human4(v)}" for k, v in hours.items())
    lines += [
        "",
        "FLOPs: computed here (training = 3x forward, MTP included); reported: the authors' own figure.",
        "MFU: computed FLOPs / (reported GPU-hours x the GPU's dense peak).",
        f"DeepSeek-V3 in all: {human4(total)} H800 GPU-hours ({parts}) = "
        f"${human4(total * DEFAULT_USD_PER_GPU_HOUR)} at ${DEFAULT_USD_PER_GPU_HOUR:g}/GPU-hour.",
    ]
    print("\n".join(lines))
    return 0
