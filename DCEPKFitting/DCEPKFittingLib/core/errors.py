"""Exceptions raised for bad user input and for cancelled work, and how messages name settings."""

import contextlib
import contextvars


class DCEPKInputError(ValueError):
    """Input that cannot be processed. The message names the problem and what to do about it."""


class DCEPKOutputError(DCEPKInputError):
    """An output that cannot be written (full disk, read-only folder, existing file); nothing was changed."""


class JobCancelledError(RuntimeError):
    """Raised inside a running job when the user asked to cancel it."""


_COMMAND_LINE = contextvars.ContextVar("dcepk_command_line", default=False)


def setting(option: str, argument: str) -> str:
    """Name a setting as its user knows it: the option alone (``--overwrite``) while a ``dcepk``
    command runs, else the Python argument with the option (``overwrite=True (--overwrite)``)."""
    return option if _COMMAND_LINE.get() else f"{argument} ({option})"


@contextlib.contextmanager
def command_line_terms():
    """Within this block, messages name settings by their command-line options (see ``setting``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)
