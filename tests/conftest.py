"""Shared fixtures. No test reaches the network: TORCH_HOME is a fresh temp folder and downloads fail at once.

Plain helpers (the CLI runner, tiny configs and data) are in ``helpers.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The suite runs a process per core (pytest-xdist), each with torch's default thread per core: more compute threads
# than cores. libgomp's threads spin between parallel regions, and spinning threads of one process take the cores
# the other needs: the suite ran 3x slower. Passive threads sleep instead. Same threads, same numbers; set before
# any test imports torch, and inherited by the CLI subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from helpers import CLI_ENV, OFFLINE_ENV, make_colour_split  # noqa: E402

os.environ.update(CLI_ENV)  # before finetune.cli.render makes its consoles: they read the width once


@pytest.fixture(autouse=True)
def offline(tmp_path_factory, monkeypatch):
    """Every test gets an empty TORCH_HOME and no network."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    yield home
    shutil.rmtree(home, ignore_errors=True)  # a hub cache holds a model's weights; 350 of them filled a disk


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``tmp_path_factory.mktemp`` for module-scoped fixtures, whose folders go when the module's tests are done
    (unless a test failed): they hold real runs' checkpoints, tens of MB each, and pytest would keep them all to
    the end of the session (a passed test's own ``tmp_path`` goes at once: ``tmp_path_retention_policy``)."""
    made = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if not request.session.testsfailed:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """root/train (12 per class) and root/val (4 per class) of three colour classes, 32x32."""
    return make_colour_split(tmp_path_factory.mktemp("colours"), 12, 4)
