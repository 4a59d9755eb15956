"""One-shot GPU check: what the model, its training step and its engine do on one CUDA device, in one JSON.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json      # one GPU, ~2 minutes
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json   # seconds
    .venv/bin/python benchmarks/gpu_check.py --describe     # the ~1B config and its counts, on the meta device

Six parts, each in its own try/except (a part that fails records "error" and the next one runs), each
under a wall-clock alarm, with the JSON rewritten after every part (a part still running when the
process dies reads "error": "did not finish"):

1. environment: torch, CUDA, the device, and the bf16 matmul FLOP/s measured at 8192^3 with CUDA events
   (the achievable peak beside the data sheet's); FP8 through torch._scaled_mm, where the GPU has it.
2. logits_parity: the `small` preset (init std 0.05, larger than training's so that differences show) on
   the same ids, the device against the CPU in fp32: fp32, bf16 autocast (training's forward) and bf16
   weights (the engine's).
3. experts: one MoE layer of the ~1B config in bf16, experts_impl "grouped" (torch._grouped_mm) against
   "loop": output difference, and the time of the layer (forward, forward + backward) and of the experts.
4. train_bf16: the ~1B MoE config trained by `TrainStep`, the optimizer step `dsv3 train` runs (AdamW,
   balancing, MTP), on synthetic batches; MFU as `dsv3 train` computes it (tokens/s x `dsv3.flops`
   training FLOPs per token, MTP included) over the data sheet's peak and over part 1's measurement.
5. train_fp8: the same from the same initial weights and batches with `--dtype fp8`'s module switch
   (`dsv3.train.fp8.apply_fp8`); a census of the matmul operators one forward + backward dispatches says
   whether the GEMMs are real FP8 (torch._scaled_mm) or the emulation in fp32; the loss difference to bf16.
6. decode: the engine (greedy, bf16 weights and cache) at batch 1 and 32 on the ~1B model and the `small`
   preset: prefill tokens/s, decode tokens/s and ms per decode step.

Batches are synthetic but learnable (pairs of a Zipf-distributed token and its image under a fixed
permutation), so the loss moves within a few steps and bf16 and FP8 can be compared on it.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.config import ModelConfig, preset
from dsv3.flops import flops_per_token
from dsv3.hardware import measure_matmul_peak
from dsv3.infer import Engine, SamplingParams, ServingConfig
from dsv3.inventory import count_parameters
from dsv3.model import DeepSeekV3
from dsv3.model.moe import MoE
from dsv3.parallel.build import build_model
from dsv3.parallel.dist import Dist
from dsv3.parallel.layout import Layout
from dsv3.train.config import TrainConfig
from dsv3.train.fp8 import apply_fp8
from dsv3.train.losses import mtp_lambda
from dsv3.train.optim import build_optimizer, lr_at
from dsv3.train.step import TrainStep

PARTS = ("environment", "logits_parity", "experts", "train_bf16", "train_fp8", "decode")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm"}


@dataclass(frozen=True)
class Sizes:
    matmul_n: int  # square matmul of part 1
    parity: tuple[str, int, int]  # preset, batch, tokens
    moe_tokens: tuple[int, int]  # batch x sequence through one MoE layer
    train: tuple[int, int]  # batch x sequence of one training step
    warmup_steps: int
    timed_steps: int
    decode: tuple[int, int]  # prompt tokens, new tokens
    decode_batches: tuple[int, ...]
    part_seconds: int  # the alarm of one part
    train_seconds: float  # what the timed steps of one training part may take (fewer steps past it)


FULL = Sizes(8192, ("small", 4, 512), (8, 2048), (8, 2048), 2, 5, (512, 128), (1, 32), 100, 40.0)
QUICK = Sizes(256, ("tiny", 2, 32), (2, 64), (2, 64), 2, 3, (16, 8), (1, 4), 60, 10.0)


def moe_1b() -> ModelConfig:
    """~1.09B parameters (334M active per token, 69M more in the MTP module): the `small` preset's mechanisms
    (YaRN, MTP, sigmoid routing with groups and bias) at d=2048, 16 layers (1 dense), 64 routed experts of
    width 128, top-6 from 4 of 8 groups, 2 shared experts, 16 heads of V3's head dims, vocabulary 32,768."""
    return preset("small").replace(
        vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=128,
        num_hidden_layers=16, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=8, topk_group=4,
    )


