"""Nothing lost, nobody surprised: every bad input, through the real CLI.

Each bad input must exit with code 2 and a message that names the file, key or path at fault and says how to
fix it, print no traceback, and create or overwrite nothing: the folder a case works in (config, data, weights,
run directory) is byte-for-byte the same afterwards.

Most cases import torch, which takes seconds, so every command runs once, all of them side by side in a
module-scoped fixture; the tests then check one result each.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from helpers import (
    OFFLINE_ENV,
    CodeRunningPayload,
    make_colour_folder,
    run_cli,
    tiny_config,
)

from finetune.config.loading import load_config
from finetune.data.folders import load_datasets
from finetune.deploy.artifacts import load_trained
from finetune.errors import FinetuneError


@dataclass
class Case:
    args: list[str]
    fragments: list[str]  # each must be in stderr
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards (e.g. a marker file)


@dataclass
class Shared:
    colour_data: Path  # root/train + root/val, 3 classes
    resnet_state: Path  # a ResNet-18 state dict with an ImageNet head


CASES: dict[str, Callable[[Path, Shared], Case]] = {}


def case(name: str):
    def register(setup):
        CASES[name] = setup
        return setup
    return register


def train_with(folder: Path, data_root: Path | str, /, *extra: str, **sections) -> list[str]:
    """`finetune train` with a tiny config in ``folder`` (its run directory is ``folder/run``) and more options."""
    return ["train", "--config", str(tiny_config(folder, data_root, **sections)), *extra]


def colours(root: Path, per_class: int = 2) -> Path:
    make_colour_folder(root, per_class)
    return root


# --- config ----------------------------------------------------------------------------------------------------

@case("config-missing-file")
def _(folder, shared):
    return Case(["train", "--config", str(folder / "nope.yaml")], ["Config file not found", str(folder / "nope.yaml")])


@case("config-bad-yaml")
def _(folder, shared):
    path = folder / "bad.yaml"
    path.write_text("optim:\n  lr: [0.1\ntrain:\n  epochs: 2\n")
    return Case(["train", "--config", str(path)], ["Invalid YAML in", f"{path}:", "Fix the syntax"])


@case("config-unknown-key")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, optim={"lrr": 0.1}),
                ["optim.lrr: unknown key", "did you mean 'optim.lr'", str(folder / "config.yaml")])


@case("config-wrong-type")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, train={"epochs": "three"}),
                ["train.epochs", "valid integer", "'three'"])


OUT_OF_RANGE = [
    ("lr-zero", "optim", "lr", 0, "greater than 0"),
    ("lr-negative", "optim", "lr", -0.01, "greater than 0"),
    ("momentum-one", "optim", "momentum", 1.0, "less than 1"),
    ("momentum-negative", "optim", "momentum", -0.1, "greater than or equal to 0"),
    ("epochs-zero", "train", "epochs", 0, "greater than or equal to 1"),
    ("batch-size-zero", "train", "batch_size", 0, "greater than or equal to 1"),
    ("image-size-too-small", "data", "image_size", 16, "greater than or equal to 32"),
]
for _name, _section, _key, _value, _fragment in OUT_OF_RANGE:
    def _setup(folder, shared, section=_section, key=_key, value=_value, fragment=_fragment):
        return Case(train_with(folder, shared.colour_data, **{section: {key: value}}),
                    [f"{section}.{key}: Input should be {fragment}", f"(got {value!r})"])
    case(f"config-{_name}")(_setup)


@case("freeze-pattern-matches-nothing")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, freeze={"trainable": ["layer9", "fc"]}),
                ["freeze.trainable[0]: pattern 'layer9' matches no parameter", "closest names"])


@case("freeze-nothing-trainable")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, freeze={"trainable": []}),
                ["freeze.trainable: no parameter is trainable", "freeze.default is 'frozen'", "nothing to train",
                 "set freeze.default: trainable"])


@case("num-classes-mismatch")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, model={"weights": "none", "num_classes": 5}),
                ["model.num_classes: is 5 but the data", "has 3 classes", "set it to 3 or null"])


# --- data ------------------------------------------------------------------------------------------------------

@case("data-root-missing")
def _(folder, shared):
    return Case(train_with(folder, folder / "nowhere"), ["data.root: folder not found", str(folder / "nowhere")])


@case("data-root-without-class-folders")
def _(folder, shared):
    (folder / "data").mkdir()
    shutil.copy(next((shared.colour_data / "train" / "red").iterdir()), folder / "data" / "loose.png")
    return Case(train_with(folder, folder / "data"), ["data.root", f"{folder / 'data'} has no class folders",
                                                      "<class>/<image>"])


@case("data-empty-class-folder")
def _(folder, shared):
    (colours(folder / "data") / "yellow").mkdir()
    return Case(train_with(folder, folder / "data"), ["data.root", "yellow", "needs at least one image"])


@case("data-val-class-not-in-train")
def _(folder, shared):
    colours(folder / "data" / "train")
    colours(folder / "data" / "val", 1)
    shutil.copytree(folder / "data" / "val" / "red", folder / "data" / "val" / "purple")
    return Case(train_with(folder, folder / "data"), ["data.root", "class folders not in train/: purple"])


@case("data-corrupt-and-truncated-images")
def _(folder, shared):
    corrupt = colours(folder / "data") / "red" / "broken.png"
    corrupt.write_bytes(random.Random(0).randbytes(2000))
    truncated = folder / "data" / "green" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:-200])
    return Case(train_with(folder, folder / "data"),
                ["2 image files cannot be read", f"{corrupt}: not an image file", f"{truncated}: OSError: Truncated",
                 "Replace or delete them, or set data.skip_bad_images: true"])


# --- weights ---------------------------------------------------------------------------------------------------

@case("weights-missing")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, model={"weights": "r18.pth"}),
                ["Weights file not found", str(folder / "r18.pth"), "model.weights"])


@case("weights-corrupt")
def _(folder, shared):
    path = folder / "r18.pth"
    path.write_bytes(shared.resnet_state.read_bytes()[:100_000])
    return Case(train_with(folder, shared.colour_data, model={"weights": "r18.pth"}),
                [f"Could not read weights file {path}", "corrupt"])


@case("weights-other-architecture")
def _(folder, shared):
    from torchvision.models import resnet34

    path = folder / "r34.pth"
    torch.save(resnet34().state_dict(), path)
    return Case(train_with(folder, shared.colour_data, model={"weights": "r34.pth"}),
                [f"Weights {path} do not fit ResNet-18", "unexpected: layer1.2.conv1.weight",
                 "Give a ResNet-18 state dict"])


@case("weights-other-head-size")
def _(folder, shared):
    state = torch.load(shared.resnet_state, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(5, 512), torch.zeros(5)
    path = folder / "five.pth"
    torch.save(state, path)
    return Case(train_with(folder, shared.colour_data, model={"weights": "five.pth"}),
                [f"Weights {path} have a 5-class head but model.num_classes is 3", "drop fc.weight/fc.bias"])


# --- output ----------------------------------------------------------------------------------------------------

@case("output-dir-not-empty")
def _(folder, shared):
    run = folder / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  epochs: 9\n")
    (run / "last.pt").write_bytes(b"an earlier run's checkpoint")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return Case(train_with(folder, shared.colour_data), [f"Output directory {run} already holds a run",
                                                         f"--resume {run}", "--overwrite"])


@case("output-dir-under-a-file")
def _(folder, shared):
    (folder / "file.txt").write_text("not a folder\n")
    return Case(train_with(folder, shared.colour_data, train={"output_dir": "file.txt/run"}),
                [f"Cannot write to output directory {folder / 'file.txt' / 'run'}", "choose another"])


# --- command line ----------------------------------------------------------------------------------------------

@case("cli-unknown-option")
def _(folder, shared):
    return Case(["train", "--nope"], ["No such option", "--nope", "finetune train --help"])


@case("cli-set-without-equals")
def _(folder, shared):
    return Case(train_with(folder, shared.colour_data, "--set", "optim.lr"),
                ["Invalid --set 'optim.lr'", "KEY=VALUE"])


# --- paths are never expanded by a shell -----------------------------------------------------------------------

@case("path-dollar-home-is-literal")
def _(folder, shared):
    # looked up as <config folder>/$HOME/data, never as the home folder
    return Case(train_with(folder, "$HOME/data"), [f"folder not found: {folder.resolve() / '$HOME' / 'data'}"])


# --- untrusted files -------------------------------------------------------------------------------------------

def _evil_checkpoint(folder: Path) -> tuple[Path, Path]:
    (folder / "run").mkdir()
    path, marker = folder / "run" / "best.pt", folder / "MARKER"
    torch.save({"format": 1, "model": {}, "classes": ["a", "b"], "payload": CodeRunningPayload(marker)}, path)
    return path, marker


@case("untrusted-checkpoint-evaluate")
def _(folder, shared):
    path, marker = _evil_checkpoint(folder)
    return Case(["evaluate", str(path)], [f"Refused to load checkpoint {path}", "could run code"], [marker])


@case("untrusted-checkpoint-predict")
def _(folder, shared):
    path, marker = _evil_checkpoint(folder)
    image = next((shared.colour_data / "val" / "red").iterdir())
    return Case(["predict", str(path), str(image)], [f"Refused to load checkpoint {path}", "could run code"],
                [marker])


@case("untrusted-checkpoint-as-weights")
def _(folder, shared):
    path, marker = _evil_checkpoint(folder)
    return Case(train_with(folder, shared.colour_data, "--set", f"model.weights={path}",
                           train={"output_dir": "out"}),
                [f"Refused to load weights file {path}", "could run code"], [marker, folder / "out"])


# --- inputs that must work -------------------------------------------------------------------------------------

def _tree_with_extras(folder: Path) -> Path:
    make_colour_folder(folder / "data" / "train", 4, seed=1)
    make_colour_folder(folder / "data" / "val", 2, seed=2)
    (folder / "data" / "train" / "red" / "notes.txt").write_text("not an image: ignored by its extension\n")
    (folder / "data" / "val" / "blue" / "README.md").write_text("# neither\n")
    return folder / "data"


@case("ok-non-image-files-are-ignored")
def _(folder, shared):
    return Case(train_with(folder, _tree_with_extras(folder), train={"epochs": 1}), [])


@case("ok-bad-images-skipped")
def _(folder, shared):
    data = _tree_with_extras(folder)
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (data / "val" / "green" / "1.png").write_bytes((data / "val" / "green" / "1.png").read_bytes()[:150])
    return Case(train_with(folder, data, data={"skip_bad_images": True}, train={"epochs": 1}), [])


OK_CASES = [name for name in CASES if name.startswith("ok-")]
BAD_CASES = [name for name in CASES if name not in OK_CASES]


def snapshot(folder: Path) -> dict:
    """Every file and folder below ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in [folder, *sorted(folder.rglob("*"))]}


