"""What an audit found, as a readable summary or one JSON document."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Report:
    files: int = 0
    records: int = 0  # JSONL lines and plain-text paragraphs
    texts: int = 0  # texts judged: text fields, assistant turns, paragraphs
    bytes: int = 0
    seconds: float = 0.0
    flagged_records: int = 0
    flagged: list[dict] = field(default_factory=list)  # one entry per finding
    by_language: Counter = field(default_factory=Counter)  # findings per language
    by_pattern: Counter = field(default_factory=Counter)
    reasons: dict[str, str] = field(default_factory=dict)  # pattern -> reason
    bad_lines: list[dict] = field(default_factory=list)
    fix: dict | None = None  # output, log, counts of what the fix did

    def as_dict(self) -> dict:
        return {
            "files": self.files, "records": self.records, "texts": self.texts, "bytes": self.bytes,
            "seconds": round(self.seconds, 3), "flagged_records": self.flagged_records,
            "findings": len(self.flagged), "by_language": dict(self.by_language.most_common()),
            "by_pattern": dict(self.by_pattern.most_common()), "bad_lines": self.bad_lines,
            "fix": self.fix, "flagged": self.flagged,
        }

    def summary(self, examples: int = 3) -> str:
        """A few lines for people: totals, findings by language and pattern with examples, what a fix did."""
        pct = 100 * self.flagged_records / max(1, self.records)
        speed = self.bytes / 1e6 / max(self.seconds, 1e-9)
        lines = [
            f"audited {self.files} file(s), {self.records:,} records, {self.texts:,} texts "
            f"({self.bytes / 1e6:,.1f} MB in {self.seconds:.1f} s, {speed:,.1f} MB/s)",
            f"flagged: {self.flagged_records:,} records ({pct:.2f}%), {len(self.flagged):,} findings",
        ]
        if self.by_language:
            lines.append("  by language: " + ", ".join(f"{k} {v:,}" for k, v in self.by_language.most_common()))
        if self.by_pattern:
            lines.append("  by pattern:")
            shown: Counter = Counter()
            samples: dict[str, list[dict]] = {}
            for f in self.flagged:
                if shown[f["pattern"]] < examples:
                    shown[f["pattern"]] += 1
                    samples.setdefault(f["pattern"], []).append(f)
            width = max(len(p) for p in self.by_pattern)
            for pattern, n in self.by_pattern.most_common():
                lines.append(f"    {pattern:<{width}} {n:>6,}  {self.reasons[pattern]}")
                for f in samples.get(pattern, []):
                    where = f"{f['file']}:{f['line']}" + (f" {f['field']}" if f["field"] else "")
                    lines.append(f"      {where}: {_clip(f['text'])!r}")
        for b in self.bad_lines[:examples]:
            lines.append(f"bad line {b['file']}:{b['line']}: {b['problem']}")
        if len(self.bad_lines) > examples:
            lines.append(f"... {len(self.bad_lines) - examples} more bad lines")
        if self.fix is not None:
            done = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.fix.items() if k not in ("output", "log"))
            lines.append(f"fixed copy: {self.fix['output']} ({done or 'nothing to change'}); log: {self.fix['log']}")
        return "\n".join(lines)


def _clip(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."
