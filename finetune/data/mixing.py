"""MixUp and CutMix: training batches mixed with themselves, labels turned into soft targets (``train.mixup``,
``train.cutmix``, ``train.mix_prob``).

As timm's ``Mixup`` does, each batch is mixed with probability ``mix_prob``, by MixUp or CutMix (either with equal
chance when both are on); the pairing is the batch and itself shifted by one, as torchvision's ``MixUp``/``CutMix``
pair them. Every batch gets soft targets (one row of class weights per image; one-hot when the batch is not mixed),
so that the loss is the same function in every step; multi-hot targets (``model.task: multilabel``) are mixed with
the images' weights. The draws are seeded by (seed, epoch, batch, process), so a
resumed run mixes exactly as the uninterrupted one did.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms import v2

from finetune.config.schema import TrainConfig
from finetune.utils.seeding import mix_seed, seeded


class Mixer:
    """Mixes (images, class indices) batches into (images, soft targets)."""

    def __init__(self, train: TrainConfig, num_classes: int, rank: int = 0):
        self.num_classes, self.seed, self.rank = num_classes, train.seed, rank
        ops = [op(alpha=alpha, num_classes=num_classes)
               for op, alpha in ((v2.MixUp, train.mixup), (v2.CutMix, train.cutmix)) if alpha is not None]
        self.transform = v2.RandomApply([v2.RandomChoice(ops)], p=train.mix_prob)

    @classmethod
    def from_config(cls, train: TrainConfig, num_classes: int, rank: int = 0) -> Optional["Mixer"]:
        """The mixer ``train`` asks for, or None when neither ``train.mixup`` nor ``train.cutmix`` is set."""
        if train.mixup is None and train.cutmix is None:
            return None
        return cls(train, num_classes, rank)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, batch: int):
        """Batch number ``batch`` of (0-based) ``epoch``, mixed or not as its seed draws; targets (N, classes).

        ``targets``: class indices, or multi-hot rows (multi-label), which are mixed with the same weights as the
        images (binary cross-entropy takes the soft rows as they are)."""
        if targets.dim() == 2:
            targets = targets.float()
        with seeded(mix_seed(self.seed, epoch, batch, self.rank)):
            images, targets = self.transform(images, targets)
        if targets.dim() == 1:  # not mixed this time
            targets = torch.nn.functional.one_hot(targets, self.num_classes).float()
        return images, targets
