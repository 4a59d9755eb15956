"""Multi-token prediction on vs off at the same main-model tokens.

Two runs of the same preset on the same batches from the same seed; the second drops the MTP module
(`--no-mtp`, so it also has no MTP parameters). Reported: the main head's validation loss and
perplexity (does the denser MTP signal help the main model?), the MTP head's top-1 accuracy on the
next-next token (the speculative-decoding acceptance to expect), and the training tokens/s of each
(what the extra module costs).

    .venv/bin/python benchmarks/ablation_mtp.py                     # small preset, 100 steps of 8 x 256
"""

from __future__ import annotations

import argparse
import tempfile

from dsv3.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mtp in (True, False):
            cfg = TrainConfig(preset=args.preset, mtp=mtp, max_steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, eval_windows=args.eval_windows, eval_every=args.steps,
                              save_every=args.steps, seed=args.seed, samples=0, tensorboard=False,
                              out=f"{tmp}/{'on' if mtp else 'off'}")
            s = train(cfg, log=lambda _: None).summary
            rows.append(("on" if mtp else "off", s))
            print(f"MTP {rows[-1][0]}: done ({s.train_seconds:.0f} s)", flush=True)

    print(f"\npreset {args.preset}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
          f"({rows[0][1].tokens:,} main-model tokens), seed {args.seed}, validation over {args.eval_windows} windows")
    print("| MTP | val loss (main head) | val perplexity | MTP top-1 accuracy (val) | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows:
        acc = f"{s.val_mtp_acc:.1%}" if s.val_mtp_acc is not None else "-"
        print(f"| {name} | {s.val_loss:.4f} | {s.val_ppl:.2f} | {acc} | {s.tokens_per_s:,.0f} |")


if __name__ == "__main__":
    main()
