"""Experiment tracking: TensorBoard events and an MLflow run that a resumed run continues without a missing or
doubled point (read back with TensorBoard's own event reader and MLflow's client), status.json, and bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from helpers import Messages, SignalAtStep, run_cli, tiny_config

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.training.reporter import Reporter
from finetune.training.run import train
from finetune.training.tracking import RunStart, Tracker, Tracking

STEPS = 5  # 36 training images in batches of 8 (the last one of 4): steps per epoch
SIZES = [8, 8, 8, 8, 4]


@pytest.fixture(scope="module")
def reader(tracked):
    """The tracked run's TensorBoard events as TensorBoard shows them (orphaned events purged), every point kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked[0] / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(reader, tag) -> dict[int, float]:
    points = reader.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: doubled steps {steps}"
    return {p.step: p.value for p in points}


@pytest.fixture(scope="module")
def runs_root(module_tmp):
    """WORK/runs/, the folder the real runs of this module write into (listed by `finetune runs` below)."""
    root = module_tmp("work") / "runs"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def tracked(runs_root, module_tmp, colour_data):
    """A run with TensorBoard and MLflow, stopped by SIGINT at epoch 2, step 2 (step 7), then resumed.

    Before the resume, events for steps after the checkpoint are added, as a session killed after its checkpoint
    leaves them: TensorBoard must drop them for the resumed session's own.
    """
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

    folder = module_tmp("tracked")
    store = folder / "mlruns"
    path = tiny_config(folder, colour_data, train={"output_dir": str(runs_root / "tracked"), "log_every_steps": 1,
                                                   "loggers": ["tensorboard", "mlflow"],
                                                   "mlflow": {"tracking_uri": str(store), "experiment": "colours"}})
    run_dir = runs_root / "tracked"
    with pytest.raises(FinetuneError) as stopped:
        train(load_config(path), SignalAtStep(1, 2))
    assert stopped.value.exit_code == 130
    interrupted = json.loads((run_dir / "status.json").read_text())
    client = MlflowClient(str(store))
    killed = client.get_run(interrupted["trackers"]["mlflow"]["run_id"]).info.status
    with SummaryWriter(str(run_dir / "tensorboard")) as orphans:
        orphans.add_scalar("step/loss", 999.0, 8)
        orphans.add_scalar("epoch/val_acc", -1.0, 2 * STEPS)
    messages = Messages()
    summary = train(load_config(run_dir / "config.yaml"), messages, resume=run_dir)
    return run_dir, interrupted, killed, summary, messages, client


def test_status_json_says_how_each_session_ended(tracked):
    run_dir, interrupted, killed, summary, messages, _ = tracked
    assert interrupted["status"] == "interrupted" and interrupted["message"].startswith("Interrupted by SIGINT")
    assert killed == "KILLED"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["message"] is None and status["ended"]
    assert status["epochs"] == 2 and status["trained_params"] == 512 * 3 + 3  # the fc head of ResNet-18
    assert status["trackers"]["mlflow"]["run_id"] == interrupted["trackers"]["mlflow"]["run_id"]
    assert summary["epochs_done"] == 2
    assert not [line for line in messages.lines if line.startswith("WARNING")]


