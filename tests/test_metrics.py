"""Classification metrics from a confusion matrix: values, the 0/0 rule, and agreement with direct counting."""

from __future__ import annotations

import random

import pytest
import torch

from finetune.training.metrics import (
    accuracy,
    balanced_accuracy,
    macro_f1,
    per_class,
    summary,
)


def test_values_of_a_small_matrix():
    confusion = [[8, 2, 0],   # true class 0: 10 images, 8 right
                 [1, 3, 0],   # true class 1: 4 images, 3 right
                 [0, 1, 1]]   # true class 2: 2 images, 1 right
    rows = per_class(confusion)
    assert [r["support"] for r in rows] == [10, 4, 2]
    assert [r["recall"] for r in rows] == [0.8, 0.75, 0.5]
    assert rows[0]["precision"] == pytest.approx(8 / 9) and rows[1]["precision"] == pytest.approx(3 / 6)
    assert rows[2]["precision"] == 1.0
    assert rows[1]["f1"] == pytest.approx(2 * 0.5 * 0.75 / (0.5 + 0.75))
    assert accuracy(confusion) == pytest.approx(12 / 16)
    assert balanced_accuracy(confusion) == pytest.approx((0.8 + 0.75 + 0.5) / 3)
    assert macro_f1(confusion) == pytest.approx(sum(r["f1"] for r in rows) / 3)


def test_zero_over_zero_is_undefined_and_left_out_of_averages():
    confusion = [[5, 0, 0],
                 [3, 0, 0],   # class 1 has images but is never predicted: precision undefined, recall and F1 0
                 [0, 0, 0]]   # class 2 neither has images nor is predicted: everything undefined
    rows = per_class(confusion)
    assert rows[1] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 3}
    assert rows[2] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert balanced_accuracy(confusion) == pytest.approx((1.0 + 0.0) / 2)
    assert macro_f1(confusion) == pytest.approx((rows[0]["f1"] + 0.0) / 2)


def test_a_class_predicted_but_absent_counts_in_macro_f1_not_in_balanced_accuracy():
    confusion = [[4, 1],
                 [0, 0]]
    rows = per_class(confusion)
    assert rows[1] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert balanced_accuracy(confusion) == 0.8
    assert macro_f1(confusion) == pytest.approx((2 * 4 / (2 * 4 + 1)) / 2)


def test_no_images_at_all():
    assert summary([[0, 0], [0, 0]]) == {"accuracy": None, "balanced_accuracy": None, "macro_f1": None,
                                         "per_class": [{"precision": None, "recall": None, "f1": None,
                                                        "support": 0}] * 2}


def test_tensor_input_and_agreement_with_direct_counting():
    rng = random.Random(0)
    true = [rng.randrange(4) for _ in range(300)]
    pred = [t if rng.random() < 0.7 else rng.randrange(4) for t in true]
    confusion = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(true, pred):
        confusion[t, p] += 1
    rows = per_class(confusion)
    for c in range(4):
        tp = sum(t == p == c for t, p in zip(true, pred))
        precision, recall = tp / pred.count(c), tp / true.count(c)
        assert rows[c]["precision"] == pytest.approx(precision)
        assert rows[c]["recall"] == pytest.approx(recall)
        assert rows[c]["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert accuracy(confusion) == pytest.approx(sum(t == p for t, p in zip(true, pred)) / 300)


def test_rejects_a_matrix_that_is_not_square():
    with pytest.raises(ValueError, match="square"):
        per_class([[1, 2, 3], [4, 5, 6]])
