"""Tests for finetune.config: YAML + --set loading, path resolution, and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_config

from finetune.config.loading import load_config
from finetune.config.schema import Config
from finetune.errors import FinetuneError


def config_error(tmp_path: Path, text: str | None = None, sets: tuple[str, ...] = ()) -> tuple[str, Path | None]:
    """Load a config that must fail; return the message (checked to be a user error, exit code 2) and the file."""
    path = write_config(tmp_path / "c.yaml", text) if text is not None else None
    with pytest.raises(FinetuneError) as info:
        load_config(path, sets)
    assert info.value.exit_code == 2
    return str(info.value), path


# --- loading and overrides -------------------------------------------------------------------------------------

def defaults_with_absolute_paths() -> dict:
    expected = Config().model_dump()
    expected["train"]["output_dir"] = str(Path("runs/default").resolve())  # defaults are relative to the cwd
    expected["train"]["mlflow"]["tracking_uri"] = str(Path("mlruns").resolve())
    return expected


def test_defaults_without_file():
    config = load_config(None)
    assert config.model_dump() == defaults_with_absolute_paths()
    assert (config.model.weights, config.model.num_classes) == ("DEFAULT", None)
    assert config.optim.lr == 0.01 and config.optim.momentum == 0.9
    assert config.freeze.trainable == ["head"] and config.freeze.batchnorm == "eval"
    assert config.train.epochs == 5 and config.data.image_size is None  # null: the weights' own (validate fills it)


def test_set_values_are_parsed_as_yaml():
    config = load_config(None, ["optim.lr=0.001", 'freeze.trainable=["layer4.*","fc.*"]', "data.augment=true",
                                "model.num_classes=10", "train.epochs=2", "data.workers=null"])
    assert config.optim.lr == 0.001 and isinstance(config.optim.lr, float)
    assert config.freeze.trainable == ["layer4.*", "fc.*"]
    assert config.data.augment == "light"  # true keeps meaning the light preset
    assert config.model.num_classes == 10 and config.train.epochs == 2 and config.data.workers is None


def test_set_wins_over_file_and_last_set_wins(tmp_path):
    path = write_config(tmp_path / "c.yaml", "optim:\n  lr: 0.5\n  momentum: 0.5\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["optim.lr=0.002", "train.epochs=7", "train.epochs=8"])
    assert config.optim.lr == 0.002 and config.train.epochs == 8
    assert config.optim.momentum == 0.5  # untouched file value
    assert config.optim.nesterov is False  # untouched default


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write_config(tmp_path / "c.yaml", "# nothing\n")).model_dump() == defaults_with_absolute_paths()


# --- paths -----------------------------------------------------------------------------------------------------

def test_paths_in_file_are_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write_config(folder / "c.yaml", "model:\n  weights: w/r18.pth\ndata:\n  root: ../data\n"
                                            "train:\n  output_dir: runs/x\n")
    config = load_config(path)
    assert Path(config.model.weights) == folder / "w" / "r18.pth"
    assert Path(config.data.root) == tmp_path / "data"
    assert Path(config.train.output_dir) == folder / "runs" / "x"


def test_paths_in_set_are_relative_to_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write_config(tmp_path / "c.yaml", "data:\n  root: from_file\n")
    config = load_config(path, ["model.weights=w.pth", "data.root=imgs", "train.output_dir=out"])
    assert Path(config.model.weights) == work / "w.pth"
    assert Path(config.data.root) == work / "imgs"
    assert Path(config.train.output_dir) == work / "out"


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "none"])
def test_weight_names_are_not_paths(tmp_path, name):
    assert load_config(write_config(tmp_path / "c.yaml", f"model:\n  weights: {name}\n")).model.weights == name
    assert load_config(None, [f"model.weights={name}"]).model.weights == name


# --- round trip ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source_text", [
    "data:\n  root: data\ntrain:\n  output_dir: out\n",  # every path key set in the file
    "data:\n  root: data\n",  # train.output_dir left at its default
    None,  # defaults + --set only
], ids=["file-all-paths", "file-default-output-dir", "defaults"])
def test_to_yaml_round_trips(tmp_path, monkeypatch, source_text):
    monkeypatch.chdir(tmp_path)
    sets = ["optim.lr=0.003", 'freeze.trainable=["layer4", "fc"]', "model.num_classes=4", "optim.schedule=cosine"]
    source = write_config(tmp_path / "src.yaml", source_text) if source_text is not None else None
    config = load_config(source, sets)
    saved = tmp_path / "run" / "config.yaml"  # e.g. saved into a run folder, then reloaded to reproduce the run
    saved.parent.mkdir()
    saved.write_text(config.to_yaml())
    assert load_config(saved).model_dump() == config.model_dump()


# --- errors ----------------------------------------------------------------------------------------------------

FILE_PROBLEMS = [
    ("optim:\n  lrr: 0.1\n", (2,), "optim.lrr", "did you mean 'optim.lr'"),
    ("model:\n  arch: resnet18\n  num_clases: 3\n", (3,), "model.num_clases", "did you mean 'model.num_classes'"),
    ("lr: 0.1\n", (1,), "lr", "did you mean 'optim.lr'"),
    ("optim:\n  lr: fast\n", (2,), "optim.lr", "'fast'"),
    ("train:\n  epochs: [1]\n", (2,), "train.epochs", "valid integer"),
    ("optim:\n  lr: 0\n", (2,), "optim.lr", "greater than 0"),
    ("optim:\n  lr: -0.1\n", (2,), "optim.lr", "greater than 0"),
    ("optim:\n  momentum: 1.0\n", (2,), "optim.momentum", "less than 1"),
    ("optim:\n  momentum: -0.1\n", (2,), "optim.momentum", "greater than or equal to 0"),
    ("train:\n  epochs: 0\n", (2,), "train.epochs", "greater than or equal to 1"),
    ("train:\n  batch_size: 0\n", (2,), "train.batch_size", "greater than or equal to 1"),
    ("data:\n  image_size: 31\n", (2,), "data.image_size", "greater than or equal to 32"),
    ("model:\n  num_classes: 1\n", (2,), "model.num_classes", "greater than or equal to 2"),
    ("freeze:\n  batchnorm: frozen\n", (2,), "freeze.batchnorm", "'frozen'"),
    # the offending key is on line 3 (trainable), not the section line
    ("freeze:\n  default: frozen\n  trainable: [fc, 7]\n", (3,), "freeze.trainable[1]", "valid string"),
    # the offending keys are nesterov (line 2) / momentum (line 3), not the section line 1
    ("optim:\n  nesterov: true\n  momentum: 0\n", (2, 3), "optim.nesterov", "momentum"),
]


@pytest.mark.parametrize("text, lines, key, fragment", FILE_PROBLEMS, ids=[c[2] for c in FILE_PROBLEMS])
def test_file_problem_names_file_line_and_key(tmp_path, text, lines, key, fragment):
    message, path = config_error(tmp_path, text)
    assert any(f"{path}:{line}  " in message for line in lines), message
    assert key in message and fragment in message
    assert "1 problem" in message


def test_all_problems_reported_together(tmp_path):
    message, path = config_error(tmp_path, "model:\n  num_classes: 1\noptim:\n  lr: 0\ntrain:\n  epochs: 0\n")
    assert "3 problems" in message
    for line, key in ((2, "model.num_classes"), (4, "optim.lr"), (6, "train.epochs")):
        assert f"{path}:{line}  {key}" in message


def test_problems_from_file_and_set_together(tmp_path):
    message, path = config_error(tmp_path, "optim:\n  lrr: 1\n", ("train.batch_size=0",))
    assert "2 problems" in message
    assert f"{path}:2  optim.lrr" in message and "--set train.batch_size" in message


SET_PROBLEMS = [
    ("optim.lr=0", "--set optim.lr", "greater than 0"),
    ("optim.lrr=0.1", "--set optim.lrr", "did you mean 'optim.lr'"),
    ("train.epochs=many", "--set train.epochs", "'many'"),
    ("data.image_size=8", "--set data.image_size", "greater than or equal to 32"),
    ("lr=0.1", "--set lr", "did you mean 'optim.lr'"),
    ("optim.nesterov=true", "--set optim", "momentum"),  # with momentum set 0 below
    # an unknown section given with --set is still reported as coming from --set
    ("foo.bar=1", "--set foo", "unknown key"),
]


@pytest.mark.parametrize("item, where, fragment", SET_PROBLEMS, ids=[c[0] for c in SET_PROBLEMS])
def test_set_problem_is_reported_as_set(tmp_path, item, where, fragment):
    sets = (item, "optim.momentum=0") if "nesterov" in item else (item,)
    path = write_config(tmp_path / "c.yaml", "train:\n  epochs: 2\n")
    with pytest.raises(FinetuneError) as info:
        load_config(path, sets)
    message = str(info.value)
    assert where in message and fragment in message, message
    assert f"{path}:" not in message.split("\n", 1)[1]  # the problem is not blamed on a line of the file


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim.lr 0.1"])
def test_set_without_equals_is_an_error(item):
    with pytest.raises(FinetuneError) as info:
        load_config(None, [item])
    assert info.value.exit_code == 2
    assert repr(item) in str(info.value) and "KEY=VALUE" in str(info.value)


def test_bad_yaml_syntax_names_file_and_line(tmp_path):
    message, path = config_error(tmp_path, "optim:\n  lr: 0.1\n  momentum: [0.9\ntrain:\n  epochs: 1\n")
    assert f"Invalid YAML in {path}:" in message
    line = int(message.split(f"{path}:")[1].split(":")[0])
    assert 3 <= line <= 5


def test_yaml_tab_indentation_error(tmp_path):
    message, path = config_error(tmp_path, "optim:\n\tlr: 0.1\n")
    assert f"{path}:2" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message, path = config_error(tmp_path, "- 1\n- 2\n")
    assert str(path) in message and "mapping" in message


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope" / "c.yaml"
    with pytest.raises(FinetuneError) as info:
        load_config(missing)
    assert info.value.exit_code == 2 and str(missing) in str(info.value)


def test_a_bare_on_or_off_in_yaml_means_on_or_off(tmp_path):
    """YAML 1.1 reads on/off as booleans; the auto | on | off keys take them as the words."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  cache_images: off\ntrain:\n  cache_features: on\n  compile: off\n")
    config = load_config(path)
    assert (config.data.cache_images, config.train.cache_features, config.train.compile) == ("off", "on", "off")
