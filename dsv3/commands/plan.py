"""`dsv3 plan`: will it fit? Per-GPU memory for serving or training a model.

    dsv3 plan serve --preset v3 --gpu h200 --gpus 8 --weights fp8 --context 32768 --batch 4
    dsv3 plan train --preset v3 --gpu h800 --gpus 2048 --pp 16 --ep 64 --zero 1 --compute fp8
    dsv3 plan train --preset small --gpu h100 --dp-shard 2 --ep 2 --pp 2     (the layout flags of `dsv3 train`)

`dsv3 plan serve --json` prints: model, gpu, gpus, weights, cache, mtp, memory_utilization,
weight_bytes, weight_bytes_per_gpu, usable_bytes_per_gpu, cache_bytes_per_token, cache_tokens,
context, batch, needed_bytes, fits, min_gpus (GPU name -> smallest count).
`dsv3 plan train --json` prints: model, gpu, gpus, pp, pp_schedule, dp, ep, zero, micro_batch, seq_len,
micro_batches, precision (master, grads, moments, compute), usable_bytes_per_gpu, fits ({"no_recompute",
"full_recompute"}), stages (per pipeline rank: stage, blocks, master, grads, optimizer, working,
activations, activations_recompute, total, total_recompute; bytes per GPU; and sent: all_to_all,
data_parallel, pipeline, bytes per GPU per optimizer step) and sent_per_token (the same kinds, bytes over
the whole job per training token).
Memory figures print in GiB (2^30 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from dsv3.commands import options
from dsv3.hardware import NAMES, GiB, accelerator
from dsv3.parallel.layout import PP_SCHEDULES
from dsv3.plan import (
    GpuLayout,
    ServePlan,
    StageMemory,
    TrainPlan,
    TrainPrecision,
    min_gpus_table,
    plan_serving,
    plan_training,
)
from dsv3.utils import human

HELP = "will it fit: per-GPU memory for serving (weights + latent cache) or training (states + activations)"
NODE = 8  # GPUs per node in every machine of the table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{serve,train}")
    serve = tasks.add_parser("serve", help="weights and latent cache for inference")
    train = tasks.add_parser("train", help="weights, gradients, optimizer state and activations for training")
    for p, gpu, gpus in ((serve, "h200", 8), (train, "h800", 2048)):
        options.add_config_source(p, required=False, default="v3")
        p.add_argument("--gpu", default=gpu, help=f"accelerator: {', '.join(NAMES)} (default {gpu})")
        p.add_argument("--gpus", type=int, default=gpus, help=f"how many (default {gpus})")
        p.add_argument("--memory-utilization", type=float, default=0.9,
                       help="fraction of each GPU's memory the plan may use; the CUDA context, kernel workspaces "
                            "and fragmentation take the rest (default 0.9)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    serve.add_argument("--weights", choices=("bf16", "fp8"), default="fp8",
                       help="weight precision; fp8 is DeepSeek's release format with 128x128 block scales")
    serve.add_argument("--cache", choices=("bf16", "fp8"), default="bf16", help="latent cache precision")
    serve.add_argument("--context", type=int, default=32768, help="tokens per sequence (default 32768)")
    serve.add_argument("--batch", type=int, default=1, help="sequences served at once (default 1)")
    serve.add_argument("--mtp", action="store_true", help="keep the MTP modules as a speculative-decoding draft")
    train.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    train.add_argument("--pp-schedule", choices=PP_SCHEDULES, default="1f1b",
                       help="1f1b, or dualpipev: two stages per GPU in a V (default 1f1b)")
    train.add_argument("--ep", type=int, default=1, help="expert-parallel degree (default 1)")
    train.add_argument("--dp-shard", type=int, default=None, metavar="D",
                       help="as `dsv3 train --dp-shard`: sets --gpus to D x ep x pp")
    train.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=3,
                       help="sharding over data-parallel ranks: 1 optimizer, 2 + gradients, 3 + weights (FSDP; "
                            "default)")
    train.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step (default 1)")
    train.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    train.add_argument("--micro-batches", type=int, default=None, metavar="N",
                       help="micro-steps per optimizer step, each GPU (default: 2 x pp, at least 1)")
    train.add_argument("--master-weights", dest="master", choices=("fp32", "bf16"), default="fp32")
    train.add_argument("--grads", choices=("fp32", "bf16"), default="fp32")
    train.add_argument("--moments", choices=("fp32", "bf16"), default="bf16", help="AdamW moments (default bf16)")
    train.add_argument("--compute", "--dtype", dest="compute", choices=("bf16", "fp8"), default="bf16",
                       help="the weight copy matmuls read: bf16, or FP8 for the projections and experts, as "
                            "`dsv3 train --dtype fp8` (fp32 master weights and gradients, bf16 moments)")


def run(args: argparse.Namespace) -> int:
    name, cfg = options.config_from_args(args, default="v3")
    gpu = accelerator(args.gpu)
    if args.task == "serve":
        plan = plan_serving(
            cfg, gpu, args.gpus, weights=args.weights, cache=args.cache, context=args.context, batch=args.batch,
            mtp=args.mtp, memory_utilization=args.memory_utilization,
        )
        print(json.dumps(_serve_json(name, plan), indent=2) if args.json else _serve_table(name, plan))
    else:
        gpus = args.gpus if args.dp_shard is None else args.dp_shard * args.ep * args.pp
        micro_batches = args.micro_batches if args.micro_batches is not None else 2 * args.pp
        layout = GpuLayout(gpus, args.pp, args.ep, args.zero, args.micro_batch, args.seq_len, micro_batches,
                           args.pp_schedule)
        precision = TrainPrecision(args.master, args.grads, args.moments, args.compute)
        plan = plan_training(cfg, gpu, layout, precision, memory_utilization=args.memory_utilization)
        if args.json:
            print(json.dumps(_train_json(name, plan), indent=2))
        else:
            print(_train_table(name, plan, cfg.num_hidden_layers))
    return 0


def gib(n: float) -> str:
    """Bytes in GiB, or MiB / KiB for small models (four significant digits)."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.4g} {unit}"
    return f"{n:.4g} bytes"