def test_tensorboard_curves_continue_across_the_resume_without_missing_or_doubled_points(tracked, reader):
    run_dir = tracked[0]
    loss = scalars(reader, "step/loss")
    assert sorted(loss) == list(range(1, 2 * STEPS + 1))  # step 8's orphan replaced by the resumed session's
    assert sorted(scalars(reader, "step/lr")) == list(range(1, 2 * STEPS + 1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the per-step batch losses, across the resume, average to the epoch's train_loss of metrics.jsonl
    for epoch, row in enumerate(rows):
        steps = range(epoch * STEPS + 1, (epoch + 1) * STEPS + 1)
        mean = sum(loss[s] * n for s, n in zip(steps, SIZES)) / sum(SIZES)
        assert mean == pytest.approx(row["train_loss"], rel=1e-5)
    for key, value in rows[0].items():  # every metric of metrics.jsonl, at the step its epoch ended
        assert scalars(reader, f"epoch/{key}") == {STEPS: pytest.approx(value), 2 * STEPS: pytest.approx(rows[1][key])}
    assert scalars(reader, "final/val_acc") == {2 * STEPS: pytest.approx(rows[1]["val_acc"])}
    assert scalars(reader, "final/best_val_acc") == {2 * STEPS: pytest.approx(max(r["val_acc"] for r in rows))}


def test_tensorboard_has_the_config_as_hparams_and_text_and_the_end_images(reader):
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in reader.PluginTagToContent("hparams").items()}
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert start["optim.lr"].number_value == 0.01 and start["model.arch"].string_value == "resnet18"
    assert start["freeze.trainable"].string_value == '["fc"]'
    metrics = {m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos}
    assert {"final/val_acc", "final/best_val_acc"} <= metrics
    assert "_hparams_/session_end_info" in hparams
    text = reader.Tensors("config/text_summary")
    assert len(text) == 1 and b"lr: 0.01" in text[0].tensor_proto.string_val[0]
    for tag in ("confusion", "top_losses"):
        images = reader.Images(tag)
        assert [image.step for image in images] == [2 * STEPS]
        assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and images[0].width > 200


def test_mlflow_run_is_continued_by_the_resumed_run(tracked, reader):
    run_dir, interrupted, _, _, _, client = tracked
    experiment = client.get_experiment_by_name("colours")
    found = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in found] == [interrupted["trackers"]["mlflow"]["run_id"]]
    run = found[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["optim.lr"] == "0.01" and run.data.params["train.loggers"] == '["tensorboard", "mlflow"]'
    loss = client.get_metric_history(run.info.run_id, "step/loss")
    assert sorted(m.step for m in loss) == list(range(1, 2 * STEPS + 1))  # each once
    tensorboard = scalars(reader, "step/loss")
    assert all(m.value == pytest.approx(tensorboard[m.step]) for m in loss)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = client.get_metric_history(run.info.run_id, "epoch/val_acc")
    assert sorted((m.step, m.value) for m in val) == [(STEPS, rows[0]["val_acc"]), (2 * STEPS, rows[1]["val_acc"])]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "curves.png", "status.json", "confusion.png",
            "top_losses.png"} <= files and "best.pt" not in files


def test_every_n_steps_the_batch_loss_is_recorded(tmp_path):
    class Recorder(Tracker):
        def __init__(self):
            self.points = []

        def step(self, step, values):
            self.points.append((step, values["loss"], values["lr"]))

    config = load_config(None, ["train.log_every_steps=2"])
    recorder = Recorder()
    # resumed after step 3, inside an epoch of 5 steps of 2 images: its sums then were 3.0 over 3 images
    tracking = Tracking(RunStart(config, tmp_path, ["a"], [], 1, resumed_step=3, epoch_sums=(3.0, 3)), (recorder,))
    sums = [(7.0, 5), (8.0, 6), (3.0, 2), (5.0, 4)]  # steps 4 and 5 end the epoch; step 6 starts the next at 0
    for step, (loss_sum, seen) in zip(range(4, 8), sums):
        tracking.step(step, loss_sum, seen, lr=0.1)
    assert recorder.points == [(4, 2.0, 0.1), (6, 1.5, 0.1)]


@pytest.fixture(scope="module")
def offline(runs_root, module_tmp, colour_data):
    """A one-epoch run whose MLflow server cannot be reached."""
    folder = module_tmp("offline")
    path = tiny_config(folder, colour_data, train={"output_dir": str(runs_root / "offline"), "epochs": 1,
                                                   "loggers": ["mlflow"],
                                                   "mlflow": {"tracking_uri": "http://127.0.0.1:9"}})
    messages = Messages()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        train(load_config(path), messages)
    return runs_root / "offline", messages


def test_an_unreachable_mlflow_is_one_warning_and_the_run_goes_on(offline):
    run_dir, messages = offline
    warnings = [line for line in messages.lines if line.startswith("WARNING")]
    assert len(warnings) == 1, warnings
    assert "MLflow tracking at http://127.0.0.1:9 failed" in warnings[0]
    assert f"the run goes on without mlflow, and its run directory {run_dir} keeps everything" in warnings[0]
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["trackers"] == {}


