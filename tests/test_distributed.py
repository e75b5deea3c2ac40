"""Data-parallel training on torch.distributed (gloo on localhost), and device selection without a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, tiny_config

from finetune.errors import FinetuneError
from finetune.utils.hardware import select_device

# Trainable convolutions of layer4 and the head, every BatchNorm frozen in eval mode.
FREEZE = {"trainable": ["layer4.*.conv*", "fc"]}


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).abs().max() / (b[k].double().abs().max() + 1e-12)).item() for k in a)


def last_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("setting, cuda, expected", [
    ("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cuda", True, "cuda")])
def test_device_selection(setting, cuda, expected):
    assert select_device(setting, cuda) == expected


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(FinetuneError, match="no CUDA GPU"):
        select_device("cuda", False)


# Another family: RegNetY-400MF's grouped convolutions and squeeze-excitation of its last stage, and the head, train;
# every BatchNorm frozen in eval mode (in train mode each process would normalise by its own shard's statistics).
FAMILY_FREEZE = {"resnet18": FREEZE, "regnet_y_400mf": {"trainable": ["trunk_output.block4.*.f.b.0.weight",
                                                                     "trunk_output.block4.*.f.se.*", "head"]}}


@pytest.mark.parametrize("arch", FAMILY_FREEZE)
def test_two_processes_match_one_process_with_the_same_global_batch(arch, tmp_path, colour_data):
    """One test per run (a module fixture would be set up by each pytest-xdist worker that runs a test of it)."""
    config = tiny_config(tmp_path, colour_data, model={"arch": arch}, freeze=FAMILY_FREEZE[arch],
                         train={"epochs": 2, "batch_size": 8}, optim={"lr": 0.001})
    result = run_cli("train", "--config", str(config), "--nproc", "2", isolated=True)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.yaml", "curves.png", "last.pt",
                                                          "metrics.jsonl", "status.json", "summary.json"]
    assert result.stdout.count("epoch 1/2") == 1  # only rank 0 reports
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["arch"] == arch
    single = run_cli("train", "--config", str(config), "--output-dir", str(tmp_path / "single"), "--quiet")
    assert single.returncode == 0, single.stderr
    assert relative_difference(last_weights(run_dir), last_weights(tmp_path / "single")) < 1e-5
    ddp_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    one_rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ddp_rows, one_rows):  # metrics are over the whole data, not one shard
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == b["val_acc"] and a["train_acc"] == b["train_acc"]
    # resuming needs the same process count
    resumed = run_cli("train", "--resume", str(run_dir), "--set", "train.epochs=3")
    assert resumed.returncode == 2
    assert "2 process(es)" in resumed.stderr and "Traceback" not in resumed.stderr


def test_config_problems_are_reported_once_before_any_process_starts(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data, train={"batch_size": 7, "sync_batchnorm": True})
    result = run_cli("train", "--config", str(config), "--nproc", "2")  # in this process: nothing is launched
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("(2 problems)") == 1
    assert "train.batch_size: 7 is the global batch and must divide evenly among 2 processes" in result.stderr
    assert "train.sync_batchnorm: needs CUDA" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_failing_rank_ends_the_job_instead_of_hanging(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data, freeze=FREEZE, train={"epochs": 200, "batch_size": 2},
                         data={"workers": 0})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "finetune", "train", "--config", str(config)]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # both ranks are training
            assert time.monotonic() < deadline and launcher.poll() is None, "training did not start"
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=90)  # no hang: torchrun stops the job
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    # torchrun's failure summary: a child died, with the first observed failure and its exit code or signal
    assert "ChildFailedError" in output and "Root Cause (first observed failure)" in output
    torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # what was saved is intact


