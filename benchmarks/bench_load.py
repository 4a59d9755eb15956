"""Peak memory of loading a checkpoint: dsv3.load_pretrained against transformers' from_pretrained.

Each load runs in a fresh subprocess that reports its peak resident set size (VmHWM) after loading, next to
the size of the weights and the process's baseline (Python + torch imported). Usage:

    python benchmarks/bench_load.py [--hidden 1024] [--layers 8] [--experts 32] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch

def hwm():  # peak RSS of this process image (VmHWM starts afresh at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

which, path = sys.argv[1], sys.argv[2]
base = hwm()
t = time.perf_counter()
if which == "dsv3":
    from dsv3 import load_pretrained
    model = load_pretrained(path, torch.bfloat16)
else:
    import transformers
    base = hwm()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
seconds = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
peak = hwm()
print(json.dumps({"which": which, "weights": weights, "baseline": base, "peak": peak, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--fp8", action="store_true", help="save in the release's FP8 format (dsv3 only reads it)")
    args = ap.parse_args()

    import torch

    from dsv3 import DeepSeekV3, preset, save_pretrained

    cfg = preset("small").replace(
        hidden_size=args.hidden, num_hidden_layers=args.layers, n_routed_experts=args.experts,
        moe_intermediate_size=args.hidden // 2, intermediate_size=args.hidden * 3, vocab_size=32000,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        model = DeepSeekV3(cfg).to(torch.bfloat16)
        model.init_weights()
        save_pretrained(model, d, max_shard_size="200MB", fp8=args.fp8)
        del model
        peers = ["dsv3"] if args.fp8 else ["dsv3", "transformers"]
        for which in peers:
            out = subprocess.run([sys.executable, "-c", CHILD, which, d], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = (r["peak"] - r["baseline"]) / r["weights"]
            print(
                f"{which:>12}: weights {r['weights'] / 2**20:7.1f} MiB, peak RSS {r['peak'] / 2**20:7.1f} MiB "
                f"(baseline {r['baseline'] / 2**20:6.1f} MiB) -> peak above baseline = {extra:.2f}x the weights, "
                f"{r['seconds']:.2f}s"
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
