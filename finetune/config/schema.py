"""The config schema: every section and key, with its default and range (the defaults live here).

This module must not import torch, so that config errors are reported instantly.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finetune.models.arch import (
    ARCH_NAMES,
    ARCHS,
    DEFAULT_ARCH,
    HEAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    WEIGHT_NAMES,
    looks_like_weights_name,
)

# Keys renamed since: the old name keeps working (load_config warns); old run directories and checkpoints load.
RENAMED = {"optim.no_decay_bn_bias": "optim.no_decay_norm_bias"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: str = Field(DEFAULT_ARCH, description="The torchvision model: `finetune models` lists them all "
                      "(ResNet, MobileNetV3, EfficientNet, RegNetY, ConvNeXt, ViT, Swin).")
    weights: str = "DEFAULT"  # after arch: its validator reads arch
    weights_fallback: Literal["error", "random"] = "error"
    num_classes: Optional[int] = Field(None, ge=2)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCHS:
            close = difflib.get_close_matches(arch, ARCH_NAMES, n=3, cutoff=0.4)
            hint = f"closest: {', '.join(close)}; " if close else ""
            raise ValueError(f"unknown architecture {arch!r}; {hint}`finetune models` lists all "
                             f"{len(ARCH_NAMES)}")
        return arch

    @field_validator("weights")
    @classmethod
    def _weights_of_arch(cls, weights: str, info: ValidationInfo) -> str:
        arch = ARCHS.get(info.data.get("arch"))
        named = weights in WEIGHT_NAMES or looks_like_weights_name(weights)
        if arch and named and weights != "DEFAULT" and weights not in arch.weight_names:
            raise ValueError(f"torchvision has no {weights} weights for {arch.name}; use DEFAULT or "
                             f"{' or '.join(arch.weight_names)}, a state-dict file, or none")
        return weights


class DataConfig(_Section):
    root: Optional[str] = None
    image_size: Optional[int] = Field(None, ge=32, le=1024, description=(
        "Width and height of the crop the model sees. null: what the weights were trained at (224 for most "
        "models, 300 for efficientnet_b3, 384 for efficientnet_v2_s)."))
    resize_size: Optional[int] = Field(None, ge=32, le=2048, description=(
        "The shorter side images are resized to before the centre crop. null: data.image_size times the "
        "weights' own ratio (256/224 for resnet18)."))
    interpolation: Optional[Literal[INTERPOLATIONS]] = Field(None, description=(
        "Resampling of the resize (and of augmentation's random resized crop). null: the weights' own "
        "(bicubic for EfficientNet and Swin, bilinear for most)."))
    mean: Optional[tuple[float, float, float]] = Field(None, description=(
        "Per-channel RGB mean of the normalisation. null: the weights' own (ImageNet's)."))
    std: Optional[tuple[float, float, float]] = Field(None, description=(
        "Per-channel RGB standard deviation of the normalisation. null: the weights' own (ImageNet's)."))
    val_fraction: float = Field(0.2, gt=0, lt=1)
    augment: bool = False
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    workers: Optional[int] = Field(None, ge=0)  # decode threads; None: data.default_workers()
    fast_decode: bool = True  # JPEGs decoded at the smallest DCT scale that still covers the stored size
    cache_images: Literal["auto", "on", "off"] = "auto"
    demo: Optional[Literal["shapes"]] = None
    skip_bad_images: bool = False


class Stage(_Section):
    epoch: int = Field(ge=1)  # 1-based, as in the logs: the first epoch these patterns train in
    trainable: list[str] = Field(min_length=1)


class FreezeConfig(_Section):
    default: Literal["frozen", "trainable"] = "frozen"
    trainable: list[str] = Field(default_factory=lambda: [HEAD])
    frozen: list[str] = Field(default_factory=list)
    batchnorm: Literal["eval", "train"] = "eval"
    stages: list[Stage] = Field(default_factory=list)

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, stages: list[Stage]) -> list[Stage]:
        epochs = [stage.epoch for stage in stages]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"stage epochs must increase strictly (got {epochs})")
        return stages


class ParamGroup(_Section):
    params: list[str] = Field(min_length=1)
    lr: float = Field(gt=0, le=10)


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = Field("sgd", description=(
        "sgd: SGD with optim.momentum (and optim.nesterov); adamw: AdamW (the usual choice for ConvNeXt, ViT and "
        "Swin; momentum and nesterov do not apply)."))
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False  # after momentum: its validator reads momentum
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = Field(1, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0)
    param_groups: list[ParamGroup] = Field(default_factory=list)
    layer_lr_decay: Optional[float] = Field(None, gt=0, le=1)
    no_decay_norm_bias: bool = Field(False, description=(
        "Keep weight decay off normalisation layers (BatchNorm, LayerNorm, GroupNorm) and every bias. Formerly "
        "optim.no_decay_bn_bias, which still works."))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        return _renamed(data, "optim")

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        if nesterov and info.data.get("momentum") == 0:
            raise ValueError("nesterov: true needs optim.momentum > 0")
        return nesterov


class EarlyStopping(_Section):
    monitor: Literal["val_acc", "val_loss", "val_balanced_acc", "val_macro_f1"] = "val_acc"
    patience: int = Field(3, ge=0)  # epochs without improvement before stopping
    min_delta: float = Field(0.0, ge=0)  # a smaller change is no improvement


class TrainConfig(_Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    output_dir: str = "runs/default"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Union[Literal["none", "balanced"], list[float]] = "none"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where native (finetune.utils.hardware)
    cache_features: Literal["auto", "on", "off"] = "auto"
    cache_max_gb: float = Field(2.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sync_batchnorm: bool = False
    dist_timeout_s: int = Field(600, ge=10)
    early_stopping: Optional[EarlyStopping] = None
    time_limit_min: Optional[float] = Field(None, gt=0)

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, value):
        # Before the type check, so that every wrong value gets one message under the key itself.
        if value in ("none", "balanced"):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("must be none, balanced, or a list of one positive weight per class")
        for i, weight in enumerate(value):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight <= 0:
                raise ValueError(f"weight {i + 1} of {len(value)} is {weight!r}; every weight must be a positive "
                                 "number")
        return value


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    _source: Any = PrivateAttr(default=None)  # a config.loading._Source: where each key was set
    _warnings: list[str] = PrivateAttr(default_factory=list)  # e.g. a renamed key still in use

    @model_validator(mode="after")
    def _preprocessing_of_weights(self) -> "Config":
        """Fill the preprocessing the config leaves null from the weights' own (see :func:`preprocessing`)."""
        for key, value in preprocessing(self.model.arch, self.model.weights, self.data).items():
            if getattr(self.data, key) is None:
                setattr(self.data, key, value)
        return self

    @property
    def warnings(self) -> list[str]:
        """What the config still accepts but should change (renamed keys), for the user."""
        return self._warnings

    def where(self, key: str) -> str:
        """Where ``key`` was set, for messages: ``file:line``, ``--set key`` or the file."""
        return self._source.where(key) if self._source else key

    @property
    def path(self) -> Optional[Path]:
        return self._source.path if self._source else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def preprocessing(arch: str, weights: str, data: DataConfig) -> dict[str, Any]:
    """The eval preprocessing of ``arch``'s ``weights`` (its default weights for a file or none), scaled to
    ``data.image_size`` when that is set: crop, resize (the weights' resize/crop ratio), interpolation, mean/std."""
    own = ARCHS[arch].weights_named(weights)
    crop = data.image_size or own.crop
    return {"image_size": crop, "resize_size": max(crop, math.floor(crop * own.resize / own.crop)),
            "interpolation": own.interpolation, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def problems(config: Config) -> list[tuple[str, str]]:
    """``(key, message)`` problems between sections that field checks cannot see: an image size the model cannot
    take, a resize smaller than the crop, a zero standard deviation."""
    found = []
    size_problem = ARCHS[config.model.arch].size_problem(config.data.image_size)
    if size_problem:
        found.append(("data.image_size", f"is {config.data.image_size}, but {size_problem}"))
    if config.data.resize_size < config.data.image_size:
        found.append(("data.resize_size", f"is {config.data.resize_size}, smaller than data.image_size "
                      f"({config.data.image_size}): the centre crop would not fit; make it at least "
                      f"{config.data.image_size} or null"))
    if not all(s > 0 for s in config.data.std):
        found.append(("data.std", f"is {list(config.data.std)}; every standard deviation must be positive"))
    return found


def _renamed(data, section: str):
    """A section's mapping with renamed keys under their new names (the new name wins when both are there)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in RENAMED.items():
        old_section, old_key = old.split(".")
        if old_section == section and old_key in data:
            data.setdefault(new.split(".")[1], data.pop(old_key))
    return data
