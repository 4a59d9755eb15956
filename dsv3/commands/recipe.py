"""The flags of a training recipe, shared by `dsv3 train` and `dsv3 sft`: length, batch and precision; the
optimizer; balancing and MTP; logging and checkpoints; several processes. Every flag maps onto a field of
`dsv3.train.TrainConfig` and is left out of the namespace when not given (`S`), so that the defaults come from
the config the verb starts from, or from the run being resumed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from dsv3.fp8 import SCALE_FORMATS
from dsv3.parallel.layout import PP_SCHEDULES
from dsv3.train.config import BALANCE_MODES, DTYPES, MOMENT_DTYPES, TrainConfig
from dsv3.train.fp8 import SCALINGS
from dsv3.train.rundir import TRAIN_CONFIG

S = argparse.SUPPRESS  # a flag left out sets nothing, so defaults come from TrainConfig or the resumed run
LAYOUT_FIELDS = ("dp_shard", "ep", "pp", "pp_schedule", "reshard")  # the job's, never taken from a resumed run
CLI_ONLY = ("no_progress", "nproc", "argv")


def add_recipe_arguments(parser: argparse.ArgumentParser, d: TrainConfig, optimizer_title: str, *,
                         budget: bool = True, processes: bool = True) -> None:
    """The recipe's flags; `d` gives the defaults their help shows. Without `budget`, --max-steps but no
    --time-budget; without `processes`, no layout flags."""
    _length_and_precision(parser.add_argument_group("length, batch and precision"), d, budget)
    _optimizer(parser.add_argument_group(optimizer_title), d)
    _balance(parser.add_argument_group("load balancing and multi-token prediction"), d)
    _outputs(parser.add_argument_group("logging, evaluation and checkpoints"), d)
    if processes:
        _processes(parser.add_argument_group("several processes (torchrun; dp-shard x ep x pp = the ranks)"), d)


def add_run_directory_arguments(group) -> None:
    """--resume and --overwrite: what to do with a run already in --out."""
    group.add_argument("--resume", action="store_true", default=S,
                       help="continue the run in --out from its newest checkpoint, exactly")
    group.add_argument("--overwrite", action="store_true", default=S,
                       help="delete the run already in --out and start over")


def _length_and_precision(run, d: TrainConfig, budget: bool) -> None:
    run.add_argument("--max-steps", type=int, metavar="N", default=S,
                     help="optimizer steps (default: as many as fit --time-budget)" if budget else
                     "optimizer steps (default: as many as --epochs take)")
    if budget:
        run.add_argument("--time-budget", type=float, metavar="MIN", default=S,
                         help=f"without --max-steps: minutes for the whole run, data preparation and samples "
                              f"included (default: {d.time_budget:g})")
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


def recipe_config(given: dict[str, Any], start: dict[str, Any]) -> TrainConfig:
    """TrainConfig from the flags `given` over `start` (the verb's defaults), or, with --resume, over the run's
    saved train_config.json, whose layout fields are reset: they belong to the job, not the run."""
    saved = os.path.join(given["out"], TRAIN_CONFIG)
    if given.get("resume") and os.path.isfile(saved):
        base = TrainConfig.from_json(saved).to_dict()
        defaults = TrainConfig().to_dict()
        base.update(overwrite=False, **{k: defaults[k] for k in LAYOUT_FIELDS})
        return TrainConfig.from_dict({**base, **given})
    return TrainConfig.from_dict({**start, **given})
