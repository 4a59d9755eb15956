"""Training across processes on this machine (gloo): what two processes buy over one, where the time goes,
the expert all-to-all against the planner, and the pipeline schedules' idle time against their formulas.

    .venv/bin/python benchmarks/bench_parallel.py                  # all three parts, small preset, bf16
    .venv/bin/python benchmarks/bench_parallel.py --part throughput --steps 12

Each configuration is a job of its own (`dsv3.train.Trainer` on every rank, started like `dsv3 train --nproc`):
a few warm-up optimizer steps, then `--steps` timed ones. Rank 0 reports, and every rank's figures are
gathered where they differ (idle time per pipeline rank).

- throughput: 1 process x 2 threads against 2 processes x 1 thread (dp-shard 2 with and without resharding,
  and ep 2), same global batch; the share of rank 0's step time spent inside collectives (torch.profiler, in a
  second run of its own: the FSDP, c10d and functional collective ops and their waits).
- all-to-all: the bytes expert parallelism sent to other ranks per step, counted on the wire by each rank,
  against `dsv3.plan`'s formula (balanced routing: (E-1)/E of the K copies leave the rank), and the most
  ranks one token reached against topk_group.
- pipeline: per rank, the wall time of a step minus the time its stages computed, for 1F1B and DualPipeV,
  against each schedule's formula fed with the compute measured on each rank (see `pipeline`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

PARTS = ("throughput", "all-to-all", "pipeline")
COLLECTIVES = ("FSDP::all_gather", "FSDP::post_backward_reduce", "c10d::", "_c10d_functional", "gloo",
               "all_to_all", "allreduce", "allgather", "reduce_scatter", "barrier", "recv", "send")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=PARTS, action="append", help="which part (default: all)")
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step, over all data ranks")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--micro-batches", type=int, default=8, help="pipeline part: micro-batches per step")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job description: run as one rank
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    data = prepared_data(args.preset)
    parts = args.part or PARTS
    print(f"{torch.__version__}, {os.cpu_count()} cores, {args.preset} preset, {args.dtype}, "
          f"{args.batch} x {args.seq_len} tokens per step, {args.steps} timed steps")
    if "throughput" in parts:
        throughput(args, data)
    if "all-to-all" in parts:
        all_to_all(args, data)
    if "pipeline" in parts:
        pipeline(args, data)


def prepared_data(preset_name: str) -> str:
    from dsv3 import preset
    from dsv3.data.prepare import prepare

    path = os.path.join(tempfile.gettempdir(), f"dsv3-bench-data-{preset_name}")
    prepare([], path, vocab_size=preset(preset_name).vocab_size, log=lambda _: None)
    return path


def job(args, data: str, nproc: int, threads: int, layout: dict, batch_per_rank: int, grad_accum: int = 1,
        profile: bool = False) -> list[dict]:
    """Run one configuration as `nproc` ranks of `threads` threads each; every rank's result."""
    out = tempfile.mktemp(suffix=".json")
    spec = {"data": data, "preset": args.preset, "dtype": args.dtype, "batch": batch_per_rank, "seq_len": args.seq_len,
            "grad_accum": grad_accum, "steps": args.steps, "layout": layout, "threads": threads, "profile": profile,
            "out": out}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        import subprocess

        subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True, env=env)
    else:
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"bench-{os.getpid()}",
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
        elastic_launch(config, sys.executable)(__file__, "--worker", json.dumps(spec))
    results = []
    for rank in range(nproc):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
        os.remove(f"{out}.{rank}")
    return results


# ----- one rank -------------------------------------------------------------------------------------


def worker(spec: dict) -> None:
    from dsv3.train import TrainConfig, Trainer

    torch.set_num_threads(spec["threads"])
    run_dir = tempfile.mkdtemp()
    cfg = TrainConfig(preset=spec["preset"], data=[spec["data"]], out=os.path.join(run_dir, "run"),
                      batch_size=spec["batch"], seq_len=spec["seq_len"], grad_accum=spec["grad_accum"],
                      max_steps=1000, eval_every=1000, save_every=1000, samples=0, dtype=spec["dtype"],
                      peak_tflops=1.0, tensorboard=False, **spec["layout"])
    trainer = Trainer(cfg, log=lambda _: None, progress=False)
    compute = _time_stages(trainer) if trainer.train_step.pipeline is not None else None
    for _ in range(2):
        trainer.optimizer_step()
    trainer.d.barrier()
    if compute is not None:
        compute.clear()
    ep_bytes, ep_ranks = [], []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      record_shapes=bool(os.environ.get("BENCH_EVENTS"))) if spec["profile"] else None
    if profiler:
        profiler.__enter__()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        stats = trainer.optimizer_step()
        ep_bytes.append(stats.ep_sent_bytes)
        ep_ranks.append(stats.ep_max_ranks)
    seconds = (time.perf_counter() - t0) / spec["steps"]
    result = {"rank": trainer.d.rank, "step_s": seconds, "tokens_per_s": cfg.tokens_per_step / seconds,
              "ep_sent_bytes": ep_bytes, "ep_max_ranks": ep_ranks}
    if profiler:
        profiler.__exit__(None, None, None)
        result["collective_s"] = _collective_seconds(profiler) / spec["steps"]
    if compute is not None:
        result["compute_s"] = sum(compute["F"] + compute["B"]) / spec["steps"]
    with open(f"{spec['out']}.{trainer.d.rank}", "w") as f:
        json.dump(result, f)
    trainer.d.close()
    sys.stdout.flush()
    os._exit(0)  # as `python -m dsv3` does: torch's process-group threads can abort the interpreter's teardown


