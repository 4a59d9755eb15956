"""Generating and serving from several processes: rank 0 (the leader) owns the terminal or the HTTP server and
its engine; every other rank runs an identical engine over its slices of the model and replays the leader's.

Before each step the leader broadcasts what changed since the last one: sequences added (prompt and sampling
parameters), sequences cancelled, sequences that stop drafting (a choice made from the leader's timings),
everything aborted, or the end. Then every rank steps. The engines start
equal and see the same requests in the same order; every forward ends in collectives that leave the same
logits on every rank (`dsv3.parallel.inference`), and each sequence samples from a generator seeded by the
leader. So all ranks schedule, sample and stop alike without exchanging a single token. A rank that dies
breaks the next collective; torchrun then stops the job.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import secrets

import torch
import torch.distributed as dist

from dsv3.infer import Engine, SamplingParams, Sequence

# A follower waits in a broadcast for as long as the leader's user takes to type: a dead rank is noticed by
# torchrun, not by this timeout.
IDLE_TIMEOUT = datetime.timedelta(days=7)


def init() -> tuple[int, int]:
    """Join the torchrun job (gloo on the CPU, NCCL on CUDA); returns (rank, world size)."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=IDLE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


class Leader(Engine):
    """Rank 0's engine: an Engine that tells the other ranks, before each step, what its callers changed. Its
    add, cancel and step must be called from one thread (the batching thread, or the terminal's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._changes: list[tuple] = []
        atexit.register(self.close)

    def add(self, prompt, params: SamplingParams) -> Sequence:
        if params.seed is None:  # the followers must draw what the leader draws
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        seq = super().add(prompt, params)
        self._changes.append(("add", seq.id, seq.prompt, params))
        return seq

    def cancel(self, seq: Sequence) -> None:
        super().cancel(seq)
        self._changes.append(("cancel", seq.id))

    def abort_all(self) -> None:
        super().abort_all()
        self._changes.append(("abort",))

    def step(self) -> list[Sequence]:
        # whether a sequence keeps drafting rests on this rank's timings: decided here, told to the others
        for s in self._drafts_that_do_not_pay():
            self.stop_drafting(s)
            self._changes.append(("stop drafting", s.id))
        changes, self._changes = self._changes, []
        dist.broadcast_object_list([changes], src=0)
        return super().step()

    def _update_drafting(self) -> None:
        pass  # decided in `step`, before the broadcast

    def close(self) -> None:
        """Release the followers (at exit; once)."""
        if dist.is_initialized():
            try:
                dist.broadcast_object_list([[("end",)]], src=0)
                dist.destroy_process_group()
            except RuntimeError:  # a follower is gone (torchrun is stopping the job): nobody is left to release
                pass


class Follower(Engine):
    """Another rank's engine: it makes no decision of its own (`follow` applies the leader's)."""

    def _update_drafting(self) -> None:
        pass


def follow(engine: Follower) -> None:
    """Replay the leader's steps on this rank's engine until the leader ends."""
    seqs: dict[int, Sequence] = {}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        for change in box[0]:
            if change[0] == "add":
                seqs[change[1]] = engine.add(change[2], change[3])
            elif change[0] == "cancel" and change[1] in seqs:
                engine.cancel(seqs[change[1]])
            elif change[0] == "stop drafting" and change[1] in seqs:
                engine.stop_drafting(seqs[change[1]])
            elif change[0] == "abort":
                engine.abort_all()
            elif change[0] == "end":
                dist.destroy_process_group()
                return
        engine.step()
        seqs = {k: s for k, s in seqs.items() if not s.done}
