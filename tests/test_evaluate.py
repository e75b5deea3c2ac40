"""finetune evaluate: per-class precision/recall/F1, balanced accuracy and macro F1, the normalised confusion
matrix, and the error analysis of --top-losses (top_losses.png and predictions.csv)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import make_colour_folder, run_cli, tiny_config

from finetune.config.loading import load_config
from finetune.data.folders import image_samples, load_datasets
from finetune.training import metrics


@pytest.fixture(scope="module")
def checkpoint(module_tmp, colour_data) -> Path:
    folder = module_tmp("evaluate")
    result = run_cli("train", "--config", str(tiny_config(folder, colour_data, train={"epochs": 1})), "--quiet")
    assert result.returncode == 0, result.stderr
    return folder / "run" / "best.pt"


def test_json_reports_the_metrics_of_its_confusion_matrix(checkpoint, tmp_path):
    result = run_cli("evaluate", str(checkpoint), "--json", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 12 and "top_losses" not in report
    assert report["balanced_accuracy"] == metrics.balanced_accuracy(report["confusion"])
    assert report["macro_f1"] == metrics.macro_f1(report["confusion"])
    assert report["top1"] == pytest.approx(metrics.accuracy(report["confusion"]), abs=1e-12)
    assert [row["class"] for row in report["per_class"]] == ["blue", "green", "red"]
    assert [{k: v for k, v in row.items() if k != "class"} for row in report["per_class"]] == \
        metrics.per_class(report["confusion"])
    assert [row["support"] for row in report["per_class"]] == [4, 4, 4]
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "predictions.csv").exists()


def test_top_losses_writes_the_grid_and_every_prediction_sorted_by_loss(checkpoint, colour_data, tmp_path):
    result = run_cli("evaluate", str(checkpoint), "--data", str(colour_data), "--top-losses", "5", "--json",
                     "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (tmp_path / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    assert report["top_losses_png"] == str(tmp_path / "top_losses.png")
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true", "predicted", "prob_blue", "prob_green", "prob_red", "loss"]
    assert len(rows) == 12
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in (colour_data / "val").rglob("*.png"))
    losses = [float(row["loss"]) for row in rows]
    assert losses == sorted(losses, reverse=True)
    for row in rows:
        assert Path(row["path"]).parent.name == row["true"]  # the real file, in its class folder
        probs = {name: float(row[f"prob_{name}"]) for name in ("blue", "green", "red")}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert max(probs, key=probs.get) == row["predicted"]
        assert float(row["loss"]) == pytest.approx(-math.log(probs[row["true"]]), rel=1e-4, abs=1e-5)
    assert [(r["path"], r["true"], r["predicted"]) for r in report["top_losses"]] == \
        [(r["path"], r["true"], r["predicted"]) for r in rows[:5]]
    assert report["top_losses"][0]["prob"] == pytest.approx(float(rows[0][f"prob_{rows[0]['predicted']}"]), rel=1e-4)


def test_table_output(checkpoint, tmp_path):
    result = run_cli("evaluate", str(checkpoint), "--top-losses", "3", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for text in ("balanced accuracy", "macro F1", "precision", "recall", "support", "Top 3 losses",
                 str(tmp_path / "top_losses.png"), str(tmp_path / "predictions.csv")):
        assert text in result.stdout, text


@pytest.mark.parametrize("value", ["-1", "101"])
def test_bad_top_losses_exits_2_and_writes_nothing(checkpoint, tmp_path, value):
    result = run_cli("evaluate", str(checkpoint), "--top-losses", value, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "--top-losses" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_written_is_a_clear_error(checkpoint, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder\n")
    result = run_cli("evaluate", str(checkpoint), "--output-dir", str(tmp_path / "file.txt" / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Cannot write the evaluation's files ({tmp_path / 'file.txt' / 'out'}): Not a directory." in result.stderr
    assert "Choose another --output-dir" in result.stderr and "Traceback" not in result.stderr


def test_image_samples_are_the_real_files_of_a_split_tree(tmp_path):
    make_colour_folder(tmp_path / "data", 5)
    config = load_config(tiny_config(tmp_path, tmp_path / "data"))
    val = load_datasets(config).val  # a Subset: data.val_fraction of each class
    samples = image_samples(val)
    assert len(samples) == len(val) == 3
    for index, (path, target) in enumerate(samples):
        assert Path(path).is_file()
        assert val[index][1] == target and Path(path).parent.name == ["blue", "green", "red"][target]
