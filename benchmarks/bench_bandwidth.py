"""Decoding against the memory-bandwidth floor. At batch 1 a decode step has to read every weight its token
uses (all but the embedding table, and K of E routed experts per MoE layer) and the cache it attends over;
at the machine's memory bandwidth that sets the fastest possible step. This measures the bandwidth (a copy
kernel, 1 and 2 threads), counts each step's bytes, times the engine's decode at batch 1, and reports the
share of the bandwidth decoding reaches, for fp32 weights, bf16 weights in torch's plain layout, and bf16
weights reordered for oneDNN (`dsv3.infer.packing`, what the CLI does by default).

    .venv/bin/python benchmarks/bench_bandwidth.py                         # small, and hidden 1024
    .venv/bin/python benchmarks/bench_bandwidth.py --prompt 1024 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from dsv3 import DeepSeekV3, preset
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.packing import pack
from dsv3.model.cache import bytes_per_token


def copy_bandwidth(threads: int, mib: int = 256, repeats: int = 7) -> float:
    """Bytes/s of a large copy (each byte read once and written once), best of `repeats`."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def step_bytes(model: DeepSeekV3, context: int, cache_dtype: str) -> tuple[int, int]:
    """(weight bytes, cache bytes) one decode step at batch 1 reads with `context` cached tokens."""
    cfg = model.config
    weights = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "embed.weight":
            continue  # the MTP module does not run in plain decoding; the embedding gives one row
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1.0
        weights += int(p.numel() * p.element_size() * share)
    cache = bytes_per_token(cfg, cache_dtype) * context
    return weights, cache


def decode_rate(model: DeepSeekV3, prompt: int, new: int, cache_dtype: str, repeats: int) -> float:
    """Decode tokens/s at batch 1 after a prompt of `prompt` tokens, best of `repeats`."""
    ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    best = 0.0
    for _ in range(repeats):
        engine = Engine(model, None, cache_dtype=cache_dtype, max_len=prompt + new + 8)
        seq = engine.generate([ids], SamplingParams(max_new_tokens=new))[0]
        best = max(best, (len(seq.tokens) - 1) / engine.stats.decode_time)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    bandwidth = {t: copy_bandwidth(t) for t in (1, 2)}
    print(f"copy bandwidth: {bandwidth[1] / 1e9:.1f} GB/s on 1 thread, {bandwidth[2] / 1e9:.1f} GB/s on 2")
    rows = []
    for label, cfg in (("small", preset("small")), ("hidden 1024", preset("small").replace(hidden_size=1024))):
        torch.manual_seed(0)
        base = DeepSeekV3(cfg)
        base.init_weights()
        base.eval()
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        packed = copy.deepcopy(bf16)
        pack(packed)
        for dtype, model, plain in (("fp32", base, base), ("bf16", bf16, bf16), ("bf16 packed", packed, bf16)):
            cache_dtype = dtype.split()[0]
            weights, cache = step_bytes(plain, args.prompt + args.new_tokens // 2, cache_dtype)  # packing: same bytes
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    rate = decode_rate(model, args.prompt, args.new_tokens, cache_dtype, args.repeats)
                floor = bandwidth[threads] / (weights + cache)
                row = {"model": label, "dtype": dtype, "threads": threads,
                       "step_weight_mb": weights / 1e6, "step_cache_mb": cache / 1e6, "tokens_per_s": rate,
                       "floor_tokens_per_s": floor, "bandwidth_share": rate / floor}
                rows.append(row)
                print(f"{label:<12} {dtype:<11} {threads} thr  step reads {weights / 1e6:6.1f} MB weights + "
                      f"{cache / 1e6:5.2f} MB cache; {rate:7.1f} tok/s of a {floor:7.1f} tok/s floor: "
                      f"{rate / floor:5.1%} of bandwidth")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "prompt": args.prompt, "new_tokens": args.new_tokens, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
