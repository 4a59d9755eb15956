"""The OpenAI API's request bodies and error format, as far as this server implements them.

Fields are strictly typed ("5" is not a number, 1 is not a boolean) and range-checked, so a bad request
gets a 400 naming the field instead of a surprising generation. Unknown fields are ignored, as the
OpenAI API does for parameters a model does not use.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from dsv3.chat_template import RESERVED
from dsv3.infer.logprobs import MAX_TOP_LOGPROBS
from dsv3.infer.sampling import SEED_RANGE

MAX_STOP = 32  # stop strings per request; each is checked against the end of the text at every token
MAX_PROMPTS = 64  # prompts in one completions request (each takes a place in the queue like a request)


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


# What each field takes, for the fields whose checks pydantic would describe by its internal type names
# (a union's members): a 400 names the field and what is allowed.
ALLOWED = {
    "prompt": f"a non-empty string, a non-empty list of token ids, or a list of at most {MAX_PROMPTS} of either "
              "(one choice each)",
    "stop": f"a string or a list of at most {MAX_STOP} strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "max_tokens": "an integer of at least 1 (0 only with echo: true, to score the prompt)",
    "logprobs": f"an integer from 0 to {MAX_TOP_LOGPROBS} (completions) or true/false (chat)",
    "top_logprobs": f"an integer from 0 to {MAX_TOP_LOGPROBS}",
    "seed": f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
    "chat_template_kwargs": "an object of chat template variables, such as {\"thinking\": true}",
    "thinking": "true or false",
    "enable_thinking": "true or false",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: score the prompt only (completions with echo)
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # beyond OpenAI's API (as in vLLM); 0 or -1: off
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request; ask again for more
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


NonEmptyText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class CompletionRequest(SamplingFields):
    prompt: (NonEmptyText | TokenIds | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    echo: bool = False  # the answer's text (and logprobs) start with the prompt's
    logprobs: TopLogprobs | None = None  # per-token log-probabilities with this many alternatives each
    # BOS before a text prompt (as vLLM: on by default); token-id prompts are always taken exactly as sent
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _score_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing and so needs echo: true (scoring the prompt)")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list, one choice each."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt


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


class TemplateKwargs(BaseModel):
    """`chat_template_kwargs` (vLLM's and SGLang's name): variables for the chat template. `thinking` (the
    name DeepSeek-V3.1's template reads) or `enable_thinking` (Qwen3's, which vLLM also accepts for DeepSeek)
    switches thinking mode; the other variables go to a Jinja template as they are."""

    model_config = ConfigDict(strict=True, extra="allow")
    thinking: bool | None = None
    enable_thinking: bool | None = None

    @model_validator(mode="after")
    def _one_switch(self):
        if None not in (self.thinking, self.enable_thinking) and self.thinking != self.enable_thinking:
            raise ValueError("thinking and enable_thinking are two names of one switch and disagree; send one")
        clash = next((k for k in RESERVED if k in (self.model_extra or {})), None)
        if clash is not None:
            raise ValueError(f"'{clash}' is set by the server itself, not by a template variable")
        return self

    def switch(self) -> bool | None:
        """The thinking switch, or None when the request leaves it to the server."""
        return self.thinking if self.thinking is not None else self.enable_thinking

    def others(self) -> dict[str, Any]:
        """The variables besides the switch."""
        return dict(self.model_extra or {})


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    chat_template_kwargs: TemplateKwargs | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool = False  # each answer token's log-probability, in the chat format
    top_logprobs: TopLogprobs | None = None  # alternatives per token; needs logprobs

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # BOS first; default: yes for a prompt, no for messages (their
    add_generation_prompt: bool = True  # template writes its own BOS)
    chat_template_kwargs: TemplateKwargs | None = None  # with messages: as in a chat request
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (text) or 'messages' (a chat)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
