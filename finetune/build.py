"""Config -> a ready model: weights, head, freeze plan and BatchNorm modes.

``train``, ``freeze-report`` and ``inspect-grads`` all build through here, so what
the reports show is exactly what training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from finetune.config import Config, config_error
from finetune.freeze import Decision, apply_plan, batchnorm_modes, plan_freeze
from finetune.model import WeightsInfo, build_model
from finetune.optim import check_patterns as check_lr_patterns


@dataclass
class Built:
    model: nn.Module
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
    """Build the model the config describes, frozen as the config's rules say for (1-based) ``epoch``."""
    num_classes = resolve_num_classes(config, class_names)
    names = _parameter_names(num_classes)
    plan = plan_freeze(names, config.freeze, config.where, epoch)  # before loading weights: fail fast
    problems = check_lr_patterns(names, config.optim)
    problems += [(f"freeze.stages[{i}].epoch", f"is {stage.epoch} but train.epochs is {config.train.epochs}: "
                  "the stage would never start") for i, stage in enumerate(config.freeze.stages)
                 if stage.epoch > config.train.epochs]
    if problems:
        raise config_error(config, problems)
    if not any(decision.trainable for decision in plan.values()):
        raise _nothing_to_train(config)
    model, weights = build_model(config, num_classes, progress=progress)
    apply_plan(model, plan)
    return Built(model, plan, batchnorm_modes(model, plan, config.freeze.batchnorm), weights, num_classes)


def _nothing_to_train(config: Config):
    freeze = config.freeze
    rules = f"freeze.trainable is {freeze.trainable}"
    if freeze.frozen:
        rules += f", freeze.frozen is {freeze.frozen}"
    return config_error(config, [("freeze.trainable", f"no parameter is trainable ({rules} and freeze.default is "
                                  f"{freeze.default!r}), so there is nothing to train. Add patterns to "
                                  "freeze.trainable (e.g. [fc] for the head only) or set freeze.default: "
                                  "trainable")])


def _parameter_names(num_classes: int) -> list[str]:
    import torch
    from torchvision.models import resnet18

    with torch.device("meta"):  # names only: no memory, no initialisation
        return [name for name, _ in resnet18(num_classes=num_classes).named_parameters()]
