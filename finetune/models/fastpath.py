"""Fast CPU paths: the frozen prefix runs without autograd, and its outputs can be cached.

A model is a chain of stages (for a ResNet: stem layers, residual blocks, pooling, fc; ``arch`` describes the
chain). The stages before the first trainable parameter form the *frozen prefix*: it runs under ``torch.no_grad()``,
so autograd builds no graph and keeps no activations for it; only the trainable suffix builds a graph. A
deterministic prefix (BatchNorm in eval mode) runs a copy of itself with every BatchNorm folded into the convolution
before it (:func:`folded`): one pass over the activations less per BatchNorm. A parameterless stage that draws
random numbers in training (the dropout before MobileNetV3's or EfficientNet's head) goes to the suffix, where it
keeps doing so. When the prefix is also deterministic (BatchNorm in eval mode, no dropout or stochastic depth in
train mode) and the training transform has no randomness, its outputs are the same every epoch: the *feature cache*
computes them once, during the first epoch, and later epochs train the suffix from it.

A cache belongs to one process and one prefix: it is never read back from disk, so
nothing it depends on (weights, images, sizes, precision, the freeze plan) can
change under it; a resumed run rebuilds it in the first epoch's batch order.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils.data import BatchSampler

from finetune.data.folders import train_transform
from finetune.data.imagecache import ImageCache, ImageCaches
from finetune.data.loaders import (
    Indexed,
    SeededSamples,
    batch_loader,
    default_workers,
    drops_last,
    epoch_sampler,
    make_loader,
    skipped_batch_error,
)
from finetune.data.mixing import Mixer
from finetune.errors import Problem, describe
from finetune.models.arch import Arch, unit_parameters
from finetune.models.freeze import Decision, is_batchnorm
from finetune.utils.distributed import Dist

ON_DISK_NAME = "feature-cache-{split}.bin"
# fp32: the smallest image size from which channels-last is faster than the default layout, per CPU kernel class
# (torch's: AVX512, or AVX2 and below) and family, for the forward pass of a frozen prefix (and inference) and for
# training its layers (more than the head); None: at no size. Measured with scripts/bench_memory_format.py
# (docs/models.md): AVX2 on a 2-core AVX2 AMD EPYC, AVX512 on the 2-core Zen 4 AMD EPYC (avx512f, avx512_bf16).
# Shared machines: where the two layouts came out within the noise, the default layout, which needs no conversion,
# is kept. The two differ for small images: ResNet-18's frozen layers at 32 px ran 0.76-0.88x channels-last on the
# Zen 4 (1.0-1.3x on the AVX2 EPYC); the AVX512 row agrees with issue #20's measurement (channels-last 20% slower
# for a full fine-tune at 32 px).
CHANNELS_LAST_FROM: dict[str, dict[str, tuple[Optional[int], Optional[int]]]] = {
    "AVX2": {"ResNet": (32, 224), "MobileNetV3": (32, 32), "EfficientNet": (32, 32), "RegNet": (128, 128),
             "ConvNeXt": (None, None), "Swin": (None, None), "ViT": (None, None)},
    "AVX512": {"ResNet": (96, 96), "MobileNetV3": (32, 32), "EfficientNet": (32, 32), "RegNet": (96, 32),
               "ConvNeXt": (None, None), "Swin": (None, None), "ViT": (None, None)},
}


def kernel_class() -> str:
    """The row of :data:`CHANNELS_LAST_FROM` for torch's CPU kernels here: AVX512, or AVX2 (also below it)."""
    return "AVX512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "AVX2"


# bf16: the families whose depthwise convolutions (one filter per channel) run faster in fp32. oneDNN's bf16
# depthwise kernels lose to its fp32 ones on the Zen 4 EPYC (a 5x5 depthwise forward and backward at 14x14: 61
# against 25 ms), while its bf16 pointwise and dense convolutions gain 1.5-1.7x. A full MobileNetV3-Large step in
# bf16: 35.3 img/s with every convolution in bf16, 52.2 with the depthwise ones in fp32 (fp32 throughout: 38.9);
# EfficientNet-B0 17.6 -> 19.1; ConvNeXt-Tiny 8.6 -> 8.4 (its 7x7 depthwise: no gain, so left in bf16).
FP32_DEPTHWISE = {"MobileNetV3", "EfficientNet"}


