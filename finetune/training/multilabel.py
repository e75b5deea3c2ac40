"""Multi-label classification (``model.task: multilabel``): a sigmoid per label, the binary loss, thresholds, metrics.

Targets are multi-hot rows (1.0 where an image has the label); an image without labels is a valid negative. The
metrics are functions of (N, C) probabilities and targets, so training (every epoch), ``evaluate`` and the tests
compute the same numbers. As in :mod:`finetune.training.metrics`, a value whose denominator is zero is undefined
and returned as None, never silently 0:

- AP (average precision) of a label: the precision at each distinct score, weighted by the recall it adds, as
  scikit-learn's ``average_precision_score``; undefined for a label without positives. mAP: the mean over the
  labels where it is defined (macro);
- precision, recall and F1 of a label at its threshold: a label is predicted when its probability is at least
  the threshold; micro F1 pools the counts of every label, macro F1 averages the labels' F1 where defined;
- exact match: the share of images whose every label is right.

Thresholds, one per label, are chosen on the validation split to maximise that label's F1 (:func:`tune_thresholds`),
or fixed by ``model.threshold``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from finetune.config.schema import MULTICLASS_SCORES, MULTILABEL_SCORES, Config
from finetune.errors import Problem
from finetune.utils.distributed import Dist

DEFAULT_THRESHOLD = 0.5  # for a label whose F1 no threshold defines (no positive among the validation images)


def binary_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing on binary targets: 1 becomes 1 - smoothing / 2 and 0 becomes smoothing / 2."""
    return targets * (1 - smoothing) + smoothing / 2


class BinaryLoss(nn.Module):
    """Binary cross-entropy with logits, averaged over every (image, label), on smoothed targets, with an optional
    ``pos_weight`` per label (the weight of a positive relative to a negative)."""

    def __init__(self, pos_weight: Optional[torch.Tensor] = None, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, binary_targets(targets, self.smoothing),
                                                              pos_weight=self.pos_weight)


def pos_weights(setting, targets: Sequence[torch.Tensor], num_classes: int) -> Optional[torch.Tensor]:
    """The ``pos_weight`` ``train.class_weights`` asks for: None for ``none``; for ``balanced`` each label's
    negatives over its positives (so both weigh the same in the loss); a list is used as given."""
    if setting == "none":
        return None
    if setting == "balanced":
        positives = torch.stack(list(targets)).sum(0) if len(targets) else torch.zeros(num_classes)
        return (len(targets) - positives) / positives.clamp(min=1)
    return torch.tensor([float(w) for w in setting], dtype=torch.float32)


def _ranked(probs: torch.Tensor, targets: torch.Tensor):
    """For each distinct score of one label, highest first: the score, the positives and the images at or above it."""
    order = torch.argsort(probs, descending=True, stable=True)
    scores, hits = probs[order].double(), targets[order].double()
    last = torch.ones(len(scores), dtype=torch.bool)  # the last image of each run of equal scores
    last[:-1] = scores[1:] != scores[:-1]
    return scores[last], hits.cumsum(0)[last], torch.arange(1, len(scores) + 1, dtype=torch.float64)[last]


def precision_recall(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One label's precision and recall at each of its distinct probabilities, highest first (at each, the images
    at or above it are predicted positive); empty for a label without positives."""
    positives = targets.sum().item()
    if not positives:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    _, true_pos, seen = _ranked(probs, targets)
    return true_pos / seen, true_pos / positives


def average_precision(probs: torch.Tensor, targets: torch.Tensor) -> list[Optional[float]]:
    """AP of each label (None for a label without positives) from (N, C) probabilities and multi-hot targets."""
    result = []
    for label in range(targets.shape[1]):
        precision, recall = precision_recall(probs[:, label], targets[:, label])
        recall_gain = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
        result.append((recall_gain * precision).sum().item() if len(recall) else None)
    return result


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label, the threshold that maximises its F1 on these images (the highest such, on a tie).

    It lies halfway between the lowest probability predicted positive and the next one below (half that
    probability when every image is predicted positive), so a slightly different probability elsewhere (another
    runtime, a rounding) decides the same way. A label without positives gets ``DEFAULT_THRESHOLD``.
    """
    thresholds = []
    for label in range(targets.shape[1]):
        positives = targets[:, label].sum().item()
        if not positives:
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        scores, true_pos, seen = _ranked(probs[:, label], targets[:, label])
        best = int(torch.argmax(2 * true_pos / (seen + positives)))  # F1 = 2 TP / (predicted + positives)
        below = scores[best + 1].item() if best + 1 < len(scores) else 0.0
        thresholds.append((scores[best].item() + below) / 2)
    return thresholds


