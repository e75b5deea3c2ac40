"""Checkpoints (``last.pt``, ``best.pt``): saving, loading with a format check, and the RNG states they hold."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.models.arch import get_arch
from finetune.utils.files import atomic_write, safe_load

FORMAT = 1


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a finetune checkpoint (``last.pt``/``best.pt``) safely."""
    checkpoint = safe_load(path, "checkpoint")
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        written = checkpoint.get("format")
        if written == FORMAT:
            return checkpoint
        if isinstance(written, int) and written > FORMAT:
            from finetune import __version__

            raise FinetuneError(f"{path} was written by a newer finetune (checkpoint format {written}); finetune "
                                f"{__version__} reads format {FORMAT}. Upgrade finetune to use it.")
    raise FinetuneError(f"{path} is not a finetune checkpoint (last.pt or best.pt from a run directory).")


def restore_model(checkpoint: dict[str, Any]) -> tuple[nn.Module, list[str], Config]:
    """The model of a loaded checkpoint with its weights, in eval mode, its class names and its run's config.

    Raises what validating the config, building the model or loading its weights raises (a damaged or foreign file).
    """
    classes = [str(name) for name in checkpoint["classes"]]
    config = Config.model_validate(checkpoint["config"])
    model = get_arch(config.model.arch).build(len(classes))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), classes, config
