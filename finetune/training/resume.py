"""Continuing a run from its ``last.pt``: the same process count, then its weights, optimizer, schedule, random
state and training state, exactly as saved."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from finetune.errors import FinetuneError
from finetune.training.checkpoint import TRAIN_STATE
from finetune.training.ema import WeightEMA
from finetune.training.epoch import TrainState
from finetune.training.optim import Schedule
from finetune.training.rng import RunRNG


def check_world(saved: dict, path: Path, world: int) -> None:
    """A run resumes with as many processes as it was saved with: its data shards and batches depend on them."""
    if saved.get("world", 1) != world:
        raise FinetuneError(f"{path} was written by a run of {saved.get('world', 1)} process(es); resume it with the "
                            f"same number (now {world}).")


def restore(saved: dict, model: nn.Module, optimizer, schedule: Schedule, rng: RunRNG,
            ema: Optional[WeightEMA] = None) -> TrainState:
    """Load the state of ``saved`` (a checkpoint) into the run's objects (and the weight ``ema``'s); returns where
    the run was.

    The optimizer must already hold the param groups it was saved with (the freeze stages started by then).
    """
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    rng.load_state_dict(saved["rng"])
    if ema is not None:
        ema.load_state_dict(saved["ema"])
    return TrainState(**saved[TRAIN_STATE])
