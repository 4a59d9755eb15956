"""DeepSeek-V3's balancing ablation at small scale: auxiliary-loss-free vs the classic auxiliary loss vs none.

Runs of the same model on the same tokens from the same seed, differing only in the balancing:
- aux-free: the bias update plus the complementary sequence-wise loss (alpha 1e-4), at this project's
  default speed gamma 0.01 and at the published 0.001;
- aux-loss: the classic batch-wise auxiliary loss (alpha 1e-3), no bias;
- none: neither.
Reported per run: batch MaxVio (mean over MoE layers, averaged over the last fifth of the steps),
global validation MaxVio at the end (loads of the whole validation set summed per layer; mean and worst
layer), validation loss and perplexity. The balancing paper (arXiv 2408.15664, 1B model) reports global
MaxVio 0.04 (aux-free) vs 0.72 (aux-loss) with perplexity 9.50 vs 9.56.

    .venv/bin/python benchmarks/ablation_balance.py                 # small preset, 100 steps of 8 x 256
    .venv/bin/python benchmarks/ablation_balance.py --steps 300
"""

from __future__ import annotations

import statistics
import tempfile

from ablation_runs import parse_args, run_config

from dsv3.train import train
from dsv3.train.metrics import read_metrics

# row label -> TrainConfig changes
RUNS = {
    "aux-free, gamma 0.01": {"balance": "aux-free", "bias_gamma": 0.01},
    "aux-free, gamma 0.001 (published)": {"balance": "aux-free", "bias_gamma": 0.001},
    "aux-loss, alpha 1e-3": {"balance": "aux-loss"},
    "none": {"balance": "none"},
}


def main() -> None:
    args = parse_args(__doc__)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, changes) in enumerate(RUNS.items()):
            cfg = run_config(args, f"{tmp}/{i}", log_every=1, **changes)
            result = train(cfg, log=lambda _: None)
            records = read_metrics(result.run_dir)
            batch = [r["maxvio"] for r in records if "maxvio" in r]
            val = [r for r in records if "val_loss" in r][-1]
            rows.append((label, statistics.mean(batch[-max(1, len(batch) // 5):]), val["val_maxvio"],
                         val["val_maxvio_max"], val["val_loss"], val["val_ppl"], result.summary.tokens))
            print(f"{label}: done ({result.summary.train_seconds:.0f} s)", flush=True)

    print(f"\npreset {args.preset}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
          f"({rows[0][-1]:,} tokens), seed {args.seed}, validation over {args.eval_windows} windows")
    print("| balancing | batch MaxVio (last 20%) | val MaxVio (mean over layers) | val MaxVio (worst layer) "
          "| val loss | val perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, batch, vmean, vmax, loss, ppl, _ in rows:
        print(f"| {mode} | {batch:.3f} | {vmean:.3f} | {vmax:.3f} | {loss:.4f} | {ppl:.2f} |")


if __name__ == "__main__":
    main()
