"""A prepared dataset on disk: token shards, the tokenizer that made them, and a JSON manifest.

    DIR/manifest.json            what is here: dtype, token and document counts, fingerprints
    DIR/tokenizer.json           the tokenizer (plus tokenizer_config.json)
    DIR/train-00000.bin, ...     uint16 (or uint32) token ids, documents joined by EOS
    DIR/val-00000.bin, ...       the held-out documents, same layout
    DIR/train-00000.mask, ...    chat data only (`masked`): one uint8 per token, 1 where the token is a target
                                 of the loss (an assistant's answer), 0 where it is context

Shards are raw little-endian arrays with no header, so `numpy.memmap` (or any language) reads them.
The manifest is written last: a folder without one is incomplete and is rebuilt, never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsv3.errors import Dsv3Error
from dsv3.tokenizer import Tokenizer
from dsv3.utils import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "dsv3-tokens-1"
SPLITS = ("train", "val")


def mask_file(shard: str) -> str:
    """The loss mask beside a token shard: train-00000.bin -> train-00000.mask."""
    return os.path.splitext(shard)[0] + ".mask"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class DatasetInfo:
    """The manifest of a prepared dataset; `DatasetInfo.load(dir)` reads it, `memmaps(split)` its shards."""

    path: str
    dtype: str  # "uint16" or "uint32"
    vocab_size: int  # largest token id + 1
    eos_id: int
    bos_id: int | None
    tokenizer_sha256: str
    fingerprint: str  # of the sources' identity and the settings: equal means a re-run can reuse this
    content_sha256: str  # of the documents' text as tokenized (after any audit)
    sources: list[str]
    documents: int
    bytes: int  # UTF-8 bytes of text tokenized
    tokens: int  # all splits, EOS separators included
    # {"train": {"documents": n, "tokens": n, "shards": [{"file": name, "tokens": n}, ...]}, "val": {...}}
    splits: dict[str, dict[str, Any]]
    settings: dict[str, Any]  # vocab_size / tokenizer, text_field, val_fraction, audit
    audit: dict[str, Any] = field(default_factory=dict)  # counts when an audit ran
    masked: bool = False  # chat data: every shard has a .mask file beside it (see the module docstring)
    seconds: float = 0.0  # how long preparing took
    reused: bool = False  # set by prepare() when it found this dataset up to date; not saved

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetInfo:
        path = os.fspath(path)
        manifest = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest):
            raise Dsv3Error(f"{path} holds no prepared dataset (no {MANIFEST}); run `dsv3 prepare --out {path}`")
        try:
            with open(manifest, encoding="utf-8") as f:
                d = json.load(f)
            if d.pop("format") != FORMAT:
                raise ValueError("unknown format")
            info = cls(path=path, **d)
            info._check()
            return info
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise Dsv3Error(f"{manifest} is damaged or from another version ({type(e).__name__}: {e}); prepare the "
                            "data again") from None

    def _check(self) -> None:
        """Raise (ValueError, TypeError, ...) unless the manifest has the shape this code reads."""
        np.dtype(self.dtype)
        for name in ("vocab_size", "eos_id", "tokens", "documents"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} is not an integer")
        for split in SPLITS:
            for shard in self.splits[split]["shards"]:
                if shard["file"] != os.path.basename(shard["file"]) or not isinstance(shard["tokens"], int):
                    raise ValueError(f"shard entry {shard!r} is not a file name in the folder with a token count")

    def save(self) -> None:
        d = {"format": FORMAT, **dataclasses.asdict(self)}
        del d["path"], d["reused"]
        atomic_write_text(os.path.join(self.path, MANIFEST), json.dumps(d, indent=2) + "\n")

    def shard_files(self, split: str) -> list[str]:
        return [os.path.join(self.path, s["file"]) for s in self.splits[split]["shards"]]

    def is_complete(self) -> bool:
        """Every shard the manifest lists exists with the size it lists (and its mask, for chat data)."""
        size = np.dtype(self.dtype).itemsize
        return all(
            os.path.isfile(p) and os.path.getsize(p) == s["tokens"] * size
            and (not self.masked or os.path.isfile(mask_file(p)) and os.path.getsize(mask_file(p)) == s["tokens"])
            for split in SPLITS
            for p, s in zip(self.shard_files(split), self.splits[split]["shards"])
        )

    def memmaps(self, split: str) -> list[np.memmap]:
        """The split's shards, memory-mapped read-only (nothing is read until indexed)."""
        if split not in SPLITS:
            raise Dsv3Error(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        if not self.is_complete():
            raise Dsv3Error(f"the token shards in {self.path} do not match its {MANIFEST}; prepare the data again")
        return [np.memmap(p, dtype=self.dtype, mode="r") for p in self.shard_files(split)]

    def mask_memmaps(self, split: str) -> list[np.memmap] | None:
        """The split's loss masks, one per shard, or None for data without (every token is a target)."""
        if not self.masked:
            return None
        return [np.memmap(mask_file(p), dtype=np.uint8, mode="r") for p in self.shard_files(split)]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dir(self.path)
