"""`finetune export`: ONNX, TorchScript and state-dict round trips, metadata, verification, bad input, and
predict/evaluate on exported files giving the checkpoint's answers. One tiny run serves every test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO, run_cli, tiny_config

from finetune.data.images import IMAGENET_MEAN, IMAGENET_STD
from finetune.deploy import export
from finetune.deploy.artifacts import load_trained
from finetune.deploy.inference import evaluate_checkpoint, predict
from finetune.training.checkpoint import FORMAT

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def run_dir(module_tmp, colour_data):
    folder = module_tmp("export_run")
    result = run_cli("train", "--config", str(tiny_config(folder, colour_data, train={"epochs": 3})), "--quiet")
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def exports(run_dir, module_tmp):
    """One export of each format, in a folder of its own."""
    out = module_tmp("exports")
    names = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "state-dict": "model.pth"}
    return {fmt: export.export_checkpoint(run_dir / "best.pt", fmt, out / name) for fmt, name in names.items()}


def cli(*args):
    """``run_cli`` with paths allowed: a crash's traceback lands in stderr, where the tests look for one."""
    return run_cli(*map(str, args))


def listing(*folders) -> dict:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.iterdir()}


def checkpoint_logits(run_dir, pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return load_trained(run_dir / "best.pt").model((pixels - mean) / std)


def test_onnx_has_a_dynamic_batch_its_metadata_and_the_checkpoints_logits(exports, run_dir):
    import onnx
    import onnxruntime

    result = exports["onnx"]
    assert result["format"] == "onnx" and result["classes"] == CLASSES
    assert result["images"] == 12 and "validation split" in result["verified_on"]  # all 4 x 3 val images
    assert 0 <= result["max_abs_diff"] <= 1e-4 and result["bytes"] == os.path.getsize(result["path"])
    model = onnx.load(result["path"])
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")][0] >= 17
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["image_size"] == "32" and props["arch"] == "resnet18"
    assert json.loads(props["mean"]) == list(IMAGENET_MEAN) and json.loads(props["std"]) == list(IMAGENET_STD)
    assert "center-crop 32x32" in props["resize"] and props["finetune_version"]
    assert json.loads(props["source"])["checkpoint"] == str((run_dir / "best.pt").resolve())

    session = onnxruntime.InferenceSession(result["path"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5):
        pixels = torch.rand(batch, 3, 32, 32)
        got = session.run(None, {"images": pixels.numpy()})[0]
        assert torch.allclose(torch.from_numpy(got), checkpoint_logits(run_dir, pixels), atol=1e-4, rtol=0)


def test_torchscript_loads_without_finetune_and_carries_metadata(exports, run_dir, tmp_path):
    script = (
        "import json, sys\n"
        "sys.modules['finetune'] = None  # any import of finetune fails\n"
        "import torch\n"
        "extra = {'finetune.json': ''}\n"
        "model = torch.jit.load(sys.argv[1], _extra_files=extra)\n"
        "pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        "torch.save({'pixels': pixels, 'logits': model(pixels)}, sys.argv[2])\n"
        "print(extra['finetune.json'].decode())\n")
    done = subprocess.run([sys.executable, "-c", script, exports["torchscript"]["path"], str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    assert meta["classes"] == CLASSES and meta["image_size"] == 32 and meta["arch"] == "resnet18"
    assert "the model normalises it" in meta["input"]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(out["logits"], checkpoint_logits(run_dir, out["pixels"]), atol=1e-4, rtol=0)


def test_state_dict_fits_a_plain_torchvision_resnet_with_json_beside_it(exports, run_dir):
    from torchvision.models import resnet18

    result = exports["state-dict"]
    model = resnet18(num_classes=3)
    model.load_state_dict(torch.load(result["path"], weights_only=True))  # strict: every key, every shape
    meta = json.loads(open(result["metadata_path"]).read())
    assert result["metadata_path"].endswith("model.json") and meta["state_dict"] == "model.pth"
    assert meta["classes"] == CLASSES and meta["mean"] == list(IMAGENET_MEAN) and "(x - mean) / std" in meta["input"]
    pixels = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        got = model.eval()((pixels - mean) / std)
    assert torch.allclose(got, checkpoint_logits(run_dir, pixels), atol=1e-4, rtol=0)


def test_documented_onnxruntime_example_gives_the_checkpoints_answers(exports, run_dir, colour_data, tmp_path):
    page = (REPO / "docs" / "commands.md").read_text()
    example = re.search(r"```python\n(# classify\.py.*?)```", page, re.S).group(1)
    assert len([line for line in example.splitlines() if line.strip() and not line.startswith("#")]) <= 14
    script = tmp_path / "classify.py"
    script.write_text("import sys\nsys.modules['torch'] = sys.modules['finetune'] = None  # only ort, numpy, PIL\n"
                      + example)
    images = [sorted((colour_data / "val" / name).iterdir())[0] for name in CLASSES]
    expected = {r["image"]: r["predictions"][0]["class"] for r in predict(run_dir / "best.pt", images, top_k=1)}
    for image in images:
        done = subprocess.run([sys.executable, str(script), exports["onnx"]["path"], str(image)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected[str(image)]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_and_evaluate_on_an_export_match_the_checkpoint(exports, run_dir, colour_data, tmp_path, fmt):
    images = [colour_data / "val"]
    from_checkpoint = predict(run_dir / "best.pt", images, top_k=3)
    from_export = predict(exports[fmt]["path"], images, top_k=3)
    assert [r["image"] for r in from_export] == [r["image"] for r in from_checkpoint]
    for a, b in zip(from_export, from_checkpoint):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert all(abs(p["prob"] - q["prob"]) < 1e-5 for p, q in zip(a["predictions"], b["predictions"]))
    assert len({r["predictions"][0]["class"] for r in from_checkpoint}) > 1  # one answer for all would prove little

    reference = evaluate_checkpoint(run_dir / "best.pt", colour_data, tmp_path / "checkpoint")
    evaluated = evaluate_checkpoint(exports[fmt]["path"], None, tmp_path / "export")  # the run's own val split
    assert evaluated["images"] == reference["images"] == 12
    assert evaluated["top1"] == reference["top1"] and evaluated["confusion"] == reference["confusion"]
    assert evaluated["loss"] == pytest.approx(reference["loss"], abs=1e-5)


def test_cli_exports_onnx_beside_the_checkpoint_and_refuses_to_overwrite(run_dir):
    done = cli("export", run_dir / "best.pt", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"path", "format", "bytes", "max_abs_diff", "images", "classes"} <= result.keys()
    assert result["path"] == str(run_dir / "best.onnx") and result["format"] == "onnx" and result["opset"] == 18
    before = listing(run_dir)
    again = cli("export", run_dir / "best.pt")
    assert again.returncode == 2
    assert "best.onnx already exists" in again.stderr and "--overwrite" in again.stderr
    assert listing(run_dir) == before


def test_cli_overwrites_with_overwrite_and_prints_the_verification(run_dir, tmp_path):
    target = tmp_path / "weights.pth"
    target.write_bytes(b"old")
    done = cli("export", run_dir / "best.pt", "--format", "state-dict", "--output", target, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert "verified on 12 images of the run's validation split" in done.stdout
    assert "max |logit difference|" in done.stdout
    assert target.read_bytes() != b"old" and (tmp_path / "weights.json").is_file()


@pytest.fixture
def newer_checkpoint(run_dir, tmp_path):
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["format"] = FORMAT + 1
    torch.save(checkpoint, tmp_path / "newer.pt")
    return tmp_path / "newer.pt"


BAD_INPUTS = {  # name -> (arguments after the checkpoint, words the message must hold)
    "unknown format": (["--format", "tflite"], ["'tflite'", "--format", "onnx, torchscript, state-dict"]),
    "opset too old": (["--opset", "16"], ["--opset 16", "18"]),
    "opset for torchscript": (["--format", "torchscript", "--opset", "18"], ["--opset", "onnx only"]),
    "missing folder": (["--output", "{tmp}/no/such/dir/m.onnx"], ["does not exist", "no/such/dir"]),
    "folder is a file": (["--output", "{tmp}/file.txt/m.onnx"], ["is not a folder", "file.txt"]),
    "output is a folder": (["--output", "{tmp}/folder.onnx"], ["is a folder"]),
    "onnx without .onnx": (["--output", "{tmp}/m.bin"], [".onnx"]),
    "output is the checkpoint": (["--format", "state-dict", "--output", "{checkpoint}", "--overwrite"],
                                 ["the checkpoint itself"]),
    "json beside a state dict exists": (["--format", "state-dict", "--output", "{tmp}/file.pth"],
                                        ["file.json already exists", "--overwrite"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_options_exit_2_and_write_nothing(run_dir, tmp_path, case):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "folder.onnx").mkdir()
    args, words = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path, checkpoint=run_dir / "best.pt") for a in args]
    before = listing(run_dir, tmp_path)
    done = cli("export", run_dir / "best.pt", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert all(word in done.stderr for word in words), done.stderr
    assert listing(run_dir, tmp_path) == before


@pytest.mark.parametrize("kind", ["text file", "image", "newer finetune"])
def test_a_file_that_is_not_a_usable_checkpoint_exits_2(tmp_path, newer_checkpoint, kind):
    if kind == "text file":
        source, words = tmp_path / "notes.pt", ["notes.pt", "corrupt"]
        source.write_text("not a checkpoint")
    elif kind == "image":
        from PIL import Image

        source, words = tmp_path / "photo.pt", ["photo.pt"]
        Image.new("RGB", (4, 4)).save(source, format="PNG")
    else:
        source, words = newer_checkpoint, ["newer.pt", "newer finetune", f"format {FORMAT + 1}", "Upgrade"]
    before = listing(tmp_path)
    done = cli("export", source, "--output", tmp_path / "out.onnx")
    assert done.returncode == 2, done.stdout + done.stderr
    assert all(word in done.stderr for word in words), done.stderr
    assert listing(tmp_path) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_unwritable_output_folder_exits_2(run_dir):
    # /proc takes no new files, even from root, who passes every permission check until the write itself
    done = cli("export", run_dir / "best.pt", "-f", "state-dict", "-o", "/proc/finetune-test.pth")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "/proc" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not os.path.exists("/proc/finetune-test.pth") and not os.path.exists("/proc/finetune-test.json")


def test_failed_verification_exits_1_and_leaves_the_old_file_alone(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference is small enough
    fresh = cli("export", run_dir / "best.pt", "--output", tmp_path / "m.onnx")
    assert fresh.returncode == 1, fresh.stderr
    assert "Verification failed" in fresh.stderr and "Nothing was written" in fresh.stderr
    (tmp_path / "old.pth").write_bytes(b"old")
    replace = cli("export", run_dir / "best.pt", "-f", "state-dict", "-o", tmp_path / "old.pth", "--overwrite")
    assert replace.returncode == 1, replace.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pth"] and (tmp_path / "old.pth").read_bytes() == b"old"


def test_an_export_that_does_not_load_back_exits_1(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_serialise", lambda *args: b"\x08garbage")
    done = cli("export", run_dir / "best.pt", "--output", tmp_path / "m.onnx")
    assert done.returncode == 1 and "does not load back" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_the_data_it_verifies_on_a_random_batch(run_dir, tmp_path):
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["config"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(checkpoint, tmp_path / "moved.pt")
    result = export.export_checkpoint(tmp_path / "moved.pt", "state-dict")
    assert result["verified_on"].startswith("random inputs") and "gone" in result["verified_on"]
    assert result["images"] == export.VERIFY_IMAGES and result["max_abs_diff"] <= 1e-4
    assert result["path"] == str(tmp_path / "moved.state_dict.pth")


def test_predict_on_a_corrupt_or_foreign_onnx_file_says_so(tmp_path, colour_data):
    import onnx
    from onnx import TensorProto, helper

    image = next((colour_data / "val" / "red").iterdir())
    (tmp_path / "corrupt.onnx").write_bytes(os.urandom(2000))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8),
              tmp_path / "foreign.onnx")
    for name, words in (("corrupt.onnx", "corrupt or not an ONNX file"), ("foreign.onnx", "not one exported by "
                                                                                          "finetune")):
        done = cli("predict", tmp_path / name, image)
        assert done.returncode == 2, done.stdout + done.stderr
        assert name in done.stderr and words in done.stderr and "Traceback" not in done.stderr


def test_help_and_checkpoint_predict_do_not_import_onnx(run_dir, colour_data):
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from finetune.cli import app\n"
        "for args in (['--help'], ['export', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'onnxscript'))\n"
        "assert not heavy, heavy\n"
        f"done = CliRunner().invoke(app, ['predict', {str(run_dir / 'best.pt')!r}, {str(colour_data / 'val')!r}])\n"
        "assert done.exit_code == 0, done.output\n"
        "onnx = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript'))\n"
        "assert not onnx, onnx\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
