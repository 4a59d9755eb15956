"""Conversations to prompt text: the tokenizer's chat template, or DeepSeek-V3's own format.

A `chat_template` in tokenizer_config.json (which `dsv3.tokenizer.Tokenizer` keeps as `.config`) is a
Jinja2 template (the Hugging Face convention); it is
rendered in a sandbox with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`. Without one,
DeepSeek-V3's format is used:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsv3.errors import Dsv3Error
from dsv3.tokenizer import ASSISTANT, BOS, EOS, USER

ROLES = ("system", "user", "assistant")


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


class ChatTemplate:
    """Renders a list of {"role", "content"} messages into the text the model continues."""

    def __init__(self, template: str | None = None, bos_token: str = BOS, eos_token: str = EOS):
        self.source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._compiled = _compile(template) if template else None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ChatTemplate:
        """The template of a tokenizer_config.json (`tokenizer.config`), or DeepSeek-V3's format when it has
        none. A list of named templates (another Hugging Face spelling) gives its "default" one."""
        template = config.get("chat_template")
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") ==
                             "default"), None)
        if template is not None and not isinstance(template, str):
            raise Dsv3Error("chat_template in tokenizer_config.json must be a string (a Jinja2 template)")
        return cls(template, _token(config.get("bos_token")) or BOS, _token(config.get("eos_token")) or EOS)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text; ValueError (one sentence) when the messages are malformed, the template fails on
        them, however it fails, or renders nothing."""
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"each message needs a role in {ROLES} and a string content, got {m!r}")
        if self._compiled is None:
            return deepseek_v3_format(messages, add_generation_prompt)
        try:
            text = self._compiled.render(
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
