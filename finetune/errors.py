"""The one exception type the library raises; only the CLI prints it."""


class FinetuneError(Exception):
    """A problem the user can fix (exit code 2) or a check that failed (exit code 1).

    The message is complete and user-facing: it names the file, key or path at
    fault and says how to fix it.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters of message, for a user-facing error that wraps ``exc``."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
