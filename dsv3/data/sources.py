"""Documents for pre-training: a text file is one document, a JSONL record one document (its text field).

Which files a list of sources names, and how their bytes are read, is `dsv3.corpus`'s, shared with
`dsv3 audit`. Every problem with the input is a `Dsv3Error` naming the file (and line) at fault.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dsv3 import corpus
from dsv3.errors import Dsv3Error


@dataclass(frozen=True)
class Document:
    """One unit of text; `name` says where it came from (`path`, `path:line` or `pydoc:topic`)."""

    name: str
    text: str


def resolve(specs: Sequence[str]) -> list[str]:
    """The files named by `specs` (see `dsv3.corpus.resolve`), as paths."""
    return [f.path for f in corpus.resolve(specs)]


def stat_key(files: Sequence[str]) -> list:
    """What identifies the files' contents without reading them: absolute path, size, mtime."""
    key = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise corpus.cannot_read(f, e) from None
        key.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return key


def read(files: Sequence[str], text_field: str = "text") -> Iterator[Document]:
    """Stream the documents of `files`: one per text file, one per JSONL record. Empty ones are skipped."""
    for path in files:
        if corpus.is_jsonl(path):
            docs = _read_jsonl(path, text_field)
        else:
            docs = [Document(path, corpus.read_text(path))]
        yield from (d for d in docs if d.text)


def _read_jsonl(path: str, text_field: str) -> Iterator[Document]:
    for n, raw in corpus.lines(path):
        try:
            record = corpus.parse_line(raw)
        except corpus.BadLine as e:
            raise Dsv3Error(f"line {n} of {path}: {e}; fix the line or leave the file out") from None
        if record is None:
            continue
        if not isinstance(record, dict):
            raise Dsv3Error(f"line {n} of {path} is a JSON {corpus.json_type(record)}, not an object with a "
                            f"{text_field!r} field")
        if text_field not in record:
            keys = ", ".join(map(repr, list(record)[:8])) or "none"
            raise Dsv3Error(f"line {n} of {path} has no {text_field!r} field (its fields: {keys}); "
                            f"name the right one with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise Dsv3Error(f"field {text_field!r} on line {n} of {path} is a JSON {corpus.json_type(text)}, "
                            "not a string")
        yield Document(f"{path}:{n}", text)
