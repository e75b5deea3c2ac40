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
)

from finetune.models.arch import ARCH_NAMES, ARCHS, DEFAULT_ARCH, WEIGHT_NAMES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: Literal[ARCH_NAMES] = DEFAULT_ARCH
    weights: str = "DEFAULT"  # after arch: its validator reads arch
    weights_fallback: Literal["error", "random"] = "error"
    num_classes: Optional[int] = Field(None, ge=2)
    zero_init_residual: bool = Field(True, description=(
        "When the model starts from random weights (model.weights: none, or the fallback), start the last "
        "BatchNorm of every residual branch at zero, so each block starts as the identity (torchvision's "
        "zero_init_residual, timm's zero_init_last). Pretrained weights are never changed."))

    @field_validator("weights")
    @classmethod
    def _weights_of_arch(cls, weights: str, info: ValidationInfo) -> str:
        arch = ARCHS.get(info.data.get("arch"))
        if arch and weights in WEIGHT_NAMES and weights != "DEFAULT" and weights not in arch.weight_names:
            raise ValueError(f"torchvision has no {weights} weights for {arch.name}; use DEFAULT or "
                             f"{' or '.join(arch.weight_names)}, a state-dict file, or none")
        return weights


AUGMENT_PRESETS = ("none", "light", "trivialaugment", "randaugment", "augmix")


class DataConfig(_Section):
    root: Optional[str] = None
    image_size: int = Field(224, ge=32, le=1024)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    augment: Literal[AUGMENT_PRESETS] = Field("none", description=(
        "Training augmentation preset: none; light (random resized crop + horizontal flip; true means light, "
        "false none); trivialaugment, randaugment or augmix (light, then torchvision's TrivialAugmentWide, "
        "RandAugment or AugMix)."))
    magnitude: int = Field(9, ge=0, le=30, description=(  # after augment: its validator reads augment
        "RandAugment's magnitude (0-30, torchvision's default 9); only with data.augment: randaugment."))
    crop_scale: float = Field(0.08, gt=0, le=1, description=(
        "The smallest share of the image area a random resized crop keeps (its scale is [crop_scale, 1]; "
        "torchvision's and timm's default 0.08). Raise it (e.g. 0.35) for small or low-resolution images, where a "
        "crop of 8% of the image can lose the object."))
    hflip: float = Field(0.5, ge=0, le=1, description=(
        "Probability of a horizontal flip in data.augment's presets; 0 where a mirror image changes the label "
        "(text, digits)."))
    random_erasing: float = Field(0.0, ge=0, le=1, description=(
        "Probability of erasing a random rectangle of each training image (torchvision's RandomErasing, after "
        "normalisation); 0 turns it off."))
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    workers: Optional[int] = Field(None, ge=0)  # decode threads; None: data.default_workers()
    fast_decode: bool = True  # JPEGs decoded at the smallest DCT scale that still covers the stored size
    cache_images: Literal["auto", "on", "off"] = "auto"
    demo: Optional[Literal["shapes"]] = None
    skip_bad_images: bool = False

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_preset(cls, value):
        if isinstance(value, bool):  # the old switch: true is today's light augmentation
            return "light" if value else "none"
        if isinstance(value, str) and value not in AUGMENT_PRESETS:
            close = difflib.get_close_matches(value.lower(), AUGMENT_PRESETS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown preset {value!r}; {hint}the presets are {', '.join(AUGMENT_PRESETS)}")
        return value

    @field_validator("magnitude")
    @classmethod
    def _magnitude_needs_randaugment(cls, magnitude: int, info: ValidationInfo) -> int:
        augment = info.data.get("augment")
        if magnitude != cls.model_fields["magnitude"].default and augment not in (None, "randaugment"):
            raise ValueError(f"is RandAugment's magnitude; it applies to data.augment: randaugment only "
                             f"(data.augment is {augment})")
        return magnitude

    @property
    def random_transforms(self) -> bool:
        """Whether training images go through random transforms (so their features change every epoch)."""
        return self.augment != "none" or self.random_erasing > 0


class Stage(_Section):
    epoch: int = Field(ge=1)  # 1-based, as in the logs: the first epoch these patterns train in
    trainable: list[str] = Field(min_length=1)


class FreezeConfig(_Section):
    default: Literal["frozen", "trainable"] = "frozen"
    trainable: list[str] = Field(default_factory=lambda: ["fc"])
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
    no_decay_bn_bias: bool = False

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


class EmaConfig(_Section):
    decay: float = Field(0.999, gt=0, lt=1, description=(
        "Weight EMA: after every step, ema = decay * ema + (1 - decay) * weights (torch's AveragedModel with "
        "get_ema_multi_avg_fn; BatchNorm running statistics are averaged too)."))
    warmup: bool = Field(True, description=(
        "Use min(decay, (1 + n) / (10 + n)) at update n, so the average of a short run is not dominated by the "
        "random start."))
    use_for: Literal["best", "ema", "raw"] = Field("best", description=(
        "Which weights best.pt, export, evaluate and predict use: ema, raw, or best: the better of the two on "
        "validation in each epoch (summary.json names it)."))


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
    mixup: Optional[float] = Field(None, gt=0, description=(
        "MixUp's alpha (torchvision's MixUp): mix a batch with itself shifted by one, with weight ~ Beta(alpha, "
        "alpha); null turns it off. timm's ImageNet recipes use 0.1-0.8."))
    cutmix: Optional[float] = Field(None, gt=0, description=(
        "CutMix's alpha (torchvision's CutMix): paste a box of the shifted batch, of area ~ Beta(alpha, alpha); "
        "null turns it off. Usually 1.0."))
    mix_prob: float = Field(1.0, ge=0, le=1, description=(
        "Probability that a batch is mixed (timm's mixup_prob); with both mixup and cutmix on, a mixed batch "
        "uses either with equal chance (timm's switch_prob 0.5)."))
    ema: Optional[EmaConfig] = Field(None, description=(
        "Keep an exponential moving average of the weights, validated every epoch beside the raw weights; "
        "null turns it off, {} uses the defaults."))

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

    def where(self, key: str) -> str:
        """Where ``key`` was set, for messages: ``file:line``, ``--set key`` or the file."""
        return self._source.where(key) if self._source else key

    @property
    def path(self) -> Optional[Path]:
        return self._source.path if self._source else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
