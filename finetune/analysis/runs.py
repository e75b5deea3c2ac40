"""Run directories side by side: the table of `finetune runs` and the comparison of `finetune runs --compare`.

Data only (cli/render.py prints it). Reads the files a run writes (config.yaml, metrics.jsonl, status.json,
summary.json) and never torch files, so it is quick; a broken or partial run directory becomes a row that says so.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from finetune.errors import FinetuneError
from finetune.training.rundir import RUN_FILES, flat_config
from finetune.training.tracking import read_status
from finetune.utils.files import writing

# How a run ended, in words, by status.json's status (summary.json's stopped for runs older than status.json).
ENDED = {"running": "running", "finished": "finished", "early_stopping": "early stop", "time_limit": "time limit",
         "interrupted": "interrupted", "failed": "failed"}
MARKERS = tuple(name for name in RUN_FILES if name != "tensorboard")  # a folder holding one of these is a run
SEARCH_DEPTH = 3  # how deep below a given folder run directories are looked for
NOT_COMPARED = {"train.output_dir"}  # differs between any two runs; the run's name says it


@dataclass
class RunRow:
    """One run directory, as the table shows it. Values it cannot know are None."""

    name: str  # the path as given or found (relative to the current folder when below it)
    ended: str  # finished, early stop, time limit, interrupted, failed, running, killed, partial or broken
    model: Optional[str] = None
    trained_params: Optional[int] = None
    epochs_done: int = 0
    epochs: Optional[int] = None  # planned
    best_val_acc: Optional[float] = None
    final_val_acc: Optional[float] = None
    train_seconds: float = 0.0
    images_per_s: Optional[float] = None
    problem: Optional[str] = None  # why it is broken or partial, or what a failed run said
    history: list[dict] = field(default_factory=list, repr=False)
    config: dict = field(default_factory=dict, repr=False)  # config.yaml, flat (dotted keys)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("history", "config")}


@dataclass
class Comparison:
    runs: list[RunRow]
    differences: dict[str, list]  # dotted config key -> the value in each run (None where it has none)
    plot: str

    def to_json(self) -> dict:
        return {"runs": [run.to_json() for run in self.runs], "differences": self.differences, "plot": self.plot}


def list_runs(folders: list[Path]) -> list[RunRow]:
    """Every run directory in ``folders`` (each a run directory or a folder holding some), best first.

    Sorted by best validation accuracy, runs without one after, broken ones last.
    Raises FinetuneError when a folder does not exist.
    """
    rows = [read_run(path) for path in find_runs(folders)]
    return sorted(rows, key=lambda row: (row.ended == "broken", row.best_val_acc is None, -(row.best_val_acc or 0)))


def find_runs(folders: list[Path]) -> list[Path]:
    """The run directories in ``folders``, in path order, each once."""
    found: dict[Path, None] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FinetuneError(f"No such folder: {folder}. Give run directories or folders that hold them "
                                "(e.g. finetune runs runs/).")
        for path in _walk(folder, SEARCH_DEPTH):
            found.setdefault(path.resolve(), None)
    return sorted(found, key=str)


def _walk(folder: Path, depth: int):
    if _is_run(folder):
        yield folder
        return
    if depth:
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                yield from _walk(child, depth - 1)


def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in MARKERS)


def read_run(path: Path) -> RunRow:
    """What ``path``'s files say about its run; a file that cannot be read makes the row ``broken``."""
    path = Path(path)
    row = RunRow(name=_display(path), ended="partial")
    try:
        status, summary = read_status(path), _read_json(path / "summary.json")
        row.config = flat_config(_read_config(path / "config.yaml"))
        row.history = _read_metrics(path / "metrics.jsonl")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        row.ended, row.problem = "broken", str(exc)
        return row
    row.model, row.epochs = row.config.get("model.arch"), row.config.get("train.epochs")
    row.ended, row.problem = _ended(path, status, summary, row.history)
    if status:
        row.trained_params, row.epochs = status.get("trained_params"), status.get("epochs", row.epochs)
    elif summary:
        row.epochs = summary.get("epochs", row.epochs)
    _add_metrics(row)
    return row


def _ended(path: Path, status: Optional[dict], summary: Optional[dict], history: list[dict]):
    """How the run ended, and what there is to say about it."""
    if status:
        state = status.get("status")
        if state == "running" and not _alive(status):
            return "killed", ("its process ended without saying how (killed, out of memory, a power cut); "
                              f"resume it with: finetune train --resume {_display(path)}")
        if state not in ENDED:
            return "broken", f"status.json: unknown status {state!r}"
        return ENDED[state], status.get("message")
    if summary:
        return ENDED[summary.get("stopped") or "finished"], None
    if not (path / "config.yaml").is_file():
        return "partial", "no config.yaml: not a complete run directory"
    done = f"{len(history)} epoch(s) recorded" if history else "no epoch finished"
    return "partial", f"no status.json or summary.json ({done}): it never finished, or an older finetune wrote it"


def _alive(status: dict) -> bool:
    """Whether the process that wrote a running status.json still runs (not knowable on another host: yes)."""
    if status.get("host") != socket.gethostname() or not isinstance(status.get("pid"), int):
        return True
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _add_metrics(row: RunRow) -> None:
    accs = [r["val_acc"] for r in row.history if isinstance(r.get("val_acc"), (int, float))]
    row.epochs_done = len(row.history)
    row.best_val_acc = max(accs) if accs else None
    row.final_val_acc = row.history[-1].get("val_acc") if row.history else None
    seconds = [float(r.get("seconds") or 0) for r in row.history]
    row.train_seconds = round(sum(seconds), 3)
    images = sum(float(r.get("images_per_s") or 0) * s for r, s in zip(row.history, seconds))
    row.images_per_s = round(images / row.train_seconds, 1) if row.train_seconds else None


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a mapping of config sections")
    return data


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"metrics.jsonl line {number} is not JSON (the file is damaged)") from None
        if not isinstance(row, dict):
            raise ValueError(f"metrics.jsonl line {number} is not a JSON object")
        rows.append(row)
    return rows


def _display(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def compare_runs(run_dirs: list[Path], output: Optional[Path] = None) -> Comparison:
    """Overlay the validation curves of ``run_dirs`` in one plot (``output``: a .png file or a folder; default
    compare.png in the current folder) and find the config keys whose values differ between them.

    Raises FinetuneError with fewer than two run directories, or a folder that is not one.
    """
    if len(run_dirs) < 2:
        raise FinetuneError("--compare needs two or more run directories, e.g. "
                            "finetune runs --compare runs/a runs/b --output compare.png")
    for path in map(Path, run_dirs):
        if not path.is_dir() or not _is_run(path):
            raise FinetuneError(f"{path} is not a run directory (it has none of {', '.join(MARKERS)}); give the "
                                "folders `finetune train` wrote.")
    from finetune.utils.plots import plot_compare, plot_path

    runs = [read_run(path) for path in run_dirs]
    output = plot_path(output, "compare.png")
    with writing("the comparison plot", "Choose another --output: a .png file or a folder you can write to."):
        output.parent.mkdir(parents=True, exist_ok=True)
        plot_compare({run.name: run.history for run in runs}, output)
    return Comparison(runs, config_differences([run.config for run in runs]), str(output))


def config_differences(configs: list[dict]) -> dict[str, list]:
    """The flat config keys whose values are not the same in every one of ``configs``, with each one's value."""
    keys = sorted({key for config in configs for key in config} - NOT_COMPARED)
    values = {key: [config.get(key) for config in configs] for key in keys}
    return {key: row for key, row in values.items() if any(value != row[0] for value in row)}
