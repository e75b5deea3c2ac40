"""Shared fixtures. No test reaches the network: TORCH_HOME is a fresh temp folder and downloads fail at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs a process per core (pytest-xdist), each with torch's default thread per core: more compute threads
# than cores. libgomp's threads spin between parallel regions, and spinning threads of one process take the cores
# the other needs: the suite ran 3x slower. Passive threads sleep instead. Same threads, same numbers; set before
# any test imports torch, and inherited by the CLI subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from finetune.training.reporter import Reporter  # noqa: E402  # rich only: no torch at collection

REPO = Path(__file__).resolve().parents[1]
# An unreachable proxy: anything that tries to download fails at once instead of reaching the network.
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


@pytest.fixture(autouse=True)
def offline(tmp_path_factory, monkeypatch):
    """Every test gets an empty TORCH_HOME and no network."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    return home


@pytest.fixture(scope="session")
def resnet_state(tmp_path_factory) -> Path:
    """A ResNet-18 state dict with a 1000-class ImageNet head, as torchvision ships it (random values)."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture
def hub_cache(offline, resnet_state) -> Path:
    """Put the state dict where torchvision's weights API looks for ResNet18_Weights.DEFAULT."""
    target = offline / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(resnet_state.read_bytes())
    return target


CLI_ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
os.environ.update(CLI_ENV)  # before finetune.cli.render makes its consoles: they read the width once


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240,
            isolated: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``finetune`` CLI: its Typer app in this process, or ``python -m finetune`` when ``isolated``.

    In this process saves the seconds a new one spends importing torch; what a test sees is the same:
    the exit code, stdout, stderr, and a traceback in stderr when the command crashed. Launching torchrun
    (``--nproc``), signals and import-time promises need ``isolated``.
    """
    if isolated:
        return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd or REPO,
                              env={**os.environ, **CLI_ENV}, capture_output=True, text=True, timeout=timeout)
    import contextlib
    import traceback

    from typer.testing import CliRunner

    from finetune.cli.app import app

    with contextlib.chdir(cwd or REPO):
        result = CliRunner(env=CLI_ENV).invoke(app, list(args), prog_name="finetune")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["finetune", *args], result.exit_code, result.stdout, stderr)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


COLOURS = {"blue": (30, 60, 200), "green": (40, 170, 60), "red": (210, 40, 40)}


def make_colour_folder(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree of noisy solid-colour images: easy to learn, even from random features."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = bytes(max(0, min(255, c + rng.randint(-40, 40))) for _ in range(size * size) for c in rgb)
            Image.frombytes("RGB", (size, size), pixels).save(folder / f"{i}.png")
    return root


def make_colour_split(root: Path, train: int, val: int) -> Path:
    """root/train and root/val of the three colour classes, ``train`` and ``val`` images per class."""
    make_colour_folder(root / "train", train, seed=1)
    make_colour_folder(root / "val", val, seed=2)
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """root/train (12 per class) and root/val (4 per class) of three colour classes, 32x32."""
    return make_colour_split(tmp_path_factory.mktemp("colours"), 12, 4)


def tiny_config(folder: Path, data_root: Path, **sections) -> Path:
    """A config for fast runs on tiny data; ``sections`` add or replace keys, e.g. optim={"lr": 0.1}."""
    import yaml

    config = {
        "model": {"weights": "none"},
        # resize_size: the 32 px images as they are, not resized to 36 px (the weights' 256/224) and cropped
        "data": {"root": str(data_root), "image_size": 32, "resize_size": 32, "workers": 0},
        "freeze": {"trainable": ["fc"]},
        "optim": {"lr": 0.01},
        # fp32: the same numbers on every CPU (precision auto would pick bf16 on some); auto has tests of its own
        "train": {"epochs": 2, "batch_size": 8, "seed": 0, "output_dir": str(folder / "run"), "precision": "fp32"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def weights(run_dir: Path) -> dict:
    """The model state dict of a run's last.pt."""
    import torch

    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


class SignalAtStep(Reporter):
    """A silent reporter that sends a real signal to this process after a given training step, like Ctrl-C."""

    def __init__(self, epoch: int, step: int, signum=signal.SIGINT):
        super().__init__()
        self.at, self.signum = (epoch, step), signum

    def step(self, epoch, step, *args):
        if (epoch, step) == self.at:
            os.kill(os.getpid(), self.signum)


class Messages(Reporter):
    """A silent reporter that keeps what it was told (warnings marked as such)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def message(self, text):
        self.lines.append(text)

    def warn(self, text):
        self.lines.append("WARNING: " + text)


class CodeRunningPayload:
    """Unpickling this creates ``marker`` (builtins.open in write mode): proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
