"""Compile the audit's data (`names.py`, `lang/*.py`) into regexes, once per process.

Two kinds of object come out:

- `NameTable` finds names of other models and organisations in a text. It is the fast path: a text
  is cut into lowercase ASCII words with one `bytes.translate` and `split`, and only when a word is the
  key of some name (or, for non-ASCII text, a non-ASCII name occurs as a substring) does a regex run,
  and then only the regex of the names whose keys were seen. Most text of a real corpus stops at the
  set intersection.
- `Language` holds one language's claims (constructions in which a speaker says who it is or who made
  it) with the placeholders filled in, and the cues that cancel a claim.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from dsv3.audit import names as shared
from dsv3.errors import Dsv3Error

LANG_DIR = Path(__file__).with_name("lang")
FLAGS = re.IGNORECASE

# Bytes of an ASCII-encoded text -> lowercase letters, everything else a space: one C call makes words.
_WORDS = bytes(c + 32 * (65 <= c <= 90) if chr(c).isalpha() and c < 128 else 32 for c in range(256))
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


# A name may not start or end inside a longer word of its own script; Chinese has no word breaks.
_LEFT = r"(?:(?=[A-Za-z0-9])(?<![A-Za-z0-9])|(?=[\u0900-\u097f])(?<![\u0900-\u097f])|(?![A-Za-z0-9\u0900-\u097f]))"
_RIGHT = r"(?:(?<=[A-Za-z0-9])(?![A-Za-z0-9])|(?<=[\u0900-\u097f])(?![\u0900-\u097f])|(?<![A-Za-z0-9\u0900-\u097f]))"


@dataclass(frozen=True)
class Name:
    text: str  # as written in the data: "chat gpt", "gpt#"
    body: str  # regex of the name itself, before any version
    ambiguous: bool
    kinds: frozenset[str]  # {"model"}, {"org"} or both ("deepseek")
    keys: tuple[str, ...]  # words (ASCII) or substrings (other scripts), one of which every match contains


def _name(text: str, ambiguous: bool, kinds: frozenset[str] = frozenset()) -> Name:
    versioned = text.endswith("#")
    parts = text.rstrip("#").lower().split()
    body = r"[\s_-]?".join(re.escape(p) for p in parts)
    if versioned:
        body += f"(?={shared.NUMBER})"
    joined = "".join(parts)
    if joined.isascii():
        # the words a match leaves after _WORDS: the joined spelling's letter runs, and for spaced-out
        # spellings ("Chat GPT") the longest part that is not a common word
        runs = re.findall(r"[a-z]+", joined)
        keys = {r for r in runs if len(r) >= 3} or {max(runs, key=len)}
        if len(parts) > 1:
            words = [r for p in parts for r in re.findall(r"[a-z]+", p)]
            keys.add(max([w for w in words if w not in shared.COMMON_WORDS] or words, key=len))
    else:
        keys = {max(parts, key=len)}
    return Name(text, body, ambiguous, kinds, tuple(sorted(keys)))


def names_regex(bodies: list[str]) -> str:
    """One regex for a list of name bodies, each followed by an optional version and variant."""
    return f"{_LEFT}(?:{'|'.join(bodies)})(?:{shared.NUMBER})?{shared.VARIANT}{_RIGHT}"


def _guarded(text: str, start: int, end: int) -> bool:
    """The check of _LEFT and _RIGHT, for a match found without them."""
    def word(ch: str) -> str:
        if ch.isascii() and ch.isalnum():
            return "latin"
        return "devanagari" if "\u0900" <= ch <= "\u097f" else ""

    inside = word(text[start]), word(text[end - 1])
    before = word(text[start - 1]) if start > 0 else ""
    after = word(text[end]) if end < len(text) else ""
    return not (inside[0] and before == inside[0]) and not (inside[1] and after == inside[1])


@dataclass(frozen=True)
class NameHit:
    start: int
    end: int
    ambiguous: bool  # an ambiguous name without a version number
    kinds: frozenset[str]


class NameTable:
    """Every name of another model or organisation, and a fast way to find them in a text."""

    def __init__(self, names: list[Name]):
        # longest first, so that "google deepmind" wins over "google" at the same position
        self.names = sorted(names, key=lambda n: -len(n.text))
        self.ascii_keys: dict[str, list[int]] = {}
        self.other_keys: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            for k in n.keys:
                (self.ascii_keys if k.isascii() else self.other_keys).setdefault(k, []).append(i)
        self.ascii_key_set = frozenset(k.encode() for k in self.ascii_keys)
        # non-ASCII names (通义千问, चैटजीपीटी) have no word breaks to split on: one literal alternation
        self._other_keys_rx = re.compile("|".join(map(re.escape, sorted(self.other_keys, key=len, reverse=True))))
        ambiguous = [n.body for n in self.names if n.ambiguous]
        self._ambiguous = re.compile(names_regex(ambiguous), FLAGS) if ambiguous else None
        suffix = f"(?:{shared.NUMBER})?{shared.VARIANT}"
        self._lower = [re.compile(n.body + suffix) for n in self.names]
        self._any_case = [re.compile(n.body + suffix, FLAGS) for n in self.names]

    def keys_in(self, text: str) -> frozenset[int]:
        """Indices of the names whose keys occur in `text`: the fast path, a superset of the names present."""
        words = text.encode("ascii", "replace").translate(_WORDS).split()
        found = [self.ascii_keys[k.decode()] for k in self.ascii_key_set.intersection(words)]
        if self.other_keys and not text.isascii():
            found += [self.other_keys[k] for k in set(self._other_keys_rx.findall(text))]
        return frozenset(i for idx in found for i in idx)

    def find(self, text: str) -> list[NameHit]:
        which = self.keys_in(text)
        if not which:
            return []
        # Each name's regex starts with a literal, which `re` finds with a fast scan, but only in
        # lowercase text (case-insensitive patterns scan position by position); the few characters
        # whose lowercase is longer fall back to the slow patterns.
        low = text.lower()
        regexes = self._lower if len(low) == len(text) else self._any_case
        if len(low) != len(text):
            low = text
        hits = []
        for i in which:
            name = self.names[i]
            for m in regexes[i].finditer(low):
                if _guarded(text, m.start(), m.end()):
                    versioned = any(c.isdigit() for c in m.group())
                    hits.append(NameHit(m.start(), m.end(), name.ambiguous and not versioned, name.kinds))
        # where names overlap ("google deepmind", "google") the longest wins
        hits.sort(key=lambda h: (h.start, -h.end))
        kept: list[NameHit] = []
        for h in hits:
            if not kept or h.start >= kept[-1].end:
                kept.append(h)
        return kept

    def is_ambiguous(self, text: str) -> bool:
        """Whether a matched name is one that is also an ordinary word (and carries no version number)."""
        return (self._ambiguous is not None and self._ambiguous.fullmatch(text) is not None
                and not any(c.isdigit() for c in text))


@dataclass(frozen=True)
class Claim:
    id: str  # "en/i-am-model"
    language: str
    reason: str
    regex: re.Pattern
    rewrite: bool
    assistant_only: bool  # counts only in an assistant's turn ("I'm from OpenAI" is also what staff say)
    examples: tuple[str, ...]


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    script: re.Pattern
    claims: tuple[Claim, ...]
    ai_cue: re.Pattern
    cancel_before: tuple[tuple[str, re.Pattern], ...]
    cancel_after: tuple[tuple[str, re.Pattern], ...]
    cancel_inside: tuple[tuple[str, re.Pattern], ...]
    quotes: tuple[tuple[str, str], ...]


def read_language_file(path: Path) -> dict:
    """The `LANGUAGE = {...}` literal of a language file, read without running the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LANGUAGE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise Dsv3Error(f"language file {path} has no `LANGUAGE = {{...}}` assignment; add one (see lang/__init__.py)")


