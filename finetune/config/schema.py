"""The config schema: every section and key, with its default and range (the defaults live here).

This module must not import torch, so that config errors are reported instantly.
"""

from __future__ import annotations

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

    @field_validator("weights")
    @classmethod
    def _weights_of_arch(cls, weights: str, info: ValidationInfo) -> str:
        arch = ARCHS.get(info.data.get("arch"))
        if arch and weights in WEIGHT_NAMES and weights != "DEFAULT" and weights not in arch.weight_names:
            raise ValueError(f"torchvision has no {weights} weights for {arch.name}; use DEFAULT or "
                             f"{' or '.join(arch.weight_names)}, a state-dict file, or none")
        return weights


class DataConfig(_Section):
    root: Optional[str] = None
    image_size: int = Field(224, ge=32, le=1024)
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
    calibrate: bool = Field(False, description=(
        "At the end of training, fit a temperature on best.pt's validation logits so that its probabilities are "
        "calibrated (as `finetune calibrate` does): stored in best.pt, used by evaluate, predict and export; "
        "reliability.png in the run directory."))

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
