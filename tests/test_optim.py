"""The optimizer sees only trainable parameters; the learning-rate schedule (pure function)."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.config.schema import OptimConfig
from finetune.models.arch import get_arch
from finetune.training.optim import build_optimizer, build_scheduler, lr_factor

RESNET = get_arch("resnet18")


def test_optimizer_receives_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.5, nesterov=True, weight_decay=1e-4), RESNET)
    (group,) = optimizer.param_groups
    assert [p is q for p, q in zip(group["params"], model[1].parameters())] == [True, True]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.5, True, 1e-4)


def factors(steps_per_epoch=4, epochs=4, **optim):
    config = OptimConfig(**optim)
    return [lr_factor(step, steps_per_epoch, epochs, config) for step in range(steps_per_epoch * epochs)]


def test_constant_and_step_schedules():
    assert factors() == [1.0] * 16
    assert factors(schedule="step", step_size=2, gamma=0.5) == [1.0] * 8 + [0.5] * 8


def test_cosine_decays_from_one_towards_zero():
    values = factors(schedule="cosine")
    assert values[0] == 1.0 and values == sorted(values, reverse=True)
    assert values[8] == pytest.approx(0.5) and values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_warmup_is_linear_and_never_zero_then_the_schedule_runs():
    values = factors(schedule="cosine", warmup_epochs=1)
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[5] < 1.0


def test_scheduler_follows_the_factors():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.2), RESNET)
    scheduler = build_scheduler(optimizer, OptimConfig(lr=0.2, schedule="step", step_size=1, gamma=0.5), 3, 2)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.05])
