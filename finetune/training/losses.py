"""The training loss and imbalanced classes: class counts, loss weights (``train.class_weights``), sampling weights
(``data.sampler: balanced``) and the warning at the start of training.

Pure functions of the training targets (one class index per image; multi-hot rows for ``model.task: multilabel``,
whose loss is :class:`~finetune.training.multilabel.BinaryLoss`), so the engine, ``lr-find`` and the tests compute the
very same numbers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from finetune.errors import Problem
from finetune.training import multilabel

IMBALANCE_RATIO = 3  # warn when the largest class has at least this many times the images of the smallest


def class_counts(targets: Sequence[int], num_classes: int) -> list[int]:
    """Images per class."""
    counts = [0] * num_classes
    for target in targets:
        counts[target] += 1
    return counts


def class_weights(setting, targets: Sequence[int], num_classes: int) -> Optional[torch.Tensor]:
    """The cross-entropy class weights ``train.class_weights`` asks for, or None for an unweighted loss.

    ``balanced``: inverse class frequency, normalised to mean 1 over the classes (so the
    loss keeps its scale and ``optim.lr`` its meaning); a list is used as given.
    """
    if setting == "none":
        return None
    if setting == "balanced":
        inverse = [1 / max(count, 1) for count in class_counts(targets, num_classes)]
        return torch.tensor(inverse, dtype=torch.float32) * (num_classes / sum(inverse))
    return torch.tensor([float(w) for w in setting], dtype=torch.float32)


def training_loss(config, targets: Sequence, num_classes: int, device="cpu") -> torch.nn.Module:
    """The loss training computes: cross-entropy with ``train.class_weights`` (on ``device``, beside the logits) and
    ``train.label_smoothing``; for ``model.task: multilabel`` binary cross-entropy with a ``pos_weight`` per label
    instead (``multilabel.BinaryLoss``). ``lr-find`` sweeps the same loss."""
    if config.model.task == "multilabel":
        weights = multilabel.pos_weights(config.train.class_weights, targets, num_classes)
        return multilabel.BinaryLoss(weights, config.train.label_smoothing).to(device)
    weights = class_weights(config.train.class_weights, targets, num_classes)
    return torch.nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                     label_smoothing=config.train.label_smoothing)


def validation_loss(config) -> torch.nn.Module:
    """The loss reported on validation images: the training loss without class weights, so that runs compare."""
    if config.model.task == "multilabel":
        return multilabel.BinaryLoss(smoothing=config.train.label_smoothing)
    return torch.nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)


def sampling_weights(setting: str, targets: Sequence[int], num_classes: int) -> Optional[torch.Tensor]:
    """Per-image sampling weights for ``data.sampler``: None for ``shuffle`` (every image once per epoch);
    for ``balanced`` 1 / (images of its class), so that every class is drawn equally often."""
    if setting == "shuffle":
        return None
    counts = class_counts(targets, num_classes)
    return torch.tensor([1 / counts[t] for t in targets], dtype=torch.float64)


def imbalance_warning(targets: Sequence[int], classes: list[str]) -> Optional[str]:
    """A warning naming the largest and smallest class when they differ by ``IMBALANCE_RATIO``x or more."""
    counts = class_counts(targets, len(classes))
    large, small = max(range(len(classes)), key=counts.__getitem__), min(range(len(classes)), key=counts.__getitem__)
    if counts[large] < IMBALANCE_RATIO * max(counts[small], 1):
        return None
    ratio = counts[large] / max(counts[small], 1)
    return (f"imbalanced classes: {classes[large]!r} has {counts[large]} training images, {classes[small]!r} "
            f"{counts[small]} ({ratio:.1f}x). A model can score well by favouring the large classes; consider "
            "--set train.class_weights=balanced (weights the loss by inverse class frequency) or "
            "--set data.sampler=balanced (draws every class equally often), and judge by balanced accuracy "
            "and macro F1 (val_balanced_acc, val_macro_f1; finetune evaluate).")


def problems(config, num_classes: int) -> list[Problem]:
    """Config problems that need the number of classes: a ``train.class_weights`` list must hold one weight per
    class."""
    weights = config.train.class_weights
    if isinstance(weights, list) and len(weights) != num_classes:
        return [Problem("train.class_weights", f"has {len(weights)} weights but there are {num_classes} classes; give "
                 f"one positive weight per class (in the sorted order of the class folders), or use balanced")]
    return []
