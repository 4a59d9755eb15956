"""`--nproc N`: run a verb as N ranks of a torchrun job on this machine (train; generate, chat and serve
across processes), as `torchrun --standalone --nproc-per-node N -m dsv3 VERB ...` would."""

from __future__ import annotations

import logging
import os
import signal
import sys

from dsv3.errors import InvalidValue
from dsv3.parallel.dist import launched


def launch(verb: str, nproc: int, argv: list[str]) -> int:
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
        elastic_launch(config, sys.executable)("-m", "dsv3", verb, *_without_nproc(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: say which, as a shell would
            print(f"dsv3 {verb}: rank {rank} was killed by {signal.Signals(-code).name}; the job was stopped",
                  file=sys.stderr)
            return 128 - code
        return code
    except SignalException as e:  # this launcher was told to stop: its ranks have been stopped with it
        print(f"dsv3 {verb}: stopped by {signal.Signals(e.sigval).name}; every rank was stopped", file=sys.stderr)
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
