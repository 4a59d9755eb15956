"""Training-step throughput of dsv3 against transformers' DeepseekV3ForCausalLM, same config, batch and dtype.

Both models are built from the same preset (transformers from `cfg.to_hf()`), get the same batches from
the built-in corpus and the same AdamW; one step is forward, loss, backward, gradient clipping and the
optimizer step. Rounds alternate between the two so that other load on the machine hits both alike;
the median step time of each is reported. transformers has no MTP module, so the comparison runs
dsv3 without it as well; dsv3's full recipe (MTP, balance loss, bias update) is timed as a third row.
MFU is model FLOPs (`dsv3.flops`, MTP counted only where it runs) over the matmul peak measured in
this run for the same dtype.

    .venv/bin/python benchmarks/bench_train.py                      # small preset, bf16, 8 x 256
    .venv/bin/python benchmarks/bench_train.py --dtype fp32 --rounds 3
    .venv/bin/python benchmarks/bench_train.py --threads 1 --clock cpu --profile

`--clock cpu` times steps by this process's CPU time (user + system) instead of the wall clock: with one
thread it is the work itself, whatever else the machine is running. `--profile` adds the operators
that take most of one dsv3 step (MTP + balancing), from torch.profiler.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import torch

from dsv3.flops import flops_per_token
from dsv3.hardware import measure_matmul_peak
from dsv3.train import TrainConfig, Trainer


def hf_model(cfg, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config.from_dict(cfg.to_hf())
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # DeepSeek-V3's init, as dsv3's init_weights
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.006)
    return model.train()


def hf_step(model, opt, batch, dtype: str) -> None:
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    peak_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = measure_matmul_peak(peak_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(preset=args.preset, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                      max_steps=10_000, peak_tflops=peak / 1e12, tensorboard=False, samples=0)
        runs = {
            "dsv3 (no MTP)": Trainer(TrainConfig(out=f"{tmp}/a", mtp=False, **common), log=lambda _: None,
                                     progress=False),
            "dsv3 (MTP + balancing)": Trainer(TrainConfig(out=f"{tmp}/b", **common), log=lambda _: None,
                                              progress=False),
        }
        base = runs["dsv3 (no MTP)"]
        hf = hf_model(base.model_cfg, seed=0)
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        batches = itertools.cycle([next(base.loader) for _ in range(args.steps)])

        steps = {name: (lambda t=t: t.optimizer_step()) for name, t in runs.items()}
        steps["transformers"] = lambda: hf_step(hf, hf_opt, next(batches), args.dtype)
        for step in steps.values():  # warm-up: first-call allocations
            step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = clock()
                for _ in range(args.steps):
                    step()
                times[name].append((clock() - t0) / args.steps)
        peak = max(peak, measure_matmul_peak(peak_dtype))  # the better of two measurements, start and end
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps["dsv3 (MTP + balancing)"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    tokens = args.batch_size * args.seq_len
    flops = {
        "dsv3 (no MTP)": flops_per_token(base.model_cfg, args.seq_len, training=True, mtp=False).total,
        "dsv3 (MTP + balancing)": flops_per_token(runs["dsv3 (MTP + balancing)"].model_cfg, args.seq_len,
                                                  training=True).total,
        "transformers": flops_per_token(base.model_cfg, args.seq_len, training=True, mtp=False).total,
    }
    print(f"preset {args.preset}, {args.dtype}, batch {args.batch_size} x {args.seq_len}, {torch.get_num_threads()} "
          f"threads, {args.clock} clock, matmul peak {peak / 1e12:.3f} TFLOP/s, median of {args.rounds} rounds of "
          f"{args.steps} steps")
    print("| model | s/step | tokens/s | MFU |")
    print("|---|---:|---:|---:|")
    rate = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        rate[name] = tokens / s
        print(f"| {name} | {s:.3f} | {rate[name]:,.0f} | {rate[name] * flops[name] / peak:.1%} |")
    print(f"dsv3 / transformers tokens/s, same model without MTP: {rate['dsv3 (no MTP)'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
