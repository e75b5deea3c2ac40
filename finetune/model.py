"""Build ResNet-18, resolve its weights (torchvision API, a local file, or none) and swap the head."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from finetune.checkpoint import UNSAFE_MARK, safe_load, unsafe_file_error
from finetune.config import TORCHVISION_WEIGHTS, Config
from finetune.errors import FinetuneError

FEATURES = 512  # width of the features entering ResNet-18's fc
IMAGENET_CLASSES = 1000
DOWNLOAD_TIMEOUT_S = 20


@dataclass
class WeightsInfo:
    source: str  # what was loaded, for logs and summary.json
    pretrained: bool
    head_loaded: bool = False  # the head came from the weights file too
    warning: Optional[str] = None


def build_model(config: Config, num_classes: int, progress: bool = True) -> tuple[nn.Module, WeightsInfo]:
    """ResNet-18 with the configured weights and a fresh ``num_classes`` head (seeded by train.seed)."""
    torch.manual_seed(config.train.seed)
    model = resnet18(weights=None)
    state, info = _load_weights(config, progress)
    if state is not None:
        _load_backbone(model, state, config.model.weights)
    model.fc = nn.Linear(FEATURES, num_classes)
    if state is not None and _file_has_head(state, num_classes, config.model.weights):
        model.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
        info.head_loaded = True
    return model, info


def torchvision_cache_file(name: str) -> Path:
    """Where torchvision's weights API looks for (and downloads) the ``name`` weights."""
    weights = ResNet18_Weights.verify(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _load_weights(config: Config, progress: bool):
    spec = config.model.weights
    if spec == "none":
        return None, WeightsInfo("none (random init)", pretrained=False)
    if spec in TORCHVISION_WEIGHTS:
        try:
            return _torchvision_state(spec, progress), WeightsInfo(f"torchvision ResNet18_Weights.{spec}", True)
        except FinetuneError as exc:
            if config.model.weights_fallback != "random":
                raise
            warning = f"{exc}\nmodel.weights_fallback is 'random': training from RANDOM weights instead."
            return None, WeightsInfo("none (random init: pretrained weights unavailable)", False, warning=warning)
    return load_state_dict_file(Path(spec)), WeightsInfo(f"file {spec}", pretrained=True)


def _torchvision_state(name: str, progress: bool) -> dict:
    weights = ResNet18_Weights.verify(name)
    cached = torchvision_cache_file(name)
    try:
        # torch.hub announces a download on stdout: keep stdout for results (--json), the notice for stderr.
        notice = contextlib.redirect_stdout(sys.stderr if progress else io.StringIO())
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), notice:
            state = weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        if UNSAFE_MARK in str(exc):
            raise unsafe_file_error(cached, "cached weights file", exc) from None
        raise _unavailable(name, cached, exc) from None
    except Exception as exc:  # network down, hash mismatch...
        raise _unavailable(name, cached, exc) from None
    return checked_state_dict(state, cached)


def _unavailable(name: str, cached: Path, exc: Exception) -> FinetuneError:
    problem = f"{type(exc).__name__}: {exc}".strip()
    if cached.exists():
        problem += f"\n  (the cached file {cached} exists but could not be loaded: delete or replace it)"
    return FinetuneError(
        f"Could not get the pretrained weights ResNet18_Weights.{name} (model.weights = {name}).\n"
        f"  {problem}\n"
        "Three ways out:\n"
        f"  1. put the file in torchvision's cache: {cached}\n"
        "  2. give a local state-dict file: --set model.weights=/path/to/resnet18.pth\n"
        "  3. train from random weights: --set model.weights=none "
        "(or allow it as a fallback with model.weights_fallback: random)")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # torch.hub downloads with urllib and no timeout: without this an offline machine can hang.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def load_state_dict_file(path: Path) -> dict:
    """Load a state dict (or a finetune checkpoint's model) from ``path`` with ``weights_only=True``."""
    if not path.is_file():
        raise FinetuneError(f"Weights file not found: {path}\nCheck model.weights (paths in a config file are "
                            "relative to the config's folder), or use DEFAULT or none.")
    return checked_state_dict(safe_load(path, "weights file"), path)


def checked_state_dict(obj, path: Path) -> dict:
    """The state dict in what ``path`` held (also inside a finetune checkpoint), without DDP's ``module.``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a finetune checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"Weights file {path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_backbone(model: nn.Module, state: dict, spec: str) -> None:
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [f"{k} {tuple(given[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in given and given[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        lines = [f"  {label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                 if keys]
        raise FinetuneError(f"Weights {spec} do not fit ResNet-18 (model.arch = resnet18):\n" + "\n".join(lines)
                            + "\nGive a ResNet-18 state dict, or use model.weights: DEFAULT or none.")
    model.load_state_dict({**model.state_dict(), **given})


def _file_has_head(state: dict, num_classes: int, spec: str) -> bool:
    """True when the file's head fits the new one; an ImageNet head is simply replaced."""
    if "fc.weight" not in state or "fc.bias" not in state:
        return False
    shape = tuple(state["fc.weight"].shape)
    if shape == (num_classes, FEATURES) and tuple(state["fc.bias"].shape) == (num_classes,):
        return True
    if shape == (IMAGENET_CLASSES, FEATURES):
        return False
    raise FinetuneError(f"Weights {spec} have a {shape[0]}-class head but model.num_classes is {num_classes}.\n"
                        f"Set model.num_classes: {shape[0]} to match the file, or drop fc.weight/fc.bias from it.")
