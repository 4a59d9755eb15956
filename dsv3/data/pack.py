"""Packing: documents -> one stream of token ids, each document followed by EOS -> train and validation shards.

Documents are packed back to back without padding or cross-document masking, as DeepSeek-V3 trains;
EOS tells the model where one document ends. The validation split holds whole documents, chosen by
a hash of their names (paths relative to the corpus folder, `file.jsonl:LINE` for records), so it does
not depend on the order of the input or on where the corpus lives, and adding a file moves few
documents between splits.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from dsv3.tokenizer import Tokenizer

SHARD_TOKENS = 1 << 28  # 512 MB of uint16 per shard file
CHUNK_CHARS = 1 << 20  # longer documents are encoded in pieces (in parallel, in bounded memory)
BATCH_CHARS = 1 << 22  # text handed to the tokenizer at once
MIN_VAL_TOKENS = 16384  # validation gets at least this many tokens (or a tenth of a small corpus)
COPY_TOKENS = 1 << 24  # tokens moved at once from the stream into the shards


def name_key(name: str) -> int:
    """A stable 64-bit hash of a document's name: orders the candidates for validation."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


# A newline with a non-space character on each side: where a long document may be cut.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def pieces(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `size` characters, each cut after a newline that sits between two
    non-space characters. Byte-level BPEs with GPT-2- or DeepSeek-style splitting never join tokens
    across such a newline, so encoding the pieces gives the same ids as encoding the whole."""
    out, start = [], 0
    while len(text) - start > size:
        cut = SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        out.append(text[start:cut.start()])
        start = cut.start()
    out.append(text[start:])
    return out


def tokenize(texts: Iterable[str], tokenizer: Tokenizer, path: str, dtype: np.dtype,
             on_text: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """Encode `texts` into the file `path` as one stream `doc0 EOS doc1 EOS ...` of `dtype` ids.

    Returns each document's token count (its EOS included). `on_text(chars)` reports progress.
    """
    lengths: list[int] = []
    with open(path, "wb") as out:
        for batch in _batches(texts):
            cut = [pieces(text, CHUNK_CHARS) for text in batch]
            encoded = iter(tokenizer.encode_batch([p for ps in cut for p in ps]))
            flat: list[int] = []
            for ps in cut:
                start = len(flat)
                for _ in ps:
                    flat.extend(next(encoded))
                flat.append(tokenizer.eos_id)
                lengths.append(len(flat) - start)
            out.write(np.asarray(flat, dtype=dtype).tobytes())
            on_text(sum(map(len, batch)))
    return np.asarray(lengths, dtype=np.int64)


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def validation_target(total: int, fraction: float) -> int:
    """Tokens to hold out: `fraction` of the corpus, but at least MIN_VAL_TOKENS or a tenth of it."""
    return max(1, int(fraction * total), min(MIN_VAL_TOKENS, total // 10))


def choose_validation(lengths: np.ndarray, keys: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents go to validation (a boolean mask), for two or more documents.

    Documents are taken in the order of their name hashes until the held-out tokens reach the target,
    skipping any that would overshoot it twice over; training always keeps at least one document.
    If every document is too large, the smallest one is held out.
    """
    target = validation_target(int(lengths.sum()), fraction)
    is_val = np.zeros(len(lengths), dtype=bool)
    held, left = 0, len(lengths)
    for i in np.argsort(keys, kind="stable"):
        if held >= target or left == 1:
            break
        if held + lengths[i] <= 2 * target:
            is_val[i], held, left = True, held + lengths[i], left - 1
    if not is_val.any():
        is_val[np.argmin(lengths)] = True  # argmin takes the first of equal lengths: deterministic
    return is_val


def plan_split(lengths: np.ndarray, keys: np.ndarray, fraction: float) -> dict[str, dict]:
    """Where each split's tokens lie in the stream: {"train": {"documents": n, "ranges": [(start, end)]},
    "val": {..., "held_out": how}}. A corpus of one document cannot be split by document: the end of
    that document is held out instead."""
    total = int(lengths.sum())
    if len(lengths) == 1:
        cut = total - validation_target(total, fraction)
        return {"train": {"documents": 1, "ranges": [(0, cut)]},
                "val": {"documents": 0, "ranges": [(cut, total)], "held_out": "the end of the only document"}}
    is_val = choose_validation(lengths, keys, fraction)
    ranges = split_ranges(lengths, is_val)
    return {
        "train": {"documents": int((~is_val).sum()), "ranges": [(a, b) for a, b, s in ranges if s == "train"]},
        "val": {"documents": int(is_val.sum()), "ranges": [(a, b) for a, b, s in ranges if s == "val"],
                "held_out": "whole documents"},
    }


def split_ranges(lengths: np.ndarray, is_val: np.ndarray) -> list[tuple[int, int, str]]:
    """(start, end, split) ranges of the token stream, merging neighbouring documents of one split."""
    ends = np.cumsum(lengths)
    ranges: list[tuple[int, int, str]] = []
    start = 0
    for end, val in zip(ends.tolist(), is_val.tolist()):
        split = "val" if val else "train"
        if ranges and ranges[-1][2] == split:
            ranges[-1] = (ranges[-1][0], end, split)
        else:
            ranges.append((start, end, split))
        start = end
    return ranges


class ShardWriter:
    """Appends token arrays to `DIR/{split}-00000.bin`, `-00001.bin`, ..., `shard_tokens` tokens per file."""

    def __init__(self, directory: str, split: str, shard_tokens: int = SHARD_TOKENS):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict[str, int | str]] = []  # [{"file": name, "tokens": n}], the manifest's entries
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]

    def _next_file(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.directory, name), "wb")  # noqa: SIM115 - closed by close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_shards(stream: np.ndarray, splits: dict[str, dict], directory: str,
                 shard_tokens: int = SHARD_TOKENS) -> dict[str, list[dict]]:
    """Copy each split's ranges of `stream` (see `plan_split`) into its shards; returns their list per split."""
    shards = {}
    for split, plan in splits.items():
        writer = ShardWriter(directory, split, shard_tokens)
        for start, end in plan["ranges"]:
            for s in range(start, end, COPY_TOKENS):
                writer.write(np.asarray(stream[s:min(s + COPY_TOKENS, end)]))
        writer.close()
        shards[split] = writer.shards
    return shards