@pytest.fixture(scope="module")
def outcomes(module_tmp, colour_data, resnet_state):
    """Set up every case in its own folder, then run all the commands (in this process: no torch import each)."""
    shared = Shared(colour_data, resnet_state)
    prepared = {}
    for name, setup in CASES.items():
        folder = module_tmp(name)
        prepared[name] = (folder, setup(folder, shared))
    before = {name: snapshot(folder) for name, (folder, _) in prepared.items()}
    with pytest.MonkeyPatch.context() as env:  # the autouse `offline` fixture is function-scoped: not active here
        env.setenv("TORCH_HOME", str(module_tmp("torch_home")))
        for key, value in OFFLINE_ENV.items():
            env.setenv(key, value)
        results = {name: run_cli(*case_.args) for name, (_, case_) in prepared.items()}
    return {name: (case_, before[name], snapshot(folder), results[name])
            for name, (folder, case_) in prepared.items()}


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_a_clear_error_that_leaves_everything_untouched(outcomes, name):
    case_, before, after, result = outcomes[name]
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    for fragment in case_.fragments:
        assert fragment in result.stderr, f"{fragment!r} not in the message\n{shown}"
    assert after == before, f"files were created, changed or removed: {sorted(set(after) ^ set(before))}"
    for path in case_.absent:
        assert not path.exists(), f"{path} exists"


