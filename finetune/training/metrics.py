"""Classification metrics from a confusion matrix (rows: true class, columns: predicted class).

Pure arithmetic on counts, so the engine (per epoch) and ``evaluate`` report the
same numbers, and tests need neither images nor a model.

0/0 rule: a value whose denominator is zero is *undefined* and returned as
``None`` (``null`` in JSON, ``-`` in tables), never silently 0. Per class:

- recall = TP / support is undefined for a class with no true images;
- precision = TP / predicted is undefined for a class nothing was predicted as
  (its recall, if it has images, is then 0, and so is its F1);
- F1 = 2·TP / (2·TP + FP + FN) (the harmonic mean of the two, written so that it
  is defined whenever the class is among the true labels or the predictions).

Averages take the classes where the value is defined: balanced accuracy is the mean
recall over classes with images, macro F1 the mean F1 over classes that occur as a
label or a prediction (as scikit-learn does when no label list is given). With no
images at all every overall value is undefined.
"""

from __future__ import annotations

from typing import Optional, Sequence


def confusion_matrix(targets, predictions, num_classes: int):
    """The (num_classes, num_classes) count matrix of two label tensors: rows true classes, columns predictions."""
    return (targets * num_classes + predictions).bincount(minlength=num_classes ** 2).reshape(num_classes, num_classes)


def top_k_hits(logits, targets, k: int = 5):
    """Per sample, whether its true class is among the top ``k`` (at most the class count) logits."""
    return (logits.topk(min(k, logits.shape[1]), dim=1).indices == targets[:, None]).any(1)


def correct_count(logits, targets, multilabel: bool = False) -> float:
    """Training's running accuracy: the top-1 hits of class-index targets. Soft targets (MixUp/CutMix: a row of
    class weights per image) count the weight the row gives the predicted class: 0.7 for predicting the class that
    makes 70% of a mixed image. ``multilabel``: the images whose every label is right at probability 0.5 (a label
    is positive where its target, mixed or not, is above 0.5)."""
    if multilabel:
        return ((logits > 0) == (targets > 0.5)).all(1).sum().item()
    predicted = logits.argmax(1)
    if targets.dim() == 2:
        return targets.gather(1, predicted[:, None]).sum().item()
    return (predicted == targets).sum().item()


def _rows(confusion) -> list[list[int]]:
    """A square matrix of ints from a list of lists or anything with ``tolist()`` (a tensor, an array)."""
    rows = confusion.tolist() if hasattr(confusion, "tolist") else [list(row) for row in confusion]
    if any(len(row) != len(rows) for row in rows):
        raise ValueError(f"a confusion matrix must be square (got {len(rows)} rows of lengths "
                         f"{sorted({len(row) for row in rows})})")
    return [[int(v) for v in row] for row in rows]


def _ratio(part: int, whole: int) -> Optional[float]:
    return part / whole if whole else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def per_class(confusion) -> list[dict]:
    """For each class: ``precision``, ``recall``, ``f1`` (None when 0/0) and ``support`` (true images)."""
    rows = _rows(confusion)
    predicted = [sum(column) for column in zip(*rows)] if rows else []
    result = []
    for i, row in enumerate(rows):
        tp, support = row[i], sum(row)
        false_pos, false_neg = predicted[i] - tp, support - tp
        result.append({"precision": _ratio(tp, predicted[i]), "recall": _ratio(tp, support),
                       "f1": _ratio(2 * tp, 2 * tp + false_pos + false_neg), "support": support})
    return result


def accuracy(confusion) -> Optional[float]:
    """Correct predictions over all images."""
    rows = _rows(confusion)
    return _ratio(sum(rows[i][i] for i in range(len(rows))), sum(map(sum, rows)))


def balanced_accuracy(confusion) -> Optional[float]:
    """Mean recall over the classes that have images: each class counts the same, whatever its size."""
    return _mean([row["recall"] for row in per_class(confusion)])


def macro_f1(confusion) -> Optional[float]:
    """Mean F1 over the classes that occur as a true label or a prediction."""
    return _mean([row["f1"] for row in per_class(confusion)])


def summary(confusion) -> dict:
    """``accuracy``, ``balanced_accuracy``, ``macro_f1`` and the ``per_class`` rows, in one dict."""
    return {"accuracy": accuracy(confusion), "balanced_accuracy": balanced_accuracy(confusion),
            "macro_f1": macro_f1(confusion), "per_class": per_class(confusion)}
