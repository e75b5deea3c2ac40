"""Experiment tracking: the run's status.json, and TensorBoard and MLflow when ``train.loggers`` asks for them.

The run calls one :class:`Tracking` beside its Reporter: :meth:`~Tracking.step` after every optimizer step,
:meth:`~Tracking.epoch` when an epoch is evaluated, :meth:`~Tracking.checkpoint` before ``last.pt`` is written,
:meth:`~Tracking.finish` with the summary, and, as a context manager, the way the run ended. Trackers receive plain
numbers and dicts, never the Run. Only rank 0 tracks.

The x axis of every curve is the optimizer step, so a resumed run continues the same curves: whatever a tracker
recorded is on disk before the checkpoint it belongs to is written, and a resumed run drops what was recorded after
that checkpoint (TensorBoard's purge step) or skips what is already there (MLflow), so no point is missing or
doubled. A tracker that fails while the run goes on (a full disk, an MLflow server gone) gets one warning and is
dropped; the run directory keeps everything.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from finetune.config.schema import Config
from finetune.errors import FinetuneError, Problem, describe
from finetune.training.rundir import flat_config
from finetune.utils.files import atomic_write_text

STATUS_FILE = "status.json"
TOP_LOSSES = 16  # images in the top-losses grid a finished run records
# The metrics a finished run records against its hyperparameters: the best val_acc, and the last epoch's values.
FINAL_KEYS = ("best_val_acc", "val_acc", "val_loss", "val_balanced_acc", "val_macro_f1")
# Files of the run directory a run uploads to MLflow when it ends (best.pt only with train.mlflow.log_checkpoint).
ARTIFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", STATUS_FILE)
# logger -> (module, what it is called, what installs it)
PACKAGES = {"tensorboard": ("tensorboard", "TensorBoard", "tensorboard"),
            "mlflow": ("mlflow", "MLflow", "'finetune[mlflow]'")}


def problems(config: Config) -> list[Problem]:
    """``train.loggers`` naming a tracker whose package is not installed (``validate`` reports it before any work)."""
    found = []
    for name in config.train.loggers:
        module, title, package = PACKAGES[name]
        try:
            importlib.import_module(module)  # now, before any work, rather than when the tracker starts
        except ImportError:
            found.append(Problem("train.loggers", f"{name} needs {title}, which is not installed: pip install "
                                                  f"{package} (or drop {name} from train.loggers)"))
    return found


def read_status(run_dir: Path) -> Optional[dict]:
    """The run's status.json, or None when it has none. Raises ValueError when it is not a JSON object."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    status = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(status, dict):
        raise ValueError("not a JSON object")
    return status


@dataclass
class RunStart:
    """What trackers are told when a run starts or resumes."""

    config: Config
    run_dir: Path
    classes: list[str]
    val_images: list[str]  # paths by sample index, for the top-losses grid
    trained_params: int  # parameters that train in some epoch of the run
    resumed_step: Optional[int] = None  # the optimizer steps a resumed run had done; None for a new run
    epoch_sums: tuple[float, int] = (0.0, 0)  # the current epoch's summed training loss and images at that step


class Tracker:
    """One place a run is recorded. A method that raises drops the tracker (with one warning), not the run."""

    name = ""

    def where(self, run: RunStart) -> str:
        """Where it records, for messages."""
        return self.name

    def start(self, run: RunStart, saved: dict) -> dict:
        """Begin or continue recording; ``saved`` is what an earlier session returned. Returns what to keep in
        status.json for the next session."""
        return {}

    def step(self, step: int, values: dict[str, float]) -> None:
        """Training loss and learning rate after optimizer step ``step``."""

    def epoch(self, step: int, row: dict) -> None:
        """An epoch's row of metrics.jsonl, at the step the epoch ended."""

    def flush(self) -> None:
        """Put everything recorded so far on disk (or on the server): a checkpoint is about to be written."""

    def finish(self, step: int, final: dict[str, float], images: dict[str, object]) -> Optional[dict]:
        """The run finished (also early or at its time limit): final metrics, images (name -> HxWx3 uint8 array).
        Returns what to keep in status.json instead of what :meth:`start` returned (None: that)."""
        return None

    def end(self, status: str) -> None:
        """The session ends (``status`` as in status.json), however it ends; release everything."""


