"""Batches of token windows from a prepared dataset, for training and for validation.

A split is cut into windows of T+1 tokens that overlap by one token, so every token except the first
is a target exactly once per pass: window w covers tokens [o + w*T, o + (w+1)*T] of its shard, the
inputs are its first T tokens and the labels its last T (in chat data, context tokens get the label
IGNORE). Training draws windows in a shuffled order that changes every pass, and the offset o of the grid
does too (0 on the first pass), so a second pass over a small corpus sees new windows rather than the same
ones again. Its position is two
integers, so `state_dict()` is plain JSON and a resumed run draws exactly the batches it would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dsv3.data.dataset import DatasetInfo
from dsv3.errors import Dsv3Error

IGNORE = -100  # a label that is no target (context in chat data); the losses skip it


class Windows:
    """The windows of T+1 tokens of one split, numbered across its shards."""

    def __init__(self, info: DatasetInfo, split: str, seq_len: int, offset: int = 0):
        self.seq_len = seq_len
        self.shards = info.memmaps(split)
        self.masks = info.mask_memmaps(split)
        # windows per shard with the grid shifted by `offset`; a window never spans two shards
        counts = [max(0, (len(s) - 1 - offset) // seq_len) for s in self.shards]
        self.starts = np.cumsum([0, *counts])  # window number where each shard begins
        self.offset = offset
        self.total = int(self.starts[-1])

    def __len__(self) -> int:
        return self.total

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the windows `indices`: two LongTensors [len(indices), T]."""
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        rows, masks = [], []
        for s, w in zip(shard.tolist(), (indices - self.starts[shard]).tolist()):
            begin = self.offset + w * self.seq_len
            rows.append(self.shards[s][begin:begin + self.seq_len + 1])
            if self.masks is not None:
                masks.append(self.masks[s][begin + 1:begin + self.seq_len + 1])
        block = torch.from_numpy(np.stack(rows).astype(np.int64))  # [B, T+1]
        labels = block[:, 1:].clone()  # [B, T], its own memory: masking must not touch the inputs
        if masks:  # chat data: only the answers' tokens are targets
            labels[torch.from_numpy(np.stack(masks)) == 0] = IGNORE
        return block[:, :-1].contiguous(), labels


def _open(data_dir: str | os.PathLike | DatasetInfo) -> DatasetInfo:
    return data_dir if isinstance(data_dir, DatasetInfo) else DatasetInfo.load(data_dir)


def _too_short(info: DatasetInfo, split: str, seq_len: int) -> Dsv3Error:
    tokens = info.splits[split]["tokens"]
    name = "training" if split == "train" else "validation"
    return Dsv3Error(
        f"the {name} split of {info.path} has {tokens} tokens, fewer than one window of seq_len+1 = {seq_len + 1}; "
        f"use a shorter sequence length or more data" + (" (or a larger --val-fraction)" if split == "val" else "")
    )


class TokenLoader:
    """An endless, shuffled stream of (input_ids, labels) batches, each a LongTensor [batch_size, seq_len].

    Deterministic for a given seed; `state_dict()` / `load_state_dict()` save and restore the position.
    """

    def __init__(self, data_dir: str | os.PathLike | DatasetInfo, split: str = "train", batch_size: int = 8,
                 seq_len: int = 512, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise Dsv3Error(f"batch_size={batch_size} and seq_len={seq_len} must both be positive")
        self.info = _open(data_dir)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.epoch = 0  # passes over the split started so far, minus one
        self.index = 0  # windows of this pass already handed out
        self._start_pass()

    def _start_pass(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        # the grid of the first pass starts at token 0; later passes shift it
        offset = 0 if self.epoch == 0 else int(rng.integers(self.seq_len))
        self.windows = Windows(self.info, self.split, self.seq_len, offset)
        if len(self.windows) == 0 and offset:  # a split of barely one window: keep the grid at 0
            self.windows = Windows(self.info, self.split, self.seq_len, 0)
        if len(self.windows) == 0:
            raise _too_short(self.info, self.split, self.seq_len)
        self.order = rng.permutation(len(self.windows))

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked, need = [], self.batch_size
        while need:  # a batch may straddle two passes
            if self.index == len(self.order):
                self.epoch, self.index = self.epoch + 1, 0
                self._start_pass()
            take = self.order[self.index:self.index + need]
            picked.append(self.windows.gather(take))
            self.index += len(take)
            need -= len(take)
        return torch.cat([x for x, _ in picked]), torch.cat([y for _, y in picked])

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream as plain JSON values, plus what it is only valid for."""
        return {"split": self.split, "seed": self.seed, "seq_len": self.seq_len,
                "tokens": self.info.splits[self.split]["tokens"], "content_sha256": self.info.content_sha256,
                "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; refuses one taken on other data or another window size."""
        for key in ("split", "seq_len", "tokens", "content_sha256"):
            if state[key] != self.state_dict()[key]:
                raise Dsv3Error(
                    f"cannot resume the data position: it was saved with {key}={state[key]!r} but the data now has "
                    f"{key}={self.state_dict()[key]!r}; resume with the same data and sequence length"
                )
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._start_pass()


def eval_batches(data_dir: str | os.PathLike | DatasetInfo, batch_size: int, seq_len: int,
                 max_windows: int | None = None, split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation windows, in order, as (input_ids, labels) batches [<=batch_size, seq_len].

    All windows of the split, or `max_windows` of them spread evenly across it; the same on every call,
    so validation losses of different steps (and runs) compare like with like.
    """
    info = _open(data_dir)
    windows = Windows(info, split, seq_len)
    if len(windows) == 0:
        raise _too_short(info, split, seq_len)
    picked = np.arange(len(windows))
    if max_windows is not None and max_windows < len(windows):
        picked = np.linspace(0, len(windows) - 1, max_windows).round().astype(np.int64)
    for i in range(0, len(picked), batch_size):
        yield windows.gather(picked[i:i + batch_size])
