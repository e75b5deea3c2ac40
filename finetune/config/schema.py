"""The config schema: every section and key, with its default and range (the defaults live here).

This module must not import torch, so that config errors are reported instantly.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_ARCH = "resnet18"
HEAD = "head"  # the freeze (and param_groups) pattern that names the new head in every family
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every torchvision classification weights' normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Keys renamed since: the old name keeps working (load_config warns); old run directories and checkpoints load.
RENAMED = {"optim.no_decay_bn_bias": "optim.no_decay_norm_bias"}


# auto | on | off. YAML 1.1 reads a bare on/off as true/false: those mean on/off here.
Switch = Annotated[Literal["auto", "on", "off"],
                   BeforeValidator(lambda value: ("on" if value else "off") if isinstance(value, bool) else value)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_weights_name(value: str) -> bool:
    """True for a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``...): a ``model.weights`` value that is
    not a file path. Which names an architecture has is the models' to say (``models.arch.problems``)."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None


class ModelConfig(_Section):
    # Architecture names and their weights are checked by validate() (models.arch knows them): the config, below
    # the models in the package layering, knows only their shape.
    arch: str = Field(DEFAULT_ARCH, description=(
        "The torchvision network to fine-tune: `finetune models` lists them all (ResNet, MobileNetV3, "
        "EfficientNet, RegNetY, ConvNeXt, ViT, Swin). Freeze patterns, the reports, stages, layer_lr_decay, the "
        "feature cache, DDP, export, evaluate and predict work the same for each."))
    weights: str = Field("DEFAULT", description=(
        "Where the pretrained weights come from: DEFAULT (the architecture's best torchvision weights), "
        "or one of its weights names (`finetune models` lists them) through torchvision's weights API (its cache, "
        "then a download with progress and a 20 s network timeout); none for random init; or a path to a state-dict "
        "file (loaded with weights_only=True; its 1000-class ImageNet head is replaced)."))
    weights_fallback: Literal["error", "random"] = Field("error", description=(
        "When torchvision's weights cannot be had (offline): error stops with three ways out; random warns "
        "loudly, trains from random weights and records it in summary.json."))
    num_classes: Optional[int] = Field(None, ge=2, description=(
        "Classes of the new head; null: the number of class folders in the data. Set it to run freeze-report or "
        "inspect-grads without data."))
    task: Literal["multiclass", "multilabel"] = Field(
        "multiclass", description="multiclass: one class per image (softmax, cross-entropy); multilabel: any number "
        "of labels per image, none included (a sigmoid per label, binary cross-entropy; needs data.labels).")
    threshold: Optional[float] = Field(
        None, gt=0, lt=1, description="multilabel: the probability at which a label is predicted, the same for "
        "every label; null: one threshold per label, chosen on the validation split to maximise its F1.")
    zero_init_residual: bool = Field(True, description=(
        "When the model starts from random weights (model.weights: none, or the fallback) and the whole network "
        "trains (by the last freeze stage), start the last BatchNorm of every residual branch at zero, so each "
        "block starts as the identity (torchvision's zero_init_residual, timm's zero_init_last). With part of the "
        "network frozen, and with pretrained weights, nothing is changed."))


class LabelColumns(_Section):
    path: str = Field("path", min_length=1, description="The column holding image paths, relative to data.root.")
    label: str = Field("label", min_length=1, description="The column holding the label (multilabel: the labels, "
                       "split by data.label_delim).")
    split: Optional[str] = Field(None, min_length=1, description="The column holding train, val or test, which the "
                                 "file must then have; null: the column named split, if the file has one.")


AUGMENT_PRESETS = ("none", "light", "trivialaugment", "randaugment", "augmix")


