"""`prepare()`: a corpus in, token shards out; the one function behind `dsv3 prepare` and `dsv3 train`.

    sources -> documents -> audit (optional) -> spool -> tokenizer (trained or given)
            -> token stream (EOS after each document) -> train / validation shards -> manifest

The dataset is built whole in a temporary folder beside the output folder and exchanged with it at the
end, so a killed run leaves the old dataset or the new one, never a mix. The output folder must be empty,
new, or a dataset prepared before (anything else needs `overwrite`). A run whose sources (paths, sizes,
modification times) and settings match the manifest reuses the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from dsv3.data import builtin
from dsv3.data.dataset import FORMAT, MANIFEST, DatasetInfo, token_dtype
from dsv3.data.pack import SHARD_TOKENS, name_key, plan_split, tokenize, write_shards
from dsv3.data.sources import Document, read, resolve, stat_key
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.tokenizer import Tokenizer
from dsv3.utils import check_destination, human, staged_directory

AUDIT_MODES = ("off", "refuse", "clean")


def prepare(
    sources: Sequence[str] = (),
    out: str | os.PathLike = "data",
    *,
    vocab_size: int = 8192,
    tokenizer: str | os.PathLike | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    audit: str = "off",
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> DatasetInfo:
    """Prepare `sources` (files, folders, globs, .jsonl; none = the built-in corpus) into `out`.

    vocab_size:   size of the byte-level BPE trained on the corpus; ignored when `tokenizer` is given
    tokenizer:    a tokenizer.json (or a folder holding one) to use instead of training
    text_field:   the field of each JSONL record that holds its text
    val_fraction: share of the tokens held out, by whole documents (at least 16K tokens or a tenth)
    audit:        "off"; "refuse" stops if `dsv3.audit` flags any document; "clean" keeps its fixed text
    overwrite:    replace an `out` that holds anything but a dataset prepared before
    log:          receives one line per stage and a summary; `progress` shows bars (None: on a terminal)
    """
    start = time.perf_counter()
    out = os.fspath(out)
    check_destination(out, overwrite=overwrite, allow=_is_dataset, what="output folder")
    if audit not in AUDIT_MODES:
        raise InvalidValue("audit", audit, f"is not one of: {', '.join(AUDIT_MODES)}")
    if not 0 < val_fraction < 0.5:
        raise InvalidValue("val_fraction", val_fraction, "must lie between 0 and 0.5")
    files = resolve(sources) if sources else None
    if files is not None:  # a source folder that holds `out` must not read the shards back in
        files = [f for f in files if not _inside(f, out)]
    given = Tokenizer.from_file(tokenizer) if tokenizer is not None else None
    settings = {"tokenizer": given.sha256() if given else None, "vocab_size": None if given else vocab_size,
                "text_field": text_field, "val_fraction": val_fraction, "audit": audit}
    # what the shards depend on: the format, the settings, and the sources' paths, sizes and times
    identity = builtin.stat_key() if files is None else stat_key(files)
    fingerprint = hashlib.sha256(json.dumps([FORMAT, settings, identity]).encode()).hexdigest()
    old = _existing(out)
    if old is not None and old.fingerprint == fingerprint and old.is_complete():
        old.reused = True
        log(f"reusing the prepared data in {out}: sources and settings are unchanged "
            f"({human(old.tokens)} tokens, {old.documents} documents)")
        return old

    described = "the built-in corpus" if files is None else _describe(files)
    manifest = dict(sources=list(sources) or [builtin.NAME], settings=settings, fingerprint=fingerprint)
    info = _build(files, out, described, given, settings, shard_tokens, log, progress, start, manifest)
    train, val = (human(info.splits[s]["tokens"]) for s in ("train", "val"))
    log(f"prepared {info.documents} documents ({human(info.bytes)}B) from {described} into {out}: "
        f"{human(info.tokens)} tokens (train {train}, val {val}), {info.dtype}, vocabulary {info.vocab_size}, "
        f"{info.seconds:.1f} s")
    return info


def _build(files: list[str] | None, out: str, described: str, given: Tokenizer | None, settings: dict,
           shard_tokens: int, log: Callable[[str], None], progress: bool | None, start: float,
           manifest: dict) -> DatasetInfo:
    """Read, tokenize and pack into a temporary folder inside `out`, then move the dataset into place."""
    vocab_size = settings["vocab_size"]
    with staged_directory(out, "prepare") as tmp:
        log(f"reading {described}")
        spool, audited = _read(files, settings["text_field"], settings["audit"], tmp, described, progress)
        if given is None:
            log(f"training a byte-level BPE tokenizer with {vocab_size} tokens on {human(spool.bytes)}B of text")
        tok = given or Tokenizer.train(spool.texts(), vocab_size, length=spool.documents)
        log(f"tokenizing {spool.documents} documents")
        dtype, total, splits = _pack(spool, tok, tmp, settings["val_fraction"], shard_tokens, progress)
        info = DatasetInfo(
            path=tmp, dtype=dtype.name, vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id,
            tokenizer_sha256=tok.sha256(), content_sha256=spool.sha256.hexdigest(), documents=spool.documents,
            bytes=spool.bytes, tokens=total, splits=splits, audit=audited,
            seconds=round(time.perf_counter() - start, 3), **manifest,
        )
        os.remove(os.path.join(tmp, "stream.bin"))  # the unsplit stream and the spool are not kept
        os.remove(os.path.join(tmp, "documents.spool"))
        info.save()  # the manifest, last
    info.path = out
    return info


def _read(files: list[str] | None, text_field: str, audit: str, tmp: str, described: str,
          progress: bool | None) -> tuple[_Spool, dict]:
    """Read (and audit) the documents once into a spool in `tmp`; returns it and what the audit did."""
    docs = builtin.documents() if files is None else read(files, text_field)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if files else None
    spool = _Spool(os.path.join(tmp, "documents.spool"), root)
    auditing = _Audit(audit)
    spool.fill(auditing.apply(docs), progress)
    if spool.documents == 0:
        if auditing.counts.get("dropped"):
            raise Dsv3Error("the audit dropped every document, so nothing is left to prepare")
        raise Dsv3Error(f"the corpus is empty: there is no text in {described}; give files with text in them")
    return spool, auditing.counts


def _pack(spool: _Spool, tok: Tokenizer, tmp: str, val_fraction: float, shard_tokens: int,
          progress: bool | None) -> tuple[np.dtype, int, dict]:
    """Tokenize the spool into one stream, split it by whole documents and write the shards and the tokenizer
    into `tmp`; returns the token dtype, the token count and the splits' manifest entries."""
    dtype = token_dtype(tok.vocab_size)
    stream_path = os.path.join(tmp, "stream.bin")
    with _bar(progress, spool.chars, "tokenizing") as bar:
        lengths = tokenize(spool.texts(), tok, stream_path, dtype, on_text=bar.update)
    stream = np.memmap(stream_path, dtype=dtype, mode="r")
    total = len(stream)
    splits = plan_split(lengths, np.asarray(spool.keys, dtype=np.uint64), val_fraction)
    shards = write_shards(stream, splits, tmp, shard_tokens)
    del stream  # release the map before the folder goes
    tok.save(tmp)
    for split in ("train", "val"):
        del splits[split]["ranges"]  # positions in the stream, which is not kept
        splits[split]["tokens"] = sum(s["tokens"] for s in shards[split])
        splits[split]["shards"] = shards[split]
    return dtype, total, splits


