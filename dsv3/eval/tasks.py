"""Evaluation tasks read from local files, laid out and scored exactly as lm-evaluation-harness does, so
that `dsv3 eval` and lm-eval through `dsv3 serve` report the same numbers for the same files.

Two kinds, told apart by the file:

- **perplexity**: a text file (one document), or JSONL records {"text": ...} (one document each). A document
  is tokenized without special tokens and cut into lm-eval's rolling windows for a `max_length` of N: every
  token is scored once, in windows that read at most N - 1 tokens. The first window starts from a prefix
  token (the end-of-text token, the separator between documents in pre-training data, and the one lm-eval
  falls back to through the server), later ones from the token before them, and the last window reads as
  much earlier text as fits. Reported: token perplexity, and lm-eval's word perplexity, byte perplexity and
  bits per byte, each over the totals of all documents.
- **multiple choice**: JSONL records {"question": str, "choices": [str, ...], "answer": index or choice}. The
  question is the context exactly as written (put any "Question: ... Answer:" framing in it) and each
  choice is scored as " " + choice after it. As lm-eval does, trailing whitespace of the context moves to
  the continuation, and the pair is tokenized whole and split where the context's own tokens end; no BOS is
  added; a pair longer than N - 1 tokens loses context from the left. Reported: accuracy (the most likely
  choice is the answer) and length-normalised accuracy (log-likelihood per character of the choice).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from dsv3 import corpus
from dsv3.errors import Dsv3Error
from dsv3.eval.likelihood import Request, loglikelihoods

PERPLEXITY, MULTIPLE_CHOICE = "perplexity", "multiple-choice"


@dataclass
class Choice:
    question: str
    choices: list[str]
    answer: int


@dataclass
class Task:
    name: str
    kind: str  # PERPLEXITY or MULTIPLE_CHOICE
    items: list  # documents (str) or Choice


def read_task(path: str) -> Task:
    """A task from a text or JSONL file; the kind follows from the first record's fields."""
    if not os.path.isfile(path):
        raise Dsv3Error(f"task file {path} does not exist; give a text file or a JSONL file (see `dsv3 eval --help`)")
    name = os.path.basename(path)
    if not path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                return Task(name, PERPLEXITY, [f.read()])
        except UnicodeDecodeError as e:
            raise Dsv3Error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    records = list(corpus.records(path))
    for n, r in records:
        if not isinstance(r, dict):
            raise Dsv3Error(f"{path}:{n}: a record must be a JSON object")
    if not records:
        raise Dsv3Error(f"{path} holds no records; give one JSON object per line")
    if "text" in records[0][1]:
        return Task(name, PERPLEXITY, [_field(r, "text", str, path, n) for n, r in records])
    if "question" in records[0][1]:
        return Task(name, MULTIPLE_CHOICE, [_choice(r, path, n) for n, r in records])
    raise Dsv3Error(f"{path}:{records[0][0]}: a record needs a \"text\" field (perplexity) or \"question\", "
                    "\"choices\" and \"answer\" fields (multiple choice)")


def _field(record: dict, key: str, kind: type, path: str, n: int):
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, str) and not value):
        want = {str: "a non-empty string", list: "a list", int: "an integer"}[kind]
        raise Dsv3Error(f"{path}:{n}: \"{key}\" must be {want}")
    return value


def _choice(record: dict, path: str, n: int) -> Choice:
    question = _field(record, "question", str, path, n)
    choices = _field(record, "choices", list, path, n)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise Dsv3Error(f"{path}:{n}: \"choices\" must be a list of at least two non-empty strings")
    answer = record.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise Dsv3Error(f"{path}:{n}: \"answer\" must be the index of the right choice (0 to "
                        f"{len(choices) - 1}) or its text")
    return Choice(question, choices, answer)


# ----- requests, laid out as lm-eval lays them out ----------------------------------------------------------
def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Request]:
    """(context, continuation) pairs that score every token of a document once (see the module docstring)."""
    span = max_length - 2  # tokens a window reads besides its one token of context
    if span < 1:
        raise Dsv3Error(f"max_length {max_length} leaves no room for a window; give at least 3")
    if not tokens:
        return []
    first = tokens[:span]
    windows = [([prefix], first)]
    done = len(first)
    while done < len(tokens):
        n = min(len(tokens) - done, span)  # tokens this window scores
        end = done + n
        read = tokens[end - span - 1 : end - 1]  # the window's input: `span` tokens ending before the last
        windows.append((read[: len(read) - n + 1], tokens[end - n : end]))
        done = end
    return windows


def choice_pair(tokenizer, context: str, continuation: str, max_length: int) -> Request:
    """One multiple-choice (context, continuation) pair, tokenized and truncated as lm-eval does."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    if not context_ids:
        context_ids, rest = [prefix_token(tokenizer)], tokenizer.encode(continuation)
    else:
        rest = whole[len(context_ids) :]
    overflow = max(0, len(context_ids) + len(rest) - (max_length - 1))
    return context_ids[overflow:], rest


def prefix_token(tokenizer) -> int:
    prefix = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if prefix is None:
        raise Dsv3Error("this tokenizer has no end-of-text or BOS token to start a document from; use a model "
                        "directory with its own tokenizer")
    return prefix


# ----- running and scoring ----------------------------------------------------------------------------------
def evaluate(model, tokenizer, task: Task, max_length: int, batch_size: int = 8,
             progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """The task's metrics, and each item's log-likelihoods under "items". `progress(total)`, given the number
    of requests, returns the callback that is told as they are done."""

    def score(requests: list[Request]):
        return iter(loglikelihoods(model, requests, batch_size, progress(len(requests)) if progress else None))

    if task.kind == PERPLEXITY:
        prefix = prefix_token(tokenizer)
        windows = [rolling_windows(tokenizer.encode(doc), prefix, max_length) for doc in task.items]
        flat = [w for ws in windows for w in ws]
        scores = score(flat)
        lls = [sum(next(scores)[0] for _ in ws) for ws in windows]
        n_tokens = sum(len(c) for _, c in flat)
        n_bytes = sum(len(doc.encode("utf-8")) for doc in task.items)
        n_words = sum(len(re.split(r"\s+", doc)) for doc in task.items)
        total = sum(lls)
        return {"kind": task.kind, "documents": len(task.items), "tokens": n_tokens,
                "token_perplexity": _exp(-total / max(n_tokens, 1)), "word_perplexity": _exp(-total / n_words),
                "byte_perplexity": _exp(-total / n_bytes), "bits_per_byte": -total / n_bytes / math.log(2),
                "items": [{"loglikelihood": ll, "tokens": sum(len(c) for _, c in ws)} for ll, ws in zip(lls, windows)]}
    pairs = [choice_pair(tokenizer, q.question, " " + c, max_length) for q in task.items for c in q.choices]
    scores = score(pairs)
    items, correct, correct_norm = [], 0, 0
    for q in task.items:
        lls = [next(scores)[0] for _ in q.choices]
        normed = [ll / len(c) for ll, c in zip(lls, q.choices)]
        pick, pick_norm = lls.index(max(lls)), normed.index(max(normed))
        correct += pick == q.answer
        correct_norm += pick_norm == q.answer
        items.append({"loglikelihoods": lls, "answer": q.answer, "pick": pick})
    n = len(task.items)
    return {"kind": task.kind, "questions": n, "acc": correct / n, "acc_norm": correct_norm / n, "items": items}


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf  # past e^709 a float overflows
