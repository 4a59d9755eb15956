"""Conversations to prompt text: the tokenizer's chat template, or one of DeepSeek's own formats.

A `chat_template` in tokenizer_config.json (which `dsv3.tokenizer.Tokenizer` keeps as `.config`) is a
Jinja2 template (the Hugging Face convention); it is rendered in a sandbox with `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, and the caller's template variables (an API request's
`chat_template_kwargs`). Without one, a built-in format is used, chosen by name (`builtin`), never guessed
from the model:

- "v3", DeepSeek-V3's format (the default):

      <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>

- "v3.1", DeepSeek-V3.1's hybrid format: every assistant turn opens with `</think>` (non-thinking) and the
  prompt ends with `<｜Assistant｜></think>`, or with `<｜Assistant｜><think>` when thinking is switched on.
  Earlier turns keep only their answers (the text after `</think>`): the reasoning of one turn is never
  shown to the next. System prompts are joined by a blank line right after BOS.

The thinking switch is `render(..., thinking=True/False)`; a Jinja template receives it as both `thinking`
(DeepSeek-V3.1's name) and `enable_thinking` (Qwen3's, and the other spelling servers accept).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.tokenizer import ASSISTANT, BOS, EOS, THINK, THINK_END, USER

ROLES = ("system", "user", "assistant")
BUILTIN_FORMATS = ("v3", "v3.1")  # what a model without a Jinja template can be given (`builtin`)
# the names a template's own variables take: a caller's template_kwargs may not replace them
RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def deepseek_v3_format(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """DeepSeek-V3's chat format: system text right after BOS, each turn behind its role token, each answer
    closed by EOS, and a trailing Assistant token when the model is to answer next."""
    parts = [BOS]
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(USER + m["content"])
        else:
            parts.append(ASSISTANT + m["content"] + EOS)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def deepseek_v31_format(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                        thinking: bool = False) -> str:
    """DeepSeek-V3.1's hybrid format, as its tokenizer_config.json renders conversations without tools:
    all system prompts joined by a blank line after BOS; an Assistant token, then `</think>`, opens the answer
    that follows a user turn; an answer keeps only its text after the first `</think>` and ends with EOS; and
    after a user turn the prompt ends `<｜Assistant｜><think>` (thinking) or `<｜Assistant｜></think>`."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [BOS, system]
    after_user = False  # the Assistant token is written only where an answer follows a question
    for m in messages:
        if m["role"] == "user":
            parts.append(USER + m["content"])
            after_user = True
        elif m["role"] == "assistant":
            if after_user:
                parts.append(ASSISTANT + THINK_END)
            _, closed, answer = m["content"].partition(THINK_END)
            parts.append((answer if closed else m["content"]) + EOS)
            after_user = False
    if add_generation_prompt and after_user:
        parts.append(ASSISTANT + (THINK if thinking else THINK_END))
    return "".join(parts)


class ChatTemplate:
    """Renders a list of {"role", "content"} messages into the text the model continues: with the Jinja
    `template` when there is one, else with the built-in format named by `builtin` (BUILTIN_FORMATS)."""

    def __init__(self, template: str | None = None, bos_token: str = BOS, eos_token: str = EOS,
                 builtin: str = "v3"):
        if builtin not in BUILTIN_FORMATS:
            raise InvalidValue("builtin", builtin, f"is not a built-in chat format; choose one of "
                               f"{', '.join(BUILTIN_FORMATS)}")
        self.source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.builtin = builtin
        self._compiled = _compile(template) if template else None

    @classmethod
    def from_config(cls, config: dict[str, Any], builtin: str = "v3") -> ChatTemplate:
        """The template of a tokenizer_config.json (`tokenizer.config`), or the built-in format `builtin` when it
        has none. A list of named templates (another Hugging Face spelling) gives its "default" one."""
        template = config.get("chat_template")
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") ==
                             "default"), None)
        if template is not None and not isinstance(template, str):
            raise Dsv3Error("chat_template in tokenizer_config.json must be a string (a Jinja2 template)")
        return cls(template, _token(config.get("bos_token")) or BOS, _token(config.get("eos_token")) or EOS,
                   builtin=builtin)

    @property
    def name(self) -> str:
        """What renders: "the model's chat template", or the built-in format's name, for messages."""
        if self._compiled is not None:
            return "the model's chat template"
        return f"DeepSeek-{self.builtin.upper()}'s chat format"

    @property
    def has_thinking_switch(self) -> bool:
        """Whether `thinking=True` can mean something: V3.1's format has the switch, V3's has not; a Jinja
        template receives it and may use it (which cannot be known without rendering)."""
        return self._compiled is not None or self.builtin == "v3.1"

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
               thinking: bool | None = None, template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt text; ValueError (one sentence) when the messages are malformed, the template fails on
        them, however it fails, or renders nothing, or thinking is asked of a format without the switch.

        `thinking` None leaves the format's default (V3.1: off); `template_kwargs` are further variables for a
        Jinja template (the built-in formats have none to take)."""
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"each message needs a role in {ROLES} and a string content, got {m!r}")
        if thinking and not self.has_thinking_switch:
            raise ValueError(f"{self.name} has no thinking mode; DeepSeek-V3.1's format (builtin 'v3.1') has one")
        if self._compiled is None:
            if self.builtin == "v3.1":
                return deepseek_v31_format(messages, add_generation_prompt, thinking=bool(thinking))
            return deepseek_v3_format(messages, add_generation_prompt)
        variables = dict(template_kwargs or {})
        clash = next((k for k in RESERVED if k in variables), None)
        if clash is not None:
            raise ValueError(f"the template variable {clash!r} is the renderer's own and cannot be passed")
        if thinking is not None:
            variables.update(thinking=thinking, enable_thinking=thinking)
        try:
            text = self._compiled.render(
                **variables,
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as e:  # a template is code: it may fail in any way (it runs sandboxed)
            raise ValueError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None
        if not text:
            raise ValueError("the chat template rendered these messages as an empty prompt")
        return text


def _compile(template: str) -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise Dsv3Error("this model's chat template needs jinja2; install it with `pip install jinja2`") from None

    def raise_exception(message: str) -> None:  # templates call this to reject a conversation
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise Dsv3Error(f"the chat_template in tokenizer_config.json is not valid Jinja2 ({e})") from None


def _token(entry: Any) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None
