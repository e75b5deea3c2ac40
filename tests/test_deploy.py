"""Deploying on a CPU: calibrated probabilities (train.calibrate, `finetune calibrate`) used by evaluate, predict and
export; `export --quantize int8` checked and timed; `finetune benchmark`; the export tolerance on large logits; bad
input. One tiny calibrated run and one int8 export serve every test."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import make_colour_folder, run_cli, tiny_config

from finetune.data.folders import load_datasets
from finetune.deploy import benchmark, export, quantize
from finetune.deploy.artifacts import load_onnx, load_trained
from finetune.deploy.quantize import Int8Options
from finetune.training.calibration import ece

CLASSES = ["blue", "green", "red"]


def cli(*args):
    return run_cli(*map(str, args))


def listing(*folders) -> dict:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.iterdir()}


@pytest.fixture(scope="module")
def run_dir(module_tmp, colour_data):
    folder = module_tmp("deploy_run")
    config = tiny_config(folder, colour_data, train={"epochs": 3, "calibrate": True})
    result = run_cli("train", "--config", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def int8(run_dir, module_tmp):
    """The int8 export of the calibrated best.pt (timed in the least time), the fp32 ONNX bytes it came from, and
    the graph torch's exporter traced (logits, before the calibration's softmax)."""
    import onnx

    serialised, traced = [], onnx.ModelProto()
    serialise, onnx_graph = export._serialise, export._onnx_graph
    with pytest.MonkeyPatch.context() as patch:
        for module, name, value in ((quantize, "MEASURE_SECONDS", 0.0), (benchmark, "LATENCY_RUNS", 2),
                                    (benchmark, "THROUGHPUT_RUNS", 1)):  # speed is not what the tests check
            patch.setattr(module, name, value)
        patch.setattr(export, "_serialise", lambda *args: serialised.append(serialise(*args)) or serialised[-1])
        patch.setattr(export, "_onnx_graph", lambda *args: _copied(onnx_graph(*args), traced))
        result = export.export_checkpoint(run_dir / "best.pt", "onnx", module_tmp("int8") / "m.int8.onnx",
                                          int8=Int8Options(calibration_images=24, max_accuracy_drop=100))
    return result, serialised[0], traced


def _copied(model, into):
    """``model``, with a copy of it kept in ``into`` (the export changes the original)."""
    into.CopyFrom(model)
    return model


def val_logits(checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw logits and labels of the run's validation images, computed here with the plain model."""
    trained = load_trained(checkpoint)
    images, labels = zip(*load_datasets(trained.config).val)
    with torch.inference_mode():
        return trained.model(torch.stack(images)), torch.tensor(labels)


