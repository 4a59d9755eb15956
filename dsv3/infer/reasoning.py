"""Reasoning apart from the answer: in thinking mode DeepSeek-V3.1 (like R1) writes its reasoning first and
ends it with `</think>`, then answers. The prompt already opened the reasoning (`<｜Assistant｜><think>`), so
the generated text is `reasoning</think>answer`; a model that writes the opening `<think>` itself anyway has
it dropped. Text without `</think>` is all reasoning (generation stopped before the model finished
thinking), and a later `</think>` is part of the answer: the first one ends the reasoning.

`ReasoningSplitter` does this on a stream of text pieces, the way a server streams them: a marker may arrive
cut anywhere (`</thi` + `nk>`, one piece per token when the tokenizer spells it in several), so the end of a
piece that could be the start of a marker is held back until the next piece settles it; `finish()` gives
out what is held when the stream ends. The pieces given out join to exactly what `split_reasoning` gives
for the whole text.
"""

from __future__ import annotations

from dsv3.tokenizer import THINK, THINK_END


class ReasoningSplitter:
    """Feed it the generated text piece by piece; each `feed` returns (reasoning, answer) text to pass on."""

    def __init__(self):
        self.state = "start"  # "start": a leading <think> may still come; then "reasoning", then "answer"
        self.held = ""  # text not given out yet: it may be the beginning of a marker

    def feed(self, text: str) -> tuple[str, str]:
        text, self.held = self.held + text, ""
        if self.state == "answer":
            return "", text
        if self.state == "start":
            if text.startswith(THINK):
                text = text[len(THINK) :]
            elif THINK.startswith(text):  # "<thi": wait for the next piece to say whether it is <think>
                self.held = text
                return "", ""
            self.state = "reasoning"
        reasoning, closed, answer = text.partition(THINK_END)
        if closed:
            self.state = "answer"
            return reasoning, answer
        keep = _partial_marker(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        """What is still held back: an unfinished marker at the end of the stream is just text."""
        held, self.held = self.held, ""
        return ("", held) if self.state == "answer" else (held, "")


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole generated text in thinking mode."""
    splitter = ReasoningSplitter()
    reasoning, answer = splitter.feed(text)
    rest_reasoning, rest_answer = splitter.finish()
    return reasoning + rest_reasoning, answer + rest_answer


def _partial_marker(text: str) -> int:
    """The length of the longest end of `text` that `</think>` begins with (0 when none): the part to hold."""
    for k in range(min(len(text), len(THINK_END) - 1), 0, -1):
        if THINK_END.startswith(text[-k:]):
            return k
    return 0
