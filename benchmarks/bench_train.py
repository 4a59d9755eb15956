"""Training-step throughput of dsv3, eager and `--compile`, against transformers' DeepseekV3ForCausalLM, same config,
batches and dtype, and where a dsv3 step's time goes.

Every model is built from the same preset (transformers from `cfg.to_hf()`), gets the same batches from the
built-in corpus and the same AdamW; one step is forward, loss, backward, gradient clipping and the optimizer
step. Rounds alternate between the models so that other load on the machine hits them alike; the median step
time of each is reported. transformers has no MTP module, so the comparison runs dsv3 without it; dsv3's full
recipe (MTP, balance loss, bias update) has rows of its own. The "torch's loss" rows are the eager step as it
was before the chunked cross-entropy (`cross_entropy(..., fused=False)`): before and after in the same run.
MFU is model FLOPs (`dsv3.flops`, MTP counted only where it runs) over the square-matmul peak measured in this
run for the same dtype (the best of a measurement before the first and after each sequence length's rounds).

The breakdown profiles one step of the full recipe and gives each part its time, forward and backward: ops run
inside a part's modules in the forward pass count for it, and so do the backward ops autograd runs for them
(matched by their sequence numbers). Parts: attention (MLA, main model), the router, the routed experts, their
dispatch and combine (the rest of the MoE layer), the shared experts and dense MLP, the MTP module with its use
of the head and its loss, the head and main loss, the optimizer (clipping and AdamW); what is left (embedding,
norms, residual adds) is "rest". Under --compile the blocks are fused graphs, so they are one part.

    .venv/bin/python benchmarks/bench_train.py                       # small preset, bf16, 8 x 256 and 8 x 512
    .venv/bin/python benchmarks/bench_train.py --seq-len 256 --no-compile --rounds 3
    .venv/bin/python benchmarks/bench_train.py --threads 1 --clock cpu --profile

`--clock cpu` times steps by this process's CPU time (user + system) instead of the wall clock: with one
thread it is the work itself, whatever else the machine is running. `--profile` adds the operators that take
most of one eager dsv3 step (MTP + balancing), from torch.profiler.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import dsv3.train.losses as losses
from dsv3.flops import flops_per_token, index_core_flops, mla_core_flops
from dsv3.hardware import measure_matmul_peak
from dsv3.model.attention import MLA
from dsv3.model.moe import MLP, GroupedExperts, MoE, Router
from dsv3.train import TrainConfig, Trainer

# the parts of a step, in the order they are printed; "rest" is whatever no part claims
PARTS = ("attention", "router", "routed experts", "dispatch + combine", "shared + dense MLP", "MTP", "head + loss",
         "optimizer", "blocks (compiled)", "rest")
MODULE_PARTS = {MLA: "attention", Router: "router", GroupedExperts: "routed experts", MoE: "dispatch + combine",
                MLP: "shared + dense MLP"}
BACKWARD = "autograd::engine::evaluate_function"
KINDS = ("matmul kernels", "attention kernel (SDPA)", "all other ops")
MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}  # the grouped matmul runs aten::mm per expert


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


def core_flops(cfg, seq_len: int, mtp: bool) -> float:
    """Training FLOPs per token of the attention core (q k^T, p v), the MTP modules' included."""
    f = flops_per_token(cfg, seq_len, training=True, mtp=False)
    core = f.attn_core + f.index_core
    if mtp:
        for k in range(1, cfg.num_nextn_predict_layers + 1):  # module k attends over seq_len - k positions
            T = seq_len - k
            core += 3 * T / seq_len * (mla_core_flops(cfg, T) + index_core_flops(cfg, T))
    return core


def reference_loss_step(trainer: Trainer) -> None:
    """One optimizer step with torch's cross-entropy on an fp32 copy of the logits, the loss before the chunked one."""
    fused = losses.cross_entropy
    losses.cross_entropy = functools.partial(fused, fused=False)
    try:
        trainer.optimizer_step()
    finally:
        losses.cross_entropy = fused


def flops_by_part(cfg, seq_len: int, mtp: bool) -> dict[str, float]:
    """Training FLOPs per token of each part (the parts that do no matmuls have none)."""
    f = flops_per_token(cfg, seq_len, training=True, mtp=mtp)
    return {"attention": f.attn_proj + f.attn_core + f.index_core, "router": f.router,
            "routed experts": f.routed_experts, "shared + dense MLP": f.dense_mlp + f.shared_experts, "MTP": f.mtp,
            "head + loss": f.head}