def test_train_calibrate_stores_a_temperature_in_best_pt_only(run_dir):
    best = torch.load(run_dir / "best.pt", weights_only=True)
    stored = best["calibration"]
    assert stored["temperature"] > 0 and stored["images"] == 12 and "cross-fitting" in stored["held_out"]
    assert stored["after"]["nll"] <= stored["before"]["nll"] and stored["folds"] == 5
    assert stored["after"]["accuracy"] == stored["before"]["accuracy"]  # a temperature changes no prediction
    assert "calibration" not in torch.load(run_dir / "last.pt", weights_only=True)
    report = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert {k: v for k, v in report.items() if k in stored} == stored
    assert {"nll", "ece", "accuracy"} == report["before"].keys() == report["after"].keys()
    assert len(report["reliability_after"]) == 15 and report["reliability_png"] == str(run_dir / "reliability.png")
    assert (run_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    logits, targets = val_logits(run_dir / "best.pt")
    assert report["before"]["ece"] == pytest.approx(ece(logits.softmax(1), targets), abs=1e-6)


def test_calibrate_refits_only_with_overwrite_and_keeps_the_weights(run_dir, tmp_path):
    shutil.copy(run_dir / "best.pt", tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()
    again = cli("calibrate", tmp_path / "best.pt")
    assert again.returncode == 2 and "already calibrated" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "best.pt").read_bytes() == before and list(tmp_path.iterdir()) == [tmp_path / "best.pt"]
    refit = cli("calibrate", tmp_path / "best.pt", "--overwrite")
    assert refit.returncode == 0, refit.stderr
    old, new = torch.load(run_dir / "best.pt", weights_only=True), torch.load(tmp_path / "best.pt", weights_only=True)
    assert new.keys() == old.keys() and all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
    assert new["calibration"] == old["calibration"]  # the same logits, the same fit
    for text in ("held out: cross-fitting over 5 folds", "NLL", "ECE (15 bins)", "before", "after",
                 str(tmp_path / "reliability.png")):
        assert text in refit.stdout, text
    assert (tmp_path / "reliability.png").is_file()


def test_evaluate_and_predict_use_the_temperature(run_dir, colour_data, tmp_path):
    temperature = load_trained(run_dir / "best.pt").temperature
    logits, targets = val_logits(run_dir / "best.pt")
    calibrated = (logits / temperature).softmax(1)
    done = cli("evaluate", run_dir / "best.pt", "--json", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["temperature"] == temperature and report["ece_bins"] == 15
    assert report["ece"] == pytest.approx(ece(calibrated, targets), abs=1e-6)
    assert report["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits / temperature, targets).item(),
                                           abs=1e-5)
    images, _ = zip(*load_datasets(load_trained(run_dir / "best.pt").config).val.samples)
    done = cli("predict", run_dir / "best.pt", *images[:3], "--json", "--top-k", "3")
    assert done.returncode == 0, done.stderr
    for row, probs in zip(json.loads(done.stdout), calibrated):
        assert [p["prob"] for p in row["predictions"]] == pytest.approx(sorted(probs.tolist(), reverse=True),
                                                                        abs=1e-5)


def test_int8_export_is_checked_timed_and_carries_its_figures(int8, run_dir):
    import onnx

    result, fp32, _ = int8
    temperature = load_trained(run_dir / "best.pt").temperature
    assert result["compared"] == "probabilities" and result["max_abs_diff"] <= 1e-4  # the fp32 graph, verified
    assert result["top1_agreement"] == 1.0 and result["temperature"] == temperature
    report = result["quantization"]
    assert report["calibration"]["images"] == 24 and "training split" in report["calibration"]["source"]
    check = report["verification"]
    assert check["images"] == 12 and check["drop_points"] == pytest.approx(100 * (check["fp32_top1"]
                                                                                  - check["int8_top1"]))
    speed = report["speed"]
    assert speed["cpu_flags"].keys() >= {"avx2", "avx512_vnni", "amx_int8"} and speed["cpu"] in speed["cpu_line"]
    for name in ("fp32", "int8"):
        assert speed[name]["batch1_ms"] > 0 and speed[name]["batch32_images_per_s"] > 0
    assert speed["speedup_batch32"] == pytest.approx(speed["int8"]["batch32_images_per_s"]
                                                     / speed["fp32"]["batch32_images_per_s"])
    model = onnx.load(result["path"])
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops and model.graph.output[0].name == "probabilities"
    assert result["bytes"] < 0.4 * len(fp32)  # int8 weights
    _, meta = load_onnx(result["path"])
    assert meta["quantization"] == report and meta["temperature"] == temperature and meta["output"] == "probabilities"


def test_predict_evaluate_and_benchmark_take_the_int8_file(int8, run_dir, colour_data, tmp_path):
    result, _, _ = int8
    done = cli("evaluate", result["path"], "--json", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["top1"] == pytest.approx(result["quantization"]["verification"]["int8_top1"])
    assert report["temperature"] == result["temperature"]
    done = cli("predict", result["path"], colour_data / "val" / "red", "--json")
    assert done.returncode == 0, done.stderr
    assert all(sum(p["prob"] for p in row["predictions"]) == pytest.approx(1, abs=1e-4)
               for row in json.loads(done.stdout))  # 3 classes, top 3: the whole distribution
    threads = torch.get_num_threads()
    done = cli("benchmark", result["path"], "--json", "--seconds", "0.01", "--batch-size", "4", "--threads", "1",
               "--images", colour_data / "val" / "red")
    assert done.returncode == 0, done.stderr
    bench = json.loads(done.stdout)
    assert bench["kind"] == "onnx int8" and bench["threads"] == 1 and bench["runtime"].startswith("onnxruntime")
    assert bench["latency"]["runs"] >= 30 and bench["latency"]["p95_ms"] >= bench["latency"]["p50_ms"] > 0
    assert bench["throughput"]["batch_size"] == 4 and bench["throughput"]["images_per_s"] > 0
    assert bench["preprocess"]["source"].startswith("4 image file(s)") and bench["preprocess"]["p50_ms"] > 0
    assert torch.get_num_threads() == threads  # --threads was for the benchmark only


def test_benchmark_of_a_checkpoint_prints_a_table_naming_the_cpu(run_dir):
    done = cli("benchmark", run_dir / "best.pt", "--seconds", "0.01")
    assert done.returncode == 0, done.stderr
    for text in ("checkpoint, resnet18, 32x32", "CPU: ", "avx2", "avx512_vnni", "model, batch 1", "model, batch 32",
                 "decode + preprocess", "synthetic 1024x768 JPEG"):
        assert text in done.stdout, text


def test_int8_calibrated_on_unlike_images_is_refused_and_writes_nothing(int8, run_dir, tmp_path, monkeypatch):
    _, fp32, _ = int8
    monkeypatch.setattr(export, "_serialise", lambda *args: fp32)  # the same graph as the fixture's: not exported again
    from PIL import Image

    (tmp_path / "dark" / "red").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32)).save(tmp_path / "dark" / "red" / f"{i}.png")  # black: activations out of range
    out = tmp_path / "out"
    out.mkdir()
    done = cli("export", run_dir / "best.pt", "-o", out / "m.onnx", "--quantize", "int8", "--calibration-data",
               tmp_path / "dark", "--max-accuracy-drop", "0")
    assert done.returncode == 1, done.stdout + done.stderr
    for text in ("int8 refused", "top-1 accuracy", "in fp32", "--max-accuracy-drop 0", "Nothing was written"):
        assert text in done.stderr, done.stderr
    assert list(out.iterdir()) == []


def test_large_logits_export_within_a_tolerance_relative_to_them(int8, run_dir, tmp_path, monkeypatch):
    from onnx import ModelProto, numpy_helper

    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    del checkpoint["calibration"]
    scaled = ModelProto()
    scaled.CopyFrom(int8[2])
    heads = [init for init in scaled.graph.initializer if init.name in ("model.fc.weight", "model.fc.bias")]
    assert len(heads) == 2
    # the head scaled alike in checkpoint and graph: logits of about 1e4-1e5 (zero-init: small features)
    for init in heads:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e5, init.name))
        checkpoint["model"][init.name.removeprefix("model.")] *= 1e5
    torch.save(checkpoint, tmp_path / "large.pt")
    monkeypatch.setattr(export, "_onnx_graph", lambda *args: scaled)  # the exporter's own graph, not traced again
    result = export.export_checkpoint(tmp_path / "large.pt", "onnx")
    logits, _ = val_logits(tmp_path / "large.pt")
    assert logits.abs().max() > 1e4 and result["compared"] == "logits"
    assert result["max_abs_diff"] > 1e-4  # the old absolute check refused this correct export
    assert result["max_rel_diff"] < export.RELATIVE_TOLERANCE and result["top1_agreement"] == 1.0
    assert (tmp_path / "large.onnx").is_file()


