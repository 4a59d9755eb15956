"""A stand-in tokenizer for models built from a preset, which come without one: token id = UTF-8 byte.

Any vocabulary of 256 or more covers it (the `tiny` preset has 512). Ids past 255 have no byte; they
decode to U+FFFD, as invalid bytes do. There are no special tokens, so generation ends on length.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class ByteTokenizer:
    bos_id = None
    eos_id = None
    vocab_size = 256

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace") + REPLACEMENT)
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)
