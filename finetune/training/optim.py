"""The optimizer (SGD + momentum, or AdamW, over the trainable parameters only), learning rates per parameter, the
schedule.

Each trainable parameter gets a learning rate: from the most specific matching
``optim.param_groups`` pattern, else ``optim.lr * optim.layer_lr_decay ** depth``
(depth 0 for the head, growing towards the input: see ``arch``) when the decay is set, else
``optim.lr``. Parameters with the same learning rate and weight decay share one
param group; parameters unfrozen by a later stage join as new groups, with
fresh momentum (and AdamW moments). The schedule multiplies every group's own base rate.
"""

from __future__ import annotations

import math

import torch

from finetune.config.schema import OptimConfig
from finetune.errors import Problem
from finetune.models.arch import Arch
from finetune.models.freeze import matches, resolve, specificity


def learning_rate(name: str, optim: OptimConfig, arch: Arch) -> tuple[float, str]:
    """The base learning rate of parameter ``name`` and the rule that set it."""
    best = None
    for i, group in enumerate(optim.param_groups):
        for pattern in group.params:
            resolved = resolve(pattern, arch.head)
            if matches(resolved, name) and (best is None or specificity(resolved) > best[0]):
                best = (specificity(resolved), group.lr, f"optim.param_groups[{i}]: {pattern}")
    if best:
        return best[1], best[2]
    if optim.layer_lr_decay is not None:
        depth = arch.depth(name)
        return optim.lr * optim.layer_lr_decay ** depth, f"optim.lr * {optim.layer_lr_decay}^{depth}"
    return optim.lr, "optim.lr"


NORM_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)


def weight_decay(name: str, model: torch.nn.Module, optim: OptimConfig) -> float:
    """``optim.weight_decay``, or 0 for normalisation layers' weights and every bias with
    ``optim.no_decay_norm_bias``."""
    if optim.no_decay_norm_bias:
        module = model.get_submodule(name.rpartition(".")[0])
        if name.endswith(".bias") or isinstance(module, NORM_LAYERS):
            return 0.0
    return optim.weight_decay


def param_groups(model: torch.nn.Module, names: list[str], optim: OptimConfig, arch: Arch) -> list[dict]:
    """SGD param groups for the parameters ``names``: one per (learning rate, weight decay), in model order."""
    params = dict(model.named_parameters())
    groups: dict[tuple, dict] = {}
    for name in names:
        key = (learning_rate(name, optim, arch)[0], weight_decay(name, model, optim))
        group = groups.setdefault(key, {"params": [], "names": [], "lr": key[0], "initial_lr": key[0],
                                        "weight_decay": key[1]})
        group["params"].append(params[name])
        group["names"].append(name)
    return list(groups.values())


def problems(names: list[str], optim: OptimConfig, head: str) -> list[Problem]:
    """``optim.param_groups`` patterns that match no parameter of ``names`` (``head``: what the pattern ``head``
    means)."""
    return [Problem(f"optim.param_groups[{i}].params[{j}]", f"pattern {pattern!r} matches no parameter")
            for i, group in enumerate(optim.param_groups) for j, pattern in enumerate(group.params)
            if not any(matches(resolve(pattern, head), n) for n in names)]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, arch: Arch) -> torch.optim.Optimizer:
    """``optim.name`` (SGD or AdamW) receiving exactly the parameters with ``requires_grad=True`` (``arch`` gives
    layer depths)."""
    groups = param_groups(model, [n for n, p in model.named_parameters() if p.requires_grad], optim, arch)
    # fused: one pass over each parameter's value, gradient and state instead of one per operation. The same
    # update (within a rounding step), 2.5-3.5x faster: SGD 2.6 against 6.8-8.9 ms a step for ResNet-18, AdamW 5.9
    # against 22 ms (torch 2.14, 2-core Zen 4); 6% of a full ResNet-18 step at 32 px.
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay, fused=True)


def add_trainable(optimizer: torch.optim.Optimizer, model: torch.nn.Module, names: list[str],
                  optim: OptimConfig, arch: Arch) -> None:
    """Newly unfrozen parameters join ``optimizer`` as new param groups (so with fresh momentum)."""
    for group in param_groups(model, names, optim, arch):
        optimizer.add_param_group(group)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, optim: OptimConfig) -> float:
    """The multiplier of the base learning rates for optimizer step ``step`` (counted from 0).

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


class Schedule:
    """Sets every param group's lr to its ``initial_lr`` times :func:`lr_factor`, once per optimizer step.

    Unlike torch's LRScheduler it also scales groups added after it was made.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int, steps_per_epoch: int):
        self.optimizer, self.optim, self.epochs, self.steps_per_epoch = optimizer, optim, epochs, steps_per_epoch
        self.steps = 0
        self.apply()

    def apply(self) -> None:
        factor = lr_factor(self.steps, self.steps_per_epoch, self.epochs, self.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.steps += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.apply()


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int, steps_per_epoch: int):
    return Schedule(optimizer, optim, epochs, steps_per_epoch)
