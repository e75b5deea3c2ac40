"""Interruptions and crashes: real signals sent to a real `finetune train` subprocess.

Ctrl-C (SIGINT) or SIGTERM stops after the current step, saves last.pt and says how to resume; the resumed run
ends with exactly the weights of an uninterrupted one. A second Ctrl-C stops at once, SIGKILL at any moment
leaves a loadable last.pt, and best.pt only ever holds the best epoch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import OFFLINE_ENV, REPO, make_colour_split, tiny_config

from finetune.training.rundir import RUN_FILES

EPOCHS = 3
# What atomic_write leaves behind when killed before its os.replace: `.last.pt.<random>.tmp`.
TEMPORARY = re.compile(r"^\.(%s)\.[^/]+\.tmp$" % "|".join(re.escape(name) for name in RUN_FILES))


class Training:
    """`python -m finetune ARGS` in the background (the environment of conftest.run_cli), stdout read line by line.

    One compute thread: runs compared bit for bit need the same thread count, and on a busy 2-core machine two
    processes with a thread per core each slow down tenfold.
    """

    def __init__(self, *args: str):
        env = {**os.environ, **OFFLINE_ENV, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, so that a full pipe can never block the child
        self.proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        self.lines: list[str] = []
        self.result: subprocess.CompletedProcess | None = None

    def wait_for(self, prefix: str) -> None:
        """Read stdout until a line starts with ``prefix`` (fails if the process ends first)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(prefix):
                return
        pytest.fail(f"the run ended before printing {prefix!r}:\n{self.finish().stdout}{self.finish().stderr}")

    def finish(self, timeout: float = 180) -> subprocess.CompletedProcess:
        if self.result is None:
            try:
                rest, _ = self.proc.communicate(timeout=timeout)
            finally:
                self.kill()
            self.stderr.seek(0)
            self.result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                                      "".join(self.lines) + (rest or ""), self.stderr.read())
            self.stderr.close()
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def long_data(module_tmp) -> Path:
    """Three colour classes, 12 training images each: 9 steps of 4 images per epoch."""
    return make_colour_split(module_tmp("long_colours"), 12, 4)


def signal_config(folder: Path, data: Path) -> Path:
    # The last block and every BatchNorm layer train: momentum buffers and running statistics must survive the resume
    return tiny_config(folder, data, freeze={"trainable": ["layer4.1", "fc"], "batchnorm": "train"},
                       optim={"lr": 0.01, "schedule": "cosine"}, train={"epochs": EPOCHS, "batch_size": 4})


@pytest.fixture(scope="module")
def reference(module_tmp, long_data):
    """An uninterrupted run of the same config, training in the background (one thread: a core of its own)
    while the first test runs; call it for its run directory."""
    folder = module_tmp("reference")
    run = Training("train", "--config", str(signal_config(folder, long_data)))

    def run_dir() -> Path:
        result = run.finish()
        assert result.returncode == 0, result.stdout + result.stderr
        return folder / "run"

    yield run_dir
    run.kill()


def model_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def no_traceback(result: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in result.stdout + result.stderr


def interrupt(run_dir: Path, args: tuple[str, ...], after: str, signum: int, code: int) -> dict:
    """Start ``finetune ARGS``, send ``signum`` once a line starts with ``after``; check how it stopped and return
    the training state its last.pt saved."""
    run = Training(*args)
    run.wait_for(after)
    run.proc.send_signal(signum)
    stopped = run.finish()
    assert stopped.returncode == code, stopped.stdout + stopped.stderr
    assert f"finetune train --resume {run_dir}" in stopped.stderr and no_traceback(stopped)
    assert f"epoch {EPOCHS}/" not in stopped.stdout
    return torch.load(run_dir / "last.pt", weights_only=True)["train_state"]


def test_signals_save_then_resume_equals_an_uninterrupted_run(tmp_path, long_data, reference):
    """SIGTERM in epoch 2, resume, Ctrl-C (SIGINT) in epoch 3 of the resumed run, resume again: the weights of
    the uninterrupted run, bit for bit."""
    run_dir = tmp_path / "run"
    first = interrupt(run_dir, ("train", "--config", str(signal_config(tmp_path, long_data))), "epoch 1/",
                      signal.SIGTERM, 143)
    assert first["epoch"] == 1  # stopped inside epoch 2 (after the step under way)
    second = interrupt(run_dir, ("train", "--resume", str(run_dir)), "epoch 2/", signal.SIGINT, 130)
    assert second["epoch"] == 2

    resumed = Training("train", "--resume", str(run_dir)).finish()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"epoch {EPOCHS}/{EPOCHS}" in resumed.stdout

    whole, parted = model_weights(reference()), model_weights(run_dir)
    assert whole.keys() == parted.keys()
    different = [name for name in whole if not torch.equal(whole[name], parted[name])]
    assert not different, f"the resumed run ends with other weights: {different[:5]}"


def test_second_sigint_stops_at_once(tmp_path, long_data):
    run_dir = tmp_path / "run"
    run = Training("train", "--config", str(signal_config(tmp_path, long_data)))
    run.wait_for("epoch 1/")
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # the first one has been handled: the run is finishing its step or saving last.pt
    run.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    result = run.finish(timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    assert time.monotonic() - sent < 15  # not after the remaining epochs
    assert f"epoch {EPOCHS}/" not in result.stdout
    assert (run_dir / "last.pt").exists()  # epoch 1 had ended: its last.pt, or the one the first signal asked for
    assert torch.load(run_dir / "last.pt", weights_only=True)["train_state"]["epoch"] >= 1  # never half of one


def test_sigkill_leaves_a_loadable_last_pt_and_no_half_written_files(tmp_path, long_data):
    run_dir = tmp_path / "run"
    run = Training("train", "--config", str(signal_config(tmp_path, long_data)))
    run.wait_for("epoch 1/")
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish().returncode == -signal.SIGKILL
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["train_state"]["epoch"] >= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1)) and rows
    strays = [p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not TEMPORARY.match(p.name)]
    assert not strays, f"unexpected files after SIGKILL: {strays}"


def test_best_pt_holds_the_best_epoch_and_is_never_replaced_by_a_worse_one(reference):
    run_dir = reference()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    best = max(row["val_acc"] for row in rows)
    first_best = next(row["epoch"] for row in rows if row["val_acc"] == best)  # a tie does not replace it
    state = torch.load(run_dir / "best.pt", weights_only=True)["train_state"]
    assert state["best_val_acc"] == best
    assert state["best_epoch"] == state["epoch"] == first_best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_val_acc"], summary["best_epoch"]) == (best, first_best)
