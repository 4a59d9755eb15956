"""Errors meant for people: one sentence naming the thing that is wrong and what to do.

The CLI turns any `Dsv3Error` into that sentence on stderr and exit code 2, without a traceback.
"""


class Dsv3Error(Exception):
    """Bad input from the user: a wrong path, a malformed file, an invalid value."""


class ConfigError(Dsv3Error, ValueError):
    """A model configuration value that is invalid or contradicts another one."""


class CheckpointError(Dsv3Error):
    """A checkpoint that is missing, truncated, or does not match the model."""
