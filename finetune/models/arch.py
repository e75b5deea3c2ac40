"""Everything finetune knows about a network architecture, in one place.

The rest of finetune asks an :class:`Arch` description, never a model's attribute names. A model is one line
in ``ARCHS``: its torchvision builder, a :class:`Family` (how that family of models is laid out) and its
weights (each with the preprocessing and ImageNet figures of torchvision's metadata, written here so that the
config check and ``finetune models`` need no torch; ``tests/test_arch.py`` checks them against torchvision).

A family says:

- ``head``: the module path of the final ``Linear``, replaced by a fresh ``num_classes`` one (what stands before
  it stays pretrained); the freeze pattern ``head`` names it in every family;
- ``stem``: the module (or parameter) paths before the first stage: one report row, the deepest depth;
- ``stage``: a regular expression whose match on a unit's name is its stage (``layer4``, ``features.3``);
  ``optim.layer_lr_decay`` counts depth in stages: 0 for the head, growing towards the input;
- ``norm``: the normalisation its blocks use (BatchNorm keeps running statistics, LayerNorm none);
- how ``forward`` reads as a chain of units (``Arch.stages``): the model's children in order, where containers
  (``nn.Sequential`` and the family's ``blocks_in``) are opened into their children, a flatten after
  ``flatten_after``; ViT needs its own chain (``_vit_chain``);
- ``patch``: ``data.image_size`` must be a multiple of it (ViT's fixed patch grid); ``meta_device``: whether
  its builders run on the meta device (RegNet's compute its widths with tensors, which fails there);
- ``marker``: a parameter name only this family has, to tell what a foreign state-dict file was made for;
- ``zero_init``: whether its blocks have residual branches that end in a BatchNorm, which random init can start at
  zero (``model.zero_init_residual``; :func:`residual_ends` finds them).

This module imports torch only inside its methods, so the config can check names and sizes instantly.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import urlparse

from finetune.config.schema import IMAGENET_MEAN, IMAGENET_STD, Config, is_weights_name
from finetune.errors import Problem

if TYPE_CHECKING:
    from torch import nn

FLATTEN = "flatten"  # the chain's name for the flatten a model's forward() does without a module


@dataclass(frozen=True)
class Weights:
    """One torchvision weights enum value: its eval preprocessing and ImageNet figures (torchvision's metadata)."""

    name: str
    acc1: float  # ImageNet-1K top-1, %
    gflops: float  # per image at ``crop``
    crop: int = 224
    resize: int = 256  # the shorter side before the centre crop
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Family:
    """How one family of torchvision classification models is laid out (see the module docstring)."""

    name: str
    head: str
    stem: tuple[str, ...]
    stage: str
    norm: str
    marker: str
    flatten_after: Optional[str] = "avgpool"
    blocks_in: tuple[str, ...] = ()
    patch: int = 1
    meta_device: bool = True
    chain: Optional[Callable] = None  # model -> [(name, module)] when the generic chain does not fit
    adapt_state: Optional[Callable] = None  # (state, model) -> state, e.g. ViT's position embeddings resized
    zero_init: bool = False


@dataclass(frozen=True)
class Arch:
    """One supported model: its torchvision builder ``name``, family, weights enum and weights.

    ``weights[0]`` is the one torchvision's ``DEFAULT`` stands for.
    """

    name: str
    title: str
    family: Family
    weights_class: str  # the torchvision weights enum, e.g. ResNet18_Weights
    params: int  # with the 1000-class ImageNet head (torchvision's metadata of the default weights)
    weights: tuple[Weights, ...]

    @property
    def head(self) -> str:
        return self.family.head

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.weights)

    def weights_named(self, spec: str) -> Weights:
        """The weights ``model.weights`` names; DEFAULT, a file or none give the default weights' preprocessing."""
        return next((w for w in self.weights if w.name == spec), self.weights[0])

    def size_problem(self, image_size: int) -> Optional[str]:
        """Why this model cannot take ``image_size`` px images, or None."""
        patch = self.family.patch
        if image_size % patch == 0:
            return None
        below, above = image_size // patch * patch, (image_size // patch + 1) * patch
        sizes = f"{below} or {above}" if below >= 32 else str(above)
        return (f"{self.title} cuts images into {patch}x{patch} patches, so data.image_size must be a multiple of "
                f"{patch} (e.g. {sizes}; the weights were trained at {self.weights[0].crop}); its position "
                "embeddings are interpolated to the size you choose")

    # --- building -----------------------------------------------------------------------------------------------

    @property
    def residual_zero_init(self) -> bool:
        """Whether ``zero_init_residual`` changes anything for this model (for the record)."""
        return self.family.zero_init

    def build(self, num_classes: int, image_size: Optional[int] = None) -> "nn.Module":
        """The torchvision model with random weights and a fresh ``num_classes``-way head (for ``image_size`` px
        images, which only ViT needs to know); its residual branches as drawn (:func:`zero_residual_branches`
        starts them at zero)."""
        import torchvision.models
        from torch import nn

        options = {"image_size": image_size} if self.family.patch > 1 and image_size else {}
        model = getattr(torchvision.models, self.name)(weights=None, **options)
        old = model.get_submodule(self.head)
        model.set_submodule(self.head, nn.Linear(old.in_features, num_classes))
        return model

    def skeleton(self, num_classes: int, image_size: Optional[int] = None) -> "nn.Module":
        """The model's structure without its values: names and shapes only (on the meta device where the
        builder allows it; RegNet's is built for real, without touching the global random state)."""
        import torch

        if self.family.meta_device:
            with torch.device("meta"):
                return self.build(num_classes, image_size)
        with torch.random.fork_rng(devices=[]):
            return self.build(num_classes, image_size)

    def parameter_names(self, num_classes: int, image_size: Optional[int] = None) -> list[str]:
        return [name for name, _ in self.skeleton(num_classes, image_size).named_parameters()]

    def zero_branches(self, model: "nn.Module") -> list[tuple[str, str]]:
        """(block name, name of the BatchNorm ending its residual branch) of every block whose branch starts at zero:
        that BatchNorm's weight is all zero, so the branch outputs a constant."""
        return [(block, end) for block, end in residual_ends(model)
                if not model.get_submodule(f"{block}.{end}").weight.any()]

    def silent_parameters(self, model: "nn.Module") -> set[str]:
        """Parameters inside residual branches that start at zero: no gradient reaches them until the branch's last
        BatchNorm weight moves (after the first step)."""
        return {f"{block}.{name}" for block, end in self.zero_branches(model)
                for name, _ in model.get_submodule(block).named_parameters()
                if not name.startswith(("downsample.", "proj.", f"{end}."))}

    def weights_enum(self):
        import torchvision.models

        return getattr(torchvision.models, self.weights_class)

    def cache_file(self, weights_name: str) -> Path:
        """Where torchvision's weights API looks for (and downloads) the ``weights_name`` weights."""
        import torch

        weights = self.weights_enum().verify(weights_name)
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)

    def head_features(self, model: "nn.Module") -> int:
        return model.get_submodule(self.head).in_features

    def adapt_state(self, state: dict, model: "nn.Module") -> dict:
        """A state dict made for another input size, fitted to ``model`` (ViT: position embeddings resized)."""
        return self.family.adapt_state(state, model) if self.family.adapt_state else state

    # --- the chain of units, stages and depth -------------------------------------------------------------------

    def stages(self, model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
        """The model as an ordered chain of ``(name, module)`` units whose composition equals ``model(x)``;
        the frozen prefix is a prefix of it. :func:`unit_parameters` gives a unit's parameter names."""
        from torch import nn

        if self.family.chain is not None:
            return self.family.chain(model)
        chain = []
        for name, child in model.named_children():
            chain += _units(name, child, ("Sequential",) + self.family.blocks_in)
            if name == self.family.flatten_after:
                chain.append((FLATTEN, nn.Flatten(1)))
        return chain

    @functools.cached_property
    def _layout(self) -> "_Layout":
        """Unit names and depth groups, read once from the model's skeleton (they depend on neither the number
        of classes nor the image size)."""
        model = self.skeleton(2, max(32, self.family.patch * 2))
        return _Layout.of(self, model)

    def group(self, name: str) -> str:
        """The report row of a parameter (or module) name: ``stem``, the head, or the unit (block) it is in."""
        if _under(name, self.head):
            return self.head
        if any(_under(name, stem) for stem in self.family.stem):
            return "stem"
        return self._layout.unit_of(name) or name.split(".")[0]

    def depth(self, param_name: str) -> int:
        """0 for the head, growing towards the input in stages (``optim.layer_lr_decay`` gives depth d the rate
        ``lr * decay**d``)."""
        layout = self._layout
        return layout.depths[layout.depth_group(self, param_name)]

    @property
    def max_depth(self) -> int:
        return max(self._layout.depths.values())

    @property
    def stage_names(self) -> list[str]:
        """The names a freeze pattern can use for this model's parts, input to output (for error messages)."""
        layout = self._layout
        stem = [s for s in self.family.stem if any(_under(n, s) for n in layout.parameters)]
        return stem + layout.stage_order + layout.neck + [self.head]


@dataclass
class _Layout:
    parameters: list[str]
    units: list[str]  # chain unit names, longest first (for prefix lookups)
    stage_order: list[str]  # stages with parameters, input to output
    neck: list[str]  # units with parameters between the last stage and the head
    depths: dict[str, int]  # depth group -> depth

    @classmethod
    def of(cls, arch: Arch, model) -> "_Layout":
        chain = arch.stages(model)
        units = sorted((name for name, _ in chain), key=len, reverse=True)
        layout = cls([name for name, _ in model.named_parameters()], units, [], [], {})
        groups = []
        for name, module in chain:
            for param in unit_parameters(name, module):
                group = layout.depth_group(arch, param)
                if group not in groups:
                    groups.append(group)
        layout.stage_order = [g for g in groups if g not in ("stem", "neck", "head")]
        layout.neck = [name for name, module in chain if unit_parameters(name, module)
                       and layout.depth_group(arch, unit_parameters(name, module)[0]) == "neck"]
        layout.depths = {group: depth for depth, group in enumerate(reversed(groups))}
        return layout

    def unit_of(self, name: str) -> Optional[str]:
        return next((unit for unit in self.units if _under(name, unit)), None)

    def depth_group(self, arch: Arch, name: str) -> str:
        """``head``, ``stem``, a stage name, or ``neck`` (between the last stage and the head)."""
        if _under(name, arch.head):
            return "head"
        if any(_under(name, stem) for stem in arch.family.stem):
            return "stem"
        found = re.match(arch.family.stage, self.unit_of(name) or name)
        return found.group(0) if found else "neck"


def residual_ends(model: "nn.Module") -> list[tuple[str, str]]:
    """(block, BatchNorm) of each residual block whose branch ends in a BatchNorm: ResNet's BasicBlock (bn2) and
    Bottleneck (bn3), RegNet's ResBottleneckBlock (f.c.1), and the inverted residual blocks of MobileNetV3 and
    EfficientNet that add their input back (block.N.1). ConvNeXt's blocks start near zero by design (layer scale
    1e-6); ViT and Swin have no BatchNorm."""
    from torch import nn

    ends = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("BasicBlock", "Bottleneck"):
            ends.append((name, "bn3" if kind == "Bottleneck" else "bn2"))
        elif kind == "ResBottleneckBlock":
            ends.append((name, "f.c.1"))
        elif getattr(module, "use_res_connect", False):
            end = f"block.{len(module.block) - 1}.1"
            if isinstance(module.get_submodule(end), nn.BatchNorm2d):
                ends.append((name, end))
    return ends


def zero_residual_branches(model: "nn.Module") -> None:
    """Start every residual branch of ``model`` at zero: the weight of the BatchNorm ending it (:func:`residual_ends`)
    becomes 0, so each block starts as the identity. No random draw changes."""
    import torch

    with torch.no_grad():
        for block, end in residual_ends(model):
            model.get_submodule(f"{block}.{end}").weight.zero_()


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _units(name: str, module, containers: tuple[str, ...]) -> list[tuple[str, "nn.Module"]]:
    if type(module).__name__ in containers:
        return [unit for child, sub in module.named_children() for unit in _units(f"{name}.{child}", sub, containers)]
    return [(name, module)]


def unit_parameters(name: str, module) -> list[str]:
    """The model's names of the parameters in chain unit ``(name, module)``."""
    if hasattr(module, "model_names"):  # a unit made for the chain holds the model's parameters under other names
        return list(module.model_names.values())
    return [f"{name}.{p}" for p, _ in module.named_parameters()]


# --- ViT: the one family whose forward() is not a chain of its children --------------------------------------

def _vit_chain(model) -> list[tuple[str, "nn.Module"]]:
    import torch
    from torch import nn

    class Stem(nn.Module):
        """Patches -> tokens, the class token in front, position embeddings added: ViT's forward up to its layers."""

        model_names = {"class_token": "class_token", "conv_proj.weight": "conv_proj.weight",
                       "conv_proj.bias": "conv_proj.bias", "pos_embedding": "encoder.pos_embedding"}

        def __init__(self, vit):
            super().__init__()
            self.conv_proj, self.dropout = vit.conv_proj, vit.encoder.dropout
            self.class_token, self.pos_embedding = vit.class_token, vit.encoder.pos_embedding

        def forward(self, x):
            x = self.conv_proj(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return self.dropout(x + self.pos_embedding)

    class ClassToken(nn.Module):
        def forward(self, x):
            return x[:, 0]

    layers = [(f"encoder.layers.{name}", layer) for name, layer in model.encoder.layers.named_children()]
    return [("stem", Stem(model))] + layers + [("encoder.ln", model.encoder.ln), ("class_token_out", ClassToken()),
                                               ("heads.head", model.heads.head)]


def _vit_positions(state: dict, model) -> dict:
    """Position embeddings made for another image size, interpolated (bicubic) to ``model``'s patch grid."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    key = "encoder.pos_embedding"
    if key not in state or state[key].shape == model.encoder.pos_embedding.shape:
        return state
    tokens = state[key].shape[1] - 1
    if math.isqrt(tokens) ** 2 != tokens:
        return state  # not a square grid: the shape check that follows reports it
    return interpolate_embeddings(model.image_size, model.patch_size, state)


# --- the families and their models ------------------------------------------------------------------------------

RESNET = Family("ResNet", head="fc", stem=("conv1", "bn1", "relu", "maxpool"), stage=r"layer\d+", norm="BatchNorm",
                marker="layer1.0.conv1.weight", zero_init=True)
MOBILENET = Family("MobileNetV3", head="classifier.3", stem=("features.0",), stage=r"features\.\d+",
                   norm="BatchNorm", marker="features.1.block.0.0.weight", zero_init=True)
EFFICIENTNET = Family("EfficientNet", head="classifier.1", stem=("features.0",), stage=r"features\.\d+",
                      norm="BatchNorm", marker="features.1.0.block.0.0.weight", zero_init=True)
REGNET = Family("RegNet", head="fc", stem=("stem",), stage=r"trunk_output\.block\d+", norm="BatchNorm",
                marker="trunk_output.block1.block1-0.proj.0.weight", blocks_in=("AnyStage",), meta_device=False,
                zero_init=True)
CONVNEXT = Family("ConvNeXt", head="classifier.2", stem=("features.0",), stage=r"features\.\d+", norm="LayerNorm",
                  marker="features.1.0.layer_scale", flatten_after=None)
SWIN = Family("Swin", head="head", stem=("features.0",), stage=r"features\.\d+", norm="LayerNorm",
              marker="features.1.0.attn.relative_position_bias_table", flatten_after=None)
VIT = Family("ViT", head="heads.head", stem=("class_token", "conv_proj", "encoder.pos_embedding", "encoder.dropout"),
             stage=r"encoder\.layers\.encoder_layer_\d+", norm="LayerNorm", marker="class_token", patch=16,
             chain=_vit_chain, adapt_state=_vit_positions)

W = Weights
ARCHS = {arch.name: arch for arch in (
    Arch("resnet18", "ResNet-18", RESNET, "ResNet18_Weights", 11_689_512, (W("IMAGENET1K_V1", 69.758, 1.814),)),
    Arch("resnet34", "ResNet-34", RESNET, "ResNet34_Weights", 21_797_672, (W("IMAGENET1K_V1", 73.314, 3.664),)),
    Arch("resnet50", "ResNet-50", RESNET, "ResNet50_Weights", 25_557_032,
         (W("IMAGENET1K_V2", 80.858, 4.089, resize=232), W("IMAGENET1K_V1", 76.13, 4.089))),
    Arch("resnet101", "ResNet-101", RESNET, "ResNet101_Weights", 44_549_160,
         (W("IMAGENET1K_V2", 81.886, 7.801, resize=232), W("IMAGENET1K_V1", 77.374, 7.801))),
    Arch("resnet152", "ResNet-152", RESNET, "ResNet152_Weights", 60_192_808,
         (W("IMAGENET1K_V2", 82.284, 11.514, resize=232), W("IMAGENET1K_V1", 78.312, 11.514))),
    Arch("resnext50_32x4d", "ResNeXt-50 32x4d", RESNET, "ResNeXt50_32X4D_Weights", 25_028_904,
         (W("IMAGENET1K_V2", 81.198, 4.23, resize=232), W("IMAGENET1K_V1", 77.618, 4.23))),
    Arch("wide_resnet50_2", "Wide ResNet-50-2", RESNET, "Wide_ResNet50_2_Weights", 68_883_240,
         (W("IMAGENET1K_V2", 81.602, 11.398, resize=232), W("IMAGENET1K_V1", 78.468, 11.398))),
    Arch("mobilenet_v3_small", "MobileNetV3-Small", MOBILENET, "MobileNet_V3_Small_Weights", 2_542_856,
         (W("IMAGENET1K_V1", 67.668, 0.057),)),
    Arch("mobilenet_v3_large", "MobileNetV3-Large", MOBILENET, "MobileNet_V3_Large_Weights", 5_483_032,
         (W("IMAGENET1K_V2", 75.274, 0.217, resize=232), W("IMAGENET1K_V1", 74.042, 0.217))),
    Arch("efficientnet_b0", "EfficientNet-B0", EFFICIENTNET, "EfficientNet_B0_Weights", 5_288_548,
         (W("IMAGENET1K_V1", 77.692, 0.386, interpolation="bicubic"),)),
    Arch("efficientnet_b1", "EfficientNet-B1", EFFICIENTNET, "EfficientNet_B1_Weights", 7_794_184,
         (W("IMAGENET1K_V2", 79.838, 0.687, crop=240, resize=255),
          W("IMAGENET1K_V1", 78.642, 0.687, crop=240, interpolation="bicubic"))),
    Arch("efficientnet_b2", "EfficientNet-B2", EFFICIENTNET, "EfficientNet_B2_Weights", 9_109_994,
         (W("IMAGENET1K_V1", 80.608, 1.088, crop=288, resize=288, interpolation="bicubic"),)),
    Arch("efficientnet_b3", "EfficientNet-B3", EFFICIENTNET, "EfficientNet_B3_Weights", 12_233_232,
         (W("IMAGENET1K_V1", 82.008, 1.827, crop=300, resize=320, interpolation="bicubic"),)),
    Arch("efficientnet_v2_s", "EfficientNetV2-S", EFFICIENTNET, "EfficientNet_V2_S_Weights", 21_458_488,
         (W("IMAGENET1K_V1", 84.228, 8.366, crop=384, resize=384),)),
    Arch("regnet_y_400mf", "RegNetY-400MF", REGNET, "RegNet_Y_400MF_Weights", 4_344_144,
         (W("IMAGENET1K_V2", 75.804, 0.402, resize=232), W("IMAGENET1K_V1", 74.046, 0.402))),
    Arch("regnet_y_800mf", "RegNetY-800MF", REGNET, "RegNet_Y_800MF_Weights", 6_432_512,
         (W("IMAGENET1K_V2", 78.828, 0.834, resize=232), W("IMAGENET1K_V1", 76.42, 0.834))),
    Arch("regnet_y_1_6gf", "RegNetY-1.6GF", REGNET, "RegNet_Y_1_6GF_Weights", 11_202_430,
         (W("IMAGENET1K_V2", 80.876, 1.612, resize=232), W("IMAGENET1K_V1", 77.95, 1.612))),
    Arch("regnet_y_3_2gf", "RegNetY-3.2GF", REGNET, "RegNet_Y_3_2GF_Weights", 19_436_338,
         (W("IMAGENET1K_V2", 81.982, 3.176, resize=232), W("IMAGENET1K_V1", 78.948, 3.176))),
    Arch("convnext_tiny", "ConvNeXt-Tiny", CONVNEXT, "ConvNeXt_Tiny_Weights", 28_589_128,
         (W("IMAGENET1K_V1", 82.52, 4.456, resize=236),)),
    Arch("convnext_small", "ConvNeXt-Small", CONVNEXT, "ConvNeXt_Small_Weights", 50_223_688,
         (W("IMAGENET1K_V1", 83.616, 8.684, resize=230),)),
    Arch("vit_b_16", "ViT-B/16", VIT, "ViT_B_16_Weights", 86_567_656,
         (W("IMAGENET1K_V1", 81.072, 17.564), W("IMAGENET1K_SWAG_E2E_V1", 85.304, 55.484, 384, 384, "bicubic"),
          W("IMAGENET1K_SWAG_LINEAR_V1", 81.886, 17.564, 224, 224, "bicubic"))),
    Arch("swin_t", "Swin-T", SWIN, "Swin_T_Weights", 28_288_354,
         (W("IMAGENET1K_V1", 81.474, 4.491, resize=232, interpolation="bicubic"),)),
)}
ARCH_NAMES = tuple(ARCHS)
# Every torchvision weights name some architecture accepts: model.weights values that are not file paths.
WEIGHT_NAMES = ("DEFAULT",) + tuple(sorted({n for arch in ARCHS.values() for n in arch.weight_names}))


def get_arch(name: str) -> Arch:
    return ARCHS[name]


def problems(config: Config) -> list[Problem]:
    """``model.arch`` that names no architecture finetune knows (with the closest names), ``model.weights`` naming
    torchvision weights the architecture lacks (with those it has), and an image size it cannot take (with the
    sizes it can), or a resize smaller than the crop. The preprocessing must have been filled
    (:func:`fill_preprocessing`)."""
    arch = ARCHS.get(config.model.arch)
    if arch is None:
        close = difflib.get_close_matches(config.model.arch, ARCH_NAMES, n=3, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return [Problem("model.arch", f"{config.model.arch!r} is not an architecture finetune knows; {hint}"
                                      f"`finetune models` lists all {len(ARCH_NAMES)}")]
    found = []
    weights = config.model.weights
    if is_weights_name(weights) and weights != "DEFAULT" and weights not in arch.weight_names:
        found.append(Problem("model.weights", f"torchvision has no {weights} weights for {arch.name}; use DEFAULT or "
                                              f"{' or '.join(arch.weight_names)}, a state-dict file, or none"))
    data = config.data
    size_problem = arch.size_problem(data.image_size)
    if size_problem:
        found.append(Problem("data.image_size", f"is {data.image_size}, but {size_problem}"))
    if data.resize_size < data.image_size:
        found.append(Problem("data.resize_size", f"is {data.resize_size}, smaller than data.image_size "
                                                 f"({data.image_size}): the centre crop would not fit; make it at "
                                                 f"least {data.image_size} or null"))
    return found


def preprocessing(config: Config) -> dict:
    """The eval preprocessing of ``model.weights`` (the architecture's default weights for a file or none), scaled
    to ``data.image_size`` when that is set: crop, resize (the weights' resize/crop ratio), interpolation and
    mean/std, as ``data`` keys.

    The margin between resize and crop (256/224) is there for two reasons: the pretrained weights were evaluated on
    such crops, and training on random resized crops makes objects look larger than in the whole image. A model
    that starts from random weights (``model.weights: none``) and trains without augmentation has neither, and the
    margin would only cut off the border of every image it sees: it is resized to the crop itself (the whole
    image, as timm's train.py does with ``--no-aug``)."""
    own = ARCHS[config.model.arch].weights_named(config.model.weights)
    crop = config.data.image_size or own.crop
    resize = crop if whole_image(config) else max(crop, math.floor(crop * own.resize / own.crop))
    return {"image_size": crop, "resize_size": resize, "interpolation": own.interpolation,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def whole_image(config: Config) -> bool:
    """Whether images are resized to the crop itself by default, without a margin: random weights and no
    augmentation (:func:`preprocessing`)."""
    return config.model.weights == "none" and config.data.augment == "none"


def fill_preprocessing(config: Config) -> Config:
    """Set the ``data`` preprocessing keys the config leaves null to the weights' own (:func:`preprocessing`), in
    place, so that the run directory, checkpoints and exports record what was used; an unknown architecture is left
    to :func:`problems`. Returns ``config``."""
    if config.model.arch in ARCHS:
        for key, value in preprocessing(config).items():
            if getattr(config.data, key) is None:
                setattr(config.data, key, value)
    return config
