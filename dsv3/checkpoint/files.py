"""Reading and writing sets of safetensors files in the Hugging Face layout.

A checkpoint is `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json` ({"metadata": {"total_size": ...}, "weight_map": {name: file}}).
Tensors are read one at a time from memory-mapped files, so reading never holds more than the tensor asked for.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv3.errors import CheckpointError
from dsv3.utils import atomic_write, atomic_write_text

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class CheckpointReader:
    """The tensors of a checkpoint directory (or of one .safetensors file), by name."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isfile(path) and path.endswith(".safetensors"):
            self.directory, files = os.path.dirname(path) or ".", [os.path.basename(path)]
            self._file_of = None
        elif os.path.isdir(path):
            self.directory = path
            index = os.path.join(path, INDEX)
            if os.path.exists(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{index} is not a valid index ({e!r}); regenerate it") from None
                self._file_of = dict(weight_map)
                files = sorted(set(weight_map.values()))
            elif os.path.exists(os.path.join(path, SINGLE)):
                files, self._file_of = [SINGLE], None
            else:
                raise CheckpointError(f"{path} holds no {SINGLE} and no {INDEX}; point at a model directory")
        else:
            raise CheckpointError(f"no checkpoint at {path}: expected a model directory or a .safetensors file")
        self._handles = {}
        for name in files:
            full = os.path.join(self.directory, name)
            if not os.path.exists(full):
                raise CheckpointError(f"shard {full} is listed in {INDEX} but missing; copy or re-download it")
            try:
                self._handles[name] = safe_open(full, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{full} is truncated or not a safetensors file ({e}); re-download or re-convert it"
                ) from None
        if self._file_of is None:
            self._file_of = {k: name for name, h in self._handles.items() for k in h.keys()}
        else:
            for key, name in self._file_of.items():
                if key not in self._handles[name].keys():
                    raise CheckpointError(f"tensor {key} is listed in {INDEX} under {name} but that shard lacks it")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> str:
        return self._file_of[key]

    def files(self) -> list[str]:
        return list(self._handles)

    def keys_in(self, file: str) -> list[str]:
        return [k for k, f in self._file_of.items() if f == file]

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, read from the header alone."""
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._file_of[key]].get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(
                f"cannot read tensor {key} from {self._file_of[key]} ({e}); the file may be damaged"
            ) from None


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"shard size {size!r} is not a size like 5GB or 500MiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def plan_shards(planned: list[tuple[str, int]], max_shard_size: int | str) -> list[list[str]]:
    """Group (name, nbytes) in order into shards of at most max_shard_size bytes (a larger tensor gets its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in planned:
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_shards(directory: str, shards: list[list[str]], materialize) -> dict[str, str]:
    """Write one safetensors file per group of names; materialize(names) -> {name: tensor} is called once per
    shard (it may add tensors, e.g. FP8 scales), so only one shard of new tensors is alive at a time.

    Writes the index when there is more than one shard, removes shard files of an earlier save that are not
    part of this one, and returns the weight map.
    """
    n = len(shards)
    file_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, names in zip(file_names, shards):
        tensors = {k: v.contiguous() for k, v in materialize(names).items()}
        path = os.path.join(directory, file_name)
        atomic_write(path, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(tensors, file_name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index_path = os.path.join(directory, INDEX)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(index_path, json.dumps(index, indent=2))
    elif os.path.exists(index_path):
        os.unlink(index_path)
    for stale in os.listdir(directory):
        if (SHARD.fullmatch(stale) or stale == SINGLE) and stale not in file_names:
            os.unlink(os.path.join(directory, stale))
    return weight_map


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize
