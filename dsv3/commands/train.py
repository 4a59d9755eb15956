"""`dsv3 train`: pre-train a model with DeepSeek-V3's recipe; with no arguments, the quick start.

Every flag maps onto a field of `dsv3.train.TrainConfig`; flags left out keep its defaults, or, with
--resume, the values the run was started with (its train_config.json), except the layout flags, which
belong to the job rather than the run: a run saved on 2 ranks resumes on 1, or on 4.

Across processes it runs under torchrun (`torchrun --nproc-per-node N -m dsv3 train ...`, every rank the
same command) or starts that job itself on this machine with `--nproc N`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from dsv3.commands.recipe import CLI_ONLY, S, add_recipe_arguments, add_run_directory_arguments, recipe_config
from dsv3.config import PRESETS
from dsv3.errors import InvalidValue
from dsv3.parallel.dist import launched
from dsv3.train.config import TrainConfig

HELP = "pre-train a model (DeepSeek-V3's recipe: aux-loss-free balancing, MTP); no arguments: the quick start"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    _model_and_data(parser.add_argument_group("model and data"), d)
    add_recipe_arguments(parser, d, "optimizer (AdamW 0.9/0.95, DeepSeek-V3's schedule shape)")


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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given; with --resume, on top of the run's saved train_config.json."""
    given = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    if "data" in given:
        given["data"] = list(given["data"])
    if "out" not in given:
        given["out"] = os.path.join("runs", "model" if "model_config" in given else given.get("preset", "small"))
    return recipe_config(given, {})


def run(args: argparse.Namespace) -> int:
    from dsv3.train import train

    if args.nproc is not None:
        return _launch(args.nproc, args.argv)
    train(config_from_args(args), progress=False if args.no_progress else None)
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this same command as `nproc` ranks of a torchrun job on this machine; returns the job's exit code
    (the first failed rank's; its own error is already on stderr)."""
    if nproc < 1:
        raise InvalidValue("nproc", nproc, "must be a positive integer")
    if launched():
        raise InvalidValue("nproc", nproc, "starts a job of its own; under torchrun leave it out")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what went wrong

    # each rank's share of the cores, as torchrun does (it sets 1), unless the user chose
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dsv3-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "dsv3", "train", *_without_nproc(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: say which, as a shell would
            print(f"dsv3 train: rank {rank} was killed by {signal.Signals(-code).name}; the job was stopped",
                  file=sys.stderr)
            return 128 - code
        return code
    except SignalException as e:  # this launcher was told to stop: its ranks have been stopped with it
        print(f"dsv3 train: stopped by {signal.Signals(e.sigval).name}; every rank was stopped", file=sys.stderr)
        return 128 + e.sigval
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