def describe(cfg: ModelConfig) -> dict:
    """Parameter counts from `dsv3.inventory`, checked against the model built on the meta device."""
    counts = count_parameters(cfg)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    built = sum(t.numel() for t in model.state_dict().values())
    assert built == counts.total + counts.mtp, (built, counts)
    return {"total": counts.total, "active": counts.active, "embedding": counts.embedding,
            "routed_experts": counts.routed_experts, "mtp": counts.mtp, "built_on_meta": built}


# ----- measuring --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, reps: int, rounds: int = 3) -> float:
    """Seconds per call of fn, the best of `rounds` rounds of `reps` calls after one warm-up call (CUDA events
    on a GPU, the wall clock on the CPU)."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            seconds = time.perf_counter() - t0
        best = min(best, seconds / reps)
    return best


class MatmulCensus(TorchDispatchMode):
    """Counts the matmul operators dispatched inside it, by name and input dtypes (after autocast's casts),
    e.g. "mm(float32,float32)": 96, backward included."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            dtypes = [str(a.dtype).removeprefix("torch.") for a in args[:2] if isinstance(a, torch.Tensor)]
            self.calls[f"{name}({','.join(dtypes)})"] += 1
        return func(*args, **(kwargs or {}))


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """got against ref (logits [..., V] or any outputs): max abs error, norm-relative error, top-1 agreement."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    return {"max_abs_err": (got - ref).abs().max().item(),
            "rel_err": ((got - ref).norm() / ref.norm()).item(),
            "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----- the parts --------------------------------------------------------------------------------------------


def environment(ctx: Check) -> dict:
    dev = ctx.device
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(dev), "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "torch_threads": torch.get_num_threads(), "grouped_mm": hasattr(torch, "_grouped_mm")}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gib=p.total_memory / 2**30, cudnn=torch.backends.cudnn.version())
    else:
        out.update(name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    n = ctx.sizes.matmul_n
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    seconds = best_time(lambda: a @ b, dev, reps=10 if dev.type == "cuda" else 2)
    ctx.measured_bf16 = 2 * n**3 / seconds
    out.update(matmul_n=n, bf16_matmul_tflops=ctx.measured_bf16 / 1e12, bf16_datasheet_tflops=ctx.args.peak_bf16,
               bf16_measured_over_datasheet=ctx.measured_bf16 / (ctx.args.peak_bf16 * 1e12))
    if dev.type == "cuda":
        # dsv3.hardware's own measurement (wall clock, best round): what `dsv3 train` divides by for its MFU
        out["bf16_matmul_tflops_dsv3_hardware"] = measure_matmul_peak(torch.bfloat16, dev, seconds=0.5) / 1e12
        try:
            ctx.measured_fp8 = measure_matmul_peak(torch.float8_e4m3fn, dev, seconds=0.5)
            out.update(fp8_scaled_mm_tflops=ctx.measured_fp8 / 1e12, fp8_datasheet_tflops=ctx.args.peak_fp8)
        except Exception as e:  # an old GPU or torch: the rest of the part stands
            out["fp8_scaled_mm_error"] = f"{type(e).__name__}: {e}"
    return out


def logits_parity(ctx: Check) -> dict:
    name, B, T = ctx.sizes.parity
    cfg = preset(name)
    model = DeepSeekV3(cfg).eval()
    model.init_weights(std=0.05, seed=0)  # larger than training's 0.006 so that the logits are not flat
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    dev = ctx.device
    with torch.no_grad():
        ref = model.run(ids)  # CPU fp32: the reference
        model.to(dev)
        x = ids.to(dev)
        runs = {"fp32": model.run(x)}
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            runs["bf16_autocast"] = model.run(x)
        model.to(torch.bfloat16)
        runs["bf16_weights"] = model.run(x)

    def flips(out) -> list[float]:
        """Per MoE layer, the share of tokens whose set of experts differs from the reference's: where a rounding
        difference moves a token to another expert, its output differs by far more than the rounding."""
        return [(a.indices.sort(-1).values.cpu() != r.indices.sort(-1).values).any(-1).float().mean().item()
                for a, r in zip(out.routing, ref.routing)]

    out = {"model": f"{name} preset, init std 0.05", "batch": B, "tokens": T,
           "reference": "CPU fp32 logits of the same weights and ids", "logit_std": ref.logits.std().item()}
    for key, run in runs.items():
        out[key] = {**compare(run.logits, ref.logits), "routing_flips": flips(run)}
    out["bf16_autocast"]["note"] = "fp32 weights, matmuls under torch.autocast(bf16): the training forward"
    out["bf16_weights"]["note"] = "model.to(bfloat16), activations bf16: how the engine serves"
    return out


def experts(ctx: Check) -> dict:
    dev, (B, T) = ctx.device, ctx.sizes.moe_tokens
    cfg = ctx.model_cfg
    torch.manual_seed(0)
    moe = MoE(cfg).to(dev)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0.0, 0.02 if name.startswith("gate") else 0.006)
    moe.to(torch.bfloat16)
    x = torch.randn(B, T, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    out: dict = {"layer": f"one MoE layer of the {ctx.model_name} config: d={cfg.hidden_size}, "
                          f"{cfg.n_routed_experts} experts of width {cfg.moe_intermediate_size}, top-"
                          f"{cfg.num_experts_per_tok}, {cfg.n_shared_experts} shared; bf16 weights",
                 "tokens": B * T, "routed_rows": B * T * cfg.num_experts_per_tok}
    results = {}
    reps = 10 if dev.type == "cuda" else 2
    for impl in ("grouped", "loop"):
        moe.experts.impl = impl
        census = MatmulCensus()
        with torch.no_grad(), census:
            y, routing = moe(x)
        results[impl] = y
        xs, order = moe.dispatch(x.view(-1, cfg.hidden_size), routing)
        xg = x.detach().requires_grad_()

        def fwd_bwd(xg=xg):
            moe(xg)[0].backward(dy)

        with torch.no_grad():
            fwd = best_time(lambda: moe(x), dev, reps)
            alone = best_time(lambda xs=xs, counts=routing.counts: moe.experts(xs, counts), dev, reps)
        both = best_time(fwd_bwd, dev, reps)
        moe.zero_grad(set_to_none=True)
        out[impl] = {"forward_ms": fwd * 1e3, "forward_backward_ms": both * 1e3, "experts_only_ms": alone * 1e3,
                     "forward_tokens_per_s": B * T / fwd, "matmuls": dict(census.calls)}
    out["grouped_kernel_ran"] = any(k.startswith("_grouped_mm") for k in out["grouped"]["matmuls"])
    out["grouped_vs_loop"] = compare(results["grouped"], results["loop"])
    del out["grouped_vs_loop"]["top1_agree"]
    for key in ("forward_ms", "forward_backward_ms", "experts_only_ms"):
        out[f"loop_over_grouped_{key.removesuffix('_ms')}"] = out["loop"][key] / out["grouped"][key]
    return out


def synthetic_batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0) -> list:
    """n batches (x, y) of [batch, seq]: a Zipf-distributed token, then its image under a fixed permutation, and
    so on; half the targets are a function of the input token, so the loss falls within a few steps."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    perm = torch.randperm(vocab, generator=g)
    out = []
    for _ in range(n):
        z = torch.multinomial(zipf, batch * (seq // 2 + 1), replacement=True, generator=g).view(batch, -1)
        t = torch.stack([z, perm[z]], dim=-1).flatten(1)[:, : seq + 1]  # [batch, seq + 1]
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def train(ctx: Check, dtype: str) -> dict:
    """The optimizer steps `dsv3 train --dtype {dtype}` runs, on the ~1B config, timed after warm-up steps."""
    dev, sizes, cfg = ctx.device, ctx.sizes, ctx.model_cfg
    B, T = sizes.train
    tcfg = TrainConfig(dtype=dtype, device=dev.type, batch_size=B, seq_len=T, max_steps=100, tensorboard=False,
                       samples=0)
    d = Dist(Layout(), device=dev)
    torch.manual_seed(tcfg.seed)
    convert = (lambda m: apply_fp8(m, tcfg.fp8_recipe)) if dtype == "fp8" else None
    model = build_model(cfg, d, init_std=tcfg.init_std, seed=tcfg.seed, bf16=dtype != "fp32", convert=convert)
    model.train()
    optimizer = build_optimizer(model, tcfg)

    def autocast():  # Trainer.autocast
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tcfg.dtype != "fp32")

    step = TrainStep(model, optimizer, tcfg, autocast, dev, d)
    batches = synthetic_batches(cfg.vocab_size, B, T, sizes.warmup_steps + sizes.timed_steps)
    losses, times = [], []

    def one(i: int) -> None:
        sync(dev)
        t0 = time.perf_counter()
        stats = step(iter([batches[i]]), lr=lr_at(i, tcfg.max_steps, tcfg),
                     mtp_lambda=mtp_lambda(i / tcfg.max_steps, tcfg), bias_gamma=tcfg.bias_gamma, accuracy=False)
        sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(stats.loss)

    for i in range(sizes.warmup_steps):
        one(i)
    # as many timed steps as fit the part's share of the run (and of what is left of --time-limit, keeping 90 s
    # for the parts after), judged by the last warm-up step
    left = ctx.args.time_limit - (time.perf_counter() - ctx.started) - 90
    n_timed = max(1, min(sizes.timed_steps, int(min(sizes.train_seconds, left / 2) / times[-1])))
    for i in range(sizes.warmup_steps, sizes.warmup_steps + n_timed):
        one(i)
    timed = times[sizes.warmup_steps:]
    step_s = statistics.mean(timed)
    tokens = B * T
    flops = flops_per_token(cfg, T, training=True).total  # as Trainer: MTP counted, 3x forward
    rate = tokens / step_s
    peak_name = "fp8" if dtype == "fp8" else "bf16"
    datasheet = ctx.args.peak_fp8 if dtype == "fp8" else ctx.args.peak_bf16
    out = {"model": ctx.model_name, "params": ctx.params, "dtype": dtype, "batch": B, "seq_len": T,
           "tokens_per_step": tokens, "warmup_steps": sizes.warmup_steps, "timed_steps": n_timed,
           "step_s": step_s, "step_s_median": statistics.median(timed), "step_times_s": times,
           "tokens_per_s": rate, "train_flops_per_token": flops, "model_tflops_per_s": rate * flops / 1e12,
           f"mfu_vs_{peak_name}_datasheet": rate * flops / (datasheet * 1e12), "losses": losses,
           "optimizer": type(optimizer).__name__, "moments_dtype": tcfg.moments_dtype,
           "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    if ctx.measured_bf16:  # `dsv3 train`'s MFU: over the measured bf16 matmul peak, FP8 included (it is emulated)
        out["mfu_vs_measured_bf16"] = rate * flops / ctx.measured_bf16
    if dtype == "fp8":
        out["mfu_vs_bf16_datasheet"] = rate * flops / (ctx.args.peak_bf16 * 1e12)
        if ctx.measured_fp8:
            out["mfu_vs_measured_fp8"] = rate * flops / ctx.measured_fp8
        # one forward + backward of one short row that changes no weight (as Trainer's probe does): which GEMMs
        census = MatmulCensus()
        x, y = batches[0]
        with census:
            step.accumulate(iter([(x[:1, :256], y[:1, :256])]), tcfg.mtp_lambda, accuracy=False)
        optimizer.zero_grad(set_to_none=True)
        step.forget_statistics()
        out["matmuls_one_forward_backward_256_tokens"] = dict(census.calls)
        scaled = sum(n for k, n in census.calls.items() if k.startswith("_scaled"))
        out["fp8_gemms"] = "real (torch._scaled_mm)" if scaled else (
            "emulated: e4m3 quantise + dequantise, then fp32 matmuls (float32 matmul precision "
            f"'{torch.get_float32_matmul_precision()}')")
        out["fp8_recipe"] = {"scaling": tcfg.fp8_recipe.scaling, "scale_format": tcfg.fp8_recipe.scale_format}
        bf16 = ctx.results.get("train_bf16", {})
        if "losses" in bf16:
            k = min(len(bf16["losses"]), len(losses)) - 1
            out["loss_compared_at_step"] = k + 1
            out["loss_bf16"], out["loss_fp8"] = bf16["losses"][k], losses[k]
            out["loss_diff_fp8_minus_bf16"] = losses[k] - bf16["losses"][k]
            out["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(losses, bf16["losses"]))
            out["tokens_per_s_over_bf16"] = rate / bf16["tokens_per_s"]
            out["loss_note"] = ("same initial weights and batches; as `dsv3 train` does, bf16 steps with torch's fused "
                                "AdamW (fp32 moments) and fp8 with LowPrecisionAdamW (bf16 moments)")
    return out


def decode(ctx: Check) -> dict:
    dev, (prompt, new) = ctx.device, ctx.sizes.decode
    out: dict = {"prompt_tokens": prompt, "new_tokens": new, "sampling": "greedy",
                 "weights": "bf16", "cache": "bf16"}
    for label, cfg in ((ctx.model_name, ctx.model_cfg), ("small", preset("small"))):
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
        model = model.to_empty(device=dev)
        model.init_weights(seed=0)
        model.to(torch.bfloat16).eval()
        rows = {}
        for batch in ctx.sizes.decode_batches:
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
            serving = ServingConfig(max_batch=batch, max_len=prompt + new + 8, cache_dtype="bf16")
            Engine(model, None, serving).generate(ids.tolist(), SamplingParams(max_new_tokens=4))  # warm-up
            engine = Engine(model, None, serving)
            sync(dev)
            t0 = time.perf_counter()
            seqs = engine.generate(ids.tolist(), SamplingParams(max_new_tokens=new))
            sync(dev)
            wall = time.perf_counter() - t0
            s = engine.stats
            decoded = s.generated_tokens - batch  # the first token of each comes from the prefill
            rows[f"batch_{batch}"] = {
                "prefill_tokens_per_s": s.prompt_tokens / s.prefill_time,
                "prefill_ms": s.prefill_time * 1e3,
                "decode_tokens_per_s": decoded / s.decode_time,
                "ms_per_decode_step": s.decode_time / s.decode_steps * 1e3,
                "decode_steps": s.decode_steps,
                "generated_tokens": s.generated_tokens,
                "all_finished_by_length": all(q.finish_reason == "length" for q in seqs),
                "wall_s": wall,
            }
        out[label] = {"params": describe(cfg) if label == "small" else ctx.params, **rows}
        del model
        free(dev)
    return out


# ----- running them -----------------------------------------------------------------------------------------


class PartTimeout(Exception):
    pass


@contextmanager
def alarm(seconds: int):
    """Raise PartTimeout in this (the main) thread after `seconds`: a part that runs away ends, and the next runs."""

    def ring(signum, frame):
        raise PartTimeout(f"the part ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.sizes = QUICK if args.quick else FULL
        self.model_name, self.model_cfg = ("tiny", preset("tiny")) if args.quick else ("moe-1b", moe_1b())
        self.params = describe(self.model_cfg)
        self.measured_bf16: float | None = None
        self.measured_fp8: float | None = None
        self.results: dict[str, dict] = {}
        self.started = time.perf_counter()

    def report(self) -> dict:
        cfg = self.model_cfg
        return {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:], "quick": self.args.quick,
                "device": str(self.device), "total_seconds": time.perf_counter() - self.started,
                "model": {"name": self.model_name, "params": self.params, "config": cfg.to_hf()},
                "parts": self.results}

    def write(self) -> None:
        tmp = self.args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.report(), f, indent=2, default=str, allow_nan=True)
        os.replace(tmp, self.args.out)

    def run(self, name: str, fn: Callable[[], dict], seconds: int) -> None:
        print(f"[{PARTS.index(name) + 1}/{len(PARTS)}] {name} ...", flush=True)
        self.results[name] = {"error": "did not finish (the process ended during this part)"}
        self.write()
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with alarm(seconds):
                result = fn()
        except Exception as e:  # a failed part is a figure of the report, not the end of it
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-6)}
        result["seconds"] = time.perf_counter() - t0
        self.results[name] = result
        free(self.device)
        self.write()
        status = f"error: {result['error']}" if "error" in result else "ok"
        print(f"    {name}: {status} ({result['seconds']:.1f} s, {time.perf_counter() - self.started:.0f} s in all)",
              flush=True)


def summary(report: dict) -> list[str]:
    """The figures that matter, one line a part, for a person reading the log."""
    p = report["parts"]

    def get(part: str, *keys, fmt: str = "{:.3g}") -> str:
        v = p.get(part, {})
        for k in keys:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        return fmt.format(v) if isinstance(v, (int, float)) else "n/a"

    e, pct = p.get("environment", {}), "{:.1%}"
    lines_of = {
        "environment": f"{e.get('name', '?')}, torch {e.get('torch', '?')}, CUDA {e.get('cuda')}: bf16 matmul "
                       f"{get('environment', 'bf16_matmul_tflops')} TFLOP/s measured "
                       f"({get('environment', 'bf16_measured_over_datasheet', fmt=pct)} of the data sheet), "
                       f"FP8 _scaled_mm {get('environment', 'fp8_scaled_mm_tflops')} TFLOP/s",
        "logits_parity": f"logits vs CPU fp32: fp32 rel {get('logits_parity', 'fp32', 'rel_err')}; bf16 autocast "
                         f"rel {get('logits_parity', 'bf16_autocast', 'rel_err')}, top-1 "
                         f"{get('logits_parity', 'bf16_autocast', 'top1_agree', fmt=pct)}; bf16 weights rel "
                         f"{get('logits_parity', 'bf16_weights', 'rel_err')}, top-1 "
                         f"{get('logits_parity', 'bf16_weights', 'top1_agree', fmt=pct)}",
        "experts": f"MoE layer forward: grouped {get('experts', 'grouped', 'forward_ms')} ms, loop "
                   f"{get('experts', 'loop', 'forward_ms')} ms ({get('experts', 'loop_over_grouped_forward')}x); "
                   f"fwd+bwd {get('experts', 'loop_over_grouped_forward_backward')}x; max abs diff "
                   f"{get('experts', 'grouped_vs_loop', 'max_abs_err')}",
        "train_bf16": f"train bf16: {get('train_bf16', 'tokens_per_s', fmt='{:,.0f}')} tok/s, "
                      f"{get('train_bf16', 'step_s')} s/step, MFU {get('train_bf16', 'mfu_vs_bf16_datasheet', fmt=pct)}"
                      f" of the data sheet, {get('train_bf16', 'mfu_vs_measured_bf16', fmt=pct)} of the measured peak",
        "train_fp8": f"train fp8 ({p.get('train_fp8', {}).get('fp8_gemms', '?')}): "
                     f"{get('train_fp8', 'tokens_per_s', fmt='{:,.0f}')} tok/s "
                     f"({get('train_fp8', 'tokens_per_s_over_bf16')}x bf16), MFU "
                     f"{get('train_fp8', 'mfu_vs_fp8_datasheet', fmt=pct)} of the FP8 data sheet; loss minus bf16's "
                     f"{get('train_fp8', 'loss_diff_fp8_minus_bf16', fmt='{:+.4f}')}",
    }
    lines = [f"gpu_check on {report['device']} ({'quick' if report['quick'] else 'full'}), "
             f"{report['total_seconds']:.0f} s"]
    for name in PARTS:
        if "error" in p.get(name, {}):
            lines.append(f"  {name}: FAILED: {p[name]['error']}")
        elif name in lines_of and name in p:
            lines.append("  " + lines_of[name])
    for label, rows in p.get("decode", {}).items():
        if isinstance(rows, dict) and "params" in rows:
            cells = [f"batch {k.removeprefix('batch_')}: {v['decode_tokens_per_s']:,.0f} tok/s "
                     f"({v['ms_per_decode_step']:.1f} ms/step), prefill {v['prefill_tokens_per_s']:,.0f} tok/s"
                     for k, v in rows.items() if k.startswith("batch_")]
            lines.append(f"  decode {label}: " + "; ".join(cells))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report (rewritten after every part)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the whole check in seconds (CPU tests)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--peak-bf16", type=float, default=989.4, help="data sheet dense bf16 TFLOP/s (H200: 989.4)")
    ap.add_argument("--peak-fp8", type=float, default=1978.9, help="data sheet dense FP8 TFLOP/s (H200: 1978.9)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--time-limit", type=int, default=285, help="seconds after which the process ends itself")
    ap.add_argument("--describe", action="store_true", help="print the ~1B config's counts (meta device) and exit")
    args = ap.parse_args()
    if args.describe:
        cfg = moe_1b()
        print(json.dumps({"params": describe(cfg), "train_flops_per_token": flops_per_token(
            cfg, FULL.train[1], training=True).total, "config": cfg.to_hf()}, indent=2))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    # the last resort against a hang inside a kernel or a collective, where no Python alarm can ring: dump the
    # stacks and end; the JSON already holds every finished part
    faulthandler.dump_traceback_later(args.time_limit, exit=True)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    ctx = Check(args)
    print(f"gpu_check: {ctx.model_name} ({ctx.params['total'] / 1e9:.3f}B parameters, "
          f"{ctx.params['active'] / 1e6:.0f}M active) on {ctx.device}, writing {args.out}", flush=True)
    if ctx.device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device is visible to torch; use --device cpu --quick for the CPU check")
        if ctx.device.index is None:  # torch.cuda.set_device wants an index: "cuda" means the current device
            ctx.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(ctx.device)
    fns = {"environment": environment, "logits_parity": logits_parity, "experts": experts,
           "train_bf16": lambda c: train(c, "bf16"), "train_fp8": lambda c: train(c, "fp8"), "decode": decode}
    for name in PARTS:
        if name in wanted:
            ctx.run(name, lambda fn=fns[name]: fn(ctx), ctx.sizes.part_seconds * (2 if name == "train_fp8" else 1))
    faulthandler.cancel_dump_traceback_later()
    ctx.write()
    print("\n".join(summary(ctx.report())), flush=True)


if __name__ == "__main__":
    main()
