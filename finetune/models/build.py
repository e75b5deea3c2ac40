"""Config -> a ready model: weights, head, freeze plan and BatchNorm modes.

``train``, ``freeze-report``, ``inspect-grads`` and ``lr-find`` all build through
here, so what the reports show is exactly what training does. The config must have
passed ``training.validate.validate`` (which also uses :func:`problems`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from finetune.config.loading import raise_problems
from finetune.config.schema import Config
from finetune.errors import Problem
from finetune.models.arch import Arch, get_arch
from finetune.models.freeze import Decision, apply_plan, batchnorm_modes, plan_freeze
from finetune.models.weights import WeightsInfo, build_model


@dataclass
class Built:
    model: nn.Module
    arch: Arch
    plan: dict[str, Decision]
    bn_modes: dict[str, str]
    weights: WeightsInfo
    num_classes: int


def problems(config: Config, class_names: Optional[list[str]]) -> list[Problem]:
    """The head's size: ``model.num_classes`` against the classes of the data (``class_names``, None without
    data)."""
    wanted = config.model.num_classes
    if class_names is None:
        if wanted is None:
            return [Problem("model.num_classes", "is null and data.root is not set; set one of them "
                                                 "(e.g. --set model.num_classes=10)")]
        return []
    if len(class_names) < 2:
        return [Problem("data.root", f"{config.data.root} has {len(class_names)} class folder(s); at least 2 are "
                                     "needed")]
    if wanted is not None and wanted != len(class_names):
        return [Problem("model.num_classes", f"is {wanted} but the data in {config.data.root} has "
                                             f"{len(class_names)} classes ({', '.join(class_names[:6])}"
                                             f"{', ...' if len(class_names) > 6 else ''}); set it to "
                                             f"{len(class_names)} or null")]
    return []


def resolve_num_classes(config: Config, class_names: Optional[list[str]]) -> int:
    """``model.num_classes``, or the number of classes in the data when it is null; raises FinetuneError for the
    :func:`problems` of the head's size."""
    raise_problems(config, problems(config, class_names))
    return config.model.num_classes if class_names is None else len(class_names)


def build(config: Config, class_names: Optional[list[str]] = None, show_download: bool = True,
          epoch: int = 1) -> Built:
    """Build the model the config describes, frozen as the config's rules say for (1-based) ``epoch``.

    ``show_download``: show torchvision's download bar when pretrained weights must be fetched.
    """
    num_classes = resolve_num_classes(config, class_names)
    arch = get_arch(config.model.arch)
    model, weights = build_model(config, num_classes, show_download=show_download)
    plan = plan_freeze([name for name, _ in model.named_parameters()], config.freeze, epoch)
    apply_plan(model, plan)
    return Built(model, arch, plan, batchnorm_modes(model, plan, config.freeze.batchnorm), weights, num_classes)
