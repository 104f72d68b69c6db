"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class KdlabError(Exception):
    """Base class: bad input, named in the message."""


class ConfigError(KdlabError):
    """An unknown key, a wrong type or an out-of-range value in a config."""


class DataError(KdlabError):
    """A missing or malformed dataset file or directory."""


class RunError(KdlabError):
    """A run dir that cannot be used (unfinished teacher, corrupt checkpoint, ...)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what
    rank 0 tells the other ranks when it stops a run."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def warn(message: str) -> None:
    """A one-line warning on stderr (``kdlab: warning: ...``): something was repaired or
    will differ from what the user may expect, and the run goes on."""
    import sys

    print(f"kdlab: warning: {message}", file=sys.stderr, flush=True)
