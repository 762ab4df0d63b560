"""Exceptions raised for bad user input and for cancelled work."""


class DCEPKInputError(ValueError):
    """Input that cannot be processed. The message names the problem and what to do about it."""


class JobCancelledError(RuntimeError):
    """Raised inside a running job when the user asked to cancel it."""
