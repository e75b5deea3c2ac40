"""The interface through which a run reports its progress; the CLI's reporters (``cli.live``) implement it."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console


@dataclass(frozen=True)
class EpochStart:
    """What a reporter is told as an epoch begins."""
    epoch: int  # 1-based
    epochs: int  # train.epochs
    steps: int  # training steps in the epoch (per process)
    lrs: tuple[float, ...]  # each optimizer param group's learning rate at the epoch's first step
    trainable: tuple[str, ...]  # the parameters that train in this epoch
    batchnorm_train: tuple[str, ...]  # the BatchNorm layers that update their statistics (train mode)
    frozen_prefix: tuple[str, ...]  # the stages that run without autograd (feature-cached when they can be)

    @classmethod
    def of(cls, epoch: int, epochs: int, steps: int, optimizer, model, frozen_prefix: list[str]) -> "EpochStart":
        """The record of ``model`` and ``optimizer`` as they are when (1-based) ``epoch`` begins."""
        from torch import nn

        return cls(epoch, epochs, steps, tuple(group["lr"] for group in optimizer.param_groups),
                   tuple(name for name, p in model.named_parameters() if p.requires_grad),
                   tuple(name for name, module in model.named_modules()
                         if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training),
                   tuple(frozen_prefix))


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

    def epoch_start(self, epoch: EpochStart) -> None:
        """Called before an epoch trains."""

    def step(self, epoch: int, step: int, steps: int, loss: float, acc: float, lr: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, row: dict, improved: bool) -> None:
        pass

    def finish(self, summary: dict, history: list[dict]) -> None:
        pass

    def close(self) -> None:
        """Stop any live display (also after an error)."""
