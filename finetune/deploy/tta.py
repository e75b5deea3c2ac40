"""Test-time augmentation (``evaluate --tta``, ``predict --tta``): the probabilities (softmax; multi-label: each
label's sigmoid) averaged over views of each image.

- ``flip``: the image as evaluated without TTA, and its mirror image (fastai's ``learn.tta`` default);
- ``five-crop``: the image resized to ``image_size / 0.875`` (256 px for 224, as torchvision's ImageNet evaluation
  resizes), and its four corner crops and centre crop of ``image_size`` (torchvision's ``five_crop``).

The model runs once per view, outside it: an export stays a single pass (its metadata says so). Flipping is no
augmentation for data whose mirror image means something else (text, digits).
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as F

from finetune.errors import FinetuneError

TTA_MODES = ("flip", "five-crop")
FIVE_CROP_RATIO = 0.875  # the crop's share of the resized image's side


def check_mode(mode: str) -> str:
    """``mode`` when it is a TTA mode; a FinetuneError naming the closest one otherwise."""
    if mode in TTA_MODES:
        return mode
    close = difflib.get_close_matches(mode, TTA_MODES, n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise FinetuneError(f"Unknown --tta-mode {mode!r}; {hint}use --tta (flip: the image and its mirror image) or "
                        "--tta-mode five-crop (four corners and the centre).")


def view_size(mode: str, image_size: int) -> int:
    """The size (px) images are prepared at before the views are cut: larger for five-crop."""
    return round(image_size / FIVE_CROP_RATIO) if mode == "five-crop" else image_size


def views(mode: str, batch: torch.Tensor, image_size: int) -> list[torch.Tensor]:
    """The views of a batch (N x 3 x S x S, S = :func:`view_size`), each N x 3 x image_size x image_size."""
    if mode == "flip":
        return [batch, batch.flip(-1)]
    return [view.contiguous(memory_format=torch.channels_last) for view in F.five_crop(batch, [image_size] * 2)]


def averaged_logits(logits_of: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, mode: str,
                    image_size: int, multilabel: bool = False) -> torch.Tensor:
    """Logits whose softmax is the softmax of ``logits_of`` averaged over the views of ``batch`` (their log); for a
    ``multilabel`` model, whose sigmoid is the averaged sigmoid of each label (their logit). Every metric and
    threshold then reads them as it reads one pass's logits."""
    outputs = [logits_of(view).float() for view in views(mode, batch, image_size)]
    tiny = torch.finfo(torch.float32).tiny  # keeps log(0) finite
    if multilabel:
        probs = torch.stack([out.sigmoid() for out in outputs]).mean(0)
        return probs.clamp_min(tiny).log() - (1 - probs).clamp_min(tiny).log()
    return torch.stack([out.softmax(1) for out in outputs]).mean(0).clamp_min(tiny).log()
