"""Errors meant for people: one sentence naming the thing that is wrong and what to do.

The CLI turns any `Dsv3Error` into that sentence on stderr and exit code 2, without a traceback.
`InvalidValue` names the field and the value; the CLI says it with the flag that set the field.
"""

from __future__ import annotations

from typing import Any


class Dsv3Error(Exception):
    """Bad input from the user: a wrong path, a malformed file, an invalid value."""


class ConfigError(Dsv3Error, ValueError):
    """A model configuration value that is invalid or contradicts another one."""


class CheckpointError(Dsv3Error):
    """A checkpoint that is missing, truncated, or does not match the model."""


class InvalidValue(Dsv3Error, ValueError):
    """`field` (a library argument or option, by its Python name) cannot take `value`, for the reason `why`."""

    def __init__(self, field: str, value: Any, why: str):
        self.field, self.value, self.why = field, value, why
        super().__init__(f"{field}={value!r} {why}")

    def as_flag(self, flag: str) -> str:
        """The same sentence in terms of a command-line flag: `--max-len 0 must be at least 2`."""
        value = self.value if isinstance(self.value, (int, float)) and not isinstance(self.value, bool) else repr(
            self.value)
        return f"{flag} {value} {self.why}"
