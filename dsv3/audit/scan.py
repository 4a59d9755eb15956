"""Audit files and folders, and optionally write a cleaned copy.

`scan()` streams every record of every file through an `Auditor` and returns a `Report`. With an
output path it also writes the cleaned copy, one file at a time and atomically: records without a
finding (and lines that could not be read) are written byte for byte; a flagged text is rewritten to
the configured identity where its sentence allows it and dropped otherwise. A dropped assistant turn
takes the user turns it answered with it; a record left without assistant turns, or a dropped text
field, drops the whole record. Every change gets a line in the log.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from dsv3.audit.auditor import Auditor
from dsv3.audit.report import Report
from dsv3.audit.sources import Fields, Record, Source, collect, read_jsonl, read_text
from dsv3.errors import Dsv3Error
from dsv3.utils import atomic_write, atomic_write_text


def scan(paths: list[str], auditor: Auditor, fields: Fields | None = None, fmt: str = "auto",
         out: str | None = None, progress: bool = False) -> Report:
    """Audit `paths`; with `out`, write the cleaned copy there (a file for one input file, else a folder).

    Without `out`, the first unreadable record raises `Dsv3Error` naming its file and line; with `out`,
    such records are copied unchanged and listed in `Report.bad_lines`.
    """
    fields = fields or Fields()
    sources = collect(paths, fmt)
    report = Report()
    start = time.perf_counter()
    meter = _Progress(sum(s.path.stat().st_size for s in sources), progress)
    if out is None:
        for src in sources:
            for rec in _records(src, fields):
                _audit(src, rec, auditor, report, strict=True)
                meter.advance(len(rec.raw), report)
            report.files += 1
    else:
        targets = _targets(sources, paths, Path(out))
        log: list[str] = []
        fix = Counter()
        for src, target in zip(sources, targets):
            atomic_write(target, lambda tmp, src=src: _fix_file(src, tmp, auditor, fields, report, log, fix, meter))
            report.files += 1
        log_path = (str(out).rstrip("/\\") or str(out)) + ".log"
        atomic_write_text(log_path, "".join(line + "\n" for line in log))
        report.fix = {"output": str(out), "log": log_path, **{k: fix[k] for k in sorted(fix)}}
    meter.done()
    report.seconds = time.perf_counter() - start
    return report


def _records(src: Source, fields: Fields):
    return read_jsonl(src.path, fields) if src.format == "jsonl" else read_text(src.path)


def _audit(src: Source, rec: Record, auditor: Auditor, report: Report, strict: bool) -> list:
    """Count one record into the report; return [(judged text, findings)] for the flagged texts."""
    report.bytes += len(rec.raw)
    if rec.error:
        if strict:
            raise Dsv3Error(f"{src.path}, line {rec.line}: {rec.error}; fix the line or pass --fix OUT to keep "
                            "bad lines unchanged and report them")
        report.bad_lines.append({"file": str(src.path), "line": rec.line, "problem": rec.error})
        report.records += 1
        return []
    if not rec.texts and rec.obj is None:
        return []  # a blank line
    report.records += 1
    flagged = []
    for j in rec.texts:
        report.texts += 1
        findings = auditor.find(j.text, assistant=j.assistant)
        if not findings:
            continue
        flagged.append((j, findings))
        for f in findings:
            report.by_language[f.language] += 1
            report.by_pattern[f.pattern] += 1
            report.reasons[f.pattern] = f.reason
            report.flagged.append({
                "file": str(src.path), "line": rec.line + j.text.count("\n", 0, f.start) if not j.path else rec.line,
                "record": rec.index, "field": j.field, "start": f.start, "end": f.end, "text": f.text,
                "language": f.language, "pattern": f.pattern, "reason": f.reason,
            })
    if flagged:
        report.flagged_records += 1
    return flagged


def _targets(sources: list[Source], paths: list[str], out: Path) -> list[Path]:
    """Where each input goes: `out` itself for a single input file, else `out/<name>`."""
    single = len(paths) == 1 and Path(paths[0]).is_file()
    if single and out.is_dir():
        out = out / sources[0].name
    if not single and out.exists() and not out.is_dir():
        raise Dsv3Error(f"--fix {out} is a file, but a folder or several inputs need a folder; name a folder")
    targets = [out] if single else [out / s.name for s in sources]
    for src, target in zip(sources, targets):
        if target.exists() and os.path.samefile(target, src.path):
            raise Dsv3Error(f"--fix {out} would overwrite the input {src.path}; write the cleaned copy elsewhere")
    for p in paths:
        if Path(p).is_dir() and Path(os.path.abspath(out)).is_relative_to(os.path.abspath(p)):
            raise Dsv3Error(f"--fix {out} is inside the input folder {p}; write the cleaned copy elsewhere")
    return targets


def _fix_file(src: Source, tmp: str, auditor: Auditor, fields: Fields, report: Report, log: list[str],
              fix: Counter, meter: _Progress) -> None:
    with open(tmp, "wb") as f:
        for rec in _records(src, fields):
            flagged = _audit(src, rec, auditor, report, strict=False)
            meter.advance(len(rec.raw), report)
            if rec.error:
                fix["bad_lines_kept"] += 1
                log.append(f"{src.path}:{rec.line}: kept unchanged, {rec.error}")
            f.write(_fixed(src, rec, flagged, auditor, fields, log, fix) if flagged else rec.raw)


def _fixed(src: Source, rec: Record, flagged: list, auditor: Auditor, fields: Fields, log: list[str],
           fix: Counter) -> bytes:
    """The bytes a flagged record becomes (b"" when it is dropped)."""
    where = f"{src.path}:{rec.line}"
    changes: dict[tuple, str] = {}
    dropped_turns: set[int] = set()
    for j, _ in flagged:
        new, lines = auditor.fix(j.text, assistant=j.assistant)
        log += [f"{where} {j.field or 'paragraph'}: {line}" for line in lines]
        if new is not None:
            changes[j.path] = new
            fix["texts_rewritten"] += 1
        elif j.assistant:
            dropped_turns.add(j.path[1])
        else:
            fix["records_dropped"] += 1
            log.append(f"{where}: dropped the {'paragraph' if rec.obj is None else 'record'}")
            return b""
    if rec.obj is None:  # a plain-text paragraph: one text, rewritten
        return changes[()].encode("utf-8")
    obj = rec.obj
    for path, text in changes.items():
        _set(obj, path, text)
    if dropped_turns:
        turns = obj[fields.messages]
        keep = _keep_turns(turns, dropped_turns, fields)
        fix["turns_dropped"] += len(turns) - len(keep)
        if not any(t.get(fields.role) == fields.assistant for t in keep):
            fix["records_dropped"] += 1
            log.append(f"{where}: dropped the record (no assistant turn left)")
            return b""
        log.append(f"{where}: dropped {len(turns) - len(keep)} turns (the flagged answers and their questions)")
        obj[fields.messages] = keep
        return _dump(obj, rec.raw)
    return _splice(rec.raw, obj, changes) or _dump(obj, rec.raw)


def _keep_turns(turns: list[dict], dropped: set[int], fields: Fields) -> list[dict]:
    """Drop each flagged assistant turn with the non-system turns since the previous assistant turn."""
    remove = set()
    for i in dropped:
        remove.add(i)
        k = i - 1
        while k >= 0 and turns[k].get(fields.role) not in (fields.assistant, "system"):
            remove.add(k)
            k -= 1
    return [t for i, t in enumerate(turns) if i not in remove]


def _set(obj, path: tuple, value: str) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_COLON = re.compile(rb"\s*:")  # after a string token: the token was a key


def _string_values(obj, path=()):
    """(path, value) of every string value (not key) of a JSON value, in document order."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _string_values(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _string_values(v, path + (i,))