@contextmanager
def part_ranges(trainer: Trainer, compiled: bool):
    """Name each part of `trainer`'s step with a profiler range while the context is open: forward hooks on the
    main model's modules (not inside compiled blocks, which run as whole graphs), the MTP modules, the head and
    the loss (their first call is the main model's, the others the MTP depths'), clipping and the optimizer."""
    model, handles, calls = trainer.model, [], collections.Counter()

    def ranged(module, name_of) -> None:
        stack = []

        def enter(*_):
            stack.append(record_function(name_of()).__enter__())

        def leave(*_):
            stack.pop().__exit__(None, None, None)

        handles.extend([module.register_forward_pre_hook(enter), module.register_forward_hook(leave)])

    if not compiled:
        for layer in model.layers:
            for sub in layer.modules():
                if type(sub) in MODULE_PARTS:
                    name = MODULE_PARTS[type(sub)]
                    ranged(sub, lambda name=name: name)
    for module in model.mtp:
        ranged(module, lambda: "MTP")

    def head_name() -> str:
        calls["head"] += 1
        return "head + loss" if calls["head"] == 1 else "MTP"

    ranged(model.head, head_name)
    cross_entropy, clip = losses.cross_entropy, trainer.train_step.clip

    def ranged_loss(*args, **kwargs):
        calls["loss"] += 1
        with record_function("head + loss" if calls["loss"] == 1 else "MTP"):
            return cross_entropy(*args, **kwargs)

    def ranged_clip():
        with record_function("optimizer"):
            return clip()

    opt = trainer.optimizer
    stack = []
    handles += [opt.register_step_pre_hook(lambda *_: stack.append(record_function("optimizer").__enter__())),
                opt.register_step_post_hook(lambda *_: stack.pop().__exit__(None, None, None))]
    losses.cross_entropy, trainer.train_step.clip = ranged_loss, ranged_clip
    try:
        yield calls
    finally:
        losses.cross_entropy = cross_entropy
        del trainer.train_step.clip  # back to the class's method
        for h in handles:
            h.remove()


