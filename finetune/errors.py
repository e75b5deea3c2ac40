"""The one exception type the library raises; only the CLI prints it."""


class FinetuneError(Exception):
    """A problem the user can fix (exit code 2) or a check that failed (exit code 1).

    The message is complete and user-facing: it names the file, key or path at
    fault and says how to fix it.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
