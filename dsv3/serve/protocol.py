"""The OpenAI API's request bodies and error format, as far as this server implements them.

Fields are strictly typed ("5" is not a number, 1 is not a boolean) and range-checked, so a bad request
gets a 400 naming the field instead of a surprising generation. Unknown fields are ignored, as the
OpenAI API does for parameters a model does not use.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dsv3.infer.sampling import SEED_RANGE


def _utf8(text: str) -> str:
    """JSON can spell a lone surrogate (\\ud800) that no UTF-8 text holds: refuse it as a bad value."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate (\\ud800-\\udfff), which is not text; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "code", "param"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # beyond OpenAI's API (as in vLLM); 0 or -1: off
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request; ask again for more
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Annotated[Text, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    echo: Literal[False] = False  # echoing the prompt is not implemented


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
