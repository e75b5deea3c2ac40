"""Early stopping, the time budget, and the imbalanced-class options as training uses them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    Messages,
    assert_same_weights,
    interrupt,
    run_cli,
    tiny_config,
    weights,
)

from finetune.cli.live import summary_line
from finetune.config.loading import load_config
from finetune.training.reporter import Reporter
from finetune.training.run import train

# A learning rate this small leaves val_acc where it is: no epoch improves on the first.
STALLED = dict(optim={"lr": 1e-9}, train={"epochs": 6, "early_stopping": {"monitor": "val_acc", "patience": 2}})


def test_early_stopping_ends_the_run_and_resume_says_it_is_finished(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, **STALLED))
    summary = train(config, Reporter())
    assert summary["stopped"] == "early_stopping" and summary["epochs_done"] == 3  # best at 1, then 2 without
    assert summary["best_epoch"] == 1
    assert "stopped early by train.early_stopping after 3 of 6 epochs" in summary_line(summary)
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == "early_stopping"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    before = (run_dir / "last.pt").read_bytes()

    messages = Messages()
    again = train(config, messages, resume=run_dir)
    assert again["epochs_done"] == 3 and again["stopped"] == "early_stopping"
    assert any("is finished" in line and "train.early_stopping.patience" in line for line in messages.lines)
    assert (run_dir / "last.pt").read_bytes() == before  # nothing trained, nothing rewritten

    patient = load_config(tiny_config(tmp_path, colour_data, optim={"lr": 1e-9},
                                      train={"epochs": 6, "early_stopping": {"monitor": "val_acc", "patience": 3}}))
    more = train(patient, Reporter(), resume=run_dir)  # the patience was raised: one more epoch, then stop again
    assert more["epochs_done"] == 4 and more["stopped"] == "early_stopping"


def test_patience_counter_survives_an_interrupted_run(tmp_path, colour_data):
    whole = train(load_config(tiny_config(tmp_path / "whole", colour_data, **STALLED)), Reporter())
    parted = load_config(tiny_config(tmp_path / "parted", colour_data, **STALLED))
    interrupt(train, parted, epoch=2, step=2)  # inside epoch 3: one epoch without improvement so far
    resumed = train(parted, Reporter(), resume=tmp_path / "parted" / "run")
    assert resumed["stopped"] == whole["stopped"] == "early_stopping"
    assert resumed["epochs_done"] == whole["epochs_done"] == 3
    assert_same_weights(weights(tmp_path / "whole" / "run"), weights(tmp_path / "parted" / "run"))


def test_time_limit_stops_after_a_step_with_exit_0_and_resumes_exactly(tmp_path, colour_data):
    sections = dict(data={"sampler": "balanced"}, train={"epochs": 2, "class_weights": "balanced"})
    train(load_config(tiny_config(tmp_path / "whole", colour_data, **sections)), Reporter())

    config = tiny_config(tmp_path / "parted", colour_data, data=sections["data"],
                         train={**sections["train"], "time_limit_min": 1e-6})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "parted" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "time_limit" and summary["epochs_done"] == 0
    last = result.stdout.strip().splitlines()[-1]  # the last line says why
    assert "no epoch finished" in last and "stopped by train.time_limit_min after 0 of 2 epochs" in last
    assert torch.load(run_dir / "last.pt", weights_only=True)["train_state"]["step"] == 1  # saved after one step

    result = run_cli("train", "--resume", str(run_dir), "--set", "train.time_limit_min=null")
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] is None
    assert_same_weights(weights(tmp_path / "whole" / "run"), weights(run_dir))


def test_class_weights_change_the_loss_and_uniform_weights_do_not(tmp_path, colour_data):
    def first_loss(name, class_weights):
        config = load_config(tiny_config(tmp_path / name, colour_data, train={"epochs": 1,
                                                                               "class_weights": class_weights}))
        train(config, Reporter())
        return json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]

    plain, uniform, skewed = first_loss("plain", "none"), first_loss("uniform", [1, 1, 1]), first_loss("skewed",
                                                                                                        [1, 8, 1])
    assert plain == uniform
    assert skewed != plain


def test_imbalanced_data_warn_at_the_start(tmp_path):
    from helpers import make_colour_split

    root = make_colour_split(tmp_path / "data", 12, 2)
    for extra in sorted((root / "train" / "red").iterdir())[3:]:
        extra.unlink()  # red: 3 images, the others 12
    messages = Messages()
    train(load_config(tiny_config(tmp_path, root, train={"epochs": 1})), messages)
    warning = next(line for line in messages.lines if "imbalanced classes" in line)
    assert "'red' 3 (4.0x)" in warning
    assert "train.class_weights=balanced" in warning and "data.sampler=balanced" in warning


@pytest.mark.parametrize("sets, key", [
    (["train.early_stopping.monitor=val_f1"], "train.early_stopping.monitor"),
    (["train.early_stopping.patience=-1"], "train.early_stopping.patience"),
    (["train.class_weights=[1, 2]"], "train.class_weights"),
    (["train.class_weights=[1, 0, 1]"], "train.class_weights"),
    (["train.time_limit_min=0"], "train.time_limit_min"),
])
def test_bad_stopping_and_weight_settings_name_the_key(tmp_path, colour_data, sets, key):
    config = tiny_config(tmp_path, colour_data)
    result = run_cli("train", "--config", str(config), *[arg for s in sets for arg in ("--set", s)])
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