class DataConfig(_Section):
    root: Optional[str] = Field(None, description=(
        "The ImageFolder tree: root/train/<class>/* and root/val/<class>/*, or root/<class>/* split by "
        "val_fraction. Relative to the config file's folder. With data.labels: the folder its image paths are "
        "relative to (null: the label file's folder)."))
    labels: Optional[str] = Field(
        None, description="A CSV or TSV label file (columns path, label and optionally split), relative to the "
        "config file's folder; null: class folders under data.root (torchvision ImageFolder layout).")
    columns: LabelColumns = Field(default_factory=LabelColumns,
                                  description="The label file's column names, e.g. {path: image, label: class}.")
    classes: Optional[list[str]] = Field(
        None, min_length=2, description="The class names in the order of the model's outputs; null: sorted names.")
    label_delim: str = Field(" ", min_length=1, description="multilabel: what separates the labels of one image "
                             "in the label column.")
    image_size: Optional[int] = Field(None, ge=32, le=1024, description=(
        "Width and height of the crop the model sees. null: what the weights were trained at (224 for most "
        "models, 300 for efficientnet_b3, 384 for efficientnet_v2_s)."))
    resize_size: Optional[int] = Field(None, ge=32, le=2048, description=(
        "The shorter side images are resized to before the centre crop. null: data.image_size times the "
        "weights' own ratio (256/224 for resnet18); data.image_size itself (the whole image, no margin) with "
        "model.weights: none and data.augment: none, where the margin would only cut off the border."))
    interpolation: Optional[Literal[INTERPOLATIONS]] = Field(None, description=(
        "Resampling of the resize (and of augmentation's random resized crop). null: the weights' own "
        "(bicubic for EfficientNet and Swin, bilinear for most)."))
    mean: Optional[tuple[float, float, float]] = Field(None, description=(
        "Per-channel RGB mean of the normalisation. null: the weights' own (ImageNet's)."))
    std: Optional[tuple[float, float, float]] = Field(None, description=(
        "Per-channel RGB standard deviation of the normalisation, each above 0. null: the weights' own "
        "(ImageNet's)."))
    val_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "Share of each class held out for validation when there is no root/val (stratified, seeded by "
        "train.seed)."))
    augment: Literal[AUGMENT_PRESETS] = Field("none", description=(
        "Training augmentation preset: none; light (random resized crop + horizontal flip; true means light, "
        "false none); trivialaugment, randaugment or augmix (light, then torchvision's TrivialAugmentWide, "
        "RandAugment or AugMix). Seeded by (seed, epoch, image index) and run in the decode threads, after the "
        "image cache (augmented pixels are never cached)."))
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
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description=(
        "shuffle: every training image once per epoch; balanced: as many draws with replacement, every class "
        "equally likely (for imbalanced classes)."))
    workers: Optional[int] = Field(None, ge=0, description=(  # None: data.loaders.default_workers()
        "Decode threads that work ahead of training; 0: decode in the main thread; null: none when an image reads "
        "in under 1 ms (small images, where threads beside the compute threads only slow them), else one per core, "
        "at most 8."))
    fast_decode: bool = Field(True, description=(
        "Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still covers data.image_size (1.5 x with "
        "data.augment); false: full-size decode, bit-identical to torchvision's classic pipeline."))
    cache_images: Switch = Field("auto", description=(
        "Keep each decoded, resized image (uint8) after its first read: in memory up to train.cache_max_gb, the "
        "rest in a file in the run directory (deleted at the end). auto: when later epochs read images again "
        "and they fit the budget or the disk."))
    demo: Optional[Literal["shapes", "shapes-multilabel"]] = Field(None, description=(
        "shapes: generate the demo data set at data.root if that folder is missing; shapes-multilabel: its "
        "multi-label variant (one to three shapes per image) with its label file, data.root/labels.csv."))
    skip_bad_images: bool = Field(False, description=(
        "true: leave out unreadable or truncated image files (named in a warning and in summary.json) instead "
        "of stopping with an error that names them."))

    @model_validator(mode="before")
    @classmethod
    def _root_of_labels(cls, data):
        # Before the fields: a label file's paths are relative to its own folder unless data.root says otherwise.
        if isinstance(data, dict) and data.get("root") is None and isinstance(data.get("labels"), str):
            return {**data, "root": os.path.dirname(data["labels"]) or "."}
        return data

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: Optional[tuple[float, float, float]]):
        if std is not None and not all(s > 0 for s in std):
            raise ValueError(f"is {list(std)}; every standard deviation must be positive")
        return std

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, classes: Optional[list[str]]) -> Optional[list[str]]:
        if classes is not None:
            repeated = sorted({name for name in classes if classes.count(name) > 1})
            if repeated:
                raise ValueError(f"names each class once (repeated: {', '.join(repeated)})")
            if any(not name.strip() for name in classes):
                raise ValueError("holds an empty class name")
        return classes

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


