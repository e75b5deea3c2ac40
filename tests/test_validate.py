"""One validation before any work: every problem of a config in one error, from every command that takes one."""

from __future__ import annotations

import pytest
from helpers import make_colour_folder, run_cli, write_config

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.training.validate import validate

THREE_PROBLEMS = ("model:\n  weights: none\n"
                  "data:\n  root: nowhere\n"
                  "freeze:\n  trainable: [fc, layer5]\n"
                  "  stages: [{epoch: 9, trainable: [layer4]}]\n"
                  "train:\n  epochs: 3\n")


def assert_three_problems(message: str, path) -> None:
    assert "Invalid config" in message and "(3 problems)" in message, message
    assert f"{path}:4  data.root: folder not found: {path.parent / 'nowhere'}" in message
    assert f"{path}:6  freeze.trainable[1]: pattern 'layer5' matches no parameter" in message
    assert f"{path}:7  freeze.stages[0].epoch: is 9 but train.epochs is 3" in message


def test_a_missing_data_root_a_bad_pattern_and_a_late_stage_in_one_error(tmp_path):
    path = write_config(tmp_path / "c.yaml", THREE_PROBLEMS)
    with pytest.raises(FinetuneError) as error:
        validate(load_config(path))
    assert error.value.exit_code == 2
    assert_three_problems(str(error.value), path)


@pytest.mark.parametrize("command", ["train", "freeze-report", "inspect-grads", "lr-find"])
def test_every_command_that_takes_a_config_validates_it_first(tmp_path, command):
    path = write_config(tmp_path / "c.yaml", THREE_PROBLEMS + "  output_dir: run\n")
    result = run_cli(command, "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert_three_problems(result.stderr, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


def test_no_image_is_read_and_no_weight_loaded_before_the_config_is_valid(tmp_path):
    """An unreadable image and pretrained weights that cannot be fetched (offline) would each stop a run; with a
    bad pattern besides, only the config's problem is reported: neither was touched."""
    data = make_colour_folder(tmp_path / "data", 2)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    path = write_config(tmp_path / "c.yaml", f"model:\n  weights: DEFAULT\ndata:\n  root: {data}\n"
                                             "freeze:\n  trainable: [layer9]\n")
    with pytest.raises(FinetuneError) as error:
        validate(load_config(path))
    message = str(error.value)
    assert "(1 problem)" in message and f"{path}:6  freeze.trainable[0]: pattern 'layer9'" in message


def test_a_demo_set_to_be_generated_is_no_problem_and_is_not_generated(tmp_path):
    config = load_config(None, [f"data.root={tmp_path / 'shapes'}", "data.demo=shapes", "train.class_weights=[1, 2]"])
    with pytest.raises(FinetuneError) as error:
        validate(config)  # the demo set's four classes are known before it exists
    assert "train.class_weights: has 2 weights but there are 4 classes" in str(error.value)
    assert not (tmp_path / "shapes").exists()


def test_train_needs_data(tmp_path):
    result = run_cli("train", "--set", "model.weights=none", "--set", "data.root=null", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "data.root: is not set; train trains on the training images" in result.stderr


def test_calibrating_needs_two_validation_images_before_training(tmp_path):
    """train.calibrate fits a temperature after training: a split too small for it is found before any epoch."""
    data = make_colour_folder(tmp_path / "data", 1)  # one image a class: nothing held out
    config = load_config(None, [f"data.root={data}", "model.weights=none", "train.calibrate=true"])
    with pytest.raises(FinetuneError) as error:
        validate(config)
    assert f"train.calibrate: the validation split of {data} has 0 image(s)" in str(error.value)
    validate(load_config(None, [f"data.root={data}", "model.weights=none"]))  # without calibrating: no problem
    split = make_colour_folder(tmp_path / "more", 2)  # one of each class's two held out: 3 images
    validate(load_config(None, [f"data.root={split}", "model.weights=none", "train.calibrate=true"]))
