"""Build the configured architecture, resolve its weights (torchvision API, a local file, or none), swap the head.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.models.arch import ARCHS, WEIGHT_NAMES, Arch, get_arch, zero_residual_branches
from finetune.models.freeze import plan_freeze
from finetune.utils.files import UNSAFE_MARK, safe_load, unsafe_file_error

IMAGENET_CLASSES = 1000
DOWNLOAD_TIMEOUT_S = 20


@dataclass
class WeightsInfo:
    source: str  # what was loaded, for logs and summary.json
    pretrained: bool
    head_loaded: bool = False  # the head came from the weights file too
    warning: Optional[str] = None
    zero_init_residual: bool = False  # random init with every residual branch starting at zero


def build_model(config: Config, num_classes: int, show_download: bool = True) -> tuple[nn.Module, WeightsInfo]:
    """``model.arch`` with the configured weights and a fresh ``num_classes`` head.

    The random initialisation is seeded by ``train.seed`` without touching the global RNG. A model that keeps
    random weights and trains whole starts its residual branches at zero (``model.zero_init_residual``), as timm's do.
    ``show_download``: torchvision's download bar (on stderr) when pretrained weights are fetched.
    """
    arch = get_arch(config.model.arch)
    state, info = _load_weights(arch, config, show_download)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        model = arch.build(num_classes, config.data.image_size)
    if state is None and config.model.zero_init_residual and arch.residual_zero_init:
        _zero_residual_branches(arch, model, config, info)
    if state is not None:
        state = arch.adapt_state(state, model)
        _load_backbone(arch, model, state, config.model.weights)
        if _file_has_head(arch, model, state, num_classes, config.model.weights):
            model.get_submodule(arch.head).load_state_dict({"weight": state[f"{arch.head}.weight"],
                                                            "bias": state[f"{arch.head}.bias"]})
            info.head_loaded = True
    return model, info


def _zero_residual_branches(arch: Arch, model: nn.Module, config: Config, info: WeightsInfo) -> None:
    """Start every residual branch at zero (its last BatchNorm weight 0, so each block starts as the identity) when
    the whole network trains by the last epoch: training from scratch, what timm and torchvision do it for. With
    part of a random network frozen the weights stay as drawn: a frozen branch at zero would stay zero for good, and
    zeroed branches before a frozen random block hurt (the quick start, layer4 frozen: 39% after 3 epochs against
    98% without). No random draw changes."""
    names = [name for name, _ in model.named_parameters()]
    plan = plan_freeze(names, config.freeze, config.train.epochs, head=arch.head)  # after the last stage
    if not all(decision.trainable for decision in plan.values()):
        info.source += ", residual branches as drawn (they start at zero only when the whole network trains)"
        return
    zero_residual_branches(model)
    info.zero_init_residual = True
    info.source += ", residual branches start at zero"


def _load_weights(arch: Arch, config: Config, show_download: bool):
    spec = config.model.weights
    if spec == "none":
        return None, WeightsInfo("none (random init)", pretrained=False)
    if spec in WEIGHT_NAMES:
        try:
            state = _torchvision_state(arch, spec, show_download)
            return state, WeightsInfo(f"torchvision {arch.weights_class}.{spec}", True)
        except FinetuneError as exc:
            if config.model.weights_fallback != "random":
                raise
            warning = f"{exc}\nmodel.weights_fallback is 'random': training from RANDOM weights instead."
            return None, WeightsInfo("none (random init: pretrained weights unavailable)", False, warning=warning)
    return load_state_dict_file(Path(spec)), WeightsInfo(f"file {spec}", pretrained=True)


def _torchvision_state(arch: Arch, name: str, show_download: bool) -> dict:
    weights = arch.weights_enum().verify(name)
    cached = arch.cache_file(name)
    try:
        # torch.hub announces a download on stdout: keep stdout for results (--json), the notice for stderr.
        notice = contextlib.redirect_stdout(sys.stderr if show_download else io.StringIO())
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), notice:
            state = weights.get_state_dict(progress=show_download, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        if UNSAFE_MARK in str(exc):
            raise unsafe_file_error(cached, "cached weights file", exc) from None
        raise _unavailable(arch, name, cached, exc) from None
    except Exception as exc:  # network down, hash mismatch...
        raise _unavailable(arch, name, cached, exc) from None
    return checked_state_dict(state, cached)


def _unavailable(arch: Arch, name: str, cached: Path, exc: Exception) -> FinetuneError:
    problem = f"{type(exc).__name__}: {exc}".strip()
    if cached.exists():
        problem += f"\n  (the cached file {cached} exists but could not be loaded: delete or replace it)"
    return FinetuneError(
        f"Could not get the pretrained weights {arch.weights_class}.{name} (model.weights = {name}).\n"
        f"  {problem}\n"
        "Three ways out:\n"
        f"  1. put the file in torchvision's cache: {cached}\n"
        f"  2. give a local state-dict file: --set model.weights=/path/to/{arch.name}.pth\n"
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


def served_state_dict(checkpoint: dict) -> dict:
    """The weights a finetune checkpoint serves (to export, evaluate, predict, or fine-tune from): the raw model's,
    or its weight EMA's when ``train.ema.use_for`` chose them (the EMA's state without ``module.`` and its count)."""
    if checkpoint.get("serves") == "ema":
        return {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    return checkpoint["model"]


def checked_state_dict(obj, path: Path) -> dict:
    """The state dict in what ``path`` held (also inside a finetune checkpoint), without DDP's ``module.``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = served_state_dict(obj)  # a finetune checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"Weights file {path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_backbone(arch: Arch, model: nn.Module, state: dict, spec: str) -> None:
    head = f"{arch.head}."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [f"{k} {tuple(given[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in given and given[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        lines = [f"  {label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                 if keys]
        other = looks_like(state)
        seems = (f"They look like {other.title} weights: set model.arch: {other.name} to use them.\n"
                 if other is not None and other is not arch else "")
        raise FinetuneError(f"Weights {spec} do not fit {arch.title} (model.arch = {arch.name}):\n"
                            + "\n".join(lines) + f"\n{seems}Give a {arch.title} state dict, or use model.weights: "
                            "DEFAULT or none.")
    model.load_state_dict({**model.state_dict(), **given})


def looks_like(state: dict) -> Optional[Arch]:
    """The supported architecture a state dict was made for (keys and shapes, the head and ViT's position
    embeddings aside), or None. Only the members of the family whose marker parameter it holds are built."""
    candidates = [arch for arch in ARCHS.values() if arch.family.marker in state]
    fits = []
    for arch in candidates:
        expected = arch.skeleton(IMAGENET_CLASSES).state_dict()
        ignored = [f"{arch.head}.", "encoder.pos_embedding"]
        if {k for k in expected if not k.startswith(tuple(ignored))} == \
                {k for k in state if not k.startswith(tuple(ignored))}:
            fits.append(arch)
            if all(state[k].shape == v.shape for k, v in expected.items() if not k.startswith(tuple(ignored))):
                return arch
    return fits[0] if fits else None


def _file_has_head(arch: Arch, model: nn.Module, state: dict, num_classes: int, spec: str) -> bool:
    """True when the file's head fits the new one; an ImageNet head is simply replaced."""
    weight, bias = f"{arch.head}.weight", f"{arch.head}.bias"
    if weight not in state or bias not in state:
        return False
    shape, features = tuple(state[weight].shape), arch.head_features(model)
    if shape == (num_classes, features) and tuple(state[bias].shape) == (num_classes,):
        return True
    if shape == (IMAGENET_CLASSES, features):
        return False
    raise FinetuneError(f"Weights {spec} have a {shape[0]}-class head but model.num_classes is {num_classes}.\n"
                        f"Set model.num_classes: {shape[0]} to match the file, or drop {weight}/{bias} from it.")