class Stage(_Section):
    epoch: int = Field(ge=1, description=(  # 1-based, as in the logs
        "The first epoch (1-based, as in the logs) these patterns train in; at most train.epochs."))
    trainable: list[str] = Field(min_length=1, description=(
        "Glob patterns of parameter names that join freeze.trainable from this epoch on."))


class FreezeConfig(_Section):
    default: Literal["frozen", "trainable"] = Field("frozen", description=(
        "What a parameter is when no pattern matches."))
    trainable: list[str] = Field(default_factory=lambda: [HEAD], description=(
        "Glob patterns of parameter names to train; layer4 also means layer4.*; head names the new head in every "
        "family (fc for ResNets, classifier.3 for MobileNetV3...). The most specific matching pattern wins."))
    frozen: list[str] = Field(default_factory=list, description=(
        "Glob patterns of parameter names to freeze; a tie with a freeze.trainable pattern goes to frozen."))
    batchnorm: Literal["eval", "train"] = Field("eval", description=(
        "eval: BatchNorm layers whose parameters are all frozen run in eval mode, so their running statistics "
        "never change; train: every BatchNorm layer updates its statistics, as the tutorials do."))
    stages: list[Stage] = Field(default_factory=list, description=(
        "Gradual unfreezing: [{epoch: E, trainable: [patterns]}, ...], epochs strictly increasing. Newly "
        "trainable parameters join the optimizer as new param groups with fresh momentum."))

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, stages: list[Stage]) -> list[Stage]:
        epochs = [stage.epoch for stage in stages]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"stage epochs must increase strictly (got {epochs})")
        return stages


class ParamGroup(_Section):
    params: list[str] = Field(min_length=1, description="Glob patterns of parameter names that get this rate.")
    lr: float = Field(gt=0, le=10, description="Their learning rate; the schedule multiplies it as it does "
                      "optim.lr.")


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = Field("sgd", description=(
        "sgd: SGD with optim.momentum (and optim.nesterov); adamw: AdamW (the usual choice for ConvNeXt, ViT and "
        "Swin; momentum and nesterov do not apply)."))
    lr: float = Field(0.01, gt=0, le=10, description="The learning rate (lr-find suggests one).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    # after momentum: its validator reads momentum
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay: L2 for sgd, decoupled for adamw.")
    schedule: Literal["constant", "step", "cosine"] = Field("constant", description=(
        "The learning-rate schedule, stepped every batch; it multiplies every param group's own base rate."))
    step_size: int = Field(1, ge=1, description="step schedule: multiply the rate by gamma every step_size "
                           "epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: the factor.")
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up from lr/steps to lr over these epochs, then "
                               "the schedule.")
    grad_clip: Optional[float] = Field(None, gt=0, description="Clip the global gradient norm to this value; "
                                       "null: no clipping.")
    param_groups: list[ParamGroup] = Field(default_factory=list, description=(
        "Learning rates by pattern: [{params: [patterns], lr: X}, ...]; the most specific pattern wins, and it "
        "takes precedence over layer_lr_decay."))
    layer_lr_decay: Optional[float] = Field(None, gt=0, le=1, description=(
        "d: the head gets lr, each stage below it one more factor d (for ResNets fc lr, layer4 lr*d, ... the "
        "stem lr*d^5)."))
    no_decay_norm_bias: bool = Field(False, description=(
        "Keep weight decay off normalisation layers (BatchNorm, LayerNorm, GroupNorm) and every bias. Formerly "
        "optim.no_decay_bn_bias, which still works with a warning."))

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


MULTICLASS_SCORES = ("val_acc", "val_balanced_acc")  # what early stopping may monitor for one task only
MULTILABEL_SCORES = ("val_map", "val_micro_f1", "val_exact_match")


