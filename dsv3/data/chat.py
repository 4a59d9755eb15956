"""Chat data for fine-tuning: conversations -> token ids with a loss mask -> a prepared dataset.

A conversation is a list of {"role", "content"} turns (system, user, assistant), read from JSONL records
with the same field options as `dsv3 audit` (`dsv3.audit.sources.Fields`). It is rendered with the model's
chat template (`dsv3.chat_template`: DeepSeek-V3's format, or the Jinja template of the tokenizer's
tokenizer_config.json) and tokenised once, whole. The loss covers the assistant turns only: the tokens of
each answer and what the template closes it with (DeepSeek-V3's end-of-sentence token). An answer's span in
the text is found by rendering the conversation up to that answer, with the generation prompt, and through
it: the template must render a conversation's beginning as a prefix of the whole, as chat templates do. A
token is a target when it lies inside a span; everything else (system text, questions, role markers) is
context.

Conversations are packed back to back into shards with a `.mask` beside each (`DatasetInfo.masked`), so
the pre-training loader, evaluation, checkpoints and resume all work on chat data unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dsv3 import corpus
from dsv3.audit.sources import Fields
from dsv3.chat_template import ROLES, ChatTemplate
from dsv3.data.dataset import DatasetInfo, mask_file, token_dtype
from dsv3.data.pack import name_key
from dsv3.errors import Dsv3Error
from dsv3.tokenizer import Tokenizer

Messages = list[dict[str, str]]


@dataclass
class Conversation:
    name: str  # where it came from: "file.jsonl:LINE" or a built-in name; names pick the validation split
    messages: Messages


def read_chats(paths: Sequence[str], fields: Fields | None = None) -> Iterator[Conversation]:
    """The conversations of JSONL files; Dsv3Error naming the file and line of the first bad record (not JSON,
    no turns, an unknown role, no assistant turn)."""
    fields = fields or Fields()
    for path in paths:
        if not os.path.isfile(path):
            raise Dsv3Error(f"chat data {path} does not exist; give JSONL files of {{\"messages\": [...]}} records")
        for lineno, obj in corpus.records(path):
            try:
                messages = _messages(obj, fields)
            except ValueError as e:
                raise Dsv3Error(f"{path}:{lineno}: {e}") from None
            yield Conversation(f"{os.path.basename(path)}:{lineno}", messages)


def _messages(obj: object, fields: Fields) -> Messages:
    if not isinstance(obj, dict) or not isinstance(obj.get(fields.messages), list):
        raise ValueError(f"the record has no list of turns in {fields.messages!r} (name it with --messages-field)")
    out = []
    for i, turn in enumerate(obj[fields.messages]):
        if not isinstance(turn, dict):
            raise ValueError(f"{fields.messages}[{i}] is not an object")
        role, content = turn.get(fields.role), turn.get(fields.content)
        role = "assistant" if role == fields.assistant else role
        if role not in ROLES:
            raise ValueError(f"{fields.messages}[{i}] has the role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{fields.messages}[{i}] has no text in {fields.content!r}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant turn: there would be nothing to learn from it")
    return out


def answer_spans(messages: Messages, template: ChatTemplate) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers (with their closing)."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        through = template.render(messages[:i + 1], add_generation_prompt=False)
        if not through.startswith(before) or not text.startswith(through):
            raise ValueError("the chat template does not render the beginning of a conversation as the beginning "
                             "of the whole, so the answers cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(messages: Messages, tokenizer: Tokenizer, template: ChatTemplate
                        ) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask: 1 where the token is part of an answer."""
    text, spans = answer_spans(messages, template)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc.offsets]
    return list(enc.ids), mask