def test_compare_outputs_counts_differences_and_flips_beyond_the_tolerance():
    expected = torch.tensor([[1e4, 0.0, -1e4], [1.0, 0.99999, 0.0], [5.0, 0.0, 0.0]])
    close = expected + torch.tensor([[0.05, 0.05, -0.05], [0.0, 2e-5, 0.0], [0.0, 0.0, 0.0]])
    check = export.compare_outputs(close, expected)  # 0.05 < 1e-4 + 1e-5 x 1e4; the near tie may flip
    assert (check["over"], check["flipped"]) == (0, 0) and check["top1_agreement"] == pytest.approx(2 / 3)
    wrong = expected.clone()
    wrong[2] = torch.tensor([5.0, 5.0 + 1e-5, 0.0])  # within 1e-4 + 5e-5 of nothing: over, and a flip
    assert export.compare_outputs(wrong, expected)["flipped"] == 1
    assert export.compare_outputs(torch.full_like(expected, float("nan")), expected)["over"] == 3


@pytest.mark.parametrize("flags, fragment", [
    ({"avx2": True, "avx512_vnni": False}, "on a CPU with VNNI (avx512_vnni, avx_vnni or amx_int8) it may well be"),
    ({"avx2": True, "avx512_vnni": True}, "this CPU has avx512_vnni already"),
])
def test_an_int8_export_slower_here_says_so_and_where_it_may_pay(monkeypatch, flags, fragment):
    from io import StringIO

    from rich.console import Console

    from finetune.cli import render

    out = StringIO()
    monkeypatch.setattr(render, "console", Console(file=out, width=300))
    timing = {"batch1_ms": 2.0, "batch32_images_per_s": 100.0}
    report = {"calibration": {"source": "8 images"}, "fp32_bytes": 4 * 2**20,
              "verification": {"images": 8, "data": "val", "int8_top1": 0.5, "fp32_top1": 0.5, "drop_points": 0.0,
                               "max_drop_points": 1.0, "top1_agreement": 1.0},
              "speed": {"cpu_line": "a CPU", "runtime": "onnxruntime", "fp32": timing, "int8": timing,
                        "speedup_batch1": 0.8, "speedup_batch32": 1.2, "cpu_flags": flags}}
    render._print_quantization(report, 2**20)
    text = " ".join(out.getvalue().split())
    assert "int8 is not faster than fp32 on this CPU at batch 1." in text and fragment in text