def _existing(out: str) -> DatasetInfo | None:
    """The dataset already in `out`, or None when there is none or it cannot be read."""
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        return None
    try:
        return DatasetInfo.load(out)
    except Dsv3Error:
        return None


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def _describe(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files"  # "0 files": only the output folder


def _is_dataset(folder: str) -> bool:
    """A folder `prepare` wrote (its manifest is there), which a new preparation may replace."""
    return os.path.isfile(os.path.join(folder, MANIFEST))


class _Audit:
    """Passes documents through `dsv3.audit` as `mode` says and counts what it did."""

    def __init__(self, mode: str):
        self.mode = mode
        self.counts: dict[str, Any] = {}
        if mode != "off":
            from dsv3.audit import Auditor  # imported only when auditing: its rules take a moment to compile

            self.auditor = Auditor()

    def apply(self, docs: Iterable[Document]) -> Iterator[Document]:
        if self.mode == "off":
            yield from docs
            return
        seen = flagged = changed = dropped = 0
        example = None
        for doc in docs:
            seen += 1
            if self.mode == "refuse":
                findings = self.auditor.find(doc.text)
                if findings:
                    flagged += 1
                    example = example or f"{doc.name}: {findings[0].reason}, {findings[0].text!r}"
                yield doc
                continue
            text, _ = self.auditor.fix(doc.text)
            if not text:  # None: the auditor dropped it
                dropped += 1
                continue
            changed += int(text != doc.text)
            yield Document(doc.name, text)
        if flagged:
            raise Dsv3Error(
                f"the audit flagged {flagged} of {seen} documents (for example {example}); run `dsv3 audit` on "
                f"the same sources for details, or prepare with --audit clean"
            )
        self.counts = {"mode": self.mode, "documents": seen, "flagged": flagged, "changed": changed,
                       "dropped": dropped}


class _Spool:
    """The documents, read (and audited) once, kept in a temporary file for the tokenizer's two passes.

    Each record is an 8-byte little-endian length and the UTF-8 text. Document names are kept only as
    64-bit hashes, which is all the validation split needs; `root` is cut off the front of a name first,
    so that the split does not depend on where the corpus lives.
    """

    def __init__(self, path: str, root: str | None):
        self.path, self.root = path, root
        self.documents = self.bytes = self.chars = 0
        self.keys: list[int] = []
        self.sha256 = hashlib.sha256()

    def fill(self, docs: Iterable[Document], progress: bool | None) -> None:
        with open(self.path, "wb") as f, _bar(progress, None, "reading", unit="doc") as bar:
            for doc in docs:
                data = doc.text.encode("utf-8")
                header = struct.pack("<Q", len(data))
                f.write(header)
                f.write(data)
                self.sha256.update(header + data)
                self.keys.append(name_key(os.path.relpath(doc.name, self.root) if self.root else doc.name))
                self.documents += 1
                self.bytes += len(data)
                self.chars += len(doc.text)
                bar.update(1)

    def texts(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            while header := f.read(8):
                (n,) = struct.unpack("<Q", header)
                yield f.read(n).decode("utf-8")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _bar(progress: bool | None, total: int | None, desc: str, unit: str = "char") -> Any:
    """A tqdm progress bar on stderr (by default only on a terminal), or one that shows nothing."""
    if progress is False:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None if progress is None else False,
                leave=False, dynamic_ncols=True)
