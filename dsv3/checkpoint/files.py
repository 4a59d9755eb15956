"""Reading and writing sets of safetensors files in the Hugging Face layout.

A checkpoint is `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json` ({"metadata": {"total_size": ...}, "weight_map": {name: file}}).
Tensors are read one at a time from memory-mapped files and each tensor's pages are released from this
process as soon as it is copied out, so loading a checkpoint costs about the model's own size in memory,
not the model plus every page of the files it read.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Iterable

import torch
from safetensors.torch import save_file

from dsv3.errors import CheckpointError
from dsv3.utils import atomic_write, atomic_write_text

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# safetensors dtype names
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsFile:
    """One .safetensors file: an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the tensor bytes. The data is memory-mapped; `get` copies a tensor out and drops its pages."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download or re-convert it")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past any real header
                raise CheckpointError(f"{path} has a corrupt header; re-download or re-convert it") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a corrupt header (not a JSON object); re-download or re-convert it")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        end = 0
        for key, e in header.items():
            end = max(end, _check_entry(path, key, e))
        self.entries = header
        if self.data_start + end > size:
            raise CheckpointError(f"{path} is truncated (its header promises {self.data_start + end} bytes, the file "
                                  f"has {size}); re-download or re-convert it")  # fmt: skip
        self._mm = None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        e = self.entries[key]
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"tensor {key} in {self.path} has dtype {e['dtype']}, which is not supported")
        return DTYPES[e["dtype"]]

    def get(self, key: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A copy of the tensor, or of its slice [start, stop) along `dim`. Only the pages holding the slice
        are read: a slice of rows is one run of bytes, a slice of columns one short run per row."""
        dtype = self.dtype(key)
        if self._mm is None:
            with open(self.path, "rb") as f:  # copy-on-write: torch wants a writable buffer, nothing is written
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        shape = self.shape(key)
        begin, end = (self.data_start + o for o in self.entries[key]["data_offsets"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        view = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - begin, offset=begin)
        full = view.view(dtype).reshape(shape)
        out = (full if start is None else full.narrow(dim, start, stop - start)).clone()
        del view, full
        page = mmap.PAGESIZE
        lo = begin // page * page
        self._mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)  # give the pages back now that they are copied
        return out


def _check_entry(path: str, key: str, e: object) -> int:
    """One header entry {dtype, shape, data_offsets} as the format defines it; returns where its bytes end.
    Anything else (missing fields, wrong types, offsets that disagree with the shape) names the tensor."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"tensor {key} in {path} has a corrupt header entry ({why}); re-download or "
                               "re-convert the checkpoint")

    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise bad("it needs dtype, shape and data_offsets")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not a [start, end] pair")
    if offsets[1] - offsets[0] != nbytes(shape, DTYPES[dtype]):
        raise bad(f"its {offsets[1] - offsets[0]} bytes do not hold a {dtype} tensor of shape {shape}")
    return offsets[1]


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
                self._file_of = _read_index(index)
                files = sorted(set(self._file_of.values()))
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
            self._handles[name] = SafetensorsFile(full)
        if self._file_of is None:
            self._file_of = {k: name for name, h in self._handles.items() for k in h.entries}
        else:
            for key, name in self._file_of.items():
                if key not in self._handles[name].entries:
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
        return self._handles[self._file_of[key]].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._handles[self._file_of[key]].dtype(key)

    def get(self, key: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A copy of the tensor (or of its slice [start, stop) along `dim`), read from the memory-mapped file."""
        return self._handles[self._file_of[key]].get(key, dim, start, stop)


def _read_index(index: str) -> dict[str, str]:
    """The weight map of model.safetensors.index.json: tensor name -> a shard file in the same folder."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index} is not a valid index ({type(e).__name__}: {e}); regenerate it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index} is not a valid index (its weight_map must map names to file names); "
                              "regenerate it")
    for name in set(weight_map.values()):
        # a shard lives in the model folder itself: a path out of it (../x, /x, sub/x) is refused
        if name != os.path.basename(name) or name in ("", ".", "..") or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index} names the shard {name!r}, which is not a .safetensors file in the "
                                  "model folder; fix or regenerate the index")
    return dict(weight_map)


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


def write_shards(directory: str, shards: list[list[str]], materialize, *, always_index: bool = False) -> dict[str, str]:
    """Write one safetensors file per group of names; materialize(names) -> {name: tensor} is called once per
    shard (it may add tensors, e.g. FP8 scales), so only one shard of new tensors is alive at a time.

    Writes the index when there is more than one shard, or always with `always_index` (DeepSeek's
    fp8_cast_bf16.py reads an FP8 checkpoint through its index, even a checkpoint of one file); removes shard
    files of an earlier save that are not part of this one, and returns the weight map.
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
    if n > 1 or always_index:
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
