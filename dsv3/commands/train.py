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

from dsv3.config import PRESETS
from dsv3.errors import InvalidValue
from dsv3.fp8 import SCALE_FORMATS
from dsv3.parallel.dist import launched
from dsv3.parallel.layout import PP_SCHEDULES
from dsv3.train.config import BALANCE_MODES, DTYPES, MOMENT_DTYPES, TrainConfig
from dsv3.train.fp8 import SCALINGS

HELP = "pre-train a model (DeepSeek-V3's recipe: aux-loss-free balancing, MTP); no arguments: the quick start"

S = argparse.SUPPRESS  # a flag left out sets nothing, so defaults come from TrainConfig or the resumed run
LAYOUT_FIELDS = ("dp_shard", "ep", "pp", "pp_schedule", "reshard")  # the job's, never taken from a resumed run
CLI_ONLY = ("no_progress", "nproc", "argv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    _model_and_data(parser.add_argument_group("model and data"), d)
    _length_and_precision(parser.add_argument_group("length, batch and precision"), d)
    _optimizer(parser.add_argument_group("optimizer (AdamW 0.9/0.95, DeepSeek-V3's schedule shape)"), d)
    _balance(parser.add_argument_group("load balancing and multi-token prediction"), d)
    _outputs(parser.add_argument_group("logging, evaluation and checkpoints"), d)
    _processes(parser.add_argument_group("several processes (torchrun; dp-shard x ep x pp = the ranks)"), d)


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
                     help="bf16: autocast matmuls, fp32 master weights; fp32: everything in fp32; fp8: the linear "
                          "layers' GEMMs in E4M3 with 1x128/128x128 scales, DeepSeek-V3's recipe "
                          f"(default: {d.dtype})")
    run.add_argument("--fp8-scaling", choices=SCALINGS, default=S,
                     help="with --dtype fp8: blockwise (default) or tensorwise, one scale per tensor")
    run.add_argument("--fp8-scale-format", choices=SCALE_FORMATS, default=S,
                     help="with --dtype fp8: fp32 scales (default) or ue8m0, powers of two")
    run.add_argument("--optimizer-state-dtype", choices=MOMENT_DTYPES, default=S,
                     help="AdamW's two moments (default: bf16 under --dtype fp8, else fp32)")
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


def _processes(procs, d: TrainConfig) -> None:
    procs.add_argument("--nproc", type=int, metavar="N", default=None,
                       help="start N processes on this machine, as `torchrun --standalone --nproc-per-node N` would")
    procs.add_argument("--dp-shard", type=int, metavar="D", default=S,
                       help="ranks that shard the weights with FSDP2 (default: the ranks --ep and --pp leave)")
    procs.add_argument("--ep", type=int, metavar="E", default=S,
                       help=f"expert-parallel ranks: each holds 1/E of the routed experts (default: {d.ep})")
    procs.add_argument("--pp", type=int, metavar="P", default=S, help=f"pipeline-parallel ranks (default: {d.pp})")
    procs.add_argument("--pp-schedule", choices=PP_SCHEDULES, default=S,
                       help="1f1b: one stage per rank; dualpipev: two per rank in a V, the embedding, head and MTP "
                            f"module on the first (default: {d.pp_schedule})")
    procs.add_argument("--no-reshard", dest="reshard", action="store_false", default=S,
                       help="FSDP2 keeps each block's gathered weights from the forward to the backward pass "
                            "(ZeRO-2's memory, half the all-gathers; faster where memory is plenty)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given; with --resume, on top of the run's saved train_config.json."""
    given = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    if "data" in given:
        given["data"] = list(given["data"])
    if "out" not in given:
        given["out"] = os.path.join("runs", "model" if "model_config" in given else given.get("preset", "small"))
    saved = os.path.join(given["out"], "train_config.json")
    if given.get("resume") and os.path.isfile(saved):
        base = TrainConfig.from_json(saved).to_dict()
        defaults = TrainConfig().to_dict()
        base.update(overwrite=False, **{k: defaults[k] for k in LAYOUT_FIELDS})
        return TrainConfig.from_dict({**base, **given})
    return TrainConfig.from_dict(given)


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