class Tracking:
    """The run's trackers and its status.json. ``Tracking()`` records nothing (the other ranks' and tests')."""

    def __init__(self, run: Optional[RunStart] = None, trackers: tuple[Tracker, ...] = (), reporter=None,
                 status: Optional[dict] = None):
        self.run, self.trackers, self.reporter, self.status = run, list(trackers), reporter, status or {}
        self.every = run.config.train.log_every_steps if run else 1
        self.at = (run.resumed_step or 0) if run else 0
        self._sums = run.epoch_sums if run else (0.0, 0)
        self.last_val: Optional[dict] = None

    @classmethod
    def start(cls, run: RunStart, reporter, is_main: bool = True) -> "Tracking":
        """Write status.json (running) and start the trackers ``train.loggers`` names (on rank 0 only).

        Raises FinetuneError when TensorBoard cannot write its folder; an MLflow that cannot be reached is a
        warning, and the run goes on without it.
        """
        if not is_main:
            return cls()
        saved = _read_saved(run.run_dir).get("trackers", {})
        # TensorBoard first: it may refuse to start, and then no other tracker has begun recording.
        wanted = [kind() for name, kind in TRACKERS.items() if name in run.config.train.loggers]
        status = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                  "ended": None, "epochs": run.config.train.epochs, "trained_params": run.trained_params,
                  "message": None, "trackers": dict(saved)}  # a tracker that cannot start now keeps its record
        tracking = cls(run, (), reporter, status)
        for tracker in wanted:
            try:
                status["trackers"][tracker.name] = tracker.start(run, saved.get(tracker.name) or {})
                tracking.trackers.append(tracker)
            except FinetuneError:
                raise
            except Exception as exc:
                tracking._warn(tracker, exc)
        tracking._write_status()
        return tracking

    def step(self, step: int, loss_sum: float, seen: int, lr: float) -> None:
        """After optimizer ``step``: ``loss_sum`` and ``seen`` are the epoch's running sums (the batch loss is
        their increase); every ``train.log_every_steps`` steps the trackers record it."""
        before_sum, before_seen = self._sums if seen > self._sums[1] else (0.0, 0)  # a new epoch starts at 0
        self._sums, self.at = (loss_sum, seen), step
        if step % self.every == 0 and self.trackers:
            self._each("step", step, {"loss": (loss_sum - before_sum) / (seen - before_seen), "lr": lr})

    def epoch(self, step: int, row: dict, val: dict) -> None:
        """An epoch ended at optimizer ``step`` with metrics ``row`` and the evaluation ``val`` (for the end)."""
        self.at, self.last_val = step, val
        self._each("epoch", step, row)

    def checkpoint(self) -> None:
        """A checkpoint is about to be written: what it covers must be recorded first (see the module doc)."""
        self._each("flush")

    def finish(self, summary: dict, history: list[dict]) -> None:
        """The run finished: final metrics against the hyperparameters, the confusion matrix and top losses."""
        if self.run is None:  # Tracking(): another rank's, which records nothing
            return
        self.status.update(status=summary["stopped"] or "finished", ended=_now())
        self._write_status()
        if not self.trackers:
            return
        final = {"best_val_acc": summary["best_val_acc"], **history[-1]} if history else {}
        final = {key: final[key] for key in FINAL_KEYS if _number(final.get(key))}
        images = self._images() if self.last_val is not None else {}
        for tracker in list(self.trackers):
            kept = self._call(tracker, "finish", self.at, final, images)
            if kept is not None:
                self.status["trackers"][tracker.name] = kept
        self._write_status()

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and self.run is not None:
            interrupted = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", 0) >= 128
            self.status.update(status="interrupted" if interrupted else "failed", ended=_now(),
                               message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            try:
                self._write_status()
            except OSError:  # the disk that stopped the run may refuse this too: the run's own error goes on
                pass
        for tracker in list(self.trackers):
            self._call(tracker, "end", self.status.get("status"))

    def _images(self) -> dict:
        from finetune.utils.plots import confusion_figure, figure_pixels, top_losses_figure

        val, classes = self.last_val, self.run.classes
        images = {"confusion": figure_pixels(confusion_figure(val["confusion"], classes))}
        rows = top_losses(val["samples"], classes, self.run.val_images, TOP_LOSSES)
        if rows:
            images["top_losses"] = figure_pixels(top_losses_figure(rows))
        return images

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, method, *args)

    def _call(self, tracker: Tracker, method: str, *args):
        try:
            return getattr(tracker, method)(*args)
        except Exception as exc:
            self._warn(tracker, exc)
            self.trackers.remove(tracker)
            return None

    def _warn(self, tracker: Tracker, exc: Exception) -> None:
        self.reporter.warn(f"{tracker.where(self.run)} failed ({describe(exc)}); the run goes on without "
                           f"{tracker.name}, and its run directory {self.run.run_dir} keeps everything.")

    def _write_status(self) -> None:
        atomic_write_text(self.run.run_dir / STATUS_FILE, json.dumps(self.status, indent=2) + "\n")


