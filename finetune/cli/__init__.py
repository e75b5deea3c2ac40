"""The ``finetune`` command line: commands (``app``), tables and JSON (``render``), live training output (``live``).

Only the CLI prints errors; the library raises :class:`finetune.errors.FinetuneError`.
"""

from finetune.cli.app import app, main

__all__ = ["app", "main"]
