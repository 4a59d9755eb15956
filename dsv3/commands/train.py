"""`dsv3 train`: pre-train a model with DeepSeek-V3's recipe; with no arguments, the quick start.

Every flag maps onto a field of `dsv3.train.TrainConfig`; flags left out keep its defaults, or, with
--resume, the values the run was started with (its train_config.json), except the layout flags, which
belong to the job rather than the run: a run saved on 2 ranks resumes on 1, or on 4.

Across processes it runs under torchrun (`torchrun --nproc-per-node N -m dsv3 train ...`, every rank the
same command) or starts that job itself on this machine with `--nproc N`.
"""

from __future__ import annotations

import argparse
import os

from dsv3.commands.recipe import CLI_ONLY, S, add_recipe_arguments, add_run_directory_arguments, recipe_config
from dsv3.config import PRESETS
from dsv3.errors import Dsv3Error
from dsv3.tokenizer import TOKENIZER_FILE
from dsv3.train.config import TrainConfig
from dsv3.train.dsa import STAGES as DSA_STAGES

HELP = "pre-train a model (DeepSeek-V3's recipe: aux-loss-free balancing, MTP); no arguments: the quick start"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    _model_and_data(parser.add_argument_group("model and data"), d)
    _sparse_attention(parser.add_argument_group("sparse attention (DeepSeek-V3.2's DSA, from a dense model)"))
    add_recipe_arguments(parser, d, "optimizer (AdamW 0.9/0.95, DeepSeek-V3's schedule shape)")
    parser.add_argument_group("speed").add_argument(
        "--compile", action="store_true", default=S,
        help="torch.compile each transformer block (regional compilation: one compiled graph serves every layer); "
             "the first step takes a minute or two longer, and on the CPU it needs a C++ compiler")


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
    add_run_directory_arguments(model)


def _sparse_attention(dsa) -> None:
    dsa.add_argument("--init-from", metavar="MODEL_DIR", default=S,
                     help="start from this model's weights (a run directory or Hugging Face folder); its config.json "
                          "is the model and its tokenizer.json the tokenizer")
    dsa.add_argument("--dsa-stage", choices=DSA_STAGES, default=S,
                     help="warmup: train only the lightning indexers towards dense attention (KL), the rest frozen; "
                          "sparse: top-k attention, the whole model on the LM loss and the indexers on their KL")
    dsa.add_argument("--index-topk", type=int, metavar="K", default=S,
                     help="keys each query keeps (a dense model's new indexers: default a quarter of --seq-len)")
    dsa.add_argument("--index-n-heads", type=int, metavar="J", default=S,
                     help="a dense model's new indexers: heads (default: half the attention heads)")
    dsa.add_argument("--index-head-dim", type=int, metavar="D", default=S,
                     help="a dense model's new indexers: head width (default: 2/3 of the query-key head width)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given; with --resume, on top of the run's saved train_config.json."""
    given = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    if "init_from" in given:  # the model and its tokenizer come with the weights
        if "model_config" in given or "preset" in given:
            raise Dsv3Error("--init-from brings its own config.json; leave out --preset and --config")
        given["model_config"] = given["init_from"]
        tokenizer = os.path.join(given["init_from"], TOKENIZER_FILE)
        if "tokenizer" not in given and os.path.isfile(tokenizer):
            given["tokenizer"] = tokenizer
    if "data" in given:
        given["data"] = list(given["data"])
    if "out" not in given:
        given["out"] = os.path.join("runs", "model" if "model_config" in given else given.get("preset", "small"))
    return recipe_config(given, {})


def run(args: argparse.Namespace) -> int:
    from dsv3.train import train

    if args.nproc is not None:
        from dsv3.commands.launch import launch

        return launch("train", args.nproc, args.argv)
    train(config_from_args(args), progress=False if args.no_progress else None)
    return 0
