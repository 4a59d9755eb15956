"""Multi-token prediction on vs off at the same main-model tokens.

Two runs of the same preset on the same batches from the same seed; the second drops the MTP module
(`--no-mtp`, so it also has no MTP parameters). Reported: the main head's validation loss and
perplexity (does the denser MTP signal help the main model?), the MTP head's top-1 accuracy on the
next-next token (the speculative-decoding acceptance to expect), and the training tokens/s of each
(what the extra module costs).

    .venv/bin/python benchmarks/ablation_mtp.py                     # small preset, 100 steps of 8 x 256
"""

from __future__ import annotations

import tempfile

from ablation_runs import parse_args, run_config

from dsv3.train import train


def main() -> None:
    args = parse_args(__doc__)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mtp in (True, False):
            cfg = run_config(args, f"{tmp}/{'on' if mtp else 'off'}", mtp=mtp)
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