def test_non_image_files_in_class_folders_are_ignored(outcomes):
    _, _, _, result = outcomes["ok-non-image-files-are-ignored"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 train / 6 val images" in result.stdout  # notes.txt and README.md are not images


def test_skip_bad_images_trains_without_them(outcomes):
    _, _, _, result = outcomes["ok-bad-images-skipped"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 train / 5 val images" in result.stdout  # the two unreadable files are left out


def test_skipped_images_are_counted_and_named(tmp_path):
    data = _tree_with_extras(tmp_path)
    broken = data / "train" / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    truncated = data / "val" / "green" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:150])
    config_path = tiny_config(tmp_path, data, data={"skip_bad_images": True})
    datasets = load_datasets(load_config(config_path))
    assert datasets.bad_images == sorted([str(broken), str(truncated)])
    assert (len(datasets.train), len(datasets.val)) == (12, 5)
    assert all(path != str(broken) for path, _ in datasets.train.samples)

    config = yaml.safe_load(config_path.read_text())
    config["data"]["skip_bad_images"] = False
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(FinetuneError) as error:
        load_datasets(load_config(config_path))
    assert "2 image files cannot be read" in str(error.value)
    assert str(broken) in str(error.value) and str(truncated) in str(error.value)


def test_a_class_left_without_readable_images_is_an_error(tmp_path):
    data = colours(tmp_path / "data")
    for image in (data / "blue").iterdir():
        image.write_bytes(b"garbage")
    config = load_config(tiny_config(tmp_path, data, data={"skip_bad_images": True}))
    with pytest.raises(FinetuneError, match="no readable image left in class folder.* blue"):
        load_datasets(config)


def test_paths_expand_a_leading_tilde_and_nothing_else(tmp_path, monkeypatch):
    # `~` is a home folder, as Python's expanduser says (no shell involved); `$HOME` is only a folder name
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg" / "c.yaml"
    path.parent.mkdir()
    path.write_text("data:\n  root: ~/images\nmodel:\n  weights: $HOME/w.pth\n"
                    "train:\n  output_dir: ~nobody_such_user/run\n")  # an unknown user: Path.expanduser would raise
    config = load_config(path)
    assert Path(config.data.root) == tmp_path / "home" / "images"
    assert Path(config.model.weights) == tmp_path / "cfg" / "$HOME" / "w.pth"
    assert Path(config.train.output_dir) == tmp_path / "cfg" / "~nobody_such_user" / "run"
    assert Path(load_config(None, ["data.root=$HOME/x"]).data.root) == tmp_path / "$HOME" / "x"  # --set: the cwd


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"format": 1, "model": {"fc.weight": torch.zeros(2, 512)}, "classes": ["a", "b"], "config": {}}, path)
    with pytest.raises(FinetuneError, match="is not a usable finetune checkpoint.*Missing key"):
        load_trained(path)