def _rows(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ----- serve ----------------------------------------------------------------------------------------


def _serve_json(name: str, p: ServePlan) -> dict:
    return {
        "model": name, "gpu": p.gpu.name, "gpus": p.gpus, "weights": p.weights_precision,
        "cache": p.cache_precision, "mtp": p.mtp, "memory_utilization": p.memory_utilization,
        "weight_bytes": p.weight_bytes, "weight_bytes_per_gpu": p.weight_bytes_per_gpu,
        "usable_bytes_per_gpu": p.usable_bytes_per_gpu, "cache_bytes_per_token": p.cache_bytes_per_token,
        "cache_tokens": p.cache_tokens, "context": p.context, "batch": p.batch, "needed_bytes": p.needed_bytes,
        "fits": p.fits, "min_gpus": min_gpus_table(p),
        "dsv3_rank": {"weight_bytes": p.rank_weight_bytes, "replicated_weight_bytes": p.weight_bytes
                      - p.split_weight_bytes, "cache_bytes": p.rank_needed_bytes - p.rank_weight_bytes,
                      "needed_bytes": p.rank_needed_bytes, "fits": p.rank_fits},
    }


def _serve_table(name: str, p: ServePlan) -> str:
    weights = "fp8 + fp32 block scales" if p.weights_precision == "fp8" else "bf16"
    usable = p.gpus * p.usable_bytes_per_gpu
    asked = f"{p.batch} x {p.context} tokens"
    sequences = p.cache_tokens // p.context
    rows = [
        ("weights", weights, gib(p.weight_bytes), f"{gib(p.weight_bytes_per_gpu)} per GPU"),
        ("usable memory", f"{p.memory_utilization:.0%} of {gib(p.gpu.memory_bytes)}", gib(usable),
         f"{gib(p.usable_bytes_per_gpu)} per GPU"),
        ("left for the cache", "", gib(max(0.0, p.cache_budget_bytes)),
         "" if p.cache_budget_bytes >= 0 else f"the weights alone are {gib(-p.cache_budget_bytes)} too many"),
        ("latent cache", p.cache_precision, f"{p.cache_bytes_per_token / 1024:.4g} KiB per token", ""),
        ("cache that fits", "", f"{human(p.cache_tokens)} tokens", f"{sequences} sequences of {p.context}"),
        (f"asked: {asked}", "", "fits" if p.fits else "does NOT fit", f"needs {gib(p.needed_bytes)}"),
    ]
    what = "main model and MTP draft" if p.mtp else "main model; MTP modules dropped"
    lines = [f"serving {name} ({what}) on {p.gpus} x {p.gpu.description}", _rows(rows), ""]
    lines.append(f"smallest GPU count for {asked} ({p.weights_precision} weights, {p.cache_precision} cache, "
                 f"{p.memory_utilization:.0%} of memory usable):")
    table = [("  GPU", "GPUs", f"nodes of {NODE}")]
    for gpu_name, n in min_gpus_table(p).items():
        table.append((f"  {gpu_name}", str(n), str(-(-n // NODE))))
    lines.append(_rows(table))
    replicated = p.weight_bytes - p.split_weight_bytes
    cache = p.rank_needed_bytes - p.rank_weight_bytes
    rank = [
        ("  weights", f"{gib(p.split_weight_bytes)} / {p.gpus} split + {gib(replicated)} on every rank",
         gib(p.rank_weight_bytes)),
        ("  latent cache", f"all {asked}, on every rank", gib(cache)),
        ("  one rank", "fits" if p.rank_fits else "does NOT fit", f"{gib(p.rank_needed_bytes)} of "
         f"{gib(p.usable_bytes_per_gpu)}"),
    ]
    lines += ["", f"per rank of `dsv3 serve --nproc {p.gpus}` (heads, experts and vocabulary split; the latent "
              "cache replicated):", _rows(rank)]
    return "\n".join(lines)


# ----- train ----------------------------------------------------------------------------------------


def _stage_label(plan: TrainPlan, s: StageMemory, n_layers: int) -> str:
    runs, main = [], [i for i in s.blocks if i < n_layers]
    for i in main:  # contiguous runs of blocks (two with dualpipev)
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"blocks {r[0]}-{r[-1]}" if len(r) > 1 else f"block {r[0]}" for r in runs]
    lay = plan.layout
    if s.stage == 0:
        parts.append("embedding")
    if s.stage == (0 if lay.pp_schedule == "dualpipev" else lay.pp - 1):
        parts.append("head")
        if len(main) < len(s.blocks):
            parts.append("MTP")
    return f"stage {s.stage}: " + " + ".join(parts)


def _train_json(name: str, p: TrainPlan) -> dict:
    lay = p.layout
    stages = []
    for s, t in zip(p.stages, p.traffic):
        d = dataclasses.asdict(s)
        d["blocks"] = list(s.blocks)
        d.update(total=s.total, total_recompute=s.total_recompute, sent=dataclasses.asdict(t))
        stages.append(d)
    return {
        "model": name, "gpu": p.gpu.name, "gpus": lay.gpus, "pp": lay.pp, "pp_schedule": lay.pp_schedule,
        "dp": lay.dp, "ep": lay.ep, "zero": lay.zero, "micro_batch": lay.micro_batch, "seq_len": lay.seq_len,
        "micro_batches": lay.micro_batches, "precision": dataclasses.asdict(p.precision),
        "usable_bytes_per_gpu": p.usable_bytes_per_gpu,
        "fits": {"no_recompute": p.fits(False), "full_recompute": p.fits(True)}, "stages": stages,
        "sent_per_token": dataclasses.asdict(p.traffic_per_token()),
    }


def _train_table(name: str, p: TrainPlan, n_layers: int) -> str:
    lay, prec = p.layout, p.precision
    worst = {False: p.worst(False), True: p.worst(True)}
    cols = (False, True)

    def row(label: str, value) -> tuple[str, ...]:
        return (label, *(value(worst[c], c) for c in cols))

    rows = [
        ("per GPU, worst stage", "no recomputation", "full recomputation"),
        row("stage", lambda s, c: _stage_label(p, s, n_layers)),
        row(f"master weights ({prec.master})", lambda s, c: gib(s.master)),
        row(f"gradients ({prec.grads})", lambda s, c: gib(s.grads)),
        row(f"AdamW moments (2 x {prec.moments})", lambda s, c: gib(s.optimizer)),
        row(f"working weights ({prec.compute})", lambda s, c: gib(s.working)),
        row("activations (bf16)", lambda s, c: gib(s.activations_recompute if c else s.activations)),
        row("total", lambda s, c: gib(s.total_recompute if c else s.total)),
        row(f"usable ({p.memory_utilization:.0%} of {gib(p.gpu.memory_bytes)})",
            lambda s, c: gib(p.usable_bytes_per_gpu)),
        row("fits", lambda s, c: "yes" if p.fits(c) else "NO"),
    ]
    pp = f"{lay.pp} pipeline stage(s) ({lay.pp_schedule})" if lay.pp > 1 else "1 pipeline stage"
    head = (
        f"training {name} on {lay.gpus} x {p.gpu.description}: {pp} x {lay.dp} data-parallel ranks, "
        f"expert-parallel {lay.ep}, ZeRO-{lay.zero}; {lay.micro_batches} micro-batch(es) of {lay.micro_batch} x "
        f"{lay.seq_len} tokens per step"
    )
    busiest = max(range(len(p.traffic)), key=lambda i: p.traffic[i].total)
    t, per_token = p.traffic[busiest], p.traffic_per_token()
    sent = [
        ("sent per optimizer step", f"per GPU (stage {busiest}, the busiest)", "whole job, per training token"),
        ("expert all-to-all", gib(t.all_to_all), _bytes(per_token.all_to_all)),
        (f"data parallel (ZeRO-{lay.zero})", gib(t.data_parallel), _bytes(per_token.data_parallel)),
        ("pipeline", gib(t.pipeline), _bytes(per_token.pipeline)),
    ]
    return head + "\n" + _rows(rows) + "\n\n" + _rows(sent)


def _bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.4g} {unit}"
    return f"{n:.4g} bytes"
