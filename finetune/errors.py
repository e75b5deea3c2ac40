"""The one exception type the library raises (only the CLI prints it), and the config problems it reports."""

from typing import NamedTuple


class FinetuneError(Exception):
    """A problem the user can fix (exit code 2) or a check that failed (exit code 1).

    The message is complete and user-facing: it names the file, key or path at
    fault and says how to fix it.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Problem(NamedTuple):
    """One thing wrong with a config: the dotted key at fault (``freeze.trainable[1]``) and what is wrong with it.

    Every checker (each concern's ``problems(...)``) returns a list of these; ``validate`` reports them all at once,
    each with the file and line where its key was set.
    """

    key: str
    message: str


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters of message, for a user-facing error that wraps ``exc``."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