@pytest.fixture(scope="module")
def failed(runs_root, tracked):
    """The record of a run that failed: the error that ends a run passes through its Tracking (as in train)."""
    run_dir = runs_root / "failed"
    run_dir.mkdir()
    shutil.copy(tracked[0] / "config.yaml", run_dir)
    config = load_config(run_dir / "config.yaml", ["train.loggers=[]"])
    with pytest.raises(FinetuneError):
        with Tracking.start(RunStart(config, run_dir, ["blue", "green", "red"], [], 1539), Reporter()):
            raise FinetuneError("Training diverged at epoch 1, step 3: the loss is nan\nLower optim.lr", exit_code=1)
    return run_dir


def test_a_failed_run_says_so_in_status_json(failed):
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and status["message"] == "Training diverged at epoch 1, step 3: the loss is nan"
    assert status["ended"] and status["trackers"] == {}


def test_unknown_logger_suggests_the_closest(tmp_path):
    result = run_cli("train", "--set", "train.loggers=[tensorbord]", "--set", f"train.output_dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "train.loggers: unknown logger 'tensorbord'; did you mean 'tensorboard'?" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_mlflow_not_installed_names_the_extra_before_any_work(tmp_path, monkeypatch, colour_data):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed: importing it fails
    config = tiny_config(tmp_path, colour_data, train={"loggers": ["mlflow"]})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 2
    assert "train.loggers: mlflow needs MLflow, which is not installed: pip install 'finetune[mlflow]'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_unwritable_tensorboard_folder_is_an_error_that_changes_nothing(tracked, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(tracked[0], run_dir)
    shutil.rmtree(run_dir / "tensorboard")
    (run_dir / "tensorboard").write_text("not a folder")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = run_cli("train", "--resume", str(run_dir))
    assert result.returncode == 2, result.stderr
    assert f"train.loggers: tensorboard cannot write its event files to {run_dir / 'tensorboard'}" in result.stderr
    assert "drop tensorboard from train.loggers" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("uri, kept", [("http://host:5000", True), ("databricks", True),
                                       ("sqlite:///mlflow.db", True), ("store", False)])
def test_tracking_uri_is_a_uri_or_a_folder_relative_to_the_config(tmp_path, uri, kept):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  mlflow:\n    tracking_uri: {uri}\n")
    assert load_config(path).train.mlflow.tracking_uri == (uri if kept else str(tmp_path / uri))


# --- finetune runs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def listing(runs_root, tracked, offline, failed):
    """runs_root with the real runs above, and run directories as a killed process, an older finetune and damage
    leave them."""
    import subprocess

    config = (tracked[0] / "config.yaml").read_text()
    first_epoch = (tracked[0] / "metrics.jsonl").read_text().splitlines()[0] + "\n"
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a process that has ended: its pid is free
    runs = {
        "killed": {"config.yaml": config, "metrics.jsonl": first_epoch, "status.json": json.dumps(
            {"status": "running", "pid": gone.pid, "host": __import__("socket").gethostname(), "epochs": 2,
             "trained_params": 1539})},
        "older": {"config.yaml": config, "metrics.jsonl": first_epoch,
                  "summary.json": json.dumps({"stopped": "early_stopping", "epochs": 4})},
        "partial": {"config.yaml": config},
        "broken": {"config.yaml": config, "metrics.jsonl": first_epoch + "{not json\n"},
    }
    for name, files in runs.items():
        (runs_root / "more" / name).mkdir(parents=True)  # one level deeper: found too
        for file, text in files.items():
            (runs_root / "more" / name / file).write_text(text)
    return runs_root


def test_runs_lists_every_run_best_first_and_broken_ones_as_such(listing):
    from finetune.analysis.runs import list_runs

    rows = {row.name: row for row in list_runs([listing])}
    assert sorted(rows) == sorted(str(listing / name) for name in ("tracked", "offline", "failed", "more/killed",
                                                                   "more/older", "more/partial", "more/broken"))
    tracked = rows[str(listing / "tracked")]
    history = [json.loads(line) for line in (listing / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert (tracked.ended, tracked.model, tracked.trained_params, tracked.epochs_done, tracked.epochs) == (
        "finished", "resnet18", 1539, 2, 2)
    assert tracked.best_val_acc == max(r["val_acc"] for r in history)
    assert tracked.final_val_acc == history[-1]["val_acc"]
    assert tracked.train_seconds == pytest.approx(sum(r["seconds"] for r in history))
    assert min(r["images_per_s"] for r in history) <= tracked.images_per_s <= max(r["images_per_s"] for r in history)
    ended = {name.rsplit("/", 1)[-1]: row.ended for name, row in rows.items()}
    assert ended == {"tracked": "finished", "offline": "finished", "failed": "failed", "killed": "killed",
                     "older": "early stop", "partial": "partial", "broken": "broken"}
    assert rows[str(listing / "failed")].problem.startswith("Training diverged at epoch")
    assert "resume it with: finetune train --resume" in rows[str(listing / "more/killed")].problem
    assert rows[str(listing / "more/broken")].problem == "metrics.jsonl line 2 is not JSON (the file is damaged)"
    assert (rows[str(listing / "more/older")].epochs, rows[str(listing / "more/killed")].epochs_done) == (4, 1)
    order = list_runs([listing])
    assert order[-1].ended == "broken"
    best = [row.best_val_acc for row in order if row.best_val_acc is not None]
    assert best == sorted(best, reverse=True) and order[:len(best)] == [r for r in order if r.best_val_acc is not None]


def test_runs_command_prints_the_table_or_json(listing):
    result = run_cli("runs", "--json", cwd=listing.parent)  # runs/ by default
    assert result.returncode == 0, result.stderr
    assert {row["name"] for row in json.loads(result.stdout)} == {
        f"runs/{name}" for name in ("tracked", "offline", "failed", "more/killed", "more/older", "more/partial",
                                    "more/broken")}
    table = run_cli("runs", ".", cwd=listing)
    assert table.returncode == 0, table.stderr
    assert "best val_acc" in table.stdout and "early stop" in table.stdout
    assert "more/broken: broken: metrics.jsonl line 2 is not JSON" in table.stdout


def test_runs_compare_plots_the_curves_and_lists_only_the_keys_that_differ(listing, tmp_path):
    result = run_cli("runs", "--compare", "tracked", "offline", "--output", str(tmp_path / "c.png"), "--json",
                     cwd=listing)
    assert result.returncode == 0, result.stderr
    comparison = json.loads(result.stdout)
    assert [run["name"] for run in comparison["runs"]] == ["tracked", "offline"]
    assert comparison["differences"]["train.epochs"] == [2, 1]
    assert comparison["differences"]["train.loggers"] == [["tensorboard", "mlflow"], ["mlflow"]]
    assert "optim.lr" not in comparison["differences"] and "train.output_dir" not in comparison["differences"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run_cli("runs", "--compare", "tracked", "offline", "--output", str(tmp_path), cwd=listing)
    assert "Config keys that differ" in table.stdout and "train.mlflow.tracking_uri" in table.stdout
    assert (tmp_path / "compare.png").is_file()


def test_runs_compare_to_an_output_it_cannot_write_is_a_clear_error(listing, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder\n")
    result = run_cli("runs", "--compare", "tracked", "offline", "--output", str(tmp_path / "file.txt" / "c.png"),
                     cwd=listing)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Cannot write the comparison plot ({tmp_path / 'file.txt'}): File exists." in result.stderr
    assert "Choose another --output" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "No such folder: nowhere"),
    (["--compare", "tracked"], "--compare needs two or more run directories"),
    (["--compare", "tracked", "more"], "more is not a run directory"),
    (["--output", "x.png"], "--output is the plot of --compare"),
])
def test_runs_bad_input(listing, args, message):
    result = run_cli("runs", *args, cwd=listing)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