BAD_EXPORTS = {  # name -> (export arguments after the checkpoint, words the message must hold)
    "int8 as torchscript": (["--format", "torchscript", "--quantize", "int8"], ["--quantize int8", "onnx only"]),
    "unknown quantization": (["--quantize", "int4"], ["'int4'", "int8"]),
    "calibration without quantize": (["--calibration-images", "10"], ["--calibration-images", "--quantize int8"]),
    "no calibration images": (["--quantize", "int8", "--calibration-images", "0"], ["--calibration-images 0"]),
    "negative drop": (["--quantize", "int8", "--max-accuracy-drop", "-1"], ["--max-accuracy-drop -1"]),
    "calibration data is a file": (["--quantize", "int8", "--calibration-data", "{tmp}/file.txt"], ["file.txt",
                                                                                                    "not a folder"]),
    "other classes": (["--quantize", "int8", "--calibration-data", "{tmp}/purple"], ["purple", "does not know"]),
    "unreadable images": (["--quantize", "int8", "--calibration-data", "{tmp}/broken"], ["0.png", "cannot be read"]),
    "no images": (["--quantize", "int8", "--calibration-data", "{tmp}/empty"], ["No readable image", "empty"]),
    "int8 exists": (["--quantize", "int8", "-o", "{tmp}/file.onnx"], ["file.onnx already exists", "--overwrite"]),
}


@pytest.mark.parametrize("case", BAD_EXPORTS)
def test_bad_int8_options_exit_2_before_any_work(run_dir, tmp_path, case):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "file.onnx").write_text("x")
    make_colour_folder(tmp_path / "purple", 1)  # blue, green, red ...
    (tmp_path / "purple" / "purple").mkdir()
    (tmp_path / "purple" / "purple" / "0.png").write_bytes((tmp_path / "purple" / "red" / "0.png").read_bytes())
    (tmp_path / "broken" / "red").mkdir(parents=True)
    (tmp_path / "broken" / "red" / "0.png").write_bytes(b"not a png")
    (tmp_path / "empty" / "red").mkdir(parents=True)
    args, words = BAD_EXPORTS[case]
    before = listing(run_dir, tmp_path)
    done = cli("export", run_dir / "best.pt", *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stdout + done.stderr
    assert all(word in done.stderr for word in words), done.stderr
    assert "Traceback" not in done.stderr and listing(run_dir, tmp_path) == before


@pytest.mark.parametrize("value", [-1.0, float("nan"), 0.0])
def test_a_damaged_temperature_is_an_error_naming_the_file(run_dir, tmp_path, value):
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["calibration"]["temperature"] = value
    torch.save(checkpoint, tmp_path / "damaged.pt")
    for command in ("evaluate", "export"):
        done = cli(command, tmp_path / "damaged.pt")
        assert done.returncode == 2, done.stdout + done.stderr
        assert "damaged.pt" in done.stderr and "positive finite" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.pt"]


def test_an_export_with_a_damaged_temperature_or_corrupt_bytes_is_refused(int8, tmp_path, colour_data):
    import onnx

    model = onnx.load(int8[0]["path"])
    next(p for p in model.metadata_props if p.key == "temperature").value = "0"
    onnx.save(model, tmp_path / "zero.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(os.urandom(3000))
    image = next((colour_data / "val" / "red").iterdir())
    for name, words in (("zero.onnx", "positive finite"), ("corrupt.onnx", "corrupt or not an ONNX file")):
        for args in (["predict", tmp_path / name, image], ["benchmark", tmp_path / name],
                     ["evaluate", tmp_path / name]):
            done = cli(*args)
            assert done.returncode == 2, done.stdout + done.stderr
            assert name in done.stderr and words in done.stderr and "Traceback" not in done.stderr


def test_calibrate_without_the_runs_data_exits_2_and_changes_nothing(run_dir, tmp_path):
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["config"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(checkpoint, tmp_path / "moved.pt")
    before = listing(tmp_path)
    done = cli("calibrate", tmp_path / "moved.pt", "--overwrite")
    assert done.returncode == 2 and "gone" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert listing(tmp_path) == before