def breakdown(trainer: Trainer, compiled: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of one profiled optimizer step by part, {part: [forward, backward]}, and by kind of op (matmul
    kernels, the attention kernel, everything else). Each op's own time (not its children's) goes to the
    innermost part range around it; a backward op goes where the forward op that recorded its autograd node
    ran; under --compile what no part claims is the compiled blocks."""
    with part_ranges(trainer, compiled) as calls, profile(activities=[ProfilerActivity.CPU]) as prof:
        calls.clear()
        trainer.optimizer_step()
    events = prof.events()
    rest = "blocks (compiled)" if compiled else "rest"

    def enclosing(e):
        """(part range or None, whether e runs in the backward pass, the backward node's sequence number)."""
        p = e
        while p is not None:
            if p.name in PARTS:
                return p.name, False, -1
            if p.name.startswith(BACKWARD):
                return None, True, p.sequence_nr
            p = p.cpu_parent
        return None, False, -1

    where = [enclosing(e) for e in events]
    part_of_node = {}  # forward sequence number -> part
    for e, (part, backward, _) in zip(events, where):
        if not backward and e.sequence_nr >= 0:
            part_of_node.setdefault(e.sequence_nr, part or rest)
    out = {p: [0.0, 0.0] for p in PARTS}
    kinds = dict.fromkeys(KINDS, 0.0)
    for e, (part, backward, seq) in zip(events, where):
        if backward:
            out[part_of_node.get(seq, rest)][1] += e.self_cpu_time_total / 1e6
        else:
            out[part or rest][0] += e.self_cpu_time_total / 1e6
        kind = KINDS[0] if e.name in MATMULS else KINDS[1] if "scaled_dot_product" in e.name else KINDS[2]
        kinds[kind] += e.self_cpu_time_total / 1e6
    return {p: v for p, v in out.items() if sum(v)}, kinds


def print_breakdown(title: str, measured: tuple[dict[str, list[float]], dict[str, float]], flops: dict[str, float],
                    core: float, tokens: int) -> None:
    """The part table, then the time by kind of op with the rate of the matmuls (every FLOP but the attention
    core's, `core` per token) and of the attention kernel."""
    parts, kinds = measured
    total_s = sum(sum(v) for v in parts.values())
    total_f = sum(flops.values())
    print(f"\n{title}: one profiled step, {total_s * 1e3:,.0f} ms")
    print("| part | forward ms | backward ms | share of time | share of FLOPs | TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for p, (fwd, bwd) in parts.items():
        f = flops.get(p, 0.0)
        rate = f"{f * tokens / (fwd + bwd) / 1e12:.3f}" if f else "-"
        print(f"| {p} | {fwd * 1e3:,.0f} | {bwd * 1e3:,.0f} | {(fwd + bwd) / total_s:.1%} | "
              f"{f / total_f:.1%} | {rate} |")
    rates = {KINDS[0]: (total_f - core) * tokens, KINDS[1]: core * tokens}
    print("by kind of op: " + "; ".join(
        f"{k} {t * 1e3:,.0f} ms ({t / total_s:.0%})" + (f" at {rates[k] / t / 1e12:.3f} TFLOP/s" if k in rates else "")
        for k, t in kinds.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (compilation, caches)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the --compile rows")
    ap.add_argument("--no-before", dest="before", action="store_false", help="leave out the torch's-loss rows")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 4 * len(args.seq_len) + 4  # a graph per block kind and shape
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    peak_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = measure_matmul_peak(peak_dtype)
    print(f"preset {args.preset}, {args.dtype}, {torch.get_num_threads()} threads, {args.clock} clock, median of "
          f"{args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps")
    results = []
    for seq_len in args.seq_len:
        results.append(run(args, seq_len, clock))
        peak = max(peak, measure_matmul_peak(peak_dtype))
    print(f"\nmatmul peak {peak / 1e12:.3f} TFLOP/s ({args.dtype}, best of the measurements in this run)")
    print("| batch | model | s/step | tokens/s | MFU | / transformers |")
    print("|---|---|---:|---:|---:|---:|")
    for seq_len, (times, flops) in zip(args.seq_len, results):
        tokens = args.batch_size * seq_len
        hf = tokens / statistics.median(times["transformers"])
        for name, ts in times.items():
            rate = tokens / statistics.median(ts)
            print(f"| {args.batch_size} x {seq_len} | {name} | {statistics.median(ts):.3f} | {rate:,.0f} | "
                  f"{rate * flops[name] / peak:.1%} | {rate / hf:.2f}x |")


def run(args, seq_len: int, clock) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time every model at one sequence length; print the breakdowns. Returns (step times, FLOPs per token)."""
    tokens = args.batch_size * seq_len
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(preset=args.preset, dtype=args.dtype, batch_size=args.batch_size, seq_len=seq_len,
                      max_steps=10_000, peak_tflops=1.0, tensorboard=False, samples=0)
        variants = {"dsv3 (no MTP)": dict(mtp=False), "dsv3 (MTP + balancing)": {}}
        before = {"dsv3 (no MTP), torch's loss": "dsv3 (no MTP)",
                  "dsv3 (MTP + balancing), torch's loss": "dsv3 (MTP + balancing)"} if args.before else {}
        if args.compile:
            variants |= {"dsv3 --compile (no MTP)": dict(mtp=False, compile=True),
                         "dsv3 --compile (MTP + balancing)": dict(compile=True)}
        runs = {name: Trainer(TrainConfig(out=f"{tmp}/{i}", **common, **kw), log=lambda _: None, progress=False)
                for i, (name, kw) in enumerate(variants.items())}
        base = runs["dsv3 (no MTP)"]
        hf = hf_model(base.model_cfg, seed=0)
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        batches = itertools.cycle([next(base.loader) for _ in range(args.steps)])
        steps = {name: (lambda t=runs[of]: reference_loss_step(t)) for name, of in before.items()}
        steps |= {name: t.optimizer_step for name, t in runs.items()}
        steps["transformers"] = lambda: hf_step(hf, hf_opt, next(batches), args.dtype)
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step()
            print(f"8 x {seq_len}: {name} warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = clock()
                for _ in range(args.steps):
                    step()
                times[name].append((clock() - t0) / args.steps)
        flops = {name: flops_per_token(t.model_cfg, seq_len, training=True).total for name, t in runs.items()}
        flops |= {name: flops[of] for name, of in before.items()}
        flops["transformers"] = flops["dsv3 (no MTP)"]
        if args.breakdown:
            full = runs["dsv3 (MTP + balancing)"]
            part_flops = flops_by_part(full.model_cfg, seq_len, mtp=True)
            core = core_flops(full.model_cfg, seq_len, mtp=True)
            print_breakdown(f"dsv3 (MTP + balancing), {args.batch_size} x {seq_len}, eager", breakdown(full, False),
                            part_flops, core, tokens)
            if args.compile:
                in_blocks = PARTS[:5]
                block_flops = {p: f for p, f in part_flops.items() if p not in in_blocks}
                block_flops["blocks (compiled)"] = sum(part_flops.get(p, 0.0) for p in in_blocks)
                print_breakdown(f"dsv3 --compile (MTP + balancing), {args.batch_size} x {seq_len}",
                                breakdown(runs["dsv3 --compile (MTP + balancing)"], True), block_flops, core, tokens)
        if args.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runs["dsv3 (MTP + balancing)"].optimizer_step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return times, flops


if __name__ == "__main__":
    main()