class EarlyStopping(_Section):
    monitor: Literal[("val_loss", "val_macro_f1") + MULTICLASS_SCORES + MULTILABEL_SCORES] = Field(
        "val_acc", description="The validation metric to watch (val_loss improves downwards, the others upwards): "
        "val_loss or val_macro_f1; for multiclass val_acc or val_balanced_acc; for multilabel val_map (the default "
        "there), val_micro_f1 or val_exact_match.")
    patience: int = Field(3, ge=0, description=(
        "Epochs without improvement before the run stops; 0: at the first epoch that does not improve."))
    min_delta: float = Field(0.0, ge=0, description="A change of at most this much is no improvement.")


LOGGERS = ("tensorboard", "mlflow")


class MlflowConfig(_Section):
    tracking_uri: str = Field("mlruns", min_length=1, description=(
        "Where MLflow records runs: a folder (a local file store; relative to the config file, or to the current "
        "folder by default) or a URI such as http://host:5000. Nothing is sent over a network unless you give one."))
    experiment: str = Field("finetune", min_length=1, description="The MLflow experiment the run is recorded under "
                            "(created when missing).")
    run_name: Optional[str] = Field(None, min_length=1, description="The MLflow run's name; default: the run "
                                    "directory's name.")
    log_checkpoint: bool = Field(False, description="Also upload best.pt as an artifact when the run ends (a "
                                 "ResNet-18 checkpoint is about 45 MB).")


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
    epochs: int = Field(5, ge=1, description="Epochs to train.")
    batch_size: int = Field(32, ge=1, description="The global batch: under DDP each of N processes takes "
                            "batch_size / N images per step.")
    seed: int = Field(0, description=(
        "Seeds the head, the split, the data order and augmentation: the same config gives the same weights, "
        "bit for bit, on the same machine."))
    output_dir: str = Field("runs/default", description="The run directory (--output-dir overrides it).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Union[Literal["none", "balanced"], list[float]] = Field("none", description=(
        "Weights of the training loss per class: none; balanced (inverse class frequency, normalised to mean 1); "
        "or a list of one positive weight per class, in the sorted order of the class folders."))
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(  # auto: finetune.utils.hardware
        "bf16 autocasts the forward pass; weights, gradients and the optimizer stay fp32. auto: bf16 only where "
        "it is native (a CPU with avx512_bf16 or amx_bf16, a CUDA GPU with compute capability >= 8.0), else "
        "fp32; an explicit bf16 elsewhere trains but warns: it is several times slower."))
    cache_features: Switch = Field("auto", description=(
        "Compute the frozen prefix's outputs once, during the first epoch, and train later epochs from them. "
        "auto: when the prefix is frozen, its BatchNorm layers run in eval mode and the training images do not "
        "change from epoch to epoch (data.augment, data.random_erasing, train.mixup and train.cutmix off); on: an "
        "error when that is not so."))
    compile: Switch = Field("auto", description=(
        "Compile the frozen prefix with torch.compile (inductor with freezing: its weights become constants; "
        "needs a C++ compiler) for the training batch's shape, when it is deterministic (BatchNorm in eval mode), "
        "and use it only if a test batch gives the eager outputs. auto: in fp32, for ResNet, MobileNetV3, "
        "EfficientNet and RegNet (1.4-1.6x as fast at 32 px, 1.0-1.2x at 224), when the images it will run in the "
        "phase win the compile time (10-15 s) back; on: for any model; off: never."))
    cache_max_gb: float = Field(2.0, ge=0, description=(
        "Memory for the feature cache, and for the image cache; beyond it a cache goes to a file in the run "
        "directory, deleted when the run ends."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else the CPU.")
    sync_batchnorm: bool = Field(False, description=(
        "Under DDP, sync trainable BatchNorm statistics across processes (CUDA only)."))
    dist_timeout_s: int = Field(600, ge=10, description="Timeout in seconds of collective operations under DDP.")
    early_stopping: Optional[EarlyStopping] = Field(None, description=(
        "Stop when monitor has not improved by more than min_delta for patience epochs, e.g. {monitor: val_acc, "
        "patience: 3, min_delta: 0.0}; null: train every epoch."))
    time_limit_min: Optional[float] = Field(None, gt=0, description=(
        "Stop cleanly after this many minutes of this invocation: after the current step, saving last.pt as on "
        "SIGTERM, exit code 0."))
    loggers: list[str] = Field(default_factory=list, description=(
        "Experiment trackers the run also writes to: tensorboard (event files in RUN/tensorboard/), mlflow (see "
        "train.mlflow; needs pip install 'finetune[mlflow]'). Empty: the run directory only."))
    log_every_steps: int = Field(10, ge=1, description="Trackers record the training loss and learning rate every "
                                 "this many optimizer steps (epoch metrics are recorded every epoch).")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="Where train.loggers: [mlflow] records "
                                 "the run.")
    calibrate: bool = Field(False, description=(
        "At the end of training, fit a temperature on best.pt's validation logits so that its probabilities are "
        "calibrated (as `finetune calibrate` does): stored in best.pt, used by evaluate, predict and export; "
        "reliability.png in the run directory."))
    mixup: Optional[float] = Field(None, gt=0, description=(
        "MixUp's alpha (torchvision's MixUp): mix a batch with itself shifted by one, with weight ~ Beta(alpha, "
        "alpha); null turns it off. timm's ImageNet recipes use 0.1-0.8. Multi-label: the multi-hot targets are "
        "mixed the same way (binary cross-entropy takes soft targets)."))
    cutmix: Optional[float] = Field(None, gt=0, description=(
        "CutMix's alpha (torchvision's CutMix): paste a box of the shifted batch, of area ~ Beta(alpha, alpha); "
        "null turns it off. Usually 1.0."))
    mix_prob: float = Field(1.0, ge=0, le=1, description=(
        "Probability that a batch is mixed (timm's mixup_prob); with both mixup and cutmix on, a mixed batch "
        "uses either with equal chance (timm's switch_prob 0.5)."))
    ema: Optional[EmaConfig] = Field(None, description=(
        "Keep an exponential moving average of the weights, validated every epoch beside the raw weights; "
        "null turns it off, {} uses the defaults. It cannot change on --resume."))

    @field_validator("loggers")
    @classmethod
    def _known_loggers(cls, loggers: list[str]) -> list[str]:
        for name in loggers:
            if name not in LOGGERS:
                close = difflib.get_close_matches(name, LOGGERS, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown logger {name!r}; {hint}the loggers are {', '.join(LOGGERS)}")
        if len(set(loggers)) < len(loggers):
            raise ValueError("a logger is named twice")
        return loggers

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
    model: ModelConfig = Field(default_factory=ModelConfig, description=(
        "The network: architecture, pretrained weights and the size of the new head."))
    data: DataConfig = Field(default_factory=DataConfig, description=(
        "The images: where they are, how they are decoded, augmented, sampled and cached."))
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description=(
        "What trains and what stays frozen, BatchNorm modes, and gradual unfreezing."))
    optim: OptimConfig = Field(default_factory=OptimConfig, description=(
        "SGD with momentum (or AdamW) over the trainable parameters only: learning rates, their schedule, weight "
        "decay."))
    train: TrainConfig = Field(default_factory=TrainConfig, description=(
        "The run: epochs, batches, seed, run directory, loss, precision, caches, devices and when to stop."))

    _source: Any = PrivateAttr(default=None)  # a config.loading._Source: where each key was set
    _warnings: list[str] = PrivateAttr(default_factory=list)  # e.g. a renamed key still in use

    @property
    def warnings(self) -> list[str]:
        """What the config still accepts but should change (renamed keys), for the user."""
        return self._warnings

    @model_validator(mode="after")
    def _monitor_of_task(self) -> "Config":
        # val_acc, the default, is a multi-class metric: a multi-label run watches val_map unless told otherwise.
        stopping = self.train.early_stopping
        if stopping and self.model.task == "multilabel" and "monitor" not in stopping.model_fields_set:
            stopping.monitor = "val_map"
        return self

    def where(self, key: str) -> str:
        """Where ``key`` was set, for messages: ``file:line``, ``--set key`` or the file."""
        return self._source.where(key) if self._source else key

    @property
    def path(self) -> Optional[Path]:
        return self._source.path if self._source else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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

