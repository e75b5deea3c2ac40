"""Config -> a ready model: weights, head, freeze plan and BatchNorm modes.

``train``, ``freeze-report``, ``inspect-grads`` and ``lr-find`` all build through
here, so what the reports show is exactly what training does. Every config problem
that needs the model's parameter names (or the process count) is found here and
reported together, before any weights are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from finetune.config.loading import config_error
from finetune.config.schema import Config
from finetune.models.arch import Arch, get_arch
from finetune.models.fastpath import cache_problems
from finetune.models.freeze import (
    Decision,
    apply_plan,
    batchnorm_modes,
    check_patterns,
    plan_freeze,
)
from finetune.models.weights import WeightsInfo, build_model
from finetune.training.losses import problems as imbalance_problems
from finetune.training.optim import check_patterns as check_lr_patterns
from finetune.utils.hardware import select_device


@dataclass
class Built:
    model: nn.Module
    arch: Arch
    plan: dict[str, Decision]
    bn_modes: dict[str, str]
    weights: WeightsInfo
    num_classes: int


def resolve_num_classes(config: Config, class_names: Optional[list[str]]) -> int:
    """``model.num_classes``, or the number of classes in the data when it is null."""
    wanted = config.model.num_classes
    if class_names is None:
        if wanted is None:
            raise config_error(config, [("model.num_classes", "is null and data.root is not set; set one of them "
                                         "(e.g. --set model.num_classes=10)")])
        return wanted
    if len(class_names) < 2:
        raise config_error(config, [("data.root", f"{config.data.root} has {len(class_names)} class folder(s); "
                                     "at least 2 are needed")])
    if wanted is not None and wanted != len(class_names):
        raise config_error(config, [("model.num_classes", f"is {wanted} but the data in {config.data.root} has "
                                     f"{len(class_names)} classes ({', '.join(class_names[:6])}"
                                     f"{', ...' if len(class_names) > 6 else ''}); set it to {len(class_names)} "
                                     "or null")])
    return len(class_names)


def build(config: Config, class_names: Optional[list[str]] = None, progress: bool = True, epoch: int = 1) -> Built:
    """Build the model the config describes, frozen as the config's rules say for (1-based) ``epoch``.

    Raises FinetuneError listing every config problem at once (see :func:`config_problems`).
    """
    num_classes = resolve_num_classes(config, class_names)
    arch = get_arch(config.model.arch)
    skeleton = arch.skeleton(num_classes, config.data.image_size)
    problems = config_problems(config, arch, skeleton, num_classes)
    if problems:
        raise config_error(config, problems)
    plan = plan_freeze([name for name, _ in skeleton.named_parameters()], config.freeze, epoch, head=arch.head)
    if not any(decision.trainable for decision in plan.values()):
        raise _nothing_to_train(config)
    model, weights = build_model(config, num_classes, progress=progress)
    apply_plan(model, plan)
    return Built(model, arch, plan, batchnorm_modes(model, plan, config.freeze.batchnorm), weights, num_classes)


def config_problems(config: Config, arch: Arch, skeleton: nn.Module, num_classes: int) -> list[tuple[str, str]]:
    """Every ``(key, message)`` problem the schema cannot see: patterns that match no parameter, stages that never
    start, a global batch that does not divide among the processes (WORLD_SIZE), class weights of the wrong
    length, and rules that depend on the freeze plan. ``skeleton`` is the model on the meta device."""
    names = [name for name, _ in skeleton.named_parameters()]
    alias = f" (and `head` for {arch.head})" if arch.head != "head" else ""
    stages = f"; {arch.title} has {', '.join(arch.stage_names)}{alias}"
    problems = check_patterns(names, config.freeze, head=arch.head, stages=stages)
    problems += check_lr_patterns(names, config.optim, arch.head)
    problems += imbalance_problems(config, num_classes)
    problems += [(f"freeze.stages[{i}].epoch", f"is {stage.epoch} but train.epochs is {config.train.epochs}: "
                  "the stage would never start") for i, stage in enumerate(config.freeze.stages)
                 if stage.epoch > config.train.epochs]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.train.batch_size % world:
        problems.append(("train.batch_size", f"{config.train.batch_size} is the global batch and must divide "
                         f"evenly among {world} processes"))
    if world > 1 and config.train.sync_batchnorm and select_device(config.train.device,
                                                                    torch.cuda.is_available()) != "cuda":
        problems.append(("train.sync_batchnorm", "needs CUDA (torch's SyncBatchNorm has no CPU implementation); "
                         "keep BatchNorm layers frozen in eval mode instead"))
    plan = plan_freeze(names, config.freeze, epoch=1, head=arch.head)  # patterns that match nothing decide nothing
    problems += cache_problems(config, arch, skeleton, plan, batchnorm_modes(skeleton, plan, config.freeze.batchnorm))
    return problems


def _nothing_to_train(config: Config):
    freeze = config.freeze
    rules = f"freeze.trainable is {freeze.trainable}"
    if freeze.frozen:
        rules += f", freeze.frozen is {freeze.frozen}"
    return config_error(config, [("freeze.trainable", f"no parameter is trainable ({rules} and freeze.default is "
                                  f"{freeze.default!r}), so there is nothing to train. Add patterns to "
                                  "freeze.trainable (e.g. [head] for the head only) or set freeze.default: "
                                  "trainable")])
