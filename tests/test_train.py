"""End-to-end training: the run directory, reproducibility, exact resume, evaluate and predict."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import SignalAtStep, assert_same_weights, run_cli, state_digest, tiny_config, weights

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.training.reporter import Reporter
from finetune.training.run import train

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "val_balanced_acc",
               "val_macro_f1", "lr", "grad_norm", "seconds",
               "images_per_s"}


# Random init as finetune did before residual branches started at zero: as tests/fixtures/format1 was written.
OLD_INIT = {"weights": "none", "zero_init_residual": False}


@pytest.fixture(scope="module")
def cli_run(module_tmp, colour_data):
    """One real `finetune train` through the CLI (not a terminal: plain logs)."""
    folder = module_tmp("cli_run")
    config = tiny_config(folder, colour_data, model=OLD_INIT, train={"epochs": 3})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return folder / "run", result


def test_run_directory_has_every_file_with_sane_values(cli_run):
    run_dir, _ = cli_run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(METRIC_KEYS <= r.keys() for r in rows)
    assert rows[-1]["val_acc"] >= 0.9  # three colour classes: chance is 1/3
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert summary["pretrained"] is False and summary["classes"] == ["blue", "green", "red"]
    assert summary["frozen_unchanged"] is True and summary["frozen_tensors"] == 120  # 60 parameters + 3 buffers x 20 BN
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["classes"] == ["blue", "green", "red"]
    assert checkpoint["train_state"]["epoch"] == summary["best_epoch"]
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= checkpoint.keys()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.output_dir == str(run_dir.resolve())


def test_plain_log_when_not_a_terminal(cli_run):
    _, result = cli_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "val_acc" in lines[0] and "img/s" in lines[0]
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "done: best val_acc" in result.stdout


def test_frozen_backbone_and_batchnorm_statistics_unchanged(cli_run):
    run_dir, _ = cli_run
    from finetune.models.build import build

    config = load_config(run_dir / "config.yaml")
    initial = build(config, ["blue", "green", "red"]).model.state_dict()
    final = weights(run_dir)
    changed = [k for k in final if not torch.equal(initial[k], final[k])]
    assert sorted(changed) == ["fc.bias", "fc.weight"]


def test_same_config_gives_identical_weights(tmp_path, colour_data, cli_run):
    config = tiny_config(tmp_path, colour_data, model=OLD_INIT, train={"epochs": 3})
    quiet = run_cli("train", "--config", str(config), "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert_same_weights(weights(tmp_path / "run"), weights(cli_run[0]))


def test_a_checkpoint_written_before_the_rename_resumes_evaluates_and_exports(tmp_path, colour_data, cli_run):
    """tests/fixtures/format1/last.pt was written by finetune at commit 14ad97d (checkpoint format 1, the training
    state under "progress") after epoch 1 of cli_run's config. To keep it small, the tensors head-only training left
    at their seeded initialisation were left out; they are rebuilt here and checked against the original's digest
    (see tests/fixtures/format1/make.py). It evaluates, exports, and resumes to cli_run's weights: bit for bit until
    BatchNorm was folded into the frozen prefix, which moved the features by float rounding (about 1e-6), so now
    within that."""
    from finetune.deploy.export import export_checkpoint
    from finetune.deploy.inference import evaluate_checkpoint
    from finetune.models.weights import build_model

    fixture = Path(__file__).parent / "fixtures" / "format1"
    saved = torch.load(fixture / "last.pt", weights_only=True)
    record = json.loads((fixture / "stripped.json").read_text())
    config = load_config(tiny_config(tmp_path, colour_data, model=OLD_INIT, train={"epochs": 3}))
    initial = build_model(config, 3, show_download=False)[0].state_dict()
    saved["model"] = {**{name: initial[name] for name in record["stripped"]}, **saved["model"]}
    assert state_digest(saved["model"]) == record["sha256_of_model"] and saved["format"] == 1
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    torch.save(saved, run_dir / "last.pt")

    evaluated = evaluate_checkpoint(run_dir / "last.pt", colour_data, tmp_path / "eval")
    assert evaluated["top1"] == saved["progress"]["history"][-1]["val_acc"]  # the run's own validation
    exported = export_checkpoint(run_dir / "last.pt", "state-dict", tmp_path / "old.pth")
    assert json.loads(Path(exported["metadata_path"]).read_text())["source"]["epoch"] == 1
    train(config, Reporter(), resume=run_dir)
    resumed_weights, uninterrupted = weights(run_dir), weights(cli_run[0])
    assert resumed_weights.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    assert resumed["format"] == 2 and resumed["train_state"]["epoch"] == 3 and "progress" not in resumed


@pytest.mark.parametrize("augment", [False, True])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, colour_data, augment):
    # The last block and BatchNorm in train mode: momentum buffers, running statistics and augmentation all matter.
    overrides = dict(freeze={"trainable": ["layer4.1", "fc"], "batchnorm": "train"},
                     data={"augment": augment}, optim={"lr": 0.02, "schedule": "cosine", "warmup_epochs": 1},
                     train={"epochs": 2, "batch_size": 6})
    before = torch.get_rng_state(), random.getstate()
    train(load_config(tiny_config(tmp_path / "whole", colour_data, **overrides)), Reporter())
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]  # the run's are its own

    parted = load_config(tiny_config(tmp_path / "parted", colour_data, **overrides))
    with pytest.raises(FinetuneError) as stopped:
        train(parted, SignalAtStep(epoch=1, step=2))  # mid-epoch 2 of 2, in the warm-up's wake
    assert stopped.value.exit_code == 130
    assert "--resume" in str(stopped.value)
    partial = torch.load(tmp_path / "parted" / "run" / "last.pt", weights_only=True)["train_state"]
    assert (partial["epoch"], partial["step"]) == (1, 2)
    assert (tmp_path / "parted" / "run" / "curves.png").is_file()  # drawn however a run ends: epoch 1's curves
    train(parted, Reporter(), resume=tmp_path / "parted" / "run")

    assert_same_weights(weights(tmp_path / "parted" / "run"), weights(tmp_path / "whole" / "run"))
    whole_rows = (tmp_path / "whole" / "run" / "metrics.jsonl").read_text().splitlines()
    parted_rows = (tmp_path / "parted" / "run" / "metrics.jsonl").read_text().splitlines()
    drop_time = [{k: v for k, v in json.loads(r).items() if k not in ("seconds", "images_per_s")}
                 for r in whole_rows + parted_rows]
    assert drop_time[:2] == drop_time[2:]


def test_resume_refuses_a_changed_config(tmp_path, colour_data, cli_run):
    run_dir, _ = cli_run
    config = tiny_config(tmp_path, colour_data, optim={"lr": 0.5})
    result = run_cli("train", "--config", str(config), "--resume", str(run_dir))
    assert result.returncode == 2
    assert "optim.lr" in result.stderr and "Traceback" not in result.stderr


def test_existing_run_directory_is_not_overwritten(cli_run, colour_data, tmp_path):
    run_dir, _ = cli_run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    config = tiny_config(tmp_path, colour_data)
    result = run_cli("train", "--config", str(config), "--output-dir", str(run_dir))
    assert result.returncode == 2
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_evaluate_reports_accuracy_and_writes_confusion_matrix(cli_run, colour_data, tmp_path):
    run_dir, _ = cli_run
    result = run_cli("evaluate", str(run_dir / "best.pt"), "--data", str(colour_data), "--json",
                     "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 12
    assert report["top1"] >= 0.9 and report["top5"] == 1.0
    assert [row["class"] for row in report["per_class"]] == ["blue", "green", "red"]
    assert sum(map(sum, report["confusion"])) == 12
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    text = run_cli("evaluate", str(run_dir / "best.pt"))
    assert text.returncode == 0, text.stderr
    assert "top-1" in text.stdout and "red" in text.stdout
    assert (run_dir / "confusion.png").is_file()


def test_predict_names_the_class_with_probabilities(cli_run, colour_data):
    run_dir, _ = cli_run
    result = run_cli("predict", str(run_dir / "best.pt"), str(colour_data / "val" / "red"), "--top-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert len(predictions) == 4
    for item in predictions:
        assert len(item["predictions"]) == 2
        assert item["predictions"][0]["prob"] >= item["predictions"][1]["prob"]
    assert sum(item["predictions"][0]["class"] == "red" for item in predictions) >= 3


def test_predict_missing_image_is_a_clear_error(cli_run, tmp_path):
    result = run_cli("predict", str(cli_run[0] / "best.pt"), str(tmp_path / "nope.png"))
    assert result.returncode == 2
    assert "nope.png" in result.stderr and "Traceback" not in result.stderr


def test_predict_unreadable_image_is_a_clear_error(cli_run, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = run_cli("predict", str(cli_run[0] / "best.pt"), str(tmp_path / "broken.png"))
    assert result.returncode == 2
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "copy"])
def test_atomic_copy_stays_independent_of_a_replaced_source(tmp_path, monkeypatch, links):
    """best.pt is made from last.pt by a hard link (or a copy where the file system has none): replacing last.pt
    afterwards, as every checkpoint does, leaves best.pt as it was."""
    import os

    from finetune.utils.files import atomic_copy, atomic_write_text

    if not links:
        monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("no hard links here")))
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_write_text(last, "epoch 1")
    atomic_copy(last, best)
    assert (best.stat().st_ino == last.stat().st_ino) is links
    atomic_write_text(last, "epoch 2")
    assert best.read_text() == "epoch 1" and last.read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left


class FullDisk:
    """Files that ``finetune.utils.files`` opens hold only ``room`` bytes from the ``after``-th file named ``name``
    on: a write past it fails with ENOSPC, as on a full disk (``torch.save`` wraps that in a RuntimeError)."""

    def __init__(self, monkeypatch, name: str, after: int = 1, room: int = 1 << 20):
        import os

        from finetune.utils import files

        self.name, self.after, self.room, self.opened = name, after, room, 0
        real = os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real(fd, *args, **kwargs)
            if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{self.name}."):
                self.opened += 1
                if self.opened >= self.after:
                    return self.limited(f)
            return f

        monkeypatch.setattr(files.os, "fdopen", fdopen)

    def limited(self, f):
        import errno

        disk, write = self, f.write

        def limited_write(data):
            if f.tell() + len(memoryview(data).cast("B")) > disk.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(data)

        f.write = limited_write
        return f


def test_a_failed_write_names_its_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    from finetune.utils.files import atomic_write

    path = tmp_path / "last.pt"
    atomic_write(path, lambda f: torch.save({"epoch": 1}, f))
    FullDisk(monkeypatch, "last.pt")
    with pytest.raises(OSError) as failed:  # torch raised "RuntimeError: ... unexpected pos ..."
        atomic_write(path, lambda f: torch.save({"epoch": 2, "weights": torch.zeros(1 << 19)}, f))
    assert failed.value.filename == str(path) and failed.value.errno == 28
    assert failed.value.strerror.startswith("No space left on device (") and "MiB free there)" in failed.value.strerror
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_a_full_disk_stops_training_with_a_message_and_the_run_resumes(tmp_path, colour_data, monkeypatch):
    """last.pt cannot be written at the end of epoch 2: the run stops with exit code 2 and says which file, why,
    what is kept (epoch 1's checkpoint, untouched) and how to go on; the resumed run equals an uninterrupted one."""
    config = load_config(tiny_config(tmp_path / "a", colour_data, train={"epochs": 3}))
    disk = FullDisk(monkeypatch, "last.pt", after=2, room=1 << 20)
    with pytest.raises(FinetuneError) as stopped:
        train(config, Reporter())
    run_dir = tmp_path / "a" / "run"
    message = str(stopped.value)
    assert stopped.value.exit_code == 2 and disk.opened == 2
    assert message.startswith(f"Training stopped: {run_dir / 'last.pt'}: No space left on device (")
    assert f"The last checkpoint written, {run_dir / 'last.pt'} (end of epoch 1), is kept." in message
    assert message.endswith(f"continue the run with: finetune train --resume {run_dir}")
    assert torch.load(run_dir / "last.pt", weights_only=True)["train_state"]["epoch"] == 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    train(config, Reporter(), resume=run_dir)
    train(load_config(tiny_config(tmp_path / "b", colour_data, train={"epochs": 3})), Reporter())
    assert_same_weights(weights(run_dir), weights(tmp_path / "b" / "run"))


@pytest.mark.parametrize("every, drawn_during_the_run", [(0.0, True), (30.0, False)], ids=["due", "not-due"])
def test_curves_are_redrawn_during_a_run_only_when_due(tmp_path, colour_data, monkeypatch, every,
                                                         drawn_during_the_run):
    """After an epoch curves.png is drawn only when engine.CURVES_EVERY_S have passed (a tiny epoch takes far
    less than 30 s), and always when the run ends."""
    from finetune.training import run as engine

    monkeypatch.setattr(engine, "CURVES_EVERY_S", every)
    seen = {}

    class WatchCurves(Reporter):
        def epoch_start(self, epoch):
            seen[epoch.epoch] = (tmp_path / "run" / "curves.png").exists()

    train(load_config(tiny_config(tmp_path, colour_data)), WatchCurves())
    assert seen == {1: False, 2: drawn_during_the_run}
    assert (tmp_path / "run" / "curves.png").is_file()
