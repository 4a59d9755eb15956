"""What the ablation scripts share: their command-line options and the training run they vary."""

from __future__ import annotations

import argparse

from dsv3.train import TrainConfig


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    """--preset, --steps, --batch-size, --seq-len, --eval-windows, --seed, and what `extra(parser)` adds; the
    description is doc's first line."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def run_config(args: argparse.Namespace, out: str, **changes) -> TrainConfig:
    """One run of the ablation: the same preset, tokens and seed, evaluated and saved once at the end."""
    return TrainConfig(preset=args.preset, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       eval_windows=args.eval_windows, eval_every=args.steps, save_every=args.steps, seed=args.seed,
                       samples=0, tensorboard=False, out=out, **changes)  # fmt: skip
