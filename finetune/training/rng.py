"""The run's own random stream, so that training never reseeds (or draws from) the caller's global one.

What a training step draws from torch's default generator (dropout, say) comes from the run's stream: seeded by
``train.seed``, swapped in around the steps and out again, and saved in ``last.pt`` so a resumed run draws the
same numbers. The data order, augmentations and the head's initialisation have generators of their own.
"""

from __future__ import annotations

import contextlib

import torch

from finetune.utils.seeding import generator_state, set_generator_state


class RunRNG:
    """The CPU generator state a run's steps draw from (``torch.get_rng_state`` format)."""

    def __init__(self, seed: int):
        self.state = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self):
        """Draw from the run's stream inside the block; the caller's global state is restored afterwards.

        The swaps go through ``utils.seeding``'s lock: decode threads that draw an image's augmentation under its
        own seed (``seeded``) may hold the generator at that moment, and must neither see nor leave this state.
        """
        caller = generator_state()
        set_generator_state(self.state)
        try:
            yield
        finally:
            self.state = generator_state()
            set_generator_state(caller)

    def state_dict(self) -> dict:
        return {"torch": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["torch"]
