"""Everything finetune knows about a network architecture, in one place.

The rest of finetune asks an :class:`Arch` description, never a model's attribute
names, so adding a family (say, MobileNet) means adding one description here.
A description provides:

- ``name``, ``title`` (for messages) and ``weight_names``: the torchvision weights
  names ``model.weights`` accepts besides ``DEFAULT`` (static, so the config check
  needs no torch);
- ``build(num_classes, zero_init_residual=False)``: the torchvision model with
  random weights and a fresh ``num_classes``-way head; with ``zero_init_residual``
  every residual branch starts at zero (its last BatchNorm's weight is 0), so each
  block starts as the identity (a family without residual branches ignores it);
- ``residual_zero_init``: whether ``zero_init_residual`` changes anything (for the record);
- ``zero_branches(model)`` and ``silent_parameters(model)``: the residual branches that
  end in a zero BatchNorm weight (as ``zero_init_residual`` starts them), and the
  parameters inside them, which no gradient reaches until that weight moves;
- ``weights_enum()`` and ``cache_file(name)``: torchvision's weights enum, and the
  file its weights API reads from (and downloads to) ``$TORCH_HOME/hub/checkpoints``;
- ``head``: the name of the classifier module that is replaced, and
  ``head_features(model)``: the width of the features entering it;
- ``stages(model)``: the model as an ordered chain of ``(name, module)`` whose
  composition equals ``model(x)`` (the frozen prefix is a prefix of this chain);
- ``depth(param_name)``: 0 for the head, growing towards the input
  (``optim.layer_lr_decay`` gives depth d the rate ``lr * decay**d``);
- ``group(name)``: the freeze-report row of a parameter or module name.

This module imports torch only inside its methods, so the config can check
architecture and weights names instantly.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from finetune.config.schema import ModelConfig, is_weights_name
from finetune.errors import Problem

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ResNet:
    """torchvision's ResNet family: a stem, four stages of residual blocks, average pooling and ``fc``."""

    name: str
    title: str
    weights_class: str  # the torchvision weights enum, e.g. ResNet18_Weights
    weight_names: tuple[str, ...]
    head: str = "fc"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
    stem: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool")
    residual_zero_init: bool = True

    def build(self, num_classes: int, zero_init_residual: bool = False) -> "nn.Module":
        import torchvision.models
        from torch import nn

        # torchvision's switch zeroes bn2 (BasicBlock) or bn3 (Bottleneck) after the seeded init: same draws.
        model = getattr(torchvision.models, self.name)(weights=None, zero_init_residual=zero_init_residual)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model

    def skeleton(self, num_classes: int) -> "nn.Module":
        """The model's structure on the meta device: names and shapes only, no memory, no initialisation."""
        import torch

        with torch.device("meta"):
            return self.build(num_classes)

    def parameter_names(self, num_classes: int) -> list[str]:
        return [name for name, _ in self.skeleton(num_classes).named_parameters()]

    def zero_branches(self, model: "nn.Module") -> list[tuple[str, str]]:
        """(block name, name of the BatchNorm ending its residual branch) of every block whose branch starts at zero:
        that BatchNorm's weight is all zero, so the branch outputs a constant."""
        ends = []
        for layer in self.layers:
            for i, block in enumerate(getattr(model, layer)):
                last = "bn3" if hasattr(block, "bn3") else "bn2"  # Bottleneck or BasicBlock
                if not getattr(block, last).weight.any():
                    ends.append((f"{layer}.{i}", last))
        return ends

    def silent_parameters(self, model: "nn.Module") -> set[str]:
        """Parameters inside residual branches that start at zero: no gradient reaches them until the branch's last
        BatchNorm weight moves (after the first step)."""
        return {f"{block}.{name}" for block, last in self.zero_branches(model)
                for name, _ in model.get_submodule(block).named_parameters()
                if not name.startswith(("downsample.", f"{last}."))}

    def weights_enum(self):
        import torchvision.models

        return getattr(torchvision.models, self.weights_class)

    def cache_file(self, weights_name: str) -> Path:
        """Where torchvision's weights API looks for (and downloads) the ``weights_name`` weights."""
        import torch

        weights = self.weights_enum().verify(weights_name)
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)

    def head_features(self, model: "nn.Module") -> int:
        return model.fc.in_features

    def stages(self, model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
        from torch import nn

        chain = [(name, getattr(model, name)) for name in self.stem]
        for layer in self.layers:
            chain += [(f"{layer}.{i}", block) for i, block in enumerate(getattr(model, layer))]
        return chain + [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), (self.head, model.fc)]

    def depth(self, param_name: str) -> int:
        top = param_name.split(".")[0]
        if top == self.head:
            return 0
        if top in self.layers:
            return len(self.layers) - self.layers.index(top)
        return len(self.layers) + 1  # the stem

    @property
    def max_depth(self) -> int:
        return len(self.layers) + 1

    def group(self, name: str) -> str:
        """The report row of a parameter (or module) name: stem, layerN.B or the head."""
        parts = name.split(".")
        if parts[0] in self.layers and len(parts) > 1:
            return ".".join(parts[:2])
        return parts[0] if parts[0] == self.head else "stem"


_V1 = ("IMAGENET1K_V1",)
_V2 = ("IMAGENET1K_V1", "IMAGENET1K_V2")
ARCHS = {arch.name: arch for arch in (
    ResNet("resnet18", "ResNet-18", "ResNet18_Weights", _V1),
    ResNet("resnet34", "ResNet-34", "ResNet34_Weights", _V1),
    ResNet("resnet50", "ResNet-50", "ResNet50_Weights", _V2),
    ResNet("resnet101", "ResNet-101", "ResNet101_Weights", _V2),
    ResNet("resnet152", "ResNet-152", "ResNet152_Weights", _V2),
    ResNet("resnext50_32x4d", "ResNeXt-50 32x4d", "ResNeXt50_32X4D_Weights", _V2),
    ResNet("wide_resnet50_2", "Wide ResNet-50-2", "Wide_ResNet50_2_Weights", _V2),
)}
ARCH_NAMES = tuple(ARCHS)
# Every torchvision weights name some architecture accepts: model.weights values that are not file paths.
WEIGHT_NAMES = ("DEFAULT",) + tuple(sorted({n for arch in ARCHS.values() for n in arch.weight_names}))

Arch = ResNet  # the interface every description provides (see the module docstring)


def get_arch(name: str) -> Arch:
    return ARCHS[name]


def problems(model: ModelConfig) -> list[Problem]:
    """``model.arch`` that names no architecture finetune knows, and ``model.weights`` naming torchvision weights
    the architecture lacks."""
    arch = ARCHS.get(model.arch)
    if arch is None:
        close = difflib.get_close_matches(model.arch, ARCH_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        return [Problem("model.arch", f"{model.arch!r} is not an architecture finetune knows; {hint}"
                                      f"use one of {', '.join(ARCH_NAMES)}")]
    weights = model.weights
    if is_weights_name(weights) and weights != "DEFAULT" and weights not in arch.weight_names:
        return [Problem("model.weights", f"torchvision has no {weights} weights for {arch.name}; use DEFAULT or "
                                         f"{' or '.join(arch.weight_names)}, a state-dict file, or none")]
    return []
