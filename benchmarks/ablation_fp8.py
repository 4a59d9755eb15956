"""FP8 training against bf16: the loss gap DeepSeek-V3 reports under 0.25%, reproduced at small scale.

Runs of the same model, data order and seed, differing only in `--dtype` and `--fp8-scaling`: bf16, fp8 with
DeepSeek-V3's fine-grained scaling (1x128 tiles, 128x128 blocks) and fp8 with one scale per tensor. Reported:
each run's final validation loss and its gap to bf16 relative to bf16's loss, and the time per step (the
FP8 GEMMs are emulated, see `dsv3.train.fp8`). The run directories stay in --keep, so that

    dsv3 report KEEP/bf16 --compare KEEP/fp8-blockwise KEEP/fp8-tensorwise

draws the curves side by side.

    .venv/bin/python benchmarks/ablation_fp8.py --steps 300 --keep runs/fp8-small           # small preset
    .venv/bin/python benchmarks/ablation_fp8.py --wide --steps 200 --keep runs/fp8-wide     # every linear
                                                                                           # dim a multiple of 128
"""

from __future__ import annotations

import json
import os

from ablation_runs import parse_args, run_config

from dsv3 import preset
from dsv3.train import TrainConfig, train
from dsv3.train.summary import Summary

RUNS = (("bf16", {"dtype": "bf16"}),
        ("fp8-blockwise", {"dtype": "fp8"}),
        ("fp8-tensorwise", {"dtype": "fp8", "fp8_scaling": "tensorwise"}))


def wide_config():
    """A wider config (hidden 384 against the small preset's 256) whose every linear dimension is a multiple of
    128, so that no tile or block is partial. That takes a rotary width of 128: the latent's projection emits
    kv_lora_rank + qk_rope_head_dim columns and the next one reads kv_lora_rank, so both are multiples of 128
    only if the rotary width is too (the small preset's is 64 + 16, DeepSeek-V3's 512 + 64)."""
    return preset("small").replace(
        hidden_size=384, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=64, intermediate_size=1024,
        moe_intermediate_size=128)


def finished(cfg: TrainConfig) -> Summary | None:
    """The summary of a run already in `cfg.out` that trained with the same settings, or None."""
    try:
        with open(os.path.join(cfg.out, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(cfg.out, "train_config.json")) as f:
            before = json.load(f)
    except FileNotFoundError:
        return None
    now = json.loads(json.dumps(cfg.to_dict()))
    shared = (before.keys() & now.keys()) - {"overwrite", "resume"}  # settings added since default to the old behaviour
    if any(before[k] != now[k] for k in shared):
        return None
    summary.pop("samples", None)
    return Summary(**summary)


def main() -> None:
    args = parse_args(__doc__, extra=lambda ap: (
        ap.add_argument("--wide", action="store_true", help="the wide config instead of the preset"),
        ap.add_argument("--keep", default="runs/fp8", help="where the run directories go"),
        ap.add_argument("--reuse", action="store_true",
                        help="read back runs in --keep that finished with the same settings instead of training"),
        ap.add_argument("--runs", nargs="+", choices=[name for name, _ in RUNS], default=[name for name, _ in RUNS],
                        help="train only these (several processes can share the work; --reuse then reads all)")))
    os.makedirs(args.keep, exist_ok=True)
    changes = {}
    if args.wide:
        path = os.path.join(args.keep, "config.json")
        with open(path, "w") as f:
            json.dump(wide_config().to_hf(), f, indent=1)
        changes["model_config"] = path
    rows = []
    for name, dtype in RUNS:
        cfg = run_config(args, os.path.join(args.keep, name), overwrite=True, **dtype, **changes)
        s = finished(cfg) if args.reuse else None
        if s is None and name not in args.runs:
            continue
        if s is None:
            s = train(cfg, log=lambda _: None, progress=False).summary
        rows.append((name, s))
        print(f"{name}: val loss {s.val_loss:.4f} ({s.train_seconds:.0f} s)", flush=True)

    if not rows or rows[0][0] != "bf16":
        return  # the bf16 baseline is another process's share
    base = rows[0][1]
    model = "wide config" if args.wide else f"preset {args.preset}"
    print(f"\n{model}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, seed {args.seed}, "
          f"validation over {args.eval_windows} windows")
    print("| run | val loss | gap to bf16 | s/step | step time vs bf16 |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows:
        gap = (s.val_loss - base.val_loss) / base.val_loss
        per_step = s.train_seconds / s.steps
        print(f"| {name} | {s.val_loss:.4f} | {gap:+.2%} | {per_step:.2f} | "
              f"{per_step / (base.train_seconds / base.steps):.2f}x |")


if __name__ == "__main__":
    main()