def _time_stages(trainer) -> _Times:
    """Wrap this rank's pipeline stages so that every forward and backward chunk is timed."""
    times = _Times(F=[], B=[])
    for stage in trainer.train_step.pipeline.pipeline_stages:
        for name, key in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"), ("backward_weight_one_chunk", "B")):
            original = getattr(stage, name)

            def timed(*a, _original=original, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    times[_key].append(time.perf_counter() - t0)

            setattr(stage, name, timed)
    return times


class _Times(dict):
    """Chunk times by kind; clear() empties the lists but keeps the kinds."""

    def clear(self) -> None:
        for v in self.values():
            v.clear()


def _collective_seconds(profiler) -> float:
    """Self CPU time of the collective ops (and their waits) the main thread ran."""
    total = 0.0
    for e in profiler.key_averages():
        if any(c in e.key for c in COLLECTIVES):
            total += e.self_cpu_time_total / 1e6
    if os.environ.get("BENCH_EVENTS"):
        top = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:12]
        print("\n".join(f"{e.key[:40]:<40} {e.self_cpu_time_total / 1e6:.3f} {e.count} {str(e.input_shapes)[:80]}"
                         for e in top), file=sys.stderr)
    return total


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ----- parts ----------------------------------------------------------------------------------------


def throughput(args, data: str) -> None:
    print("\n## 1 process x 2 threads against 2 processes x 1 thread")
    one = job(args, data, 1, 2, {}, args.batch)[0]
    print(f"  1 process x 2 threads                    {one['tokens_per_s']:6,.0f} tok/s  "
          f"({one['step_s'] * 1e3:.0f} ms/step)")
    layouts = {"dp-shard 2": {"dp_shard": 2}, "dp-shard 2, --no-reshard": {"dp_shard": 2, "reshard": False},
               "ep 2": {"ep": 2}}
    for name, layout in layouts.items():
        r = job(args, data, 2, 1, layout, args.batch // 2)[0]
        profiled = job(args, data, 2, 1, layout, args.batch // 2, profile=True)[0]  # a second run: the profiler slows
        share = profiled["collective_s"] / profiled["step_s"]
        print(f"  2 processes x 1 thread, {name:<24} {r['tokens_per_s']:6,.0f} tok/s  "
              f"({r['step_s'] * 1e3:.0f} ms/step), {r['tokens_per_s'] / one['tokens_per_s']:.2f}x; collectives "
              f"{share:.0%} of rank 0's step")


def all_to_all(args, data: str) -> None:
    from dsv3 import preset
    from dsv3.hardware import GPUS
    from dsv3.plan import GpuLayout, TrainPrecision, plan_training

    cfg = preset(args.preset)
    print(f"\n## Expert all-to-all ({cfg.n_routed_experts} experts in {cfg.n_group} groups, topk_group "
          f"{cfg.topk_group}, K {cfg.num_experts_per_tok})")
    for ep in (2, 4):
        ranks = job(args, data, ep, 1, {"ep": ep}, args.batch // ep)
        measured = _mean(ranks[0]["ep_sent_bytes"])  # already summed over the ranks, forward dispatch + combine
        lay = GpuLayout(ep, ep=ep, zero=3, micro_batch=args.batch // ep, seq_len=args.seq_len, micro_batches=1)
        plan = plan_training(cfg, GPUS["h100"], lay, TrainPrecision())
        # the planner counts forward and backward at bf16 rows; the trainer's counter is the forward at the
        # rows' own dtype: scale the plan to that
        row_bytes = 2 if args.dtype == "bf16" else 4
        forward = plan.traffic[0].all_to_all * (2 * row_bytes) / (2 + 2 + 2 + 2) * ep
        most = max(max(r["ep_max_ranks"]) for r in ranks)
        print(f"  ep {ep}: measured {measured / 1e6:.2f} MB per step (all ranks, forward), planner "
              f"{forward / 1e6:.2f} MB ({measured / forward:.2f}x); a token reached at most {most} rank(s), "
              f"topk_group {cfg.topk_group}")


def pipeline(args, data: str) -> None:
    """Idle = step time - the rank's own compute. The formulas take the measured compute of each rank, C_r for
    the whole step (m micro-batches): 1F1B's critical path is sum_r C_r / m + (m - 1) max_r C_r / m (fill and
    drain at every rank's pace, then the slowest rank's pace), DualPipe's bubble (P/2-1)(F&B+B-3W) is zero at
    P = 2, so its idle is the imbalance max_r C_r - C_r alone."""
    m = args.micro_batches
    print(f"\n## Pipeline idle time per rank, pp 2, {m} micro-batches of {max(1, args.batch // m)} x {args.seq_len}")
    for schedule in ("1f1b", "dualpipev"):
        ranks = job(args, data, 2, 1, {"pp": 2, "pp_schedule": schedule}, max(1, args.batch // m), grad_accum=m)
        compute = [r["compute_s"] for r in ranks]
        if schedule == "1f1b":
            step = sum(compute) / m + (m - 1) * max(compute) / m
        else:
            step = max(compute)
        for r, c in zip(ranks, compute):
            idle = r["step_s"] - c
            print(f"  {schedule:<10} rank {r['rank']}: step {r['step_s'] * 1e3:6.0f} ms, computing {c * 1e3:6.0f} ms, "
                  f"idle {idle * 1e3:5.0f} ms ({idle / r['step_s']:.0%}); formula {(step - c) * 1e3:5.0f} ms idle "
                  f"of a {step * 1e3:.0f} ms step")


if __name__ == "__main__":
    main()
