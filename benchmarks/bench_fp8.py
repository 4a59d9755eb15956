"""FP8 numerics and cost: why the accumulation precision matters, what fine-grained scales buy with outliers,
and what the emulated FP8 linear costs on this CPU.

    .venv/bin/python benchmarks/bench_fp8.py                 # all four parts

- accumulation: DeepSeek-V3 (section 3.3.2) observes that H800 tensor cores keep about 14 bits when they
  accumulate FP8 products, which costs close to 2% relative error at an inner dimension of 4096, and that
  promoting the partial sums to fp32 every 128 products fixes it. Emulated here on e4m3-quantised operands
  (1x128 tiles, 128x128 blocks): the products are summed one at a time into an accumulator whose significand
  is cut to 14 bits after every addition (the hardware aligns and drops low bits), either over the whole
  inner dimension or over 128 at a time with each partial sum added into an fp32 accumulator. The error is
  against the exact (fp64) sum of the same products, so it is the accumulation's alone; the maximum is over
  the outputs' |err| / sum |products| (the scale a dot product's rounding is measured in), and the norm of
  the errors over the norm of the exact results, for inner dimensions 256 to 16384.
- quantisation: activations with outlier channels (8 of 4096 channels 100x or 10,000x larger, as LLM
  activations have), quantised per tensor, per 1x128 tile, and per tile with power-of-two scales: relative
  error (over all values, and over the ordinary channels) and the share of non-zero values that become zero.
- cost: one linear layer's forward and backward (8 x 256 tokens, 256 -> 1024 and back), bf16 autocast
  against the FP8 emulation, same run.
- step: the whole training step of the small preset (8 x 256 tokens, AdamW, balancing, MTP), `dsv3 train
  --dtype bf16` against `--dtype fp8`, same run: the seconds per step between the second and the last step.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3.fp8 import fake_quant_blocks, fake_quant_tensor, fake_quant_tiles
from dsv3.train.fp8 import Fp8Recipe, fp8_linear

BITS = 14  # significand bits the H800's FP8 accumulation keeps (DeepSeek-V3 section 3.3.2)


def cut(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x with its significand truncated to `bits` bits (toward zero)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.trunc(mantissa * 2.0**bits) / 2.0**bits, exponent)


def accumulate(products: torch.Tensor, promote_every: int | None) -> torch.Tensor:
    """products [outputs, K] (fp64) summed in order with a `BITS`-bit accumulator; with `promote_every`, each
    run of that many products is summed so and added into an fp32 accumulator."""
    total = torch.zeros(products.shape[0], dtype=torch.float32)
    acc = torch.zeros(products.shape[0], dtype=torch.float64)
    for k in range(products.shape[1]):
        acc = cut(acc + products[:, k], BITS)
        if promote_every and (k + 1) % promote_every == 0:
            total += acc.float()
            acc.zero_()
    return (total.double() + acc).float()


def accumulation(outputs: int = 256) -> None:
    print(f"\n## Accumulation with a {BITS}-bit accumulator, e4m3 operands, {outputs} dot products per size")
    print("| inner dimension | whole K: max err / sum abs | whole K: norm err / norm sum | every 128 to fp32: max "
          "err / sum abs | every 128 to fp32: norm err / norm sum |")
    print("|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for K in (256, 1024, 4096, 16384):
        x = torch.randn(outputs, K, generator=g)
        w = torch.randn(1, K, generator=g) * 0.02
        products = (fake_quant_tiles(x) * fake_quant_blocks(w)).double()  # [outputs, K]: one dot product per row
        exact = products.sum(1)
        cells = []
        for promote in (None, 128):
            err = accumulate(products, promote).double() - exact
            cells += [f"{(err.abs() / products.abs().sum(1)).max().item():.3%}",
                      f"{(err.norm() / exact.norm()).item():.3%}"]
        print(f"| {K:,} | " + " | ".join(cells) + " |")


def quantisation() -> None:
    print("\n## Quantisation error of activations with outlier channels (1024 tokens x 4096 channels, 8 of them "
          "larger)")
    print("| outliers | scaling | relative error, all | relative error, ordinary channels | non-zero values "
          "flushed to zero |")
    print("|---:|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1024, 4096, generator=g)
    outliers = torch.randperm(4096, generator=g)[:8]
    ordinary = torch.ones(4096, dtype=torch.bool)
    ordinary[outliers] = False
    for factor in (100, 10_000):
        x = base.clone()
        x[:, outliers] *= factor
        for name, dq in (("per tensor", fake_quant_tensor(x)), ("1x128 tiles", fake_quant_tiles(x)),
                         ("1x128 tiles, power-of-two scales", fake_quant_tiles(x, "ue8m0"))):
            rel = ((dq - x).norm() / x.norm()).item()
            part = ((dq - x)[:, ordinary].norm() / x[:, ordinary].norm()).item()
            flushed = ((dq == 0) & (x != 0)).float().mean().item()
            print(f"| {factor:,}x | {name} | {rel:.2%} | {part:.2%} | {flushed:.2%} |")


def cost(rounds: int = 20) -> None:
    print("\n## One linear layer, forward + backward, 2048 tokens, 256 -> 1024 -> 256, ms")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g, requires_grad=True)
    w1 = (torch.randn(1024, 256, generator=g) * 0.02).requires_grad_()
    w2 = (torch.randn(256, 1024, generator=g) * 0.02).requires_grad_()
    recipe = Fp8Recipe()

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(torch.nn.functional.linear(x, w1).relu(), w2)
        y.float().square().mean().backward()

    def fp8():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fp8_linear(fp8_linear(x, w1, recipe).relu(), w2, recipe)
        y.float().square().mean().backward()

    times = {"bf16": [], "fp8": []}
    for _ in range(rounds):  # alternate, so other load hits both alike
        for name, f in (("bf16", bf16), ("fp8", fp8)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    best = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"bf16 autocast {best['bf16']:.2f} ms, FP8 emulated {best['fp8']:.2f} ms "
          f"({best['fp8'] / best['bf16']:.1f}x), median of {rounds}, {torch.get_num_threads()} threads")


def step(steps: int = 12) -> None:
    import json
    import os
    import tempfile

    from dsv3.train import TrainConfig, train

    print(f"\n## The small preset's training step, 8 x 256 tokens, seconds per step over steps 2-{steps}")
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bf16", "fp8"):
            out = os.path.join(tmp, dtype)
            train(TrainConfig(preset="small", max_steps=steps, log_every=1, eval_every=steps, eval_windows=2,
                              save_every=steps, samples=0, tensorboard=False, dtype=dtype, out=out),
                  log=lambda _: None, progress=False)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                elapsed = {r["step"]: r["elapsed"] for r in map(json.loads, f) if "loss" in r}
            per_step[dtype] = (elapsed[steps] - elapsed[2]) / (steps - 2)
    print(f"bf16 {per_step['bf16']:.2f} s, FP8 emulated {per_step['fp8']:.2f} s "
          f"({per_step['fp8'] / per_step['bf16']:.2f}x), {torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("accumulation", "quantisation", "cost", "step"), action="append")
    parts = ap.parse_args().part or ("accumulation", "quantisation", "cost", "step")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for part in parts:
        {"accumulation": accumulation, "quantisation": quantisation, "cost": cost, "step": step}[part]()


if __name__ == "__main__":
    main()
