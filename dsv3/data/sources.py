"""Where documents come from: plain-text files, folders, globs and JSONL, read as a stream.

A source argument is a file, a folder (read recursively, hidden entries and `__pycache__` skipped), or
a glob (`docs/**/*.md`). A `.jsonl` file holds one document per line in a text field; any other file
is one document. Every problem with the input is a `Dsv3Error` naming the file (and line) at fault.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dsv3.errors import Dsv3Error

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Document:
    """One unit of text; `name` says where it came from (`path`, `path:line` or `pydoc:topic`)."""

    name: str
    text: str


def resolve(specs: Sequence[str]) -> list[str]:
    """The files named by `specs`, in argument order, each folder and glob sorted, without repeats."""
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = _walk(spec)
            if not found:
                raise Dsv3Error(f"folder {spec} holds no files to read")
        elif os.path.exists(spec):
            found = [spec]
        elif any(c in spec for c in GLOB_CHARS):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise Dsv3Error(f"glob {spec!r} matches no files; check the pattern (use ** for subfolders)")
            found = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
        else:
            raise Dsv3Error(f"data source {spec} does not exist; give a text file, a folder, a glob or a .jsonl file")
        files += found
    return list(dict.fromkeys(os.path.normpath(f) for f in files))


def _walk(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def stat_key(files: Sequence[str]) -> list:
    """What identifies the files' contents without reading them: absolute path, size, mtime."""
    key = []
    for f in files:
        st = _stat(f)
        key.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return key


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise _cannot_read(path, e) from None


def read(files: Sequence[str], text_field: str = "text") -> Iterator[Document]:
    """Stream the documents of `files`: one per text file, one per JSONL record. Empty ones are skipped."""
    for path in files:
        docs = _read_jsonl(path, text_field) if path.endswith(".jsonl") else [Document(path, _read_text(path))]
        yield from (d for d in docs if d.text)


def _cannot_read(path: str, e: OSError) -> Dsv3Error:
    return Dsv3Error(f"cannot read {path}: {(e.strerror or str(e)).lower()}; fix its permissions or leave it out")


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _cannot_read(path, e) from None
    return _decode(data, path)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError as e:
        raise Dsv3Error(
            f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"convert it to UTF-8 or leave it out"
        ) from None


def _read_jsonl(path: str, text_field: str) -> Iterator[Document]:
    try:
        lines = open(path, "rb")  # noqa: SIM115 - a `with` below closes it; open errors are reported here
    except OSError as e:
        raise _cannot_read(path, e) from None
    with lines:
        for n, raw in enumerate(lines, start=1):
            line = _decode(raw, f"line {n} of {path}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Dsv3Error(f"line {n} of {path} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise Dsv3Error(f"line {n} of {path} is a JSON {_json_type(record)}, not an object with a "
                                f"{text_field!r} field")
            if text_field not in record:
                keys = ", ".join(map(repr, list(record)[:8])) or "none"
                raise Dsv3Error(f"line {n} of {path} has no {text_field!r} field (its fields: {keys}); "
                                f"name the right one with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise Dsv3Error(f"field {text_field!r} on line {n} of {path} is a JSON {_json_type(text)}, "
                                f"not a string")
            yield Document(f"{path}:{n}", text)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null")