def top_losses(samples: dict, classes: list[str], paths: list[str], k: int) -> list[dict]:
    """The ``k`` evaluated samples with the highest loss, highest first, as rows for ``plots.top_losses_figure``."""
    losses = samples["loss"]
    evaluated = (~losses.isnan()).nonzero()[:, 0]
    order = evaluated[losses[evaluated].argsort(descending=True, stable=True)][:k].tolist()
    return [{"path": paths[i], "true": classes[int(samples["target"][i])],
             "predicted": classes[int(samples["predicted"][i])], "prob": float(samples["prob"][i]),
             "loss": float(losses[i])} for i in order]


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/, through torch.utils.tensorboard."""

    name = "tensorboard"
    FOLDER = "tensorboard"

    def where(self, run: RunStart) -> str:
        return f"TensorBoard ({run.run_dir / self.FOLDER})"

    def start(self, run: RunStart, saved: dict) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        folder = run.run_dir / self.FOLDER
        # Events after the step the checkpoint holds were written by a session that then died: TensorBoard drops
        # them when it reads this session's purge step, and this session records them again.
        purge = None if run.resumed_step is None else run.resumed_step + 1
        try:
            self.writer = SummaryWriter(str(folder), purge_step=purge, flush_secs=30)
        except OSError as exc:
            raise FinetuneError(f"train.loggers: tensorboard cannot write its event files to {folder}: "
                                f"{exc.strerror or describe(exc)}. Make it a writable folder (or remove what is in "
                                "its way), or drop tensorboard from train.loggers.") from None
        self.config, self.finished_at = run.config, saved.get("finished_at")
        if not saved:  # the first session that records this run in TensorBoard
            self._hparams("experiment", "session_start")
            self.writer.add_text("config", "".join(f"    {line}\n" for line in run.config.to_yaml().splitlines()))
        return {"finished_at": self.finished_at}

    def _hparams(self, *parts: str) -> None:
        """The HParams dashboard's records: the config's keys and the final metrics' tags (``experiment``), this
        run's values (``session_start``), its end (``session_end``); the metrics' values are final/* scalars."""
        from torch.utils.tensorboard.summary import hparams

        summaries = dict(zip(("experiment", "session_start", "session_end"),
                             hparams(_hparam_values(self.config), {f"final/{key}": 0.0 for key in FINAL_KEYS})))
        for part in parts:
            self.writer.file_writer.add_summary(summaries[part])

    def step(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, step: int, row: dict) -> None:
        for key, value in row.items():
            if _number(value):
                self.writer.add_scalar(f"epoch/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, step: int, final: dict[str, float], images: dict[str, object]) -> Optional[dict]:
        if self.finished_at != step:  # else a resumed run had nothing left to do: the session before recorded it
            for key, value in final.items():
                self.writer.add_scalar(f"final/{key}", value, step)
            for name, pixels in images.items():
                self.writer.add_image(name, pixels, step, dataformats="HWC")
            self._hparams("session_end")
            self.writer.flush()
            self.finished_at = step
        return {"finished_at": step}

    def end(self, status: str) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run (train.mlflow): the same metrics, the config as parameters, the run files as artifacts.

    Metrics are sent in batches: when a checkpoint is written, when the run ends, and at least every
    ``SEND_EVERY_S`` seconds so that the run can be watched live.
    """

    name = "mlflow"
    SEND_EVERY_S = 30.0

    def where(self, run: RunStart) -> str:
        return f"MLflow tracking at {run.config.train.mlflow.tracking_uri}"

    def start(self, run: RunStart, saved: dict) -> dict:
        # MLflow 3 keeps its local file store (the default mlruns/ folder) behind this switch; a user's own setting
        # wins. Without a server an unreachable one would be retried for minutes: a few seconds is enough.
        for key, value in {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        settings = run.config.train.mlflow
        self.run_dir, self.log_checkpoint = run.run_dir, settings.log_checkpoint
        self.client = MlflowClient(settings.tracking_uri)
        self.pending, self.sent_at, self.recorded = [], time.monotonic(), {}
        if saved.get("tracking_uri") == settings.tracking_uri and saved.get("experiment") == settings.experiment:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            # What the earlier sessions sent, key by key: a resumed run repeats the steps after its checkpoint.
            for key in self.client.get_run(self.run_id).data.metrics:
                self.recorded[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
        else:
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                settings.experiment)
            from finetune import __version__

            self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name or run.run_dir.name, tags={
                "finetune.run_dir": str(run.run_dir), "finetune.version": __version__}).info.run_id
            self._send_params(_hparam_values(run.config))
        return {"run_id": self.run_id, "tracking_uri": settings.tracking_uri, "experiment": settings.experiment}

    def _send_params(self, values: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in values.items()]  # MLflow's longest value
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _add(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), stamp, step) for key, value in values.items()
                         if _number(value) and step > self.recorded.get(key, -1)]
        if time.monotonic() - self.sent_at >= self.SEND_EVERY_S:
            self.flush()

    def step(self, step: int, values: dict[str, float]) -> None:
        self._add(step, {f"step/{key}": value for key, value in values.items()})

    def epoch(self, step: int, row: dict) -> None:
        self._add(step, {f"epoch/{key}": value for key, value in row.items()})

    def flush(self) -> None:
        pending, self.pending, self.sent_at = self.pending, [], time.monotonic()
        for start in range(0, len(pending), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=pending[start:start + 1000])

    def finish(self, step: int, final: dict[str, float], images: dict[str, object]) -> Optional[dict]:
        self._add(step, {f"final/{key}": value for key, value in final.items()})
        self.flush()
        for name, pixels in images.items():
            self.client.log_image(self.run_id, pixels, artifact_file=f"{name}.png")
        return None

    def end(self, status: str) -> None:
        self.flush()
        names = ARTIFACTS + (("best.pt",) if self.log_checkpoint and status not in MLFLOW_STATUS else ())
        for name in names:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}
MLFLOW_STATUS = {"interrupted": "KILLED", "failed": "FAILED"}


def _hparam_values(config: Config) -> dict:
    """The resolved config as flat hyperparameters: numbers, strings and booleans (lists as JSON, None as null)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in flat_config(config.model_dump(mode="json")).items()}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_saved(run_dir: Path) -> dict:
    try:
        return read_status(run_dir) or {}
    except (OSError, ValueError):  # a damaged status.json: the trackers start afresh
        return {}
