"""Token log-probabilities in the two shapes OpenAI's API gives them.

- completions (the legacy shape scorers read): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
  four parallel lists. `tokens` are each token's share of the text, so they join to it and `text_offset[i]` is
  where token i starts in the choice's `text`; a token that ends inside a character gets "" and the one
  that finishes it the whole character. `top_logprobs[i]` maps the most likely tokens (each decoded on its
  own) to their log-probabilities, the chosen token included (as vLLM does); None where `token_logprobs[i]`
  is None: the first token of a sequence, which nothing predicts.
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsv3.infer.logprobs import TokenLogprob
from dsv3.infer.text import Decoder, TextStream


def pieces(tokenizer: Decoder, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text of ids; the pieces join to that text."""
    stream = TextStream(tokenizer)
    out = [stream.push(t) for t in ids]
    if out:
        out[-1] += stream.finish()
    return out


class Spelling:
    """Token ids to their text, each on its own, remembered: top-n alternatives repeat a lot."""

    def __init__(self, tokenizer: Decoder):
        self.tokenizer, self.seen = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.seen:
            self.seen[token] = self.tokenizer.decode([token])
        return self.seen[token]


def completion_logprobs(tokenizer: Decoder, ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """The legacy shape for tokens ids [N] with their entries [N]; text offsets start at `offset`."""
    spell = Spelling(tokenizer)
    texts = pieces(tokenizer, ids)
    starts = []
    for text in texts:
        starts.append(offset)
        offset += len(text)
    tops = []
    for e in entries:
        if e is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token, logprob in [*e.top, (e.token, e.logprob)]:
            top.setdefault(spell(token), logprob)  # two tokens spelt alike: keep the likelier
        tops.append(top)
    return {"tokens": texts, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": starts}


def chat_logprobs(tokenizer: Decoder, entries: Sequence[TokenLogprob]) -> dict:
    """The chat shape for generated tokens."""
    spell = Spelling(tokenizer)
    texts = pieces(tokenizer, [e.token for e in entries])

    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(text, e.logprob), "top_logprobs": [item(spell(t), lp) for t, lp in e.top]}
                        for text, e in zip(texts, entries)]}
