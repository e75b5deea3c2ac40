"""The real ``finetune freeze-report`` command, run in a subprocess, plus the CLI's help and import promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, run_cli, write_config

from finetune.utils.hardware import precision_for

RANDOM_10 = ("--set", "model.weights=none", "--set", "model.num_classes=10")
TOTAL = 11_181_642
RESNET18_TENSORS = 62
LAYER4_FC = '["layer4.*","fc.*"]'


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert result.stderr.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("sets, trainable, trainable_tensors", [
    ((), 5_130, 2),
    (("--set", f"freeze.trainable={LAYER4_FC}"), 8_398_858, 17),
], ids=["head-only", "layer4+fc"])
def test_json_report(sets, trainable, trainable_tensors):
    result = run_cli("freeze-report", *RANDOM_10, *sets, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["total_params"], report["trainable_params"], report["frozen_params"], report["optimizer_params"]) \
        == (TOTAL, trainable, TOTAL - trainable, trainable)
    params = {p["name"]: p for p in report["parameters"]}
    assert len(report["parameters"]) == RESNET18_TENSORS
    assert sum(p["numel"] for p in params.values()) == TOTAL
    assert sum(p["numel"] for p in params.values() if p["trainable"]) == trainable
    assert sum(p["trainable"] for p in params.values()) == trainable_tensors
    assert params["fc.weight"] == {"name": "fc.weight", "shape": [10, 512], "numel": 5_120, "trainable": True,
                                   "rule": "trainable: fc" if not sets else "trainable: fc.*", "lr": 0.01}
    assert params["conv1.weight"] == {"name": "conv1.weight", "shape": [64, 3, 7, 7], "numel": 9_408,
                                      "trainable": False, "rule": "default: frozen", "lr": None}
    modes = {b["module"]: b["mode"] for b in report["batchnorm"]}
    assert len(modes) == 20 and modes["bn1"] == "eval"
    assert modes["layer4.1.bn2"] == ("eval" if not sets else "train")
    assert (report["precision"], report["precision_reason"]) == precision_for("auto", "cpu")[:2]


def test_text_report_from_config_file_with_cached_weights(tmp_path, hub_cache):
    path = write_config(tmp_path / "c.yaml", "model:\n  num_classes: 10\n"
                                              f"freeze:\n  trainable: {LAYER4_FC}\n")
    result = run_cli("freeze-report", "--config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "weights: torchvision ResNet18_Weights.DEFAULT" in out and "head: 10 classes" in out
    assert f"trainable 8,398,858 (75.11%)   frozen {TOTAL - 8_398_858:,} (24.89%)   total 11,181,642" in out
    assert "optimizer receives 8,398,858 parameters in 17 tensors (trainable set: 8,398,858 in 17) OK" in out
    assert "BatchNorm: 15 of 20 layers run in eval mode" in out
    assert "Traceback" not in result.stderr


def test_explicit_bf16_where_it_is_not_native(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN's bf16 kernels off, as on an AVX2-only CPU
    result = run_cli("freeze-report", *RANDOM_10, "--set", "train.precision=bf16", isolated=True)  # read at start
    assert result.returncode == 0, result.stderr
    assert "precision: bf16 (train.precision: bf16, not native here: " in result.stdout


BASE = "model:\n  weights: none\n  num_classes: 10\n"


@pytest.mark.parametrize("text, args, expected", [
    (BASE + "optim:\n  lrr: 0.1\n", (), ["{path}:5  optim.lrr", "did you mean 'optim.lr'"]),
    (BASE + "freeze:\n  trainable: [fc, layer5.*]\n", (),
     ["{path}:5  freeze.trainable[1]", "'layer5.*' matches no parameter", "closest names: layer"]),
    (BASE, ("--set", "optim.lr"), ["--set 'optim.lr'", "KEY=VALUE"]),
], ids=["unknown-key", "bad-pattern", "set-without-equals"])
def test_user_errors(tmp_path, text, args, expected):
    path = write_config(tmp_path / "c.yaml", text)
    result = run_cli("freeze-report", "--config", str(path), *args)
    assert_user_error(result, *(e.format(path=path) for e in expected))


@pytest.mark.parametrize("args, expected", [
    (("--help",), ["freeze-report", "Fine-tune"]),
    (("freeze-report", "--help"), ["Example", "--config", "--set", "--json"]),
], ids=["app", "freeze-report"])
def test_help(args, expected):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def test_cli_and_config_import_without_torch():
    result = run_python("import sys, finetune.cli, finetune.config; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_config_error_is_reported_without_importing_torch():
    # cli.py: "config errors never wait for torch to import"
    result = run_python(
        "import sys\nfrom finetune.cli import app\n"
        "try:\n    app(['freeze-report', '--set', 'optim.lrr=1'], prog_name='finetune')\n"
        "except SystemExit as exc:\n    print('exit', exc.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n")
    assert "exit 2" in result.stdout and "did you mean 'optim.lr'" in result.stderr, result.stdout + result.stderr
    assert "torch imported: False" in result.stdout


def test_json_stays_clean_when_the_weights_cannot_be_downloaded():
    # torch.hub announces downloads on stdout; --json output must still parse.
    result = run_cli("freeze-report", "--set", "model.num_classes=10", "--set", "model.weights_fallback=random",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pretrained"] is False
    assert "Downloading" in result.stderr and "RANDOM weights" not in result.stdout
