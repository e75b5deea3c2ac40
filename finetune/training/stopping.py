"""How a run stops before its last epoch: early stopping, the time limit, and SIGINT/SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.training.epoch import TrainState


def early_stopping(config: Config, state: TrainState, row: dict) -> None:
    """Count an epoch (its metrics ``row``) against ``train.early_stopping``; stop the run when its patience is
    spent before the last epoch. ``state`` has already counted the epoch."""
    rule = config.train.early_stopping
    if rule is None:
        return
    value = row[rule.monitor]  # None or NaN when undefined (e.g. an empty val split): no improvement
    sign = -1 if rule.monitor == "val_loss" else 1  # loss improves downwards
    defined = value is not None and not math.isnan(value)
    if defined and (state.monitor_best is None or sign * (value - state.monitor_best) > rule.min_delta):
        state.monitor_best, state.epochs_without_improvement = value, 0
    else:
        state.epochs_without_improvement += 1
    waited = state.epochs_without_improvement
    if waited and waited >= rule.patience and state.epoch < config.train.epochs:
        state.stopped = "early_stopping"


def after_resume(state: TrainState, saved_config: dict, config: Config, run_dir: Path) -> Optional[str]:
    """Whether a resumed run that had stopped stays stopped: a run early stopping ended stays finished unless
    ``train.epochs`` or the patience was raised; one the time limit stopped goes on. Sets ``state.stopped`` and
    returns what to tell the user."""
    stopped, state.stopped = state.stopped, None
    if stopped != "early_stopping":
        return None
    before = saved_config["train"]
    patience = (before.get("early_stopping") or {}).get("patience")
    now = config.train.early_stopping
    if config.train.epochs > before["epochs"] or (now and patience is not None and now.patience > patience):
        return (f"continuing a run that stopped early at epoch {state.epoch}: train.epochs or the patience was "
                "raised")
    state.stopped = stopped
    return (f"nothing to do: {run_dir} is finished, early stopping ended it at epoch {state.epoch} "
            f"({state.epochs_without_improvement} epochs without improvement). To train on, raise train.epochs or "
            "train.early_stopping.patience (--set ...) and resume again.")


def out_of_time(started: float, limit_min: Optional[float]) -> bool:
    """Whether ``train.time_limit_min`` has passed since ``started`` (a ``time.perf_counter()``)."""
    return limit_min is not None and time.perf_counter() - started > limit_min * 60


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal stops at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: die at once, as by default (atomic writes keep files whole)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def interrupted(signum: Optional[int], epoch: int, step: int, run_dir: Path) -> FinetuneError:
    """The error of a run stopped by a signal in (0-based) ``epoch`` after ``step`` steps: exit code 128 + signal."""
    name = signal.Signals(signum).name if signum else "signal"
    return FinetuneError(f"Interrupted by {name} at epoch {epoch + 1}, step {step}: saved {run_dir / 'last.pt'} "
                         f"and the metrics so far.\nResume with: finetune train --resume {run_dir}",
                         exit_code=128 + (signum or 2))