def _expand(pattern: str, terms: dict[str, str], where: str, depth: int = 0) -> str:
    """Fill in terms recursively; name slots are left as placeholders for `_fill_slots`."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in SLOTS:
            return m.group()
        if key in terms and depth < 8:
            return _expand(terms[key], terms, where, depth + 1)
        raise Dsv3Error(f"{where}: unknown placeholder {{{key}}}; define it under 'terms'")

    return _PLACEHOLDER.sub(sub, pattern)


def _fill_slots(pattern: str, any_model: str, any_org: str) -> str:
    """{model}/{org} become named groups (model, model2, ... where a pattern has alternatives)."""
    seen: dict[str, int] = {}

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in ("any_model", "any_org"):
            return any_model if key == "any_model" else any_org
        seen[key] = seen.get(key, 0) + 1
        group = key if seen[key] == 1 else f"{key}{seen[key]}"
        return f"(?P<{group}>{any_model if key == 'model' else any_org})"

    return _PLACEHOLDER.sub(sub, pattern)


SLOTS = ("model", "org", "any_model", "any_org")


class Rules:
    """All names and all languages, compiled."""

    def __init__(self, languages: list[dict]):
        models = [(t, False) for t in shared.MODELS] + [(t, True) for t in shared.AMBIGUOUS_MODELS]
        orgs = [(t, False) for t in shared.ORGS] + [(t, True) for t in shared.AMBIGUOUS_ORGS]
        for lang in languages:
            models += [(t, False) for t in lang["models"]] + [(t, True) for t in lang["ambiguous_models"]]
            orgs += [(t, False) for t in lang["orgs"]] + [(t, True) for t in lang["ambiguous_orgs"]]
        kinds: dict[tuple[str, bool], set[str]] = {}
        for kind, entries in (("model", models), ("org", orgs)):
            for entry in entries:
                kinds.setdefault(entry, set()).add(kind)
        self.names = NameTable([_name(t, a, frozenset(k)) for (t, a), k in kinds.items()])

        def alternation(entries: list[tuple[str, bool]]) -> str:
            return names_regex(sorted({_name(t, a).body for t, a in entries}, key=len, reverse=True))

        alternatives = (alternation(models), alternation(orgs))
        self.languages = tuple(self._language(lang, alternatives) for lang in languages)
        self.ai_cue = re.compile("|".join(f"(?:{lang.ai_cue.pattern})" for lang in self.languages), FLAGS)
        self.quotes = tuple(dict.fromkeys(q for lang in self.languages for q in lang.quotes))

    @staticmethod
    def _language(data: dict, alternatives: tuple[str, str]) -> Language:
        code = data["code"]
        claims = []
        for c in data["claims"]:
            where = f"language {code!r}, claim {c['id']!r}"
            try:
                pattern = _fill_slots(_expand(c["pattern"], data["terms"], where), *alternatives)
                regex = re.compile(pattern, FLAGS)
            except re.error as e:
                raise Dsv3Error(f"{where}: the pattern does not compile ({e}); fix the regex") from e
            claims.append(Claim(f"{code}/{c['id']}", code, c["reason"], regex, bool(c["rewrite"]),
                                bool(c.get("assistant_only", False)), tuple(c.get("examples", ()))))

        def cues(key: str) -> tuple[tuple[str, re.Pattern], ...]:
            return tuple((label, re.compile(rx, FLAGS)) for label, rx in data.get(key, {}).items())

        return Language(code, data["name"], re.compile(data["script"]), tuple(claims),
                        re.compile(data["ai_cue"], FLAGS), cues("cancel_before"), cues("cancel_after"),
                        cues("cancel_inside"), tuple(tuple(q) for q in data.get("quotes", ())))


def available_languages() -> list[str]:
    return sorted(p.stem for p in LANG_DIR.glob("*.py") if not p.stem.startswith("_"))


@functools.lru_cache(maxsize=8)
def load_rules(codes: tuple[str, ...] | None = None) -> Rules:
    """Rules for the given language codes (all languages in `lang/` when None); compiled once."""
    known = available_languages()
    codes = tuple(known) if codes is None else codes
    for code in codes:
        if code not in known:
            raise Dsv3Error(f"unknown audit language {code!r}; choose from {', '.join(known)}")
    return Rules([read_language_file(LANG_DIR / f"{code}.py") for code in codes])
