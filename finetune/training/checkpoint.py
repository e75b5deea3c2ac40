"""Checkpoints (``last.pt``, ``best.pt``): saving, loading with a format check, and the RNG states they hold."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.utils.files import atomic_write, safe_load
from finetune.utils.seeding import generator_state

FORMAT = 1


def rng_states() -> dict[str, Any]:
    return {"torch": generator_state(), "python": random.getstate()}


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
