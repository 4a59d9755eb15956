"""Corpora on disk: which files a list of sources names, and how their bytes are read. One set of rules
for `dsv3 prepare` / `dsv3 train --data` and for `dsv3 audit`, so that both judge the same documents.

- A source is a file, a folder (read recursively in sorted order; hidden entries and `__pycache__`
  skipped) or a glob (`docs/**/*.md`; `**` reaches into subfolders).
- A file whose name ends in `.jsonl` or `.ndjson` holds one JSON value per line; any other file is
  UTF-8 text (a leading byte-order mark is not part of the text).
- Every problem with the input is a `Dsv3Error` naming the file (and line) at fault.

Nothing here holds a whole JSONL file in memory: lines are yielded one at a time with their exact bytes,
so a cleaned copy can leave every other byte unchanged.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dsv3.errors import Dsv3Error

JSONL_SUFFIXES = (".jsonl", ".ndjson")
GLOB_CHARS = "*?["
SKIPPED_DIRS = ("__pycache__",)


@dataclass(frozen=True)
class CorpusFile:
    path: str  # normalised, as the source named it
    name: str  # relative to the folder (or the glob's fixed part) it was found in; the file name otherwise


def is_jsonl(path: str) -> bool:
    return path.lower().endswith(JSONL_SUFFIXES)


def resolve(specs: Sequence[str]) -> list[CorpusFile]:
    """The files named by `specs`, in argument order, each folder and glob sorted, without repeats."""
    found: dict[str, CorpusFile] = {}
    for spec in specs:
        if os.path.isdir(spec):
            files = [_under(spec, f) for f in _walk(spec)]
            if not files:
                raise Dsv3Error(f"folder {spec} holds no files to read")
        elif os.path.exists(spec):
            files = [CorpusFile(os.path.normpath(spec), os.path.basename(spec))]
        elif any(c in spec for c in GLOB_CHARS):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise Dsv3Error(f"glob {spec!r} matches no files; check the pattern (use ** for subfolders)")
            base = _glob_base(spec)
            files = [_under(base, f) for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
        else:
            raise Dsv3Error(f"data source {spec} does not exist; give a text file, a folder, a glob or a .jsonl file")
        for f in files:
            found.setdefault(f.path, f)
    return list(found.values())


def _walk(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def _under(root: str, path: str) -> CorpusFile:
    return CorpusFile(os.path.normpath(path), os.path.relpath(path, root).replace(os.sep, "/"))


def _glob_base(spec: str) -> str:
    """The folder part of a glob before its first wildcard: what matched names are relative to."""
    parts = spec.split(os.sep)
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
    return os.sep.join(parts[:fixed]) or "."


def cannot_read(path: str, e: OSError) -> Dsv3Error:
    return Dsv3Error(f"cannot read {path}: {(e.strerror or str(e)).lower()}; fix its permissions or leave it out")


def read_text(path: str) -> str:
    """A whole text file, UTF-8 (without a leading byte-order mark)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise cannot_read(path, e) from None
    return decode(data, path)


def decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Dsv3Error(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "convert it to UTF-8 or leave it out") from None


def lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, exact bytes with the line ending) of every line of a file, streamed."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; open errors are reported here
    except OSError as e:
        raise cannot_read(path, e) from None
    with f:
        yield from enumerate(f, start=1)


def records(path: str) -> Iterator[tuple[int, object]]:
    """(1-based line number, JSON value) of every non-blank line of a JSONL file; Dsv3Error "PATH:LINE: ..." at
    the first line that is not UTF-8 JSON."""
    for n, raw in lines(path):
        try:
            value = parse_line(raw)
        except BadLine as e:
            raise Dsv3Error(f"{path}:{n}: {e}") from None
        if value is not None:
            yield n, value


class BadLine(ValueError):
    """A JSONL line that is not valid UTF-8 or not valid JSON; the message says which and where."""


def parse_line(raw: bytes) -> object:
    """The JSON value of one JSONL line (None for a blank line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("the line is not valid UTF-8") from None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadLine("invalid JSON (nested too deeply)") from None


def json_type(value: object) -> str:
    """JSON's name for a parsed value's type: object, array, string, number, boolean, null."""
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null")
