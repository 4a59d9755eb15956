"""Read corpora as a stream of records: JSONL lines (a text field or a chat record) and paragraphs of
plain text, each with its exact bytes so that a fixed copy can leave every other byte unchanged.

Which files the paths name and which of them are JSONL follows `dsv3.corpus`, the rules `dsv3 prepare`
and `dsv3 train --data` read by, so the audit judges the documents training would see. Nothing here reads
a whole file: JSONL is read line by line and plain text paragraph by paragraph (a paragraph longer than
`MAX_PARAGRAPH` bytes is cut at a line break).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsv3 import corpus
from dsv3.errors import Dsv3Error

MAX_PARAGRAPH = 1 << 20


@dataclass(frozen=True)
class Fields:
    """Where the text is in a JSONL record. A record with `messages` is a chat: a list of turns with
    `role` and `content`, of which only turns whose role is `assistant` are judged."""

    text: str = "text"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    assistant: str = "assistant"


class BadRecord(ValueError):
    """A line that is not valid JSON, not an object, or lacks the configured fields."""


@dataclass(frozen=True)
class Judged:
    """One text of a record that is audited."""

    path: tuple  # where it sits in the JSON object: ("messages", 3, "content"); () for plain text
    text: str
    assistant: bool  # an assistant's turn in a chat record

    @property
    def field(self) -> str | None:
        """'messages[3].content', 'text', or None for plain text."""
        if not self.path:
            return None
        out = str(self.path[0])
        for p in self.path[1:]:
            out += f"[{p}]" if isinstance(p, int) else f".{p}"
        return out


@dataclass
class Record:
    index: int  # 0-based, among the records of its file
    line: int  # 1-based line of its first byte
    raw: bytes  # exact bytes, line ending included
    obj: dict | None = None  # the parsed JSONL object
    texts: list[Judged] = field(default_factory=list)
    error: str | None = None  # why the record could not be read (it is then kept as it is)


def judged_texts(obj: object, fields: Fields) -> list[Judged]:
    """The texts of one JSONL record to audit, or BadRecord naming what is missing."""
    if not isinstance(obj, dict):
        raise BadRecord(f"the line is a JSON {type(obj).__name__}, not an object")
    if fields.messages in obj:
        turns = obj[fields.messages]
        if not isinstance(turns, list):
            raise BadRecord(f"field {fields.messages!r} is not a list of turns")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or fields.role not in turn:
                raise BadRecord(f"{fields.messages}[{i}] has no {fields.role!r} field (pass --role-field)")
            if turn[fields.role] != fields.assistant:
                continue
            content = turn.get(fields.content)
            if isinstance(content, str):
                out.append(Judged((fields.messages, i, fields.content), content, True))
            elif isinstance(content, list):  # a list of parts: [{"type": "text", "text": ...}, ...]
                for j, part in enumerate(content):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        out.append(Judged((fields.messages, i, fields.content, j, "text"), part["text"], True))
            elif content is not None:
                raise BadRecord(f"{fields.messages}[{i}] has no text in {fields.content!r} (pass --content-field)")
        return out
    if fields.text in obj:
        if not isinstance(obj[fields.text], str):
            raise BadRecord(f"field {fields.text!r} is not a string")
        return [Judged((fields.text,), obj[fields.text], False)]
    have = ", ".join(repr(k) for k in list(obj)[:8]) or "no fields"
    raise BadRecord(f"no field {fields.text!r} or {fields.messages!r} (the record has {have}); "
                    "name the right one with --text-field or --messages-field")


def read_jsonl(path: Path, fields: Fields) -> Iterator[Record]:
    for lineno, raw in corpus.lines(str(path)):
        rec = Record(lineno - 1, lineno, raw)
        try:
            rec.obj = corpus.parse_line(raw)
            if rec.obj is not None:
                rec.texts = judged_texts(rec.obj, fields)
        except (corpus.BadLine, BadRecord) as e:
            rec.error = str(e)
        yield rec


def read_text(path: Path) -> Iterator[Record]:
    """Paragraphs (runs of non-blank lines) as records; the blank lines between them pass as records
    with no texts, so that joining every record's bytes gives the file back."""
    index = 0
    para: list[bytes] = []
    size, first = 0, 1
    for lineno, raw in corpus.lines(str(path)):
        blank = not raw.strip()
        if para and (blank or size >= MAX_PARAGRAPH):
            yield _paragraph(index, first, b"".join(para))
            index += 1
            para, size = [], 0
        if blank:
            yield Record(index, lineno, raw)
            index += 1
            continue
        if not para:
            first = lineno
        para.append(raw)
        size += len(raw)
    if para:
        yield _paragraph(index, first, b"".join(para))


def _paragraph(index: int, line: int, raw: bytes) -> Record:
    try:
        return Record(index, line, raw, texts=[Judged((), raw.decode("utf-8"), False)])
    except UnicodeDecodeError as e:
        bad_line = line + raw[:e.start].count(b"\n")
        return Record(index, bad_line, raw, error="the text is not valid UTF-8")


@dataclass(frozen=True)
class Source:
    path: Path
    name: str  # its path relative to the output folder of a fix
    format: str  # "jsonl" or "text"


def collect(paths: list[str], fmt: str = "auto") -> list[Source]:
    """Every file the paths name (`dsv3.corpus.resolve`), each read as JSONL or text by its suffix, or all
    as `fmt` when it is "jsonl" or "text"."""
    sources: list[Source] = []
    for arg in paths:
        prefix = Path(arg).name + "/" if len(paths) > 1 and Path(arg).is_dir() else ""
        for f in corpus.resolve([arg]):
            kind = fmt if fmt != "auto" else "jsonl" if corpus.is_jsonl(f.path) else "text"
            sources.append(Source(Path(f.path), prefix + f.name, kind))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise Dsv3Error(f"two inputs would both be written as {dup!r}; audit them separately")
    return sources