def _ratio(part: float, whole: float) -> Optional[float]:
    return part / whole if whole else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def per_label(probs: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float]) -> list[dict]:
    """For each label: ``precision``, ``recall``, ``f1`` at its threshold and ``ap`` (None when 0/0), ``support``
    (images with the label) and ``threshold``."""
    predicted = probs >= torch.tensor(thresholds, dtype=probs.dtype)
    truth = targets > 0.5
    rows = []
    for label, ap in enumerate(average_precision(probs, targets)):
        tp = (predicted[:, label] & truth[:, label]).sum().item()
        n_pred, support = predicted[:, label].sum().item(), truth[:, label].sum().item()
        rows.append({"precision": _ratio(tp, n_pred), "recall": _ratio(tp, support),
                     "f1": _ratio(2 * tp, n_pred + support), "ap": ap, "support": support,
                     "threshold": thresholds[label]})
    return rows


def scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float]) -> dict:
    """``map``, ``micro_f1``, ``macro_f1`` and ``exact_match`` at ``thresholds``, and the ``per_label`` rows."""
    rows = per_label(probs, targets, thresholds)
    predicted, truth = probs >= torch.tensor(thresholds, dtype=probs.dtype), targets > 0.5
    true_pos = (predicted & truth).sum().item()
    return {"map": _mean([row["ap"] for row in rows]),
            "micro_f1": _ratio(2 * true_pos, predicted.sum().item() + truth.sum().item()),
            "macro_f1": _mean([row["f1"] for row in rows]),
            "exact_match": _ratio((predicted == truth).all(1).sum().item(), len(truth)),
            "per_label": rows}


def thresholds_for(fixed: Optional[float], probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """``fixed`` for every label, or when it is None the thresholds :func:`tune_thresholds` chooses."""
    return [fixed] * targets.shape[1] if fixed is not None else tune_thresholds(probs, targets)


@torch.no_grad()  # not inference_mode: a compiled frozen prefix (train.compile) serves no_grad batches only
def evaluate(fast, batches, loss_fn, num_classes: int, dist: Dist = Dist(), threshold: Optional[float] = None) -> dict:
    """Loss, mAP, micro/macro F1 and exact match in eval mode over (features, targets) batches, at ``threshold``
    or at the thresholds that maximise each label's F1 here (returned as ``thresholds``).

    Under DDP each process evaluates its shard and the rows are gathered.
    """
    fast.model.eval()
    logits, targets = [torch.empty(0, num_classes)], [torch.empty(0, num_classes)]
    for features, batch_targets in batches:
        logits.append(fast.head(features).cpu())
        targets.append(batch_targets.cpu())
    logits, targets = dist.gather(torch.cat(logits)), dist.gather(torch.cat(targets))
    probs = logits.sigmoid()
    thresholds = thresholds_for(threshold, probs, targets)
    result = scores(probs, targets, thresholds)
    del result["per_label"]
    loss = loss_fn(logits, targets).item() if len(targets) else float("nan")
    return {"loss": loss, **result, "thresholds": thresholds, "n": len(targets)}


def problems(config: Config) -> list[Problem]:
    """Config problems between model.task and the keys that depend on it."""
    task = config.model.task
    found = []
    stopping = config.train.early_stopping
    other = MULTICLASS_SCORES if task == "multilabel" else MULTILABEL_SCORES
    if stopping and stopping.monitor in other:
        mine = ", ".join(("val_loss", "val_macro_f1") + (MULTILABEL_SCORES if task == "multilabel"
                                                          else MULTICLASS_SCORES))
        found.append(Problem("train.early_stopping.monitor", f"{stopping.monitor} is not measured for model.task "
                                                             f"{task}; monitor one of {mine}"))
    if task == "multiclass":
        if config.model.threshold is not None:
            found.append(Problem("model.threshold", "applies to model.task: multilabel only (a multi-class model "
                                                    "predicts its most probable class); leave it out"))
        return found
    if config.data.sampler == "balanced":
        found.append(Problem("data.sampler", "balanced draws every class equally often, which images with several "
                                             "labels (or none) cannot do; use shuffle, and train.class_weights: "
                                             "balanced for a pos_weight per label"))
    if config.data.root and not config.data.labels:
        found.append(Problem("model.task", "multilabel needs a label file (data.labels): class folders give each "
                                           "image exactly one label"))
    return found
