"""Precision and recall of the audit per language on a labelled JSONL set.

Each line of the set is a record the audit reads (a `text` field or a chat `messages` list) plus
`lang` and `label` (1: the speaker claims another model's identity or maker; 0: it does not, such as
a mention, a quotation, a user's question, reported speech). A record counts as flagged when any of
its judged texts has a finding, exactly as `dsv3 audit` decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv3.audit.auditor import Auditor
from dsv3.audit.sources import Fields, read_jsonl
from dsv3.errors import Dsv3Error


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / max(1, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return self.tp / max(1, self.tp + self.fn)


def evaluate(path: str | Path, auditor: Auditor) -> tuple[dict[str, Score], list[dict]]:
    """Scores per language, and the records the audit got wrong."""
    scores: dict[str, Score] = {}
    wrong = []
    for rec in read_jsonl(Path(path), Fields()):
        if rec.obj is None:
            continue
        if rec.error:
            raise Dsv3Error(f"{path}, line {rec.line}: {rec.error}")
        flagged = any(auditor.find(j.text, assistant=j.assistant) for j in rec.texts)
        label = bool(rec.obj["label"])
        s = scores.setdefault(rec.obj["lang"], Score())
        if flagged and label:
            s.tp += 1
        elif flagged:
            s.fp += 1
        elif label:
            s.fn += 1
        else:
            s.tn += 1
        if flagged != label:
            wrong.append(rec.obj)
    return scores, wrong


def table(scores: dict[str, Score]) -> str:
    """A Markdown table: language, positives, negatives, precision, recall."""
    rows = ["| language | positives | negatives | precision | recall |", "|---|---:|---:|---:|---:|"]
    total = Score()
    for lang, s in sorted(scores.items()):
        rows.append(f"| {lang} | {s.tp + s.fn} | {s.fp + s.tn} | {s.precision:.3f} | {s.recall:.3f} |")
        total.tp, total.fp, total.fn, total.tn = total.tp + s.tp, total.fp + s.fp, total.fn + s.fn, total.tn + s.tn
    rows.append(f"| all | {total.tp + total.fn} | {total.fp + total.tn} | {total.precision:.3f} | {total.recall:.3f} |")
    return "\n".join(rows)
