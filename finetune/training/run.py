"""The training engine: a :class:`Run` holds one run's state, :func:`fit` is its epoch loop.

Everything a resumed run needs is in ``last.pt``: model, optimizer (momentum
buffers), schedule, position (epoch and step), RNG states and the metrics so far.
The data order is a function of (seed, epoch) alone, so a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data.folders import ensure_demo_data, image_samples, load_datasets
from finetune.data.imagecache import ImageCaches, plan_image_caches
from finetune.data.loaders import steps_per_epoch
from finetune.errors import FinetuneError
from finetune.models.build import Built, build
from finetune.models.fastpath import FastModel, FeatureSource, feature_sources, image_source
from finetune.models.freeze import (
    apply_plan,
    batchnorm_modes,
    frozen_tensors,
    plan_freeze,
    set_train_mode,
)
from finetune.training import rundir
from finetune.training.checkpoint import (
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from finetune.training.distributed import Dist, setup, teardown
from finetune.training.ema import WeightEMA, served
from finetune.training.losses import imbalance_warning, sampling_weights, training_loss
from finetune.training.metrics import (
    balanced_accuracy,
    confusion_matrix,
    hits,
    macro_f1,
    top_k_hits,
)
from finetune.training.optim import Schedule, add_trainable, build_optimizer
from finetune.training.reporter import Reporter
from finetune.utils.files import atomic_copy
from finetune.utils.hardware import precision_for_config

# curves.png is redrawn after an epoch only when this long has passed since the last drawing (a drawing costs
# about 0.3 s), and always when the run ends, however it ends.
CURVES_EVERY_S = 30.0


@dataclass
class TrainState:
    """Where a run is: completed epochs, steps done in the current one, and the metrics so far."""
    epoch: int = 0
    step: int = 0
    seen: int = 0  # training images seen in the current epoch, and their summed loss and correct count
    loss_sum: float = 0.0
    correct: float = 0.0  # soft targets (MixUp/CutMix) count a share of an image: metrics.hits
    seconds: float = 0.0  # training time spent in the current epoch
    grad_norm_sum: float = 0.0  # of the global gradient norm (before clipping) over the epoch's steps
    frozen_checksums: dict[str, str] = field(default_factory=dict)  # taken when the run started
    history: list[dict] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_val_acc: float = -1.0  # of the weights the best epoch's checkpoint serves
    serves: str = "raw"  # the weights the last finished epoch's checkpoints serve ("raw" or "ema": train.ema.use_for)
    best_serves: str = "raw"
    total_seconds: float = 0.0
    monitor_best: Optional[float] = None  # early stopping: the best monitored value and epochs since it
    epochs_without_improvement: int = 0
    stopped: Optional[str] = None  # "early_stopping" or "time_limit" when the run ended before train.epochs

    def next_epoch(self) -> None:
        self.epoch, self.step, self.seen, self.loss_sum, self.correct = self.epoch + 1, 0, 0, 0.0, 0.0
        self.seconds = self.grad_norm_sum = 0.0


def train(config: Config, reporter: Reporter, *, output_dir: Optional[Path] = None, resume: Optional[Path] = None,
          overwrite: bool = False) -> dict:
    """Fine-tune as ``config`` says and write the run directory; returns the summary.

    With ``resume`` (a run directory) the run continues from its ``last.pt``. Under
    torchrun every process trains its shard and only rank 0 reports and writes.
    Raises FinetuneError for bad input, and with exit code 130/143 when interrupted.
    """
    dist = setup(config)
    try:
        run = Run.create(config, reporter if dist.is_main else Reporter(), dist, output_dir=output_dir,
                         resume=resume, overwrite=overwrite)
        return fit(run)
    finally:
        teardown(dist)


def fit(run: "Run") -> dict:
    """Train ``run`` to its last epoch (or until it stops early); returns the summary."""
    config, state = run.config, run.state
    with StopSignals() as signals:
        try:
            while state.epoch < config.train.epochs and state.stopped is None:
                epoch = state.epoch
                run.enter_epoch(epoch + 1)
                finished = train_one_epoch(
                    run.phase.fast, run.phase.train_source.epoch(epoch, state.step), run.loss_fn, run.optimizer,
                    run.schedule, state, grad_clip=config.optim.grad_clip, on_step=run.after_step,
                    should_stop=lambda: run.dist.any(signals.signum is not None or run.out_of_time()))
                if not finished:
                    run.checkpoint("last.pt")
                    if signals.signum is None:
                        state.stopped = "time_limit"
                        break
                    raise _interrupted(signals.signum, epoch, state.step, run.run_dir)
                run.end_epoch(*run.validate())
                if run.dist.any(signals.signum is not None):
                    raise _interrupted(signals.signum, epoch + 1, 0, run.run_dir)
                if state.stopped is None and state.epoch < config.train.epochs and run.dist.any(run.out_of_time()):
                    state.stopped = "time_limit"
        except FinetuneError as exc:
            if exc.exit_code == 1:  # a failed guard: nothing from this epoch was saved
                raise FinetuneError(f"{exc}\n{run.kept()}", exit_code=1) from None
            raise
        finally:
            run.close()
    return run.finish()


def train_one_epoch(fast: FastModel, batches, loss_fn, optimizer, schedule: Schedule, state: TrainState, *,
                    grad_clip: Optional[float] = None, should_stop: Callable[[], bool] = lambda: False,
                    on_step: Callable[[TrainState], None] = lambda state: None) -> bool:
    """Train the trainable part of ``fast`` over (prefix features, targets) ``batches``, counting into ``state``.

    Returns False when ``should_stop()`` said so after a step (the epoch is unfinished).
    Raises FinetuneError (exit code 1) when the loss, a gradient or an updated tensor is not finite.
    """
    model = fast.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    watched = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    watched += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()
                and model.get_submodule(n.rsplit(".", 1)[0]).training]
    where = lambda: f"epoch {state.epoch + 1}, step {state.step + 1}"  # noqa: E731
    tick = time.perf_counter()
    for features, targets in batches:
        targets = targets.to(fast.device, non_blocking=True)
        logits = fast.head(features)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        loss_value = loss.item()
        if not math.isfinite(loss_value) or not torch.isfinite(norm):
            culprit = next((n for n, p in model.named_parameters()
                            if p.grad is not None and not torch.isfinite(p.grad).all()), None)
            raise _diverged(f"{where()}: the loss is {loss_value}; first parameter with a non-finite gradient: "
                            f"{culprit or 'none (the loss itself overflowed)'}", optimizer)
        optimizer.step()
        broken = next((name for name, t in watched if not torch.isfinite(t).all()), None)
        if broken:  # a finite but huge update, or BatchNorm statistics blown up by huge activations
            raise _diverged(f"{where()}: non-finite values in {broken} after the update", optimizer)
        schedule.step()
        state.step += 1
        state.seen += len(targets)
        state.grad_norm_sum += norm.item()
        state.loss_sum += loss_value * len(targets)
        state.correct += hits(logits, targets)
        now = time.perf_counter()
        state.seconds += now - tick
        tick = now
        on_step(state)
        if should_stop():  # under DDP every process agrees, so all stop at the same step
            return False
    return True


@torch.inference_mode()
def evaluate(fast: FastModel, batches, loss_fn, num_classes: int, dist: Dist = Dist()) -> dict:
    """Loss, top-1 and top-5 accuracy (and the confusion matrix) in eval mode over (features, targets) batches.

    Under DDP each process evaluates its shard and the sums are combined.
    """
    fast.model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5, seen = 0.0, 0, 0
    for features, targets in batches:
        logits = fast.head(features).cpu()
        loss_sum += loss_fn(logits, targets).item() * len(targets)
        top5 += top_k_hits(logits, targets).sum().item()
        confusion += confusion_matrix(targets, logits.argmax(1), num_classes)
        seen += len(targets)
    loss_sum, top5, seen = dist.sum([loss_sum, top5, seen])
    confusion = dist.sum_tensor(confusion)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "confusion": confusion, "n": 0}
    return {"loss": loss_sum / seen, "acc": confusion.diagonal().sum().item() / seen, "top5": top5 / seen,
            "confusion": confusion, "n": seen}


class Run:
    """One training run: config, data, model, optimizer, schedule, state, process group, run directory, reporter.

    :meth:`create` sets it up (new or resumed), :meth:`enter_epoch` starts freeze stages,
    :meth:`end_epoch` records an epoch, :meth:`checkpoint` saves it and :meth:`finish` summarises it.
    """

    def __init__(self, config: Config, reporter: Reporter, dist: Dist, run_dir: Path, data, built: Built,
                 resumed_precision: Optional[str] = None):
        self.config, self.reporter, self.dist, self.run_dir, self.data, self.built = (
            config, reporter, dist, run_dir, data, built)
        self.started = time.perf_counter()
        self.precision = precision_for_config(config, resumed_precision)
        self.model = built.model
        self.optimizer = build_optimizer(self.model, config.optim, built.arch)
        self.steps = steps_per_epoch(data.train, config.train.batch_size // dist.world, dist.world)
        self.schedule = Schedule(self.optimizer, config.optim, config.train.epochs, self.steps)
        self.targets = [target for _, target in image_samples(data.train)]
        self.sampling_weights = sampling_weights(config.data.sampler, self.targets, built.num_classes)
        self.loss_fn = training_loss(config, self.targets, built.num_classes, dist.device)
        self.val_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)  # unweighted: comparable
        # Tensors frozen for the whole run (after the last stage) must end bit-identical.
        final_plan = plan_freeze(built.plan, config.freeze, config.train.epochs)
        self.frozen = frozen_tensors(self.model, final_plan,
                                     batchnorm_modes(self.model, final_plan, config.freeze.batchnorm))
        self.state = TrainState()
        self.phase = Phase(self, built.plan, epoch=1)
        self.ema = WeightEMA(self.model, config.train.ema) if config.train.ema else None  # after Phase moved it
        self.image_caches = ImageCaches("off")
        self.caches_reported = False
        self.curves_drawn_at, self.curves_drawn_epochs = self.started, 0
        self.bad_reported = len(data.bad_images)

    @classmethod
    def create(cls, config: Config, reporter: Reporter, dist: Dist, *, output_dir: Optional[Path] = None,
               resume: Optional[Path] = None, overwrite: bool = False) -> "Run":
        """Check the run directory, load the data, build the model; restore ``resume``'s last.pt if given."""
        if resume is not None:
            run_dir = Path(resume)
            rundir.check_resume(config, run_dir)
        else:
            run_dir = Path(output_dir or config.train.output_dir)
            rundir.check_new(run_dir, overwrite)
        config = config.model_copy(deep=True)
        config.train.output_dir = str(run_dir.resolve())
        demo = ensure_demo_data(config) if dist.is_main else None
        dist.barrier()
        if demo:
            reporter.message(f"Generated the shapes demo data set at {demo['root']} "
                             f"({demo['train']} train / {demo['val']} val images)")
        data = load_datasets(config)
        if data.bad_images:
            reporter.warn(f"skipped {len(data.bad_images)} unreadable image(s) (data.skip_bad_images: true): "
                          + ", ".join(data.bad_images[:5]) + (" ..." if len(data.bad_images) > 5 else ""))
        built = build(config, data.classes, progress=reporter.shows_progress)
        if built.weights.warning:
            reporter.warn(built.weights.warning)
        if resume is None and dist.is_main:
            rundir.prepare_new(run_dir, overwrite)  # only now: bad data or weights leave nothing behind
        dist.barrier()
        saved = load_checkpoint(run_dir / "last.pt") if resume is not None else None
        run = cls(config, reporter, dist, run_dir, data, built, resumed_precision=saved and saved.get("precision"))
        remedied = config.train.class_weights != "none" or config.data.sampler != "shuffle"
        for warning in (run.precision.warning, None if remedied else imbalance_warning(run.targets, data.classes)):
            if warning:
                reporter.warn(warning)
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        if saved is not None:
            run.restore(saved)
        else:
            run.state.frozen_checksums = _checksums(run.frozen)
            if dist.is_main:
                rundir.write_config(run_dir, config)
        run.image_caches = plan_image_caches(config, data, feature_cached=run.phase.cached_splits(),
                                             epochs_left=config.train.epochs - run.state.epoch, folder=run_dir,
                                             suffix=f"-rank{dist.rank}" if dist.active else "")
        reporter.message(f"image cache {run.image_caches.why}")
        reporter.start(run_dir=run_dir, config=config, weights=built.weights.source, layout=data.layout,
                       train_images=len(data.train), val_images=len(data.val), classes=data.classes,
                       steps_per_epoch=run.steps, resumed_at=run.state.epoch if resume else None)
        return run

    def restore(self, saved: dict) -> None:
        """Continue from ``saved`` (the run's ``last.pt``): the stages started by then, weights, optimizer,
        schedule, RNG, state."""
        path = self.run_dir / "last.pt"
        if saved.get("world", 1) != self.dist.world:
            raise FinetuneError(f"{path} was written by a run of {saved.get('world', 1)} process(es); resume it "
                                f"with the same number (now {self.dist.world}).")
        self._start_stages(saved["progress"]["epoch"] + 1)  # the same param groups as when it was saved
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["scheduler"])
        restore_rng_states(saved["rng"])
        self.state = TrainState(**saved["progress"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self._resume_stopped(saved["config"])

    def _resume_stopped(self, saved_config: dict) -> None:
        stopped, self.state.stopped = self.state.stopped, None
        if stopped != "early_stopping":
            return
        before = saved_config["train"]
        patience = (before.get("early_stopping") or {}).get("patience")
        now = self.config.train.early_stopping
        if self.config.train.epochs > before["epochs"] or (now and patience is not None and now.patience > patience):
            self.reporter.message(f"continuing a run that stopped early at epoch {self.state.epoch}: "
                                  "train.epochs or the patience was raised")
            return
        self.state.stopped = stopped
        self.reporter.message(f"nothing to do: {self.run_dir} is finished, early stopping ended it at epoch "
                              f"{self.state.epoch} ({self.state.epochs_without_improvement} epochs without "
                              "improvement). To train on, raise train.epochs or train.early_stopping.patience "
                              "(--set ...) and resume again.")

    def enter_epoch(self, epoch: int) -> None:
        """Get ready to train (1-based) ``epoch``: start the freeze stages due, set train/eval modes."""
        self._start_stages(epoch)
        set_train_mode(self.model, self.phase.bn_modes)
        self.reporter.epoch_start(epoch, self)

    def _start_stages(self, epoch: int) -> None:
        """Start every stage due by ``epoch``, one at a time and in order (so a resume rebuilds the same param
        groups): newly trainable parameters join the optimizer as new groups, BatchNorm modes and the fast path
        follow the new freeze state, and the old feature cache is dropped."""
        config = self.config
        for stage in config.freeze.stages:
            if not self.phase.epoch < stage.epoch <= epoch:
                continue
            plan = plan_freeze(self.phase.plan, config.freeze, stage.epoch)
            newly = [n for n, decision in plan.items() if decision.trainable and not self.phase.plan[n].trainable]
            apply_plan(self.model, plan)
            add_trainable(self.optimizer, self.model, newly, config.optim, self.built.arch)
            self.schedule.apply()
            self.phase.close()
            self.phase = Phase(self, plan, stage.epoch)
            params = sum(p.numel() for n, p in self.model.named_parameters() if n in newly)
            self.reporter.message(f"stage at epoch {stage.epoch}: {len(newly)} more tensors train ({params:,} "
                                  f"parameters, patterns {stage.trainable}); they join the optimizer as new "
                                  "param groups")

    def after_step(self, state: TrainState) -> None:
        if self.ema is not None:
            self.ema.update(self.model)
        self.report_step(state)

    def report_step(self, state: TrainState) -> None:
        self.reporter.step(state.epoch, state.step, self.steps, state.loss_sum / state.seen, state.correct / state.seen,
                           self.optimizer.param_groups[0]["lr"], state.seen / max(state.seconds, 1e-9))

    def out_of_time(self) -> bool:
        limit = self.config.train.time_limit_min
        return limit is not None and time.perf_counter() - self.started > limit * 60

    def validate(self) -> tuple[dict, Optional[dict]]:
        """The raw model's validation results, and the EMA model's (None without ``train.ema``)."""
        phase = self.phase
        val = evaluate(phase.fast, phase.val_source.epoch(0), self.val_loss_fn, self.built.num_classes, self.dist)
        if self.ema is None:
            return val, None
        fast = FastModel(self.ema.module, self.built.arch, phase.plan, phase.bn_modes, self.precision.precision,
                         self.dist.device)
        # A frozen prefix in eval mode is bit-identical in both models: the EMA reads the same (cached) features.
        source = phase.val_source if phase.fast.prefix_deterministic else image_source(self.config, fast,
                                                                                       self.data.val, self.dist)
        return val, evaluate(fast, source.epoch(0), self.val_loss_fn, self.built.num_classes, self.dist)

    def end_epoch(self, val: dict, ema_val: Optional[dict] = None) -> None:
        """Record a finished epoch: metrics, best epoch, early stopping, checkpoints, curves, the epoch line."""
        state = self.state
        row = self._epoch_row(val, ema_val)
        state.history.append(row)
        state.total_seconds += row["seconds"]
        state.next_epoch()
        state.serves = served(self.config.train.ema.use_for, row["val_acc"], row["ema_val_acc"]) if ema_val else "raw"
        score = row["ema_val_acc"] if state.serves == "ema" else row["val_acc"]
        improved = score > state.best_val_acc
        if improved:
            state.best_epoch, state.best_val_acc, state.best_serves = row["epoch"], score, state.serves
        self._early_stopping(row)
        if self.dist.is_main:
            rundir.write_metrics(self.run_dir, state.history)
            self.checkpoint("last.pt")
            if improved:
                atomic_copy(self.run_dir / "last.pt", self.run_dir / "best.pt")  # the same file: no second save
            if time.perf_counter() - self.curves_drawn_at >= CURVES_EVERY_S:
                self.draw_curves()
        self.reporter.epoch_end(row, improved)
        self._report_after_epoch()

    def _report_after_epoch(self) -> None:
        bad = self.data.bad_images  # grows when an image that passed the start check fails to decode
        if len(bad) > self.bad_reported:
            self.reporter.warn(f"skipped {len(bad) - self.bad_reported} unreadable image(s) found while decoding "
                               f"(data.skip_bad_images: true): {', '.join(bad[self.bad_reported:][:5])}")
            self.bad_reported = len(bad)
        if not self.caches_reported:
            self.caches_reported = True
            held = [f"{split} {source.describe()}" for split, source in self.phase.sources() if source.caching]
            if held:
                self.reporter.message(f"feature cache: {', '.join(held)}")
            if self.image_caches.caches:
                self.reporter.message(f"image cache: {self.image_caches.describe()}")

    def _epoch_row(self, val: dict, ema_val: Optional[dict]) -> dict:
        state = self.state
        loss_sum, correct, seen = self.dist.sum([state.loss_sum, state.correct, state.seen])  # over all processes
        ema = {"ema_val_loss": ema_val["loss"], "ema_val_acc": ema_val["acc"]} if ema_val else {}
        return {
            "epoch": state.epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"], **ema,
            "val_balanced_acc": balanced_accuracy(val["confusion"]), "val_macro_f1": macro_f1(val["confusion"]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": state.grad_norm_sum / max(state.step, 1),
            "seconds": round(state.seconds, 3),
            "images_per_s": round(seen / max(state.seconds, 1e-9), 1),
        }

    def _early_stopping(self, row: dict) -> None:
        rule, state = self.config.train.early_stopping, self.state
        if rule is None:
            return
        value = row[rule.monitor]  # None or NaN when undefined (e.g. an empty val split): no improvement
        sign = -1 if rule.monitor == "val_loss" else 1  # loss improves downwards
        defined = value is not None and not math.isnan(value)
        if defined and (state.monitor_best is None or sign * (value - state.monitor_best) > rule.min_delta):
            state.monitor_best, state.epochs_without_improvement = value, 0
        else:
            state.epochs_without_improvement += 1
        waited = state.epochs_without_improvement
        if waited and waited >= rule.patience and state.epoch < self.config.train.epochs:
            state.stopped = "early_stopping"

    def checkpoint(self, name: str) -> None:
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / name, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "progress": asdict(self.state), "rng": rng_states(),
            "classes": self.data.classes, "world": self.dist.world, "config": self.config.model_dump(mode="json"),
            **({"ema": self.ema.state_dict(), "serves": self.state.serves} if self.ema else {}),
            "precision": self.precision.precision,
            "weights": self.built.weights.source, "pretrained": self.built.weights.pretrained})

    def kept(self) -> str:
        """What a failed epoch leaves behind, for its error message."""
        if not self.state.epoch:
            return "Nothing was saved from it; no checkpoint was written yet."
        return (f"Nothing was saved from it; the last good checkpoint {self.run_dir / 'last.pt'} "
                f"(end of epoch {self.state.epoch}) is kept.")

    def draw_curves(self) -> None:
        """curves.png of the epochs so far (only where it lacks some)."""
        history = self.state.history
        if self.dist.is_main and history and self.curves_drawn_epochs != len(history):
            rundir.plot_curves(self.run_dir, history)
            self.curves_drawn_at, self.curves_drawn_epochs = time.perf_counter(), len(history)

    def close(self) -> None:
        """Release the caches and draw the last epochs' curves; runs however the run ends."""
        self.phase.close()
        self.image_caches.close()
        self.draw_curves()

    def finish(self) -> dict:
        """Check the frozen tensors, write summary.json, report the end; returns the summary."""
        state, config = self.state, self.config
        changed = [name for name, digest in _checksums(self.frozen).items()
                   if state.frozen_checksums.get(name) != digest]
        summary = {
            "frozen_unchanged": not changed, "frozen_tensors": len(self.frozen),
            "run_dir": str(self.run_dir), "epochs": config.train.epochs, "epochs_done": state.epoch,
            "stopped": state.stopped, "best_epoch": state.best_epoch, "best_val_acc": state.best_val_acc,
            "best_weights": state.best_serves,
            "final_val_acc": state.history[-1]["val_acc"] if state.history else None,
            "train_seconds": round(state.total_seconds, 3),
            "total_seconds": round(time.perf_counter() - self.started, 3),
            "arch": config.model.arch, "precision": self.precision.precision,
            "precision_reason": self.precision.reason, "pretrained": self.built.weights.pretrained,
            "weights": self.built.weights.source, "weights_warning": self.built.weights.warning,
            "zero_init_residual": self.built.weights.zero_init_residual,
            "classes": self.data.classes, "train_images": len(self.data.train), "val_images": len(self.data.val),
            "skipped_images": self.data.bad_images, "processes": self.dist.world, "device": str(self.dist.device),
        }
        if self.dist.is_main:
            rundir.write_summary(self.run_dir, summary)
        if changed:
            raise FinetuneError(f"Frozen tensors changed during training: {', '.join(changed[:5])}"
                                f"{' ...' if len(changed) > 5 else ''}. They should be bit-identical; "
                                "this is a bug, please report it with the run's config.yaml.", exit_code=1)
        self.reporter.finish(summary, state.history)
        return summary


class Phase:
    """What trains now: BatchNorm modes, the fast model and its feature sources. A freeze stage starts a new one."""

    def __init__(self, run: Run, plan: dict, epoch: int):
        config, dist = run.config, run.dist
        self.plan, self.epoch = plan, epoch
        self.bn_modes = batchnorm_modes(run.model, plan, config.freeze.batchnorm)
        self.fast = FastModel(run.model, run.built.arch, plan, self.bn_modes, run.precision.precision, dist.device)
        if dist.active:
            self.fast.distribute()
        self.train_source, self.val_source, why = feature_sources(config, self.fast, run.data, run.run_dir,
                                                                  weights=run.sampling_weights, dist=dist)
        names = self.fast.prefix_names
        prefix = f"{names[0]} .. {names[-1]} (no autograd)" if names else "none"
        run.reporter.message(f"frozen prefix: {prefix}; precision {run.precision.precision} "
                             f"({run.precision.reason}); feature cache {why}")

    def sources(self) -> list[tuple[str, FeatureSource]]:
        return [("train", self.train_source), ("val", self.val_source)]

    def cached_splits(self) -> list[str]:
        """The splits ("train", "val") whose prefix features the feature cache holds."""
        return [split for split, source in self.sources() if source.caching]

    def close(self) -> None:
        self.train_source.close()
        self.val_source.close()


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal stops at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: die at once, as by default (atomic writes keep files whole)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checksums(tensors: dict) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for name, t in tensors.items()}


def _diverged(what: str, optimizer) -> FinetuneError:
    return FinetuneError(
        f"Training diverged at {what}.\n"
        f"Lower optim.lr (now {optimizer.defaults['lr']}) or set optim.grad_clip (e.g. --set optim.grad_clip=1.0).",
        exit_code=1)


def _interrupted(signum: Optional[int], epoch: int, step: int, run_dir: Path) -> FinetuneError:
    name = signal.Signals(signum).name if signum else "signal"
    return FinetuneError(f"Interrupted by {name} at epoch {epoch + 1}, step {step}: saved {run_dir / 'last.pt'} "
                         f"and the metrics so far.\nResume with: finetune train --resume {run_dir}",
                         exit_code=128 + (signum or 2))
