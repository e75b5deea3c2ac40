"""The training run: :func:`train` starts a :class:`Run` (new or resumed) and :func:`fit` is its epoch loop.

Everything a resumed run needs is in ``last.pt``: model, optimizer (momentum buffers), schedule, position (epoch
and step), the run's random state and the metrics so far. The data order is a function of (seed, epoch) alone, so
a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data.folders import image_samples
from finetune.data.imagecache import ImageCaches
from finetune.errors import FinetuneError, describe
from finetune.models.fastpath import FastModel, FeatureSource, image_source
from finetune.models.freeze import batchnorm_modes, frozen_tensors, plan_freeze, set_train_mode
from finetune.training import multilabel, rundir
from finetune.training.calibration import calibrate_checkpoint
from finetune.training.checkpoint import TRAIN_STATE, load_checkpoint, save_checkpoint
from finetune.training.ema import WeightEMA, ema_row, served
from finetune.training.epoch import TrainState, evaluate, train_one_epoch
from finetune.training.reporter import EpochStart, Reporter
from finetune.training.resume import check_world, restore
from finetune.training.rng import RunRNG
from finetune.training.setup import Phase, Setup, prepare
from finetune.training.stopping import StopSignals, after_resume, early_stopping, interrupted, out_of_time
from finetune.training.summary import changed, checksums, epoch_row, frozen_changed_error, run_summary, score_key
from finetune.training.tracking import RunStart, Tracking
from finetune.training.validate import validate
from finetune.utils import distributed
from finetune.utils.distributed import Dist
from finetune.utils.files import atomic_copy
from finetune.utils.hardware import select_device

# curves.png is redrawn after an epoch only when this long has passed since the last drawing (a drawing costs
# about 0.3 s), and always when the run ends, however it ends.
CURVES_EVERY_S = 30.0


def train(config: Config, reporter: Reporter, *, output_dir: Optional[Path] = None, resume: Optional[Path] = None,
          overwrite: bool = False) -> dict:
    """Fine-tune as ``config`` says and write the run directory; returns the summary.

    With ``resume`` (a run directory) the run continues from its ``last.pt``. Under
    torchrun every process trains its shard and only rank 0 reports and writes.
    Raises FinetuneError for bad input, and with exit code 130/143 when interrupted.
    """
    validate(config, data_needed_by="train")
    dist = distributed.setup(select_device(config.train.device, torch.cuda.is_available()),
                             config.train.dist_timeout_s)
    run = None
    try:
        run = Run.create(config, reporter if dist.is_main else Reporter(), dist, output_dir=output_dir,
                         resume=resume, overwrite=overwrite)
        with run.tracking:  # tracking: how the run ends goes to status.json and the trackers
            return fit(run)
    except OSError as exc:  # a run file could not be written (a full disk); the atomic writes kept the old one
        raise _stopped_by(exc, run) from None
    finally:
        distributed.teardown(dist)


def _stopped_by(exc: OSError, run: Optional["Run"]) -> FinetuneError:
    where = f"{exc.filename}: " if exc.filename else ""
    message = f"Training stopped: {where}{exc.strerror or describe(exc)}."
    if run is None:
        return FinetuneError(f"{message}\nFix that and run the command again.")
    if run.saved_at is None:
        return FinetuneError(f"{message}\n{run.kept()} Once that is fixed, start the run again (--overwrite: "
                             f"{run.run_dir} holds only this attempt's files).")
    return FinetuneError(f"{message}\n{run.kept()} Once that is fixed, continue the run with: "
                         f"finetune train --resume {run.run_dir}")


def fit(run: "Run") -> dict:
    """Train ``run`` to its last epoch (or until it stops early); returns the summary."""
    state, dist, setup = run.state, run.dist, run.setup
    with StopSignals() as signals:
        should_stop = lambda: dist.any(signals.signum is not None or run.out_of_time())  # noqa: E731
        try:
            while run.epochs_left():
                epoch = run.start_epoch()
                with run.rng.active():
                    finished = train_one_epoch(run.phase.fast, run.phase.train_source.epoch(epoch, state.step),
                                               setup.loss_fn, setup.optimizer, setup.schedule, state,
                                               grad_clip=run.config.optim.grad_clip, on_step=run.after_step,
                                               should_stop=should_stop,
                                               multilabel=run.config.model.task == "multilabel")
                if not finished:
                    run.checkpoint("last.pt")
                    if signals.signum is None:
                        state.stopped = "time_limit"
                        break
                    raise interrupted(signals.signum, epoch, state.step, run.run_dir)
                run.end_epoch(run.evaluate(), run.evaluate_ema())
                if dist.any(signals.signum is not None):
                    raise interrupted(signals.signum, epoch + 1, 0, run.run_dir)
                if run.epochs_left() and dist.any(run.out_of_time()):
                    state.stopped = "time_limit"
        except BaseException as exc:
            run.close(failed=True)
            if isinstance(exc, FinetuneError) and exc.exit_code == 1:  # a failed guard: nothing from this epoch
                raise FinetuneError(f"{exc}\nNothing was saved from it. {run.kept()}", exit_code=1) from None
            raise
        run.close()
    return run.finish()


class Run:
    """One training run: its :class:`~finetune.training.setup.Setup` (data, model, optimizer...), what trains now
    (its :class:`~finetune.training.setup.Phase`), where it is (:class:`TrainState`), its random stream, run
    directory and reporter.

    :meth:`create` starts it, new or resumed; :meth:`start_epoch` starts the freeze stages due, :meth:`end_epoch`
    records an epoch, :meth:`checkpoint` saves it and :meth:`finish` summarises it.
    """

    def __init__(self, config: Config, reporter: Reporter, run_dir: Path, setup: Setup):
        self.config, self.reporter, self.run_dir, self.setup = config, reporter, run_dir, setup
        self.dist: Dist = setup.dist
        self.model: nn.Module = setup.model
        self.started = time.perf_counter()
        self.plan, self.plan_epoch = setup.built.plan, 1  # the freeze plan in force, and the epoch it began
        self.state = TrainState()
        self.rng = RunRNG(config.train.seed)
        # Tensors frozen for the whole run (after the last stage) must end bit-identical.
        final = plan_freeze(self.plan, config.freeze, config.train.epochs, head=setup.built.arch.head)
        self.frozen = frozen_tensors(self.model, final, batchnorm_modes(self.model, final, config.freeze.batchnorm))
        self.image_caches = ImageCaches("off")
        self.phase: Optional[Phase] = None
        self.curves_drawn_at, self.curves_drawn_epochs = self.started, 0
        self.caches_reported, self.unreadable_reported = False, len(setup.data.bad_images)
        self.tracking = Tracking()  # tracking: started by create()
        self.score = score_key(config)  # what picks best.pt
        self.thresholds: Optional[list[float]] = None  # multilabel: those of the last epoch, saved with it
        self.ema = WeightEMA(self.model, config.train.ema) if config.train.ema else None  # train.ema
        self.saved_at: Optional[tuple[int, int]] = None  # (epoch, step) of the last checkpoint written

    @classmethod
    def create(cls, config: Config, reporter: Reporter, dist: Dist, *, output_dir: Optional[Path] = None,
               resume: Optional[Path] = None, overwrite: bool = False) -> "Run":
        """Check the run directory, prepare data and model (the run directory is written only once they are ready),
        then start the run: new, or from ``resume``'s last.pt."""
        run_dir = _checked_run_dir(config, output_dir, resume, overwrite)
        config = config.model_copy(deep=True)
        config.train.output_dir = str(run_dir.resolve())
        saved = load_checkpoint(run_dir / "last.pt") if resume is not None else None
        setup = prepare(config, dist=dist, show_download=reporter.shows_progress,
                        resumed_precision=saved and saved.get("precision"))
        _report_setup(reporter, setup)
        if resume is None and dist.is_main:
            rundir.prepare_new(run_dir, overwrite)  # only now: bad data or weights leave nothing behind
        dist.barrier()
        run = cls(config, reporter, run_dir, setup)
        run.resume(saved) if saved is not None else run.begin()
        run.open_phase()
        data = setup.data
        reporter.start(run_dir=run_dir, config=config, weights=setup.built.weights.source, layout=data.layout,
                       train_images=len(data.train), val_images=len(data.val), classes=data.classes,
                       steps_per_epoch=setup.steps, resumed_at=run.state.epoch if resume else None)
        run.tracking = Tracking.start(RunStart(  # tracking: status.json, TensorBoard, MLflow (training/tracking.py)
            config, run_dir, data.classes, [path for path, _ in image_samples(data.val)],
            trained_params=sum(p.numel() for n, p in run.model.named_parameters() if n not in run.frozen),
            resumed_step=run.steps_done if resume else None, epoch_sums=(run.state.loss_sum, run.state.seen)),
            reporter, dist.is_main)
        return run

    def begin(self) -> None:
        """A new run: note the checksums of the tensors that must stay frozen, and save the resolved config."""
        self.state.frozen_checksums = checksums(self.frozen)
        if self.dist.is_main:
            rundir.write_config(self.run_dir, self.config)

    def resume(self, saved: dict) -> None:
        """Continue from ``saved`` (the run's last.pt): the stages started by then (the same param groups), then
        weights, optimizer, schedule, random state and training state."""
        check_world(saved, self.run_dir / "last.pt", self.dist.world)
        self._start_stages(saved[TRAIN_STATE]["epoch"] + 1)
        self.state = restore(saved, self.model, self.setup.optimizer, self.setup.schedule, self.rng, self.ema)
        self.thresholds = saved.get("thresholds")
        self.saved_at = (self.state.epoch, self.state.step)
        message = after_resume(self.state, saved["config"], self.config, self.run_dir)
        if message:
            self.reporter.message(message)

    def open_phase(self) -> None:
        """Plan the image caches for the epochs left, then start the phase of the freeze plan in force."""
        self.image_caches = self.setup.image_caches(self.plan, self.config.train.epochs - self.state.epoch,
                                                    self.run_dir)
        self.reporter.message(f"image cache {self.image_caches.why}")
        self._new_phase()

    def epochs_left(self) -> bool:
        return self.state.epoch < self.config.train.epochs and self.state.stopped is None

    def start_epoch(self) -> int:
        """Get ready to train the next epoch: start the freeze stages due, set train/eval modes, tell the reporter.
        Returns the epoch (0-based)."""
        epoch = self.state.epoch
        if self._start_stages(epoch + 1):
            self._new_phase()
        set_train_mode(self.model, self.phase.fast.bn_modes)
        self.reporter.epoch_start(EpochStart.of(epoch + 1, self.config.train.epochs, self.setup.steps,
                                                self.setup.optimizer, self.model, self.phase.fast.prefix_names))
        return epoch

    def _start_stages(self, epoch: int) -> bool:
        """Start every stage due by ``epoch``, one at a time and in order (so a resume rebuilds the same param
        groups): newly trainable parameters join the optimizer as new groups. Returns whether any started."""
        started = False
        for stage in self.config.freeze.stages:
            if not self.plan_epoch < stage.epoch <= epoch:
                continue
            self.plan, newly = self.setup.start_stage(self.plan, stage)
            self.plan_epoch, started = stage.epoch, True
            params = sum(p.numel() for n, p in self.model.named_parameters() if n in newly)
            self.reporter.message(f"stage at epoch {stage.epoch}: {len(newly)} more tensors train ({params:,} "
                                  f"parameters, patterns {stage.trainable}); they join the optimizer as new "
                                  "param groups")
        return started

    def _new_phase(self) -> None:
        """The fast path and feature sources follow the freeze plan; the old feature cache is dropped."""
        if self.phase is not None:
            self.phase.close()
        # the epochs this phase trains in all, from its freeze stage (or the start) to the next one (or the end)
        end = min((stage.epoch - 1 for stage in self.config.freeze.stages if stage.epoch > self.state.epoch + 1),
                  default=self.config.train.epochs)
        self.phase = self.setup.phase(self.plan, self.run_dir, self.image_caches, epochs=end - self.plan_epoch + 1)
        self.reporter.message(self.phase.describe(self.setup.precision))

    def after_step(self, state: TrainState) -> None:
        """After each optimizer step: the weight EMA follows the weights (train.ema), then the step is reported."""
        if self.ema is not None:
            self.ema.update(self.model)
        self.report_step(state)

    def report_step(self, state: TrainState) -> None:
        self.reporter.step(state.epoch, state.step, self.setup.steps, state.loss_sum / state.seen,
                           state.correct / state.seen, self.setup.optimizer.param_groups[0]["lr"],
                           state.seen / max(state.seconds, 1e-9))
        self.tracking.step(self.steps_done, state.loss_sum, state.seen, self.setup.optimizer.param_groups[0]["lr"])

    @property
    def steps_done(self) -> int:
        """Optimizer steps so far: the x axis of the trackers' curves."""
        return self.state.epoch * self.setup.steps + self.state.step

    def out_of_time(self) -> bool:
        return out_of_time(self.started, self.config.train.time_limit_min)

    def evaluate(self, fast: Optional[FastModel] = None, source: Optional[FeatureSource] = None) -> dict:
        """The validation metrics of the model as it is now (multilabel: with the thresholds for them); of ``fast``
        fed by ``source`` when given (default: the phase's)."""
        setup = self.setup
        fast, source = fast or self.phase.fast, source or self.phase.val_source
        if self.config.model.task == "multilabel":
            return multilabel.evaluate(fast, source.epoch(0), setup.val_loss_fn, setup.built.num_classes, self.dist,
                                       self.config.model.threshold)
        return evaluate(fast, source.indexed_epoch(0), setup.val_loss_fn, setup.built.num_classes,
                        len(setup.data.val), self.dist)

    def evaluate_ema(self) -> Optional[dict]:
        """The weight EMA's validation metrics (None without ``train.ema``)."""
        if self.ema is None:
            return None
        phase = self.phase
        fast = FastModel(self.ema.module, self.setup.built.arch, phase.plan, phase.fast.bn_modes,
                         self.setup.precision.precision, self.dist.device, fold=False)
        # A frozen prefix in eval mode is bit-identical in both models: the EMA reads the same (cached) features,
        # from the phase's own (folded) prefix; so its copy is not folded.
        source = phase.val_source if phase.fast.prefix_deterministic else image_source(fast, phase.val_source)
        return self.evaluate(fast, source)

    def end_epoch(self, val: dict, ema_val: Optional[dict] = None) -> None:
        """Record a finished epoch: metrics, best epoch, early stopping, checkpoints, curves, the epoch line.

        With the weight EMA's validation ``ema_val`` its scores join the row (``ema_`` keys), and the checkpoints
        serve the weights ``train.ema.use_for`` chooses, scored by their own validation."""
        state = self.state
        row = epoch_row(state, val, self.setup.optimizer.param_groups[0]["lr"], self.dist)
        if ema_val is not None:
            row.update(ema_row(epoch_row(state, ema_val, row["lr"], self.dist), self.score))
        state.history.append(row)
        state.total_seconds += row["seconds"]
        state.next_epoch()
        state.serves = served(self.config.train.ema, row[self.score], row.get(f"ema_{self.score}"))
        self.thresholds = (ema_val if state.serves == "ema" else val).get("thresholds")
        score = row[f"ema_{self.score}" if state.serves == "ema" else self.score]
        improved = score is not None and score > state.best_val_acc  # None or NaN (no val images): not better
        if improved:
            state.best_epoch, state.best_val_acc, state.best_serves = row["epoch"], score, state.serves
        early_stopping(self.config, state, row)
        self.tracking.epoch(self.steps_done, row, val)
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
        unreadable = self.setup.data.unreadable()  # images that passed the start check but failed to decode
        if len(unreadable) > self.unreadable_reported:
            self.reporter.warn(f"skipped {len(unreadable) - self.unreadable_reported} unreadable image(s) found "
                               f"while decoding (data.skip_bad_images: true): "
                               f"{', '.join(unreadable[self.unreadable_reported:][:5])}")
            self.unreadable_reported = len(unreadable)
        if not self.caches_reported:
            self.caches_reported = True
            held = [f"{split} {source.describe()}" for split, source in self.phase.sources() if source.caching]
            if held:
                self.reporter.message(f"feature cache: {', '.join(held)}")
            if self.image_caches.by_split:
                self.reporter.message(f"image cache: {self.image_caches.describe()}")

    def checkpoint(self, name: str) -> None:
        if not self.dist.is_main:
            return
        self.tracking.checkpoint()  # tracking: what the checkpoint covers is recorded before it is written
        built = self.setup.built
        save_checkpoint(self.run_dir / name, {
            "model": self.model.state_dict(), "optimizer": self.setup.optimizer.state_dict(),
            "scheduler": self.setup.schedule.state_dict(), TRAIN_STATE: asdict(self.state),
            "rng": self.rng.state_dict(), "classes": self.setup.data.classes, "world": self.dist.world,
            "config": self.config.model_dump(mode="json"), "thresholds": self.thresholds,
            **({"ema": self.ema.state_dict(), "serves": self.state.serves} if self.ema is not None else {}),
            "precision": self.setup.precision.precision,
            "weights": built.weights.source, "pretrained": built.weights.pretrained})
        self.saved_at = (self.state.epoch, self.state.step)

    def kept(self) -> str:
        """Which checkpoint a failed run leaves behind, for its error message."""
        if self.saved_at is None:
            return "No checkpoint was written yet."
        epoch, step = self.saved_at
        return (f"The last checkpoint written, {self.run_dir / 'last.pt'} "
                f"({f'epoch {epoch + 1}, step {step}' if step else f'end of epoch {epoch}'}), is kept.")

    def draw_curves(self) -> None:
        """curves.png of the epochs so far (only where it lacks some)."""
        history = self.state.history
        if self.dist.is_main and history and self.curves_drawn_epochs != len(history):
            rundir.plot_curves(self.run_dir, history)
            self.curves_drawn_at, self.curves_drawn_epochs = time.perf_counter(), len(history)

    def close(self, failed: bool = False) -> None:
        """Release the caches and draw the last epochs' curves; runs however the run ends. When it ``failed``, a
        drawing that fails too (the same full disk) is let go: the first error is the one to report."""
        if self.phase is not None:
            self.phase.close()
        self.image_caches.close()
        try:
            self.draw_curves()
        except OSError:
            if not failed:
                raise

    def finish(self) -> dict:
        """Check the frozen tensors, write summary.json, report the end; returns the summary."""
        altered = changed(self.frozen, self.state.frozen_checksums)
        summary = run_summary(self.setup, self.state, self.run_dir, frozen=len(self.frozen), altered=altered,
                              seconds=time.perf_counter() - self.started)
        if self.dist.is_main:
            if self.config.train.calibrate and self.state.best_epoch is not None:  # best.pt's probabilities
                summary["calibration"] = calibrate_checkpoint(self.run_dir / "best.pt", self.setup.data.val,
                                                              self.config.train.batch_size)
            rundir.write_summary(self.run_dir, summary)
        if altered:
            raise frozen_changed_error(altered)
        self.reporter.finish(summary, self.state.history)
        self.tracking.finish(summary, self.state.history)
        return summary


def _checked_run_dir(config: Config, output_dir: Optional[Path], resume: Optional[Path], overwrite: bool) -> Path:
    """The run directory: ``resume`` (which must hold a run this config can continue), or a new one."""
    if resume is not None:
        rundir.check_resume(config, Path(resume))
        return Path(resume)
    run_dir = Path(output_dir or config.train.output_dir)
    rundir.check_new(run_dir, overwrite)
    return run_dir


def _report_setup(reporter: Reporter, setup: Setup) -> None:
    for text in setup.messages:
        reporter.message(text)
    for text in setup.warnings:
        reporter.warn(text)
