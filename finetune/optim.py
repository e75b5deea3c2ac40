"""The optimizer (SGD + momentum over the trainable parameters only) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from finetune.config import OptimConfig


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    """SGD that receives exactly the parameters with ``requires_grad=True``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, optim: OptimConfig) -> float:
    """The multiplier of ``optim.lr`` for optimizer step ``step`` (counted from 0).

    Linear warm-up over ``optim.warmup_epochs`` (never a zero first step), then
    constant, step or cosine decay over the remaining epochs.
    """
    warmup_steps = min(optim.warmup_epochs, epochs) * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step / steps_per_epoch
    if optim.schedule == "step":
        return optim.gamma ** (int(epoch) // optim.step_size)
    if optim.schedule == "cosine":
        done = (step - warmup_steps) / max(epochs * steps_per_epoch - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step, following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, epochs, optim))