def _splice(raw: bytes, obj: dict, changes: dict[tuple, str]) -> bytes | None:
    """Replace only the changed string tokens of the original line, so every other byte stays as it was.
    None when the line cannot be matched token for token (duplicate keys), for `_dump` to handle."""
    tokens = [m for m in _JSON_STRING.finditer(raw) if not _COLON.match(raw, m.end())]
    values = list(_string_values(obj))
    if len(tokens) != len(values):
        return None
    out, last = [], 0
    for (path, value), m in zip(values, tokens):
        if path not in changes:
            continue
        if json.loads(m.group()) != value:
            return None
        escaped = m.group().isascii() and not value.isascii()  # the line escapes non-ASCII as \uXXXX
        out += [raw[last:m.start()], json.dumps(changes[path], ensure_ascii=escaped).encode("utf-8")]
        last = m.end()
    out.append(raw[last:])
    return b"".join(out)


def _dump(obj: dict, raw: bytes) -> bytes:
    """Re-serialise a record in the style of its original line (separators, escaping, line ending)."""
    compact = b'": ' not in raw
    text = json.dumps(obj, ensure_ascii=raw.isascii(), separators=(",", ":") if compact else (", ", ": "))
    return text.encode("utf-8") + (b"\r\n" if raw.endswith(b"\r\n") else b"\n" if raw.endswith(b"\n") else b"")


class _Progress:
    """A one-line progress meter on stderr, for runs longer than a couple of seconds."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.seen, self.start, self.last = 0, time.perf_counter(), 0.0

    def advance(self, n: int, report: Report) -> None:
        self.seen += n
        now = time.perf_counter()
        if self.enabled and now - self.last > 0.5 and now - self.start > 2:
            self.last = now
            mb = self.seen / 1e6
            print(f"\raudit: {mb:,.0f} of {self.total / 1e6:,.0f} MB ({mb / (now - self.start):.0f} MB/s), "
                  f"{report.records:,} records, {report.flagged_records:,} flagged", end="", file=sys.stderr)

    def done(self) -> None:
        if self.enabled and self.last:
            print(file=sys.stderr)
