"""Tokens to text as they are made: incremental detokenisation and stop strings.

Decoding token by token breaks multi-byte characters and, with byte-level BPE, a token can end in the
middle of one. `TextStream` decodes a short window of recent tokens and releases text only once it no
longer ends in an incomplete character, so the pieces it releases always join to the text of the whole
sequence. Text that could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class TextStream:
    """Feed token ids one at a time with `push`; it returns the text that became final. `stopped` turns true
    when a stop string appears (the text ends just before it). `finish()` releases whatever is held back."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context so the decoder sees whole characters
        self.read_offset = 0  # tokens before this have been turned into text
        self.held = ""  # final text not yet released: it may begin a stop string
        self.text = ""  # everything released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if full.endswith(REPLACEMENT) or not full.startswith(prefix):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(full[len(prefix) :])

    def finish(self) -> str:
        """End of the sequence: decode any leftover bytes and release what was held back."""
        if self.stopped:
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        rest = self.tokenizer.decode(self.ids[self.prefix_offset :])[len(prefix) :]
        self.read_offset = len(self.ids)
        out = self._release(rest)
        if not self.stopped:
            out += self.held
            self.text += self.held
            self.held = ""
        return out

    def _release(self, new: str) -> str:
        buf = self.held + new
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.held = buf[: min(hits)], ""
        else:
            keep = self._stop_prefix_len(buf)
            out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.text += out
        return out

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest end of buf that is the beginning of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if s.startswith(buf[len(buf) - k :]):
                    best = k
                    break
        return best
