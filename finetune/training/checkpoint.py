"""Checkpoints (``last.pt``, ``best.pt``): saving, and loading with a format check.

Format 2 keeps the training state (epoch, step, metrics so far: ``epoch.TrainState``) under ``train_state`` and
the run's random state under ``rng["torch"]``; format 1 (finetune 0.1.0 before the rename) called the training
state ``progress`` and also saved Python's random state, which nothing drew from. Both load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.models.arch import fill_preprocessing, get_arch
from finetune.models.weights import served_state_dict
from finetune.utils.files import atomic_write, safe_load

FORMAT = 2
TRAIN_STATE = "train_state"  # the key of the training state


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a finetune checkpoint (``last.pt``/``best.pt``) safely, in the current format."""
    checkpoint = safe_load(path, "checkpoint")
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        written = checkpoint.get("format")
        if written == 1:
            return _from_format_1(checkpoint)
        if written == FORMAT:
            return checkpoint
        if isinstance(written, int) and written > FORMAT:
            from finetune import __version__

            raise FinetuneError(f"{path} was written by a newer finetune (checkpoint format {written}); finetune "
                                f"{__version__} reads formats 1 to {FORMAT}. Upgrade finetune to use it.")
    raise FinetuneError(f"{path} is not a finetune checkpoint (last.pt or best.pt from a run directory).")


def _from_format_1(checkpoint: dict[str, Any]) -> dict[str, Any]:
    upgraded = {key: value for key, value in checkpoint.items() if key != "progress"}
    upgraded.update(format=FORMAT, **{TRAIN_STATE: checkpoint.get("progress")})
    return upgraded


def restore_model(checkpoint: dict[str, Any]) -> tuple[nn.Module, list[str], Config]:
    """The model of a loaded checkpoint with the weights it serves (the raw ones, or the EMA's:
    ``models.weights.served_state_dict``), in eval mode, its class names and its run's config.

    Raises what validating the config, building the model or loading its weights raises (a damaged or foreign file).
    """
    classes = [str(name) for name in checkpoint["classes"]]
    config = saved_config(checkpoint["config"])
    model = get_arch(config.model.arch).build(len(classes), config.data.image_size)
    model.load_state_dict(served_state_dict(checkpoint))  # the raw weights, or the EMA's (train.ema.use_for)
    return model.eval(), classes, config


def saved_config(saved: dict[str, Any]) -> Config:
    """The config a checkpoint or an export carries, with its preprocessing filled in. One saved before
    ``data.resize_size`` existed resized images to the crop size itself (no margin) and keeps doing so; its other
    preprocessing (bilinear, ImageNet's mean and std) was ResNet's, what the fill gives it."""
    data = saved.get("data") or {}
    if "resize_size" not in data:
        saved = {**saved, "data": {**data, "resize_size": data.get("image_size")}}
    return fill_preprocessing(Config.model_validate(saved))
