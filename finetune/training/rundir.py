"""The run directory: checking and preparing it, what a resumed run may change, and the files a run writes.

A run directory holds only finetune's own files (``RUN_FILES``). A new run needs an
empty or missing folder (``--overwrite`` replaces finetune's files, never others);
a resumed run needs ``last.pt`` and the same settings as the run's ``config.yaml``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.config.loading import load_config
from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.utils.files import atomic_write_text

RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "summary.json", "status.json",
             "tensorboard", "reliability.png")
# Keys a resumed run may change; anything else would make the result differ from an uninterrupted run.
# The caches and decode threads change speed only: their batches are bit-identical; trackers only record.
RESUMABLE_CHANGES = {"train.epochs", "train.output_dir", "data.workers", "data.cache_images", "train.time_limit_min",
                     "train.early_stopping.patience", "train.loggers", "train.log_every_steps",
                     "train.mlflow.tracking_uri", "train.mlflow.experiment", "train.mlflow.run_name",
                     "train.mlflow.log_checkpoint", "train.calibrate"}


def check_new(run_dir: Path, overwrite: bool) -> None:
    """Refuse a run directory that holds a run (unless ``overwrite``) or files finetune did not write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneError(f"Output directory {run_dir} is a file; choose another train.output_dir or --output-dir.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FinetuneError(f"Output directory {run_dir} already holds a run and is not empty.\n"
                                f"Continue it with --resume {run_dir}, replace it with --overwrite, "
                                "or choose another --output-dir.")
        others = [p.name for p in run_dir.iterdir() if p.name not in RUN_FILES]
        if others:
            raise FinetuneError(f"--overwrite refused: {run_dir} holds files finetune did not write "
                                f"({', '.join(sorted(others)[:5])}); choose another --output-dir.")


def prepare_new(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory (emptied of finetune's files with ``overwrite``) and check it is writable."""
    if overwrite:
        for path in (run_dir / name for name in RUN_FILES):
            if path.is_dir():  # tensorboard/
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FinetuneError(f"Cannot write to output directory {run_dir}: {exc.strerror}; "
                            "choose another train.output_dir or --output-dir.") from None


def check_resume(config: Config, run_dir: Path) -> None:
    """A run can be resumed from ``run_dir`` with ``config``: it has last.pt, and only resumable keys changed."""
    if not (run_dir / "last.pt").is_file():
        raise FinetuneError(f"Nothing to resume in {run_dir}: no last.pt there. "
                            "Give the run directory of an earlier `finetune train`.")
    if (run_dir / "config.yaml").is_file():
        changed = config_changes(load_config(run_dir / "config.yaml"), config)
        changed = [key for key in changed if key not in RESUMABLE_CHANGES]
        if changed:
            raise FinetuneError(f"--resume {run_dir}: the config differs from the run's config.yaml in "
                                f"{', '.join(changed)}; a resumed run must use the same settings "
                                f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change).")


def config_changes(saved: Config, given: Config) -> list[str]:
    """The dotted keys whose values differ between two configs, sorted."""
    old, new = flat_config(saved.model_dump()), flat_config(given.model_dump())
    # Both sides' keys: a section set on one side only (train.ema: {...} against null) has keys on that side only.
    return sorted(key for key in new.keys() | old.keys() if key not in new or key not in old or new[key] != old[key])


def flat_config(data: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{dotted key: value}`` (``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def plot_curves(run_dir: Path, history: list[dict]) -> None:
    from finetune.utils.plots import plot_curves

    plot_curves(history, run_dir / "curves.png")