def prepare_chats(conversations: Iterable[Conversation], tokenizer: Tokenizer, template: ChatTemplate, out: str,
                  *, val_names: set[str] | None = None, val_fraction: float = 0.05, min_val_tokens: int = 0,
                  sources: Sequence[str] = ()) -> DatasetInfo:
    """Encode and pack `conversations` into a masked dataset folder `out` (replacing what is there). The
    validation split is the conversations named in `val_names`, or else a `val_fraction` chosen by a hash
    of their names (stable across runs and orders), grown in the same order to at least one conversation and
    `min_val_tokens` tokens (one evaluation window) while a conversation is left for training."""
    encoded = []
    for conv in conversations:
        try:
            encoded.append((conv, *encode_conversation(conv.messages, tokenizer, template)))
        except ValueError as e:
            raise Dsv3Error(f"{conv.name}: {e}") from None
    if val_names is None:
        val_names = _held_out({c.name: len(ids) for c, ids, _ in encoded}, val_fraction, min_val_tokens)
    tmp = tempfile.mkdtemp(prefix=".tmp-chat-", dir=os.path.dirname(os.path.abspath(out)) or ".")
    try:
        writers = {split: _SplitWriter(tmp, split, token_dtype(tokenizer.vocab_size)) for split in ("train", "val")}
        digest, documents, chars = hashlib.sha256(), 0, 0
        for conv, ids, mask in encoded:
            writers["val" if conv.name in val_names else "train"].write(ids, mask)
            digest.update(np.asarray(ids, dtype=np.int64).tobytes() + bytes(mask))
            documents += 1
            chars += sum(len(m["content"]) for m in conv.messages)
        splits = {split: w.close() for split, w in writers.items()}
        if not splits["train"]["tokens"] or not splits["val"]["tokens"]:
            n_train, n_val = splits["train"]["documents"], splits["val"]["documents"]
            raise Dsv3Error(f"the chat data gives {n_train} training and {n_val} validation conversations; both "
                            "splits need at least one")
        tokenizer.save(tmp)
        info = DatasetInfo(
            path=tmp, dtype=str(token_dtype(tokenizer.vocab_size)), vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id, tokenizer_sha256=tokenizer.sha256(),
            fingerprint=digest.hexdigest(), content_sha256=digest.hexdigest(), sources=list(sources),
            documents=documents, bytes=chars, tokens=sum(s["tokens"] for s in splits.values()), splits=splits,
            settings={"format": "chat", "template": "tokenizer_config" if template.source else "deepseek-v3"},
            masked=True)
        info.save()
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
        info.path = out
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _held_out(lengths: dict[str, int], fraction: float, min_tokens: int) -> set[str]:
    """Names (-> token counts) in the order of their hash: the first `fraction` of the hash range, then more
    until there are at least one and `min_tokens` tokens, never the last one."""
    order = sorted(lengths, key=lambda name: name_key(name) % 10_000)
    chosen, tokens = [], 0
    for name in order[:-1]:
        if name_key(name) % 10_000 >= fraction * 10_000 and chosen and tokens >= min_tokens:
            break
        chosen.append(name)
        tokens += lengths[name]
    return set(chosen)


class _SplitWriter:
    """One shard of token ids and one of masks for a split (chat sets are small: one shard each)."""

    def __init__(self, folder: str, split: str, dtype: np.dtype):
        self.name = f"{split}-00000.bin"
        self.ids = open(os.path.join(folder, self.name), "wb")  # noqa: SIM115 - closed in close()
        self.mask = open(mask_file(os.path.join(folder, self.name)), "wb")  # noqa: SIM115
        self.dtype, self.tokens, self.documents = dtype, 0, 0

    def write(self, ids: list[int], mask: list[int]) -> None:
        self.ids.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.tokens += len(ids)
        self.documents += 1

    def close(self) -> dict:
        for f in (self.ids, self.mask):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {"documents": self.documents, "tokens": self.tokens,
                "shards": [{"file": self.name, "tokens": self.tokens}]}


def write_jsonl(conversations: Iterable[Conversation], path: str) -> int:
    """Conversations as `{"messages": [...]}` lines (what `read_chats` and `dsv3 audit` read); returns the
    count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": conv.messages}, ensure_ascii=False) + "\n")
            n += 1
    return n

