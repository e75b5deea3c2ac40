"""One validation, before any work: every problem of a config, reported at once.

:func:`validate` asks each concern's checker (each is called ``problems`` and returns a list of
:class:`~finetune.errors.Problem`): the data's root and layout, the head's size against the classes, the
architecture and weights names and the image sizes the model takes, the freeze rules and stages, the param-group
patterns, the feature cache's rules, the device, the global batch against the processes, the class weights, a
validation split big enough for ``train.calibrate``, the keys that depend on ``model.task``, and the packages of the
trackers ``train.loggers`` names. It reads folder listings, label files and the model's structure on the meta
device, never an image or a weight, and raises one FinetuneError that names every key at fault with the file and
line that set it. Schema problems (unknown keys, wrong types) come first, all together, from
``config.loading.load_config``: without them there is no config to check further.
"""

from __future__ import annotations

from typing import Optional

import torch

from finetune.config.loading import raise_problems
from finetune.config.schema import Config
from finetune.data import folders
from finetune.errors import Problem
from finetune.models import arch, build, fastpath, freeze
from finetune.training import calibration, losses, multilabel, optim, tracking
from finetune.utils import distributed, hardware


def validate(config: Config, *, data_needed_by: Optional[str] = None, processes: Optional[int] = None) -> None:
    """Raise one FinetuneError (exit code 2) listing every problem of ``config``; see the module docstring.

    First the preprocessing keys the config leaves null are set to the weights' own (``models.arch``), so that
    everything after (and the run directory) sees the sizes actually used.

    ``data_needed_by``: the command that trains on ``data.root`` (e.g. ``lr-find``), which must then be set.
    ``processes``: the number of training processes about to be launched (default: this process's world size).
    """
    raise_problems(config, problems(config, data_needed_by, processes))


def problems(config: Config, data_needed_by: Optional[str] = None,
             processes: Optional[int] = None) -> list[Problem]:
    """Every problem :func:`validate` reports, in the order of the config's sections."""
    arch.fill_preprocessing(config)
    found = _data_problems(config, data_needed_by)
    classes = None if found else folders.data_classes(config)
    if not found:
        found += build.problems(config, classes)
        if classes is not None:
            found += calibration.problems(config)
    num_classes = len(classes) if classes else config.model.num_classes
    arch_problems = arch.problems(config)
    found += arch_problems
    if not arch_problems:
        found += _model_problems(config, num_classes)
    if num_classes is not None:
        found += losses.problems(config, num_classes)
    found += multilabel.problems(config)
    device_problems = hardware.problems(config.train.device, torch.cuda.is_available())
    found += device_problems
    if not device_problems:
        device = hardware.select_device(config.train.device, torch.cuda.is_available())
        found += distributed.problems(config.train.batch_size, config.train.sync_batchnorm, device, processes)
    return found + tracking.problems(config)


def _data_problems(config: Config, data_needed_by: Optional[str]) -> list[Problem]:
    if config.data.root is None and data_needed_by:
        return [Problem("data.root", f"is not set; {data_needed_by} trains on the training images, so give an "
                                     "ImageFolder tree (e.g. --set data.root=data/shapes)")]
    return folders.problems(config)


def _model_problems(config: Config, num_classes: Optional[int]) -> list[Problem]:
    """Freeze rules and stages, param-group patterns and the feature cache, checked on the model's skeleton."""
    description = arch.get_arch(config.model.arch)
    # Parameter names do not depend on the head's size (ViT's position embeddings do on the image size).
    skeleton = description.skeleton(num_classes or 2, config.data.image_size)
    names = [name for name, _ in skeleton.named_parameters()]
    head = description.head
    alias = f" (and `head` for {head})" if head != "head" else ""
    stages = f"; {description.title} has {', '.join(description.stage_names)}{alias}"
    found = freeze.problems(names, config.freeze, config.train.epochs, head=head, stages=stages)
    found += optim.problems(names, config.optim, head)
    plan = freeze.plan_freeze(names, config.freeze, epoch=1, head=head)  # patterns that match nothing decide nothing
    bn_modes = freeze.batchnorm_modes(skeleton, plan, config.freeze.batchnorm)
    return found + fastpath.problems(config, description, skeleton, plan, bn_modes)
