"""Plain helpers the tests import (``from helpers import ...``): the CLI runner, tiny configs and data sets,
weight comparisons and reporters for tests. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from finetune.training.reporter import Reporter  # rich only: no torch at collection

REPO = Path(__file__).resolve().parents[1]
# An unreachable proxy: anything that tries to download fails at once instead of reaching the network.
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


CLI_ENV = {"COLUMNS": "200", "NO_COLOR": "1"}  # conftest puts them in os.environ before any console is made


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


def tiny_config(folder: Path, data_root: Path, **sections) -> Path:
    """A config for fast runs on tiny data; ``sections`` add or replace keys, e.g. optim={"lr": 0.1}."""
    import yaml

    config = {
        "model": {"weights": "none"},
        "data": {"root": str(data_root), "image_size": 32, "workers": 0},
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


def state_digest(state: dict) -> str:
    """A SHA-256 over a state dict's names and tensor bytes, in name order."""
    import hashlib

    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(name.encode())
        hasher.update(state[name].contiguous().numpy().tobytes())
    return hasher.hexdigest()


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


def interrupt(train, config, *, epoch: int, step: int) -> None:
    """Run ``train(config, reporter)`` (``finetune.training.run.train``) with SIGINT sent after ``step`` of (0-based)
    ``epoch``, like Ctrl-C, and check that it stopped as an interrupted run does: a FinetuneError with exit code
    130 (128 + SIGINT) that says how to resume."""
    import pytest

    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError) as stopped:
        train(config, SignalAtStep(epoch=epoch, step=step))
    assert stopped.value.exit_code == 130 and "finetune train --resume" in str(stopped.value), stopped.value


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
