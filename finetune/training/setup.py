"""One setup for everything that trains: what a training step needs, prepared from a validated config.

``train`` (the :class:`~finetune.training.run.Run`), ``lr-find``, ``inspect-grads`` and ``scripts/bench.py``
all start from :func:`prepare`, so what a report or a benchmark shows is what training does:

- the data (demo set generated first, unreadable files checked), or none when ``data.root`` is not set;
- the model built with its weights and head, its freeze plan and BatchNorm modes
  (:class:`~finetune.models.build.Built`);
- the precision ``train.precision`` resolves to, and the device;
- the optimizer with its param groups, the schedule, the training and validation losses, the sampling weights;
- and, for a freeze plan, a :class:`Phase`: the fast model (frozen prefix without autograd) and the feature
  sources that feed it batches (:meth:`Setup.phase`). A freeze stage starts a new phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.config.schema import Config, Stage
from finetune.data.folders import Datasets, ensure_demo_data, image_samples, load_datasets
from finetune.data.imagecache import ImageCaches, plan_image_caches
from finetune.data.loaders import steps_per_epoch
from finetune.models.build import Built, build
from finetune.models.fastpath import FastModel, FeatureSource, cache_plan, compile_decision, feature_sources
from finetune.models.freeze import Decision, apply_plan, batchnorm_modes, plan_freeze, set_train_mode
from finetune.training.losses import imbalance_warning, sampling_weights, training_loss, validation_loss
from finetune.training.optim import Schedule, add_trainable, build_optimizer
from finetune.utils.distributed import Dist
from finetune.utils.hardware import PrecisionChoice, precision_for_config, select_device


@dataclass
class Phase:
    """What trains now: the freeze plan, the fast model (with the BatchNorm modes) and the feature sources feeding
    it."""

    plan: dict[str, Decision]
    fast: FastModel
    train_source: FeatureSource
    val_source: FeatureSource
    cache: str  # whether the feature cache is on, and why, in words
    compiling: str = ""  # why train.compile compiles the frozen prefix or not, in words ("": not a question here)

    def describe(self, precision: PrecisionChoice) -> str:
        """One line for the log: the frozen prefix, the precision, the memory format and the feature cache."""
        fast = self.fast
        names = fast.prefix_names
        how = "no autograd, BatchNorm folded" if fast.folded else "no autograd"
        if fast.compile_error:
            how += f"; not compiled, torch.compile failed: {fast.compile_error}"
        elif fast.compile_seconds is not None:
            how += f"; compiled in {fast.compile_seconds:.1f} s, {self.compiling}"
        elif self.compiling:
            how += f"; not compiled, {self.compiling}"
        prefix = f"{names[0]} .. {names[-1]} ({how})" if names else "none"
        depthwise = (f", its {fast.fp32_depthwise} depthwise convolutions in fp32 (faster there)"
                     if fast.fp32_depthwise else "")
        return (f"frozen prefix: {prefix}; precision {precision.precision} ({precision.reason}{depthwise}); memory "
                f"format {fast.layout.why}; feature cache {self.cache}")

    def sources(self) -> list[tuple[str, FeatureSource]]:
        return [("train", self.train_source), ("val", self.val_source)]

    def close(self) -> None:
        """Free the feature caches (and delete their files)."""
        self.train_source.close()
        self.val_source.close()


@dataclass
class Setup:
    """What a training step needs (see the module docstring); :func:`prepare` makes it."""

    config: Config
    dist: Dist
    data: Optional[Datasets]  # None when data.root is not set (inspect-grads then checks a random batch)
    built: Built  # model, freeze plan and BatchNorm modes of the epoch prepared for, weights, class count
    precision: PrecisionChoice
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    steps: int  # training steps per epoch and process
    targets: list  # the class of each training image (multilabel: its multi-hot row)
    loss_fn: nn.Module  # the training loss: class weights, label smoothing
    val_loss_fn: nn.Module  # unweighted, so validation losses compare across settings
    sampling_weights: Optional[torch.Tensor]  # per training image, for data.sampler: balanced
    messages: list[str] = field(default_factory=list)  # what a run reports: the demo set generated
    warnings: list[str] = field(default_factory=list)  # unreadable images skipped, weights, precision, imbalance

    @property
    def model(self) -> nn.Module:
        return self.built.model

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def start_stage(self, plan: dict[str, Decision], stage: Stage) -> tuple[dict[str, Decision], list[str]]:
        """Start freeze ``stage`` after ``plan``: its parameters train and join the optimizer as new param groups
        (with fresh momentum), scaled by the schedule. Returns the new plan and the newly trainable names."""
        config, model = self.config, self.built.model
        new = plan_freeze(plan, config.freeze, stage.epoch, head=self.built.arch.head)
        newly = [name for name, decision in new.items() if decision.trainable and not plan[name].trainable]
        apply_plan(model, new)
        add_trainable(self.optimizer, model, newly, config.optim, self.built.arch)
        self.schedule.apply()
        return new, newly

    def image_caches(self, plan: dict[str, Decision], epochs_left: int, folder: Path) -> ImageCaches:
        """The decoded-image caches for the ``epochs_left`` (see ``data.imagecache.plan_image_caches``), beside the
        feature cache ``plan`` allows; a cache beyond ``train.cache_max_gb`` spills to a file in ``folder``."""
        config, model = self.config, self.built.model
        feature_cached = cache_plan(config, self.built.arch, model, plan,
                                    batchnorm_modes(model, plan, config.freeze.batchnorm)).splits
        return plan_image_caches(config, self.data, feature_cached=feature_cached, epochs_left=epochs_left,
                                 folder=folder, suffix=f"-rank{self.dist.rank}" if self.dist.active else "")

    def fast_model(self, plan: dict[str, Decision]) -> FastModel:
        """The model as ``plan`` (the freeze plan in force) trains it: frozen prefix without autograd, in the
        run's precision, on its device (the trainable part under DistributedDataParallel in a distributed run),
        in train mode with frozen BatchNorm layers in eval mode."""
        model = self.built.model
        bn_modes = batchnorm_modes(model, plan, self.config.freeze.batchnorm)
        fast = FastModel(model, self.built.arch, plan, bn_modes, self.precision.precision, self.device,
                         image_size=self.config.data.image_size)
        if self.dist.active:
            fast.distribute()
        set_train_mode(model, bn_modes)
        return fast

    def phase(self, plan: dict[str, Decision], folder: Path, image_caches: Optional[ImageCaches] = None,
              epochs: int = 0) -> Phase:
        """The fast model and the data's feature sources for ``plan``.

        ``folder`` takes a feature cache that spills to disk; ``image_caches``: the run's decoded-image caches;
        ``epochs``: how many the phase trains in all (a resumed run's as many as the run it continues: both decide
        ``train.compile`` alike), for ``train.compile`` (0: no compiling).
        """
        fast = self.fast_model(plan)
        train_source, val_source, cache = feature_sources(self.config, fast, self.data, folder, dist=self.dist,
                                                          weights=self.sampling_weights, image_caches=image_caches)
        compiling, compile_why = False, ""
        if epochs:
            passes = {"train": 1 if train_source.caching else epochs, "val": 1 if val_source.caching else epochs}
            images = sum(len(getattr(self.data, split)) * n for split, n in passes.items()) / self.dist.world
            compiling, compile_why = compile_decision(self.config.train.compile, self.built.arch,
                                                      self.precision.precision, fast.prefix_deterministic,
                                                      fast.split > 0, images, self.config.data.image_size)
        if compiling:
            size = self.config.data.image_size
            fast.compile_prefix((self.config.train.batch_size // self.dist.world, 3, size, size))
        return Phase(plan, fast, train_source, val_source, cache, compile_why)


def prepare(config: Config, *, dist: Optional[Dist] = None, epoch: int = 1, show_download: bool = False,
            resumed_precision: Optional[str] = None) -> Setup:
    """Everything a training step needs from ``config``, which must have passed ``validate``.

    ``dist``: this process's place in a distributed job (default: one process on ``train.device``); only its
    first process generates the demo set. ``epoch``: the (1-based) epoch whose freeze plan the model gets.
    ``show_download``: torchvision's download bar for pretrained weights. ``resumed_precision``: the precision a
    resumed run trained in (``train.precision: auto`` keeps it). Raises FinetuneError for unreadable images and
    weights that cannot be loaded.
    """
    dist = dist or Dist(device=torch.device(select_device(config.train.device, torch.cuda.is_available())))
    demo = ensure_demo_data(config) if dist.is_main else None
    dist.barrier()
    data = load_datasets(config) if config.data.root is not None else None
    built = build(config, data.classes if data else None, show_download=show_download, epoch=epoch)
    precision = precision_for_config(config, resumed_precision)
    optimizer = build_optimizer(built.model, config.optim, built.arch)
    steps = steps_per_epoch(data.train, config.train.batch_size // dist.world, dist.world) if data else 0
    targets = [target for _, target in image_samples(data.train)] if data else []
    setup = Setup(config, dist, data, built, precision, optimizer,
                  Schedule(optimizer, config.optim, config.train.epochs, max(steps, 1)), steps, targets,
                  training_loss(config, targets, built.num_classes, dist.device),
                  validation_loss(config),
                  sampling_weights(config.data.sampler, targets, built.num_classes))
    if demo:
        setup.messages.append(f"Generated the shapes demo data set at {demo['root']} ({demo['train']} train / "
                              f"{demo['val']} val images)")
    setup.warnings += _warnings(config, setup)
    return setup


def _warnings(config: Config, setup: Setup) -> list[str]:
    bad = setup.data.bad_images if setup.data else []
    remedied = config.train.class_weights != "none" or config.data.sampler != "shuffle"
    # The imbalance warning counts images per class and suggests multi-class remedies: multi-label runs go without it.
    multilabel = config.model.task == "multilabel"
    found = [f"skipped {len(bad)} unreadable image(s) (data.skip_bad_images: true): " + ", ".join(bad[:5])
             + (" ..." if len(bad) > 5 else "") if bad else None,
             setup.built.weights.warning, setup.precision.warning,
             None if remedied or multilabel or not setup.data else imbalance_warning(setup.targets, setup.data.classes),
             *(setup.data.notes if setup.data else [])]
    return [warning for warning in found if warning]