def _distinct_modules(modules: list[nn.Module]) -> list[nn.Module]:
    """Every module in ``modules`` and below them, each once (roots may share submodules)."""
    return list({id(m): m for root in modules for m in root.modules()}.values())


def _fp32_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return self._conv_forward(x.float(), self.weight, self.bias)


def depthwise_in_fp32(modules: list[nn.Module]) -> int:
    """Make each depthwise convolution in ``modules`` compute in fp32 under bf16 autocast (its input cast up; the
    layers after it take fp32 or cast as autocast does). Outside autocast it computes as before; state dicts,
    checkpoints and exports are untouched (the module's class and parameters stay). Returns how many ``modules``
    hold (a module made so before counts; it is not wrapped twice)."""
    count = 0
    for module in _distinct_modules(modules):
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            module.forward = _fp32_conv_forward.__get__(module)
            count += 1
    return count


def _single_position_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution, as a matrix product where it has a single output position whose window covers the whole
    input (the weights' taps outside the input only ever meet the zero padding)."""
    (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
    h, w = x.shape[-2:]
    if x.dim() == 4 and 0 <= h + 2 * ph - kh < sh and 0 <= w + 2 * pw - kw < sw and ph + h <= kh and pw + w <= kw:
        weight = self.weight[:, :, ph:ph + h, pw:pw + w]
        if self.groups == 1:
            return nn.functional.linear(x.flatten(1), weight.flatten(1), self.bias).view(len(x), -1, 1, 1)
        return nn.functional.conv2d(x, weight, self.bias, groups=self.groups)
    return self._conv_forward(x, self.weight, self.bias)


def single_positions_as_products(modules: list[nn.Module]) -> int:
    """Make each convolution in ``modules`` compute, when its output is a single position, only with the taps of
    its weights that meet the input: a 3x3 convolution on a 1x1 map (ResNet's last stage at 32 px) as a matrix
    product with its centre taps, a squeeze-and-excitation block's 1x1 convolutions on their pooled input as matrix
    products, a depthwise one with its weights cropped to the input. The same function (float64: within 1e-14 of
    the convolution; its gradient for the other taps is zero, as the convolution's); oneDNN computes such
    convolutions, and above all their backward passes, over the padding: a full fine-tune at 32 px went from 534
    to 578 img/s (ResNet-18), 298 to 530 (MobileNetV3-L), 202 to 374 (EfficientNet-B0), 394 to 547 (RegNetY-400MF)
    on the Zen 4 EPYC. Other inputs run the convolution as it is. State dicts, checkpoints and exports are untouched
    (the module's class and parameters stay). Returns how many convolutions were made so."""
    count = 0
    for module in _distinct_modules(modules):
        if (type(module) is nn.Conv2d and "forward" not in vars(module) and isinstance(module.padding, tuple)
                and module.dilation == (1, 1) and module.padding_mode == "zeros"):
            module.forward = _single_position_forward.__get__(module)
            count += 1
    return count


class CompileGain(NamedTuple):
    """What torch.compile (inductor, with freezing) did for a family's deterministic frozen prefix against running
    it eagerly as the fast path does (BatchNorm folded, its memory format): fp32, batch 32, at 32 and 224 px, on the
    2-core Zen 4 EPYC (scripts/bench_compile.py, interleaved; docs/models.md)."""

    compile_s: float  # the longer of the two sizes', with inductor's on-disk cache cold, as on a fresh machine
    at_32: tuple[float, float]  # (eager images/s, speed-up) at 32 px
    at_224: tuple[float, float]  # the same at 224 px

    def at(self, image_size: int) -> tuple[float, float]:
        """Eager seconds per image and the speed-up at ``image_size``: linear in the pixel count between (and
        beyond) the two sizes measured, the speed-up held at the nearer one outside them."""
        share = (image_size ** 2 - 32 ** 2) / (224 ** 2 - 32 ** 2)
        (small, small_gain), (large, large_gain) = self.at_32, self.at_224
        seconds = max(1 / small + share * (1 / large - 1 / small), 0.0)
        share = min(max(share, 0.0), 1.0)
        return seconds, small_gain + share * (large_gain - small_gain)


# The families whose gain held in every measurement (docs/models.md: two runs here with freed memory kept for reuse,
# as every command runs; before that two more here and two with the kernels capped to AVX2). ConvNeXt gained 1.05-1.15x
# while each pass faulted its memory in afresh, and 0.97-1.10x once memory is reused: the compiled code had gained by
# allocating less, so auto leaves it eager. Swin-T (1.21x at 224 px, 124 s to compile cold) and ViT-B/16 (1.15x,
# 38 s) were measured once with freezing (without it: 1.03-1.23x and 1.00-1.18x from run to run): train.compile: on.
COMPILE_GAIN = {
    "ResNet": CompileGain(13.4, (1785, 1.47), (59.4, 1.04)),
    "MobileNetV3": CompileGain(10.1, (2523, 1.36), (197.5, 1.18)),
    "EfficientNet": CompileGain(13.0, (1526, 1.41), (111.2, 1.06)),
    "RegNet": CompileGain(8.3, (1647, 1.56), (135.7, 1.10)),
}
COMPILE_PAYS = 2.0  # auto compiles when the run's prefix time saved is worth this many compile times
# A compiled prefix's outputs against the eager ones, relative to the largest: fp32 measured at most 1.2e-6; bf16
# rounds each result to 8 bits (2**-8 = 3.9e-3), and the compiled code rounds elsewhere (ResNet-18: 8.4e-3).
COMPILE_TOLERANCE = {False: 1e-4, True: 3e-2}  # by whether the prefix runs in bf16


def compile_decision(setting: str, arch: Arch, precision: str, deterministic: bool, has_prefix: bool,
                     images: float, image_size: int) -> tuple[bool, str]:
    """Whether to compile the frozen prefix (``train.compile``), and why in words ("": nothing to say: the family
    gains nothing); ``images``: how many the prefix will run in the phase (a feature cache runs each once).
    ``auto`` compiles a family of ``COMPILE_GAIN`` in fp32, where its gain was measured, when the time it saves at
    ``image_size`` is worth ``COMPILE_PAYS`` times the compile time (which does not shrink with the images)."""
    gain = COMPILE_GAIN.get(arch.family.name)
    if setting == "off" or not has_prefix or (setting == "auto" and (gain is None or precision != "fp32")):
        return False, ""
    if not deterministic:
        return False, "frozen BatchNorm or dropout runs in train mode"
    if setting == "on":
        return True, "train.compile: on"
    seconds, speedup = gain.at(image_size)
    if images * seconds * (1 - 1 / speedup) < COMPILE_PAYS * gain.compile_s:
        return False, (f"auto: {images:,.0f} images at {image_size} px would not win back torch.compile's "
                       f"{gain.compile_s:.0f} s, train.compile: on compiles it anyway")
    return True, f"auto: {arch.family.name} at {image_size} px runs {speedup:.2f}x as fast compiled"


class CompiledPrefix:
    """The frozen prefix compiled by ``torch.compile`` for one input shape, the training batch's; any other shape
    (the last, smaller batch; validation batches of another size), and inference-mode tensors, run it as it is, so
    nothing recompiles (a second compile would cost as much as the first).

    Compiled with inductor's *freezing*: the prefix's weights become constants of the compiled code, so BatchNorm
    folds, convolution and linear weights are packed once for oneDNN instead of on every call, and a convolution's
    ReLU runs inside it. At 32 px that is most of the gain (ResNet-18: 1.44x with freezing, 0.63-0.72x without: on
    small images repacking the weights on every call outweighs the work on the activations). The weights must not
    change while it is in use: a frozen prefix's do not, and a new freeze stage builds a new one."""

    def __init__(self, modules: list[nn.Module], shape: tuple[int, ...]):
        self.eager = nn.Sequential(*modules)
        self.shape = shape
        self.compiled = torch.compile(self.eager, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        same = tuple(x.shape) == self.shape and not x.is_inference() and not torch.is_inference_mode_enabled()
        return (self.compiled if same else self.eager)(x)


@dataclass(frozen=True)
class Layout:
    """The memory format the fast path runs a model in, and why (for the start line)."""

    channels_last: bool
    why: str


def memory_layout(arch: Arch, image_size: int, precision: str, trains_layers: bool,
                  kernels: Optional[str] = None) -> Layout:
    """Channels-last or the default layout for ``arch`` at ``image_size`` px in ``precision``, when training some of
    its layers (``trains_layers``: more than the head) or else running a frozen prefix before the head (or
    inference): the rule measured for the CPU's ``kernels`` (``CHANNELS_LAST_FROM``; None: this CPU's) in fp32;
    channels-last in bf16, which oneDNN's bf16 kernels are made for."""
    if precision == "bf16":
        return Layout(True, "channels-last (bf16)")
    kernels = kernels or kernel_class()
    family, what = arch.family.name, "training its layers" if trains_layers else "its frozen layers"
    start = CHANNELS_LAST_FROM[kernels][family][trains_layers]
    if start is not None and image_size >= start:
        return Layout(True, f"channels-last ({family} at {image_size} px, {what}: faster from {start} px in fp32 "
                            f"on {kernels} CPUs)")
    where = f"below {start} px" if start is not None else "at every size measured"
    return Layout(False, f"default layout ({family} at {image_size} px, {what}: channels-last is no faster {where} "
                         f"in fp32 on {kernels} CPUs)")


def frozen_prefix_length(chain: list[tuple[str, nn.Module]], plan: dict[str, Decision]) -> int:
    """How many leading stages of ``chain`` hold no trainable parameter."""
    count = 0
    for name, module in chain:
        if any(plan[p].trainable for p in unit_parameters(name, module)):
            break
        count += 1
    return count


def split_point(chain: list[tuple[str, nn.Module]], plan: dict[str, Decision], model: nn.Module,
                bn_modes: dict[str, str]) -> int:
    """The frozen prefix's length, less the parameterless stages at its end that run in train mode (a dropout
    before the head): they belong with the suffix, which runs them as training does."""
    split = frozen_prefix_length(chain, plan)
    training = _training_modules(model, bn_modes)
    while split and not unit_parameters(*chain[split - 1]) and _runs_in(chain[split - 1][1], training):
        split -= 1
    return split


def prefix_is_deterministic(prefix: list[nn.Module], model: nn.Module, bn_modes: dict[str, str]) -> bool:
    """Eval-mode BatchNorm (and no dropout or stochastic depth in train mode) makes the prefix (its stages'
    modules) a fixed function of the image: its outputs can be cached."""
    training = _training_modules(model, bn_modes)
    return not any(_runs_in(module, training) for module in prefix)


def _training_modules(model: nn.Module, bn_modes: dict[str, str]) -> set[int]:
    return {id(model.get_submodule(name)) for name, mode in bn_modes.items() if mode == "train"}


def _runs_in(module: nn.Module, training: set[int]) -> bool:
    return any(id(m) in training for m in module.modules())


def folded(prefix: list[nn.Module]) -> list[nn.Module]:
    """The stages of a deterministic frozen ``prefix`` as one copy in eval mode with each BatchNorm folded into the
    convolution before it (torch.fx's ``fuse``, over the whole prefix so that a stem's conv and BatchNorm fold
    although they are two stages): the same function up to float rounding (about 1e-6 relative), with one pass over
    the activations less per BatchNorm, 7-8% of ResNet-18's forward pass on the Zen 4 EPYC at 32 and 224 px. The
    model's own weights are not touched; the copy costs the prefix's weights in memory once. A prefix without
    BatchNorm, or one torch.fx cannot trace, is returned as it is."""
    if not any(is_batchnorm(m) for stage in prefix for m in stage.modules()):
        return prefix
    try:
        return [fuse(copy.deepcopy(nn.Sequential(*prefix)).eval(), inplace=True)]
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError):
        return prefix


class FastModel:
    """Runs a model as frozen prefix (no autograd) + trainable suffix, in channels-last (or the default layout:
    :func:`memory_layout`) and optional bf16.

    ``model`` is shared, not copied: its state dict, checkpoints and optimizer are untouched. A deterministic
    prefix runs as a folded copy (:func:`folded`; ``fold=False``: as it is).
    """

    def __init__(self, model: nn.Module, arch: Arch, plan: dict[str, Decision], bn_modes: dict[str, str],
                 precision: str, device: torch.device = torch.device("cpu"), *, image_size: Optional[int] = None,
                 inference: bool = False, fold: bool = True):
        """``image_size`` picks the memory format by :func:`memory_layout` (None: channels-last); ``inference``:
        the model only runs forward."""
        self.device = device
        chain = arch.stages(model)
        self.split, self.prefix_deterministic = _prefix(chain, plan, model, bn_modes)
        # Training a layer before the head (backward through it) is what channels-last slows down on small images.
        trains_layers = not inference and any(unit_parameters(*unit) for unit in chain[self.split:]
                                               if unit[0] != arch.head)
        self.layout = (memory_layout(arch, image_size, precision, trains_layers)
                       if image_size else Layout(True, "channels-last"))
        self.memory_format = torch.channels_last if self.layout.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        single_positions_as_products([model])  # before the prefix is copied: its copy computes so too
        self.bn_modes = bn_modes  # the mode ('train' or 'eval') of each BatchNorm (and dropout) layer while training
        self.prefix, self.suffix = chain[:self.split], chain[self.split:]
        stages = [module for _, module in self.prefix]
        self.prefix_run = ([m.to(memory_format=self.memory_format) for m in folded(stages)]
                           if fold and self.prefix_deterministic else stages)
        self.folded = self.prefix_run != stages  # BatchNorm folded into the prefix's convolutions (start line)
        self.trainable_part: nn.Module = nn.Sequential(OrderedDict(
            (name.replace(".", "_"), module) for name, module in self.suffix))
        self.bf16 = precision == "bf16"
        self.fp32_depthwise = 0  # the model's depthwise convolutions that compute in fp32 under bf16
        if self.bf16 and arch.family.name in FP32_DEPTHWISE:
            depthwise_in_fp32(self.prefix_run)  # the folded copy's, where the prefix runs one
            self.fp32_depthwise = depthwise_in_fp32([model])
        self.compile_seconds: Optional[float] = None  # compile_prefix: how long torch.compile took,
        self.compile_error = ""  # or why it failed

    def compile_prefix(self, shape: tuple[int, ...]) -> None:
        """Compile the frozen prefix for input batches of ``shape`` now, and check it: a seeded random batch must
        give the eager prefix's outputs within rounding (COMPILE_TOLERANCE of the largest). When torch.compile
        fails (no C++ compiler, say) or its outputs differ (without freezing, inductor's convolutions gave NaN and
        infinities with torch's and oneDNN's kernels capped to AVX2), the prefix runs as it is and ``compile_error``
        says why."""
        import logging

        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
        began = time.perf_counter()
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        probe = probe.contiguous(memory_format=self.memory_format)
        try:
            compiled = CompiledPrefix(self.prefix_run, shape)
            from torch._inductor import config as inductor

            # freezing is read when the first call compiles (torch.compile's options do not reach it)
            with torch.no_grad(), self.autocast(), inductor.patch(freezing=True):
                expected, got = compiled.eager(probe), compiled(probe)
        except Exception as exc:  # torch.compile's failures have many types; the eager prefix still works
            self.compile_error = describe(exc)
            return
        largest = expected.float().abs().max().clamp(min=1e-12)
        difference = ((got.float() - expected.float()).abs().max() / largest).item()
        if not difference <= COMPILE_TOLERANCE[self.bf16]:  # NaN too
            self.compile_error = (f"on this CPU its outputs differ from the prefix's own (largest difference "
                                  f"{difference:.1e} of the largest output)")
            return
        self.prefix_run = [compiled]
        self.compile_seconds = time.perf_counter() - began

    @classmethod
    def whole(cls, model: nn.Module, arch: Arch, image_size: int) -> "FastModel":
        """No prefix: ``head`` runs the whole model (for evaluating a checkpoint of ``image_size`` px images)."""
        return cls(model, arch, {name: Decision(True, "whole") for name, _ in model.named_parameters()}, {}, "fp32",
                   image_size=image_size, inference=True)

    @property
    def prefix_names(self) -> list[str]:
        return [name for name, _ in self.prefix]

    def distribute(self) -> None:
        """Wrap the trainable part (only) in DistributedDataParallel: the prefix needs no gradient sync."""
        if any(p.requires_grad for p in self.trainable_part.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trainable_part = nn.parallel.DistributedDataParallel(self.trainable_part, device_ids=ids)

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output, computed without autograd."""
        x = images.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x
        with torch.no_grad(), self.autocast():
            for module in self.prefix_run:
                x = module(x)
        return x

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable suffix (with autograd) from prefix features to logits, in float32."""
        x = features.to(self.device, non_blocking=True)
        with self.autocast():
            x = self.trainable_part(x)
        return x.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class CachePlan(NamedTuple):
    """Which splits the feature cache holds, and why, in words for the log."""
    train: bool
    val: bool
    why: str

    @property
    def splits(self) -> list[str]:
        return [split for split, cached in (("train", self.train), ("val", self.val)) if cached]


def cache_plan(config, arch: Arch, model: nn.Module, plan: dict[str, Decision],
               bn_modes: dict[str, str]) -> CachePlan:
    """Where ``train.cache_features`` caches the frozen prefix's features for ``model`` frozen as ``plan`` says
    (``model`` may be on the meta device): never for augmented training images; validation is never augmented."""
    return _cache_plan(config, *_prefix(arch.stages(model), plan, model, bn_modes))


def _cache_plan(config, split: int, deterministic: bool) -> CachePlan:
    setting = config.train.cache_features
    train, why = _cache_decision(setting, split, deterministic, changing_key(config))
    val, _ = _cache_decision(setting, split, deterministic, changing=None)
    if val and not train:
        why += "; on for validation (its images are not augmented)"
    return CachePlan(train, val, why)


def problems(config, arch: Arch, model: nn.Module, plan: dict[str, Decision],
             bn_modes: dict[str, str]) -> list[Problem]:
    """``train.cache_features: on`` where the cache cannot be used (``model`` may be on the meta device)."""
    if config.train.cache_features != "on":
        return []
    split, deterministic = _prefix(arch.stages(model), plan, model, bn_modes)
    usable, why = _cache_decision("on", split, deterministic, changing_key(config))
    return [] if usable else [Problem("train.cache_features", f"is 'on' but the cache cannot be used: "
                                                              f"{why.removeprefix('off (').rstrip(')')}; use auto "
                                                              "or off")]


def _prefix(chain: list[tuple[str, nn.Module]], plan: dict[str, Decision], model: nn.Module,
            bn_modes: dict[str, str]) -> tuple[int, bool]:
    """The frozen prefix's length (:func:`split_point`) and whether it is deterministic
    (:func:`prefix_is_deterministic`)."""
    split = split_point(chain, plan, model, bn_modes)
    return split, prefix_is_deterministic([module for _, module in chain[:split]], model, bn_modes)


def changing_key(config) -> Optional[str]:
    """The config key that makes the training inputs differ from epoch to epoch (random transforms, MixUp or
    CutMix), or None when they are the same every epoch."""
    changing = {"data.augment": config.data.augment != "none", "data.random_erasing": config.data.random_erasing > 0,
                "train.mixup": config.train.mixup is not None, "train.cutmix": config.train.cutmix is not None}
    return next((key for key, on in changing.items() if on), None)


def _cache_decision(setting: str, split: int, deterministic: bool, changing: Optional[str]) -> tuple[bool, str]:
    """Whether to cache, and why; ``changing``: the key that changes the inputs every epoch (:func:`changing_key`)."""
    if setting == "off":
        return False, "off (train.cache_features: off)"
    reasons = []
    if split == 0:
        reasons.append("nothing is frozen before the first trainable layer")
    if changing:
        reasons.append(f"{changing} is on: random transforms change the features every epoch")
    if not deterministic:
        reasons.append("frozen BatchNorm (or dropout) layers run in train mode (freeze.batchnorm: train)")
    if reasons:
        return False, "off (" + "; ".join(reasons) + ")"
    return True, "on (the frozen prefix is a fixed function of each image: BatchNorm in eval mode, no augmentation)"


@dataclass
class FeatureCache:
    """Prefix outputs of one data split, by sample index: in memory, or memory-mapped in the run directory."""

    features: torch.Tensor
    targets: torch.Tensor  # class indices, or multi-hot rows (multi-label)
    filled: torch.Tensor  # bool per sample
    skipped: torch.Tensor  # bool per sample: an unreadable image left out (data.skip_bad_images), found when decoded
    path: Optional[Path] = None

    @classmethod
    def create(cls, size: int, shape: tuple, max_bytes: float, folder: Path, split: str,
               targets: torch.Tensor) -> "FeatureCache":
        """Room for ``size`` samples of features of ``shape``, and targets shaped as a batch of ``targets``."""
        numel = size * math.prod(shape)
        path = None
        if numel * 4 <= max_bytes:
            features = torch.empty((size, *shape))
        else:
            path = folder / ON_DISK_NAME.format(split=split)
            with open(path, "wb") as f:
                f.truncate(numel * 4)
            features = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32).view(size, *shape)
        return cls(features, torch.zeros((size, *targets.shape[1:]), dtype=targets.dtype),
                   torch.zeros(size, dtype=torch.bool),
                   torch.zeros(size, dtype=torch.bool), path)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    @property
    def nbytes(self) -> int:
        return self.features.numel() * 4

    def put(self, indices: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features[indices] = features.float().cpu()
        self.targets[indices] = targets
        self.filled[indices] = True

    def skip(self, indices: list[int]) -> None:
        self.filled[indices] = self.skipped[indices] = True

    def merge(self, dist: Dist) -> None:
        """Combine the shards the processes filled (a sample two of them hold is averaged)."""
        self.features[~self.filled] = 0
        count = dist.sum_tensor(self.filled.float()).clamp(min=1)
        per_sample = count.view(-1, *[1] * (self.features.dim() - 1))
        self.features.copy_(dist.sum_tensor(self.features.clone()) / per_sample)
        per_target = count.view(-1, *[1] * (self.targets.dim() - 1))
        filled = self.filled.view_as(per_target)
        targets = dist.sum_tensor((self.targets * filled).double()) / per_target
        self.targets.copy_(targets.round().to(self.targets.dtype))
        self.filled.copy_(dist.sum_tensor(self.filled.float()) > 0)
        self.skipped.copy_(dist.sum_tensor(self.skipped.float()) > 0)

    def batches(self, sampler, batch_size: int, drop_last: bool):
        """(features, targets, sample indices) batches in the sampler's order: the same batches the image loader
        would give."""
        for indices in BatchSampler(sampler, batch_size, drop_last):
            index = torch.as_tensor(indices)
            index = index[~self.skipped[index]]  # unreadable images skipped: left out, as the image loader does
            if not len(index):
                raise skipped_batch_error()
            yield self.features[index], self.targets[index], index

    def close(self) -> None:
        if self.path is not None:
            del self.features
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


class FeatureSource:
    """One data split as (prefix features, targets) batches for an epoch.

    Without a cache, or until it is complete, it loads image batches and runs the
    frozen prefix; with one, it stores what it computed and, once every sample is
    in, serves later epochs from the cache in exactly the batches the images would
    have given. The cache is always filled in the first epoch's batches, so a
    resumed run caches the very same numbers. With sampling ``weights``
    (``data.sampler: balanced``) epochs are weighted draws that repeat some images
    and miss others, so the cache is filled first, in the batches of the plain
    first-epoch shuffle, and every epoch is served from it.
    """

    def __init__(self, fast: FastModel, dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int,
                 cache_bytes: Optional[float] = None, folder: Optional[Path] = None, split: str = "train",
                 dist: Dist = Dist(), weights: Optional[torch.Tensor] = None,
                 image_cache: Optional[ImageCache] = None, mixer: Optional[Mixer] = None):
        self.fast, self.dataset, self.batch_size, self.weights = fast, dataset, batch_size, weights
        self.mixer = mixer  # MixUp/CutMix of the image batches (train.mixup, train.cutmix)
        self.shuffle, self.seed, self.workers, self.dist = shuffle, seed, workers, dist
        self.cache_bytes, self.folder, self.split = cache_bytes, folder, split
        self.image_cache = image_cache  # decoded images, read by the loaders (data.cache_images)
        self.cache: Optional[FeatureCache] = None

    @property
    def caching(self) -> bool:
        return self.cache_bytes is not None

    def epoch(self, epoch: int, skip_batches: int = 0):
        """(features, targets) batches of (0-based) ``epoch``, less its first ``skip_batches``."""
        for features, targets, _ in self.indexed_epoch(epoch, skip_batches):
            yield features, targets

    def indexed_epoch(self, epoch: int, skip_batches: int = 0):
        """:meth:`epoch`'s batches with the dataset index of each sample: (features, targets, indices)."""
        if self.caching and (self.cache_complete or epoch > 0 or self.weights is not None):
            self.complete_cache()
            yield from self.cache.batches(self._sampler(epoch, skip_batches * self.batch_size), self.batch_size,
                                          self._drop_last)
            return
        yield from self._from_images(epoch, skip_batches)
        if self.caching:
            self.complete_cache()  # e.g. a lone last sample the training batches dropped

    @property
    def cache_complete(self) -> bool:
        return self.cache is not None and self.cache.complete

    @property
    def _drop_last(self) -> bool:
        return drops_last(len(self.dataset), self.batch_size, self.shuffle, self.dist.world)

    def _sampler(self, epoch: int, skip: int = 0, weighted: bool = True):
        return epoch_sampler(len(self.dataset), shuffle=self.shuffle, seed=self.seed, epoch=epoch, skip=skip,
                             rank=self.dist.rank, world=self.dist.world, weights=self.weights if weighted else None)

    def _from_images(self, epoch: int, skip_batches: int):
        loader = make_loader(Indexed(self.dataset), self.batch_size, shuffle=self.shuffle, seed=self.seed,
                             epoch=epoch, skip_batches=skip_batches, workers=self.workers, rank=self.dist.rank,
                             world=self.dist.world, weights=self.weights, cache=self.image_cache)
        for batch, (images, targets, indices) in enumerate(loader, start=skip_batches):
            if self.mixer is not None:  # on the images, before the frozen prefix: it never runs with the cache
                images, targets = self.mixer(images, targets, epoch, batch)
            features = self.fast.features(images)
            if self.caching and epoch == 0:
                self._store(indices, features, targets)
            yield features, targets, indices

    def complete_cache(self) -> None:
        """Compute what the cache lacks, batch by batch in the first epoch's order (the last partial batch too).

        Under DDP each process computes its own shard, then the shards are summed
        across processes so that every process can serve any sample of later epochs.
        """
        if self.cache_complete:
            return
        missing = [indices for indices in BatchSampler(self._sampler(0, weighted=False), self.batch_size, False)
                   if self.cache is None or not bool(self.cache.filled[indices].all())]
        images_of = batch_loader(Indexed(self.dataset), missing, self.workers, self.image_cache)
        for indices, (images, targets, kept) in zip(missing, images_of):
            self._store(kept, self.fast.features(images), targets)
            self.cache.skip(sorted(set(indices) - set(kept.tolist())))  # unreadable images, skipped
        if self.dist.active:
            self.cache.merge(self.dist)

    def _store(self, indices, features, targets) -> None:
        if self.cache is None:
            self.cache = FeatureCache.create(len(self.dataset), tuple(features.shape[1:]), self.cache_bytes,
                                             self.folder, self.split, targets)
        self.cache.put(indices, features, targets)

    def describe(self) -> str:
        if self.cache is None:
            return "none"
        where = f"memory-mapped file {self.cache.path}" if self.cache.path else "in memory"
        return f"{self.cache.nbytes / 2**20:.1f} MiB {where}"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def feature_sources(config, fast: FastModel, data, folder: Path, *, weights: Optional[torch.Tensor] = None,
                    dist: Dist = Dist(), image_caches: Optional[ImageCaches] = None
                    ) -> tuple[FeatureSource, FeatureSource, str]:
    """The train and val sources training reads, with the feature cache when ``train.cache_features`` allows it
    (a spilled cache goes to ``folder``), and why the cache is on or off. ``weights``: the train sampling weights;
    ``image_caches``: the run's image caches, which the loaders read through."""
    images = image_caches or ImageCaches("off")
    budget = config.train.cache_max_gb * 2**30
    use_cache, val_cache, why = _cache_plan(config, fast.split, fast.prefix_deterministic)
    common = _source_settings(config, dist, folder, data.train)
    rank = f"-rank{dist.rank}" if dist.active else ""  # spilled caches: one file per process
    random = train_transform(config.data).random  # random transforms: each image drawn under its own seed
    train_set = SeededSamples(data.train, config.train.seed) if random else data.train
    mixer = Mixer.from_config(config.train, len(data.classes), dist.rank)
    return (FeatureSource(fast, train_set, shuffle=True, split=f"train{rank}", weights=weights,
                          cache_bytes=budget if use_cache else None, image_cache=images.get("train"), mixer=mixer,
                          **common),
            FeatureSource(fast, data.val, shuffle=False, split=f"val{rank}",
                          cache_bytes=budget if val_cache else None, image_cache=images.get("val"), **common), why)


def image_source(fast: FastModel, like: FeatureSource) -> FeatureSource:
    """``like``'s images in order, with its settings (batch, decode threads, image cache), run through ``fast``'s
    prefix every time, without a feature cache (the EMA model's validation when its frozen prefix is not a fixed
    function of the image)."""
    return FeatureSource(fast, like.dataset, like.batch_size, shuffle=False, seed=like.seed, workers=like.workers,
                         dist=like.dist, image_cache=like.image_cache)


def _source_settings(config, dist: Dist, folder: Optional[Path], images) -> dict:
    """What a run's sources share; ``data.workers: null`` takes the decode threads ``images`` call for."""
    workers = config.data.workers if config.data.workers is not None else default_workers(images)
    return dict(seed=config.train.seed, dist=dist, folder=folder, batch_size=config.train.batch_size // dist.world,
                workers=workers)
