"""`dsv3 train`: pre-train a model with DeepSeek-V3's recipe; with no arguments, the quick start.

Every flag maps onto a field of `dsv3.train.TrainConfig`; flags left out keep its defaults, or, with
--resume, the values the run was started with (its train_config.json).
"""

from __future__ import annotations

import argparse
import os

from dsv3.config import PRESETS
from dsv3.train.config import BALANCE_MODES, DTYPES, TrainConfig

HELP = "pre-train a model (DeepSeek-V3's recipe: aux-loss-free balancing, MTP); no arguments: the quick start"

S = argparse.SUPPRESS  # a flag left out sets nothing, so defaults come from TrainConfig or the resumed run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    _model_and_data(parser.add_argument_group("model and data"), d)
    _length_and_precision(parser.add_argument_group("length, batch and precision"), d)
    _optimizer(parser.add_argument_group("optimizer (AdamW 0.9/0.95, DeepSeek-V3's schedule shape)"), d)
    _balance(parser.add_argument_group("load balancing and multi-token prediction"), d)
    _outputs(parser.add_argument_group("logging, evaluation and checkpoints"), d)


def _model_and_data(model, d: TrainConfig) -> None:
    which = model.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=list(PRESETS), default=S, help=f"a named model (default: {d.preset})")
    which.add_argument("--config", dest="model_config", metavar="CONFIG_JSON", default=S,
                       help="a Hugging Face config.json (or a folder holding one) instead of a preset")
    model.add_argument("--data", nargs="+", metavar="SOURCE", default=S,
                       help="text files, folders, globs or .jsonl files, or one folder `dsv3 prepare` wrote "
                            "(default: the built-in corpus of Python's documentation and standard library)")
    model.add_argument("--data-dir", metavar="DIR", default=S,
                       help=f"where sources are tokenized into shards, reused while unchanged (default: {d.data_dir})")
    model.add_argument("--tokenizer", metavar="PATH", default=S,
                       help="use this tokenizer.json instead of training one on the data")
    model.add_argument("--audit", choices=["off", "refuse", "clean"], default=S,
                       help="audit the corpus for other models' self-identification before training: refuse to "
                            "train on a flagged corpus, or train on the cleaned text (default: off)")
    model.add_argument("--out", metavar="DIR", default=S,
                       help="the run directory: model files, checkpoints, metrics (default: runs/PRESET)")
    model.add_argument("--resume", action="store_true", default=S,
                       help="continue the run in --out from its newest checkpoint, exactly")
    model.add_argument("--overwrite", action="store_true", default=S,
                       help="delete the run already in --out and start over")


def _length_and_precision(run, d: TrainConfig) -> None:
    run.add_argument("--max-steps", type=int, metavar="N", default=S,
                     help="optimizer steps (default: as many as fit --time-budget)")
    run.add_argument("--time-budget", type=float, metavar="MIN", default=S,
                     help=f"without --max-steps: minutes for the whole run, data preparation and samples included "
                          f"(default: {d.time_budget:g})")
    run.add_argument("--batch-size", type=int, metavar="B", default=S,
                     help=f"sequences per micro-batch (default: {d.batch_size})")
    run.add_argument("--seq-len", type=int, metavar="T", default=S, help=f"tokens per sequence (default: {d.seq_len})")
    run.add_argument("--grad-accum", type=int, metavar="N", default=S,
                     help=f"micro-batches per optimizer step (default: {d.grad_accum})")
    run.add_argument("--dtype", choices=DTYPES, default=S,
                     help=f"bf16: autocast matmuls, fp32 master weights; fp32: everything in fp32 (default: {d.dtype})")
    run.add_argument("--device", metavar="DEV", default=S, help=f"cpu or cuda (default: {d.device})")
    run.add_argument("--seed", type=int, default=S,
                     help=f"seed of the initialisation and the data order (default: {d.seed})")


def _optimizer(opt, d: TrainConfig) -> None:
    opt.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default: {d.lr:g})")
    opt.add_argument("--warmup", type=float, metavar="FRAC", default=S,
                     help=f"fraction of the steps spent warming up (default: {d.warmup:g})")
    opt.add_argument("--weight-decay", type=float, default=S, help=f"on matrices (default: {d.weight_decay:g})")
    opt.add_argument("--grad-clip", type=float, default=S, help=f"gradient norm limit (default: {d.grad_clip:g})")


def _balance(bal, d: TrainConfig) -> None:
    bal.add_argument("--balance", choices=BALANCE_MODES, default=S,
                     help="aux-free: DeepSeek-V3's bias update + sequence-wise loss; aux-loss: the classic auxiliary "
                          f"loss instead; none (default: {d.balance})")
    bal.add_argument("--bias-gamma", type=float, metavar="G", default=S,
                     help=f"bias update speed (default: {d.bias_gamma:g})")
    bal.add_argument("--bias-freeze", type=float, metavar="FRAC", default=S,
                     help=f"fraction of the steps after which the bias is frozen (default: {d.bias_freeze:g})")
    bal.add_argument("--seq-alpha", type=float, default=S,
                     help=f"sequence-wise balance loss weight (default: {d.seq_alpha:g})")
    bal.add_argument("--aux-alpha", type=float, default=S,
                     help=f"classic auxiliary loss weight, --balance aux-loss (default: {d.aux_alpha:g})")
    bal.add_argument("--no-mtp", dest="mtp", action="store_false", default=S,
                     help="train without the multi-token-prediction module")
    bal.add_argument("--mtp-lambda", type=float, default=S,
                     help=f"MTP loss weight for the first {d.mtp_switch * 100:.0f}%% of the steps "
                          f"(default: {d.mtp_lambda:g}; then {d.mtp_lambda_late:g})")


def _outputs(out, d: TrainConfig) -> None:
    out.add_argument("--log-every", type=int, metavar="N", default=S,
                     help=f"steps per log line (default: {d.log_every})")
    out.add_argument("--eval-every", type=int, metavar="N", default=S,
                     help=f"steps per validation (default: {d.eval_every})")
    out.add_argument("--eval-windows", type=int, metavar="N", default=S,
                     help=f"validation sequences per evaluation (default: {d.eval_windows})")
    out.add_argument("--save-every", type=int, metavar="N", default=S,
                     help=f"steps per checkpoint (default: {d.save_every})")
    out.add_argument("--keep-last", type=int, metavar="N", default=S,
                     help=f"checkpoints kept (default: {d.keep_last})")
    out.add_argument("--peak-tflops", type=float, metavar="X", default=S,
                     help="this machine's matmul peak for the MFU (default: measured at start)")
    out.add_argument("--samples", type=int, metavar="N", default=S,
                     help=f"texts generated at the end (default: {d.samples})")
    out.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S,
                     help="no TensorBoard event files even when tensorboard is installed")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given; with --resume, on top of the run's saved train_config.json."""
    given = {k: v for k, v in vars(args).items() if k != "no_progress"}
    if "data" in given:
        given["data"] = list(given["data"])
    if "out" not in given:
        given["out"] = os.path.join("runs", "model" if "model_config" in given else given.get("preset", "small"))
    saved = os.path.join(given["out"], "train_config.json")
    if given.get("resume") and os.path.isfile(saved):
        base = TrainConfig.from_json(saved).to_dict()
        base.update(overwrite=False)
        return TrainConfig.from_dict({**base, **given})
    return TrainConfig.from_dict(given)


def run(args: argparse.Namespace) -> int:
    from dsv3.train import train

    train(config_from_args(args), progress=False if args.no_progress else None)
    return 0
