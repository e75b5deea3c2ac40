"""The interface through which a run reports its progress; the CLI's reporters (``cli.live``) implement it."""

from __future__ import annotations

from rich.console import Console


class Reporter:
    """Silent: errors only (the CLI prints them). The base of the other reporters."""

    shows_progress = False

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.epochs = 0

    def start(self, *, config, **info) -> None:
        self.epochs = config.train.epochs

    def message(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass

    def epoch_start(self, epoch: int, run) -> None:
        """Called before (1-based) ``epoch`` trains, with the :class:`~finetune.training.run.Run` (for callbacks)."""

    def step(self, epoch: int, step: int, steps: int, loss: float, acc: float, lr: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, row: dict, improved: bool) -> None:
        pass

    def finish(self, summary: dict, history: list[dict]) -> None:
        pass

    def close(self) -> None:
        """Stop any live display (also after an error)."""
