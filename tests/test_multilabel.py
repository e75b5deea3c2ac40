"""Multi-label (model.task: multilabel): the metrics and thresholds on known numbers, the binary loss, and a run
end to end on the multi-label shapes demo: per-epoch mAP/F1, thresholds in the checkpoint and exports, evaluate
(per label, pr_curves.png, predictions.csv, --split test, --threshold), predict, and the inspect-grads closed form."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_config

from finetune.config.loading import load_config
from finetune.data.labels import strata
from finetune.errors import FinetuneError
from finetune.training import multilabel


def test_average_precision_matches_its_definition():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.4], [0.7, 0.4], [0.6, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    # label 0: positives at ranks 1 and 3: (1/1 + 2/3) / 2; label 1: its positive ties with a negative at the top
    # score, so precision there is 1/2 (one step per distinct score, as scikit-learn); no positive: undefined
    assert multilabel.average_precision(probs, targets) == pytest.approx([(1 + 2 / 3) / 2, 1 / 2])
    assert multilabel.average_precision(probs, torch.zeros(4, 2)) == [None, None]


def test_thresholds_maximise_each_labels_f1_and_lie_between_probabilities():
    probs = torch.tensor([[0.9], [0.7], [0.6], [0.4], [0.2]])
    targets = torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0]])
    # predicted at >= 0.9: F1 2/4; >= 0.7: 4/5; >= 0.6: 4/6; >= 0.4: 6/7 (best); >= 0.2: 6/8
    assert multilabel.tune_thresholds(probs, targets) == pytest.approx([(0.4 + 0.2) / 2])
    assert multilabel.tune_thresholds(probs, torch.zeros(5, 1)) == [multilabel.DEFAULT_THRESHOLD]
    assert multilabel.tune_thresholds(probs, torch.ones(5, 1)) == pytest.approx([0.1])  # all: half the lowest


def test_scores_at_thresholds_and_the_undefined_rule():
    probs = torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.7, 0.1], [0.1, 0.8, 0.1]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    result = multilabel.scores(probs, targets, [0.5, 0.75, 0.5])
    labels = result["per_label"]
    assert [(row["precision"], row["recall"], row["f1"], row["support"]) for row in labels] == [
        (1.0, 1.0, 1.0, 2), (1.0, 1.0, 1.0, 1), (None, None, None, 0)]  # label 2: never true, never predicted
    assert (result["micro_f1"], result["macro_f1"], result["exact_match"], result["map"]) == (1.0, 1.0, 1.0, 1.0)
    result = multilabel.scores(probs, targets, [0.5, 0.5, 0.5])  # image 1 now also predicts label 1
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["micro_f1"] == pytest.approx(2 * 3 / (4 + 3))  # 3 true positives, 4 predicted, 3 true
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_binary_loss_smooths_targets_and_balanced_pos_weight_evens_out_each_label():
    targets = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])]
    weights = multilabel.pos_weights("balanced", targets, 2)
    assert weights.tolist() == [1.0, 3.0]  # negatives / positives of each label
    logits, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    loss = multilabel.BinaryLoss(smoothing=0.2)(logits, y)
    q = torch.tensor([[0.9, 0.1]])
    expected = -(q * logits.sigmoid().log() + (1 - q) * (-logits).sigmoid().log()).mean()
    assert loss.item() == pytest.approx(expected.item())


def test_the_split_stratifies_by_each_images_rarest_label():
    hot = lambda *labels: torch.tensor([1.0 if i in labels else 0.0 for i in range(3)])  # noqa: E731
    targets = [hot(0), hot(0, 1), hot(0, 2), hot(0, 1), hot()]
    assert strata(targets) == [0, 1, 2, 1, -1]  # label 2 (1 image) is rarer than label 1 (2), than label 0 (4)
    assert strata([2, 0, 1]) == [2, 0, 1]  # class indices: the class


@pytest.mark.parametrize("sets, key", [
    (["model.task=multilabel", "data.sampler=balanced"], "data.sampler"),
    (["model.task=multilabel", "train.early_stopping={monitor: val_acc}"], "train.early_stopping.monitor"),
    (["model.threshold=0.3"], "model.threshold"),
])
def test_keys_that_do_not_suit_the_task_are_config_errors(tmp_path, sets, key):
    from finetune.training.validate import validate

    config = load_config(None, ["model.weights=none", "model.num_classes=3", *sets])
    with pytest.raises(FinetuneError, match=key.replace(".", r"\.")):
        validate(config)


@pytest.fixture(scope="module")
def run(module_tmp) -> Path:
    """Two epochs on a tiny multi-label shapes set, with a negative image and test rows in its label file."""
    from PIL import Image

    folder = module_tmp("multilabel")
    made = run_cli("make-dataset", "shapes", str(folder / "data"), "--multilabel", "--classes", "3",
                   "--train-per-class", "4", "--val-per-class", "2", "--image-size", "32")
    assert made.returncode == 0, made.stderr
    Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / "data" / "images" / "blank.png")
    labels = folder / "data" / "labels.csv"
    rows = list(csv.reader(labels.read_text().splitlines()))
    test = []
    for path, label, split in rows[1:]:
        if split == "val":  # the validation images again, as test images
            copy = f"images/test-{Path(path).name}"
            (folder / "data" / copy).write_bytes((folder / "data" / path).read_bytes())
            test.append([copy, label, "test"])
    with open(labels, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["images/blank.png", "", "train"], *test])
    # EfficientNet-B0: a family other than ResNet's (its head, classifier.1, follows a dropout; ResNet-18's multi-label
    # runs are in test_recipes.py and test_labels.py)
    config = tiny_config(folder, folder / "data", model={"task": "multilabel", "weights": "none",
                                                         "arch": "efficientnet_b0"},
                         freeze={"trainable": ["features.8", "head"]},
                         data={"labels": str(labels)},
                         train={"class_weights": "balanced", "label_smoothing": 0.1, "early_stopping": {"patience": 3}})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "val_map" in result.stdout and "best val_map" in result.stdout
    return folder / "run"


def test_every_epoch_reports_map_f1_and_exact_match_and_keeps_its_thresholds(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"train_exact_match", "val_map", "val_micro_f1", "val_macro_f1", "val_exact_match"} <= row.keys()
        assert "val_acc" not in row and all(0 <= row[k] <= 1 for k in ("val_map", "val_micro_f1", "val_macro_f1"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["score"] == "val_map" and summary["best_val_map"] == max(row["val_map"] for row in rows)
    assert "monitor: val_map" in (run / "config.yaml").read_text()  # early stopping watches mAP by default
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    thresholds = checkpoint["thresholds"]
    assert len(thresholds) == 3 and all(0 < t < 1 for t in thresholds)
    assert checkpoint["classes"] == ["circle", "square", "triangle"]


def test_evaluate_reports_each_label_draws_pr_curves_and_writes_every_probability(run, tmp_path):
    result = run_cli("evaluate", str(run / "best.pt"), "--json", "--top-losses", "2", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert [row["threshold"] for row in report["per_label"]] == checkpoint["thresholds"]
    assert report["images"] == 6 and report["map"] == pytest.approx(
        sum(row["ap"] for row in report["per_label"]) / 3)
    assert (tmp_path / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true", "predicted", "prob_circle", "prob_square", "prob_triangle", "loss"]
    assert len(rows) == 6 and [float(r["loss"]) for r in rows] == sorted((float(r["loss"]) for r in rows), reverse=True)
    supports = {name: sum(name in row["true"].split() for row in rows) for name in ("circle", "square", "triangle")}
    assert [row["support"] for row in report["per_label"]] == list(supports.values())
    for row in rows:
        probs = [float(row[f"prob_{name}"]) for name in ("circle", "square", "triangle")]
        truth = [float(name in row["true"].split()) for name in ("circle", "square", "triangle")]
        predicted = [name for name, p, t in zip(("circle", "square", "triangle"), probs, checkpoint["thresholds"])
                     if p >= t]
        assert row["predicted"].split() == predicted
        bce = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(truth, probs)) / 3
        assert float(row["loss"]) == pytest.approx(bce, rel=1e-4, abs=1e-5)
    fixed = run_cli("evaluate", str(run / "best.pt"), "--json", "--split", "test", "--threshold", "0.5",
                    "--output-dir", str(tmp_path / "test"))
    assert fixed.returncode == 0, fixed.stderr
    test = json.loads(fixed.stdout)
    assert test["split"] == "test" and test["images"] == 6 and test["thresholds_from"] == "--threshold"
    assert [row["threshold"] for row in test["per_label"]] == [0.5] * 3
    assert test["map"] == pytest.approx(report["map"])  # the test rows are the val images again


def test_predict_shows_the_labels_above_their_thresholds_and_exports_carry_them(run, tmp_path):
    image = run.parent / "data" / "images" / "00000.png"
    result = run_cli("predict", str(run / "best.pt"), str(image), "--json")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    guesses = json.loads(result.stdout)[0]["predictions"]
    assert all(g["prob"] >= g["threshold"] == checkpoint["thresholds"][checkpoint["classes"].index(g["class"])]
               for g in guesses)
    assert [g["prob"] for g in guesses] == sorted((g["prob"] for g in guesses), reverse=True)
    none = run_cli("predict", str(run / "best.pt"), str(image), "--threshold", "1")
    assert none.returncode == 0 and "(none above its threshold)" in none.stdout
    exported = run_cli("export", str(run / "best.pt"), "--format", "state-dict", "--output", str(tmp_path / "m.pth"))
    assert exported.returncode == 0, exported.stderr
    meta = json.loads((tmp_path / "m.json").read_text())
    assert (meta["task"], meta["thresholds"]) == ("multilabel", checkpoint["thresholds"])


def test_a_multiclass_model_refuses_a_threshold():
    from finetune.deploy.inference import Loaded

    with pytest.raises(FinetuneError, match="--threshold applies to multi-label models"):
        Loaded(["a", "b"], load_config(None), fast=None).thresholds_for(0.5)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_inspect_grads_checks_the_sigmoid_head_against_its_closed_form(tmp_path, arch):
    config = tiny_config(tmp_path, tmp_path, model={"task": "multilabel", "weights": "none", "num_classes": 3,
                                                    "arch": arch}, freeze={"trainable": ["head"]},
                         data={"root": None}, train={"batch_size": 4, "label_smoothing": 0.1})
    result = run_cli("inspect-grads", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["head gradient equals the sigmoid binary cross-entropy closed form"]["passed"]
    assert checks["float64 finite differences agree with autograd"]["passed"]
