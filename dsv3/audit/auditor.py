"""Find and repair text in which the speaker claims to be another model or to be made by another lab.

A claim is a construction of some language (`lang/*.py`) with a name of another model or organisation
in it, that survives these checks:

1. an ambiguous name (Claude, Gemini, Apple) needs an AI cue in its sentence, an unambiguous name
   or an ambiguous maker beside it, a version number, or an assistant turn;
2. no cue before it says someone else is speaking or it is not meant (negation, "imagine", "it
   replied:", "people think"), and none after it makes it a question;
3. it is not inside quotation marks or a code span: quoted dialogue is a mention, not a claim.

Only sentences that contain a name are examined, and a text with no name in it costs one
set intersection (see `rules.NameTable`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsv3.audit.rules import Claim, Language, NameHit, Rules, load_rules

# Where a sentence ends: . ! ? followed by a space, or any CJK/Devanagari stop, semicolon or newline.
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|[。！？；;\n।॥]")
_REACH = 400  # characters looked at on each side of a name for the sentence around it
_CUE_REACH = 120  # characters before a claim in which a cancelling cue is looked for


@dataclass(frozen=True)
class Slot:
    """A name inside a claim that a fix replaces: the model with the identity, the org with the creator."""

    start: int
    end: int
    kind: str  # "model" or "org"
    text: str


@dataclass(frozen=True)
class Finding:
    """One claim in a text: where it is, what it says, and which rule found it."""

    start: int
    end: int
    text: str
    language: str  # "en", "zh", "hi": the language of the construction
    reason: str  # "speaker says it is another model"
    pattern: str  # "en/i-am-model"
    slots: tuple[Slot, ...]
    rewritable: bool  # the construction allows a fix that swaps in the configured identity and creator


def _normal(name: str) -> str:
    return re.sub(r"[\W_]+", "", name).lower()


IDENTITY, CREATOR = "dsv3", "the dsv3 authors"  # the assistant's own name and maker, unless told otherwise


class Auditor:
    """Finds and fixes claims of another model's identity in text.

    The API other code relies on (keep it stable):

        from dsv3.audit import Auditor
        auditor = Auditor(identity="dsv3", creator="the dsv3 authors")   # both optional
        findings = auditor.find(text)          # list[Finding]: start, end, text, language, reason, pattern
        fixed, log = auditor.fix(text)         # fixed is None when the whole text must be dropped

    `assistant=True` (keyword) says the text is an assistant's turn in a chat, where even an ambiguous
    name such as "Claude" or "Gemini" is taken as a claim without further cues. Names equal to
    `identity` or `creator` are never flagged. `languages` picks language codes (default: all).
    """

    def __init__(self, identity: str = IDENTITY, creator: str = CREATOR,
                 languages: list[str] | tuple[str, ...] | None = None):
        self.identity = identity
        self.creator = creator
        self.rules: Rules = load_rules(tuple(languages) if languages is not None else None)
        self._ours = {_normal(identity), _normal(creator)} - {""}

    # -- finding -------------------------------------------------------------------------------------

    def find(self, text: str, *, assistant: bool = False) -> list[Finding]:
        hits = self.rules.names.find(text)
        if not hits:
            return []
        matches: list[tuple[re.Match, Claim, tuple[Slot, ...]]] = []
        for start, end in _windows(text, hits):
            cued = assistant or self._cued(text, start, end, [h for h in hits if start <= h.start < end])
            for lang in self.rules.languages:
                if not lang.script.search(text, start, end):
                    continue
                for claim in lang.claims:
                    if claim.assistant_only and not assistant:
                        continue
                    for m in claim.regex.finditer(text, start, end):
                        slots = self._slots(m)
                        if not slots:
                            continue
                        if not cued and any(self.rules.names.is_ambiguous(s.text) for s in slots):
                            continue
                        if _cancelled(lang, text, start, end, m) or self._quoted(text, m.start()):
                            continue
                        matches.append((m, claim, slots))
        return _merge(text, matches)

    def _cued(self, text: str, start: int, end: int, near: list[NameHit]) -> bool:
        """Whether a sentence is clearly about AI: an unambiguous name, an AI cue, or an ambiguous model
        beside an ambiguous maker ("trained by Google ... known as Gemini")."""
        if any(not h.ambiguous for h in near) or self.rules.ai_cue.search(text, start, end):
            return True
        models = {text[h.start:h.end].lower() for h in near if "model" in h.kinds}
        orgs = {text[h.start:h.end].lower() for h in near if "org" in h.kinds}
        return any(m != o for m in models for o in orgs)

    def _slots(self, m: re.Match) -> tuple[Slot, ...]:
        slots = []
        for group, value in m.groupdict().items():
            if value is None or _normal(value) in self._ours:
                continue
            kind = "model" if group.startswith("model") else "org"
            slots.append(Slot(m.start(group), m.end(group), kind, value))
        return tuple(slots)

    def _quoted(self, text: str, pos: int) -> bool:
        """Whether `pos` is inside quotation marks (in its paragraph) or inside a Markdown code span."""
        para = text.rfind("\n\n", max(0, pos - 4000), pos)
        seg = text[para + 1 if para >= 0 else max(0, pos - 4000):pos]
        for open_, close in self.rules.quotes:
            if open_ == close:
                if seg.count(open_) % 2:
                    return True
                continue
            last_open = seg.rfind(open_)
            if last_open < 0:
                continue
            # a closing mark directly followed by a letter is an apostrophe ("I’m"), not a close
            closes = [m.start() for m in re.finditer(re.escape(close) + r"(?![A-Za-z])", seg[last_open:])]
            if not closes:
                return True
        return text.count("```", max(0, pos - 20000), pos) % 2 == 1

    # -- fixing --------------------------------------------------------------------------------------

    def fix(self, text: str, *, assistant: bool = False) -> tuple[str | None, list[str]]:
        """Rewrite each claim to the configured identity and creator, or return None to drop the text.

        A claim is rewritten only if its construction allows it and every name in its sentence is a slot
        of some claim (so "I'm based on OpenAI's GPT-4" is dropped: swapping one name would leave the
        other, and the sentence would still say who made the speaker).
        Returns the new text (the input itself when nothing was found) and one log line per claim.
        """
        findings = self.find(text, assistant=assistant)
        if not findings:
            return text, []
        hits = self.rules.names.find(text)
        windows = _windows(text, hits)
        for f in findings:
            sentence = next((w for w in windows if w[0] <= f.start < w[1]), (f.start, f.end))
            why = self._why_not_rewritable(text, f, findings, hits, sentence)
            if why:
                return None, [f"dropped: {f.text!r} [{f.pattern}] {why}"]
        out, log, last = [], [], 0
        for f in findings:
            new = []
            pos = f.start
            for s in sorted(f.slots, key=lambda s: s.start):
                new += [text[pos:s.start], self.identity if s.kind == "model" else self.creator]
                pos = s.end
            new.append(text[pos:f.end])
            rewritten = "".join(new)
            out += [text[last:f.start], rewritten]
            last = f.end
            log.append(f"rewrote {f.text!r} -> {rewritten!r} [{f.pattern}]")
        out.append(text[last:])
        return "".join(out), log

    def _why_not_rewritable(self, text: str, f: Finding, findings: list[Finding], hits: list[NameHit],
                            sentence: tuple[int, int]) -> str:
        """Empty if swapping the slots of `f` leaves a true sentence: the construction allows it, and no
        other name of a model or maker is left in the sentence ("I'm ChatGPT, based on OpenAI's GPT-4")."""
        if not f.rewritable:
            return "cannot be rewritten: the construction names the maker in a way a swap would garble"
        slots = [s for g in findings for s in g.slots]
        for h in hits:
            if not (sentence[0] <= h.start < sentence[1]):
                continue
            inside_slot = any(s.start <= h.start and h.end <= s.end for s in slots)
            if not inside_slot and _normal(text[h.start:h.end]) not in self._ours:
                return f"cannot be rewritten: its sentence also names {text[h.start:h.end]!r}"
        return ""


def _windows(text: str, hits: list[NameHit]) -> list[tuple[int, int]]:
    """The sentences around the name hits, merged where they overlap."""
    spans: list[tuple[int, int]] = []
    for h in hits:
        lo, hi = max(0, h.start - _REACH), min(len(text), h.end + _REACH)
        start = lo
        for m in _BOUNDARY.finditer(text, lo, h.start):
            start = m.end()
        m = _BOUNDARY.search(text, h.end, hi)
        end = m.end() if m else hi
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return spans


def _cancelled(lang: Language, text: str, start: int, end: int, m: re.Match) -> bool:
    """Whether a cue around the claim says it is not the speaker's own claim."""
    before = text[max(start, m.start() - _CUE_REACH):m.start()]
    if any(rx.search(before) for _, rx in lang.cancel_before):
        return True
    if any(rx.match(text, m.end(), end) for _, rx in lang.cancel_after):
        return True
    return any(rx.search(text, m.start(), m.end()) for _, rx in lang.cancel_inside)


def _merge(text: str, matches: list[tuple[re.Match, Claim, tuple[Slot, ...]]]) -> list[Finding]:
    """Overlapping matches (two constructions reading the same claim) become one finding with all slots;
    the longest match names the pattern."""
    matches.sort(key=lambda x: (x[0].start(), -x[0].end()))
    groups: list[list[tuple[re.Match, Claim, tuple[Slot, ...]]]] = []
    for item in matches:
        if groups and item[0].start() < max(g[0].end() for g in groups[-1]):
            groups[-1].append(item)
        else:
            groups.append([item])
    findings = []
    for group in groups:
        start = min(m.start() for m, _, _ in group)
        end = max(m.end() for m, _, _ in group)
        _, claim, _ = max(group, key=lambda x: x[0].end() - x[0].start())
        slots = sorted({s for _, _, ss in group for s in ss}, key=lambda s: (s.start, -s.end))
        # keep the outermost slot where two overlap ("Llama 3" over "Llama")
        kept: list[Slot] = []
        for s in slots:
            if not kept or s.start >= kept[-1].end:
                kept.append(s)
        findings.append(Finding(start, end, text[start:end], claim.language, claim.reason, claim.id,
                                tuple(kept), all(c.rewrite for _, c, _ in group)))
    return findings
