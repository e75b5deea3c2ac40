"""Seeded random draws that any thread may make: augmentation in the decode threads, mixing in the training loop.

torchvision's random transforms (and MixUp/CutMix) draw from torch's one process-wide CPU generator. To make a draw
a function of its own seed, whichever thread makes it, :func:`seeded` holds a lock, seeds the generator, and puts
its state back afterwards: the draws of two threads never interleave, and the process's own stream (saved in
``last.pt``) is left as it was.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_GENERATOR = threading.Lock()  # held while a thread draws from torch's CPU generator under its own seed


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from integers (e.g. seed, epoch, index): no two tuples of small integers alike."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 25)  # the largest 63-bit prime: a seed torch accepts
    return value


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU generator seeded by ``seed``, alone among threads; its state is restored.

    Only the CPU generator: ``torch.manual_seed`` would also queue a seed for every lazy accelerator module
    (CUDA, XPU, MTIA), formatting a stack trace for each, about 1 ms a call.
    """
    with _GENERATOR, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def generator_state() -> torch.Tensor:
    """torch's CPU generator state as the process left it (never a state :func:`seeded` holds for a moment)."""
    with _GENERATOR:
        return torch.get_rng_state()


def set_generator_state(state: torch.Tensor) -> None:
    """Set torch's CPU generator state, never while :func:`seeded` holds it."""
    with _GENERATOR:
        torch.set_rng_state(state)
