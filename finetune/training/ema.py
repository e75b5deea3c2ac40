"""Weight EMA (``train.ema``): an exponential moving average of the weights, updated after every step.

Built on torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``. With ``use_buffers=True`` (as timm's ModelEmaV3
averages the whole state) the BatchNorm running statistics are averaged like the weights, so the EMA model needs no
extra pass over the data (``update_bn``) before it is evaluated. Frozen tensors stay bit-identical: the average of
a tensor that never changes is that tensor (``torch.lerp`` of equal values).

Which weights a checkpoint *serves* (best.pt, export, evaluate, predict) follows ``train.ema.use_for``: ``raw``,
``ema``, or ``best``: whichever scored higher on validation in that epoch (the raw model on a tie).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from finetune.config.schema import EmaConfig


def warm_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))`` with warmup
    (TensorFlow's ExponentialMovingAverage with num_updates), so early averages forget the random start."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class WeightEMA:
    """The EMA copy of a model; :meth:`update` after each optimizer step."""

    def __init__(self, model: nn.Module, ema: EmaConfig):
        self.config = ema
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.eval()

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        get_ema_multi_avg_fn(warm_decay(self.config.decay, int(updates), self.config.warmup))(averaged, current,
                                                                                             updates)

    @property
    def module(self) -> nn.Module:
        """The averaged model (in eval mode), shaped as the trained one."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def served(ema: Optional[EmaConfig], score: Optional[float], ema_score: Optional[float]) -> str:
    """``"ema"`` or ``"raw"``: the weights an epoch's checkpoint serves, by ``train.ema.use_for`` (``best``: the
    higher validation score, the raw weights on a tie or when a score is undefined)."""
    if ema is None or ema.use_for == "raw" or ema_score is None:
        return "raw"
    if ema.use_for == "ema":
        return "ema"
    return "ema" if score is not None and ema_score > score else "raw"


def ema_row(row: dict, score: str) -> dict:
    """The weight EMA's validation loss and ``score`` (val_acc, or val_map) from its epoch row, as ``ema_`` keys."""
    return {f"ema_{key}": row[key] for key in ("val_loss", score)}
