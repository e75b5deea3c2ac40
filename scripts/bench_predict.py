"""Benchmark: one trained run classified four ways on this CPU - the checkpoint in eager PyTorch (as `finetune
predict` runs it), its fp32 ONNX and int8 ONNX exports in ONNX Runtime, and its TorchScript export - timed by
`finetune benchmark`'s own code (``finetune.deploy.benchmark``).

    .venv/bin/python scripts/bench_predict.py                                   # ResNet-18, 224 px: ~3 min on 2 cores
    .venv/bin/python scripts/bench_predict.py --arch resnet50                   # ResNet-50
    .venv/bin/python scripts/bench_predict.py --checkpoint runs/quickstart/best.pt   # an existing run, its own size
    .venv/bin/python scripts/bench_predict.py --size 32 --seconds 0.5           # a quick smoke run

The run: without --checkpoint, a throwaway one in a temporary folder: the shapes demo set at --size px (2 classes,
8 training and 16 validation images each) and one head-only epoch of --arch from random weights, through the real
`finetune make-dataset` and `finetune train`. Speed does not depend on the weights; accuracy is beside the point here,
so the int8 export is written whatever its accuracy drop (``--max-accuracy-drop 100``; its check is still printed).
The exports come from `finetune export` itself, so each is verified (and the int8 one timed against fp32) first.

Every side is loaded as `finetune predict` loads it and timed on what predict calls; the sides run interleaved,
call after call, so that other work on a shared machine slows them alike and their ratios hold: batch-1 latency
(p50 and p95 after warm-up) and batch-32 throughput (from the median batch time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# As the CLI sets it before torch loads (finetune/cli/app.py): torch's idle threads sleep sooner, and leave the
# cores to the other sides and to whatever else runs.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.deploy.benchmark import cpu_description, model_speed, runtime  # noqa: E402
from finetune.deploy.export import export_checkpoint  # noqa: E402
from finetune.deploy.inference import load_model  # noqa: E402
from finetune.deploy.quantize import Int8Options  # noqa: E402

BATCH = 32
SIDES = {"checkpoint (eager PyTorch)": None, "ONNX Runtime fp32": "onnx", "ONNX Runtime int8": "int8",
         "TorchScript": "torchscript"}


def make_run(folder: Path, size: int, arch: str) -> Path:
    """A throwaway run trained by the real CLI: its best.pt."""
    def cli(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"finetune {args[0]} failed:\n{done.stderr}")

    data, run = folder / "shapes", folder / "run"
    cli("make-dataset", "shapes", str(data), "--classes", "2", "--train-per-class", "8", "--val-per-class", "16",
        "--image-size", str(size))
    cli("train", "--quiet", "--set", f"data.root={data}", "--set", f"data.image_size={size}",
        "--set", f"model.arch={arch}", "--set", "model.weights=none", "--set", "train.epochs=1",
        "--set", "train.batch_size=16", "--set", f"train.output_dir={run}")
    return run / "best.pt"


def export_all(checkpoint: Path, folder: Path) -> dict[str, dict]:
    """fp32 ONNX, int8 ONNX and TorchScript exports of ``checkpoint`` in ``folder``, by `finetune export`."""
    return {"onnx": export_checkpoint(checkpoint, "onnx", folder / "model.onnx"),
            "int8": export_checkpoint(checkpoint, "onnx", folder / "model.int8.onnx",
                                      int8=Int8Options(max_accuracy_drop=100)),
            "torchscript": export_checkpoint(checkpoint, "torchscript", folder / "model.torchscript.pt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an existing run's best.pt (default: train a throwaway run)")
    parser.add_argument("--size", type=int, default=224, help="image size of the throwaway run (default 224)")
    parser.add_argument("--arch", default="resnet18", help="architecture of the throwaway run (default resnet18)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time each batch size for at least this long, "
                        "all sides together (default 10)")
    parser.add_argument("--threads", type=int, help="compute threads (default: one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or make_run(folder, args.size, args.arch)
        exported = export_all(checkpoint, folder)
        models = {name: load_model(Path(exported[kind]["path"]) if kind else checkpoint, args.threads)
                  for name, kind in SIDES.items()}
        loaded = models["checkpoint (eager PyTorch)"]
        size = loaded.config.data.image_size
        cpu = cpu_description()
        print(f"finetune predict benchmark: {loaded.config.model.arch}, {size}x{size}, {len(loaded.classes)} classes, "
              f"{runtime('checkpoint')} ({torch.get_num_threads()} threads), {runtime('onnx')}")
        print(f"CPU: {cpu['cpu_line']}; torch CPU kernels: {torch.backends.cpu.get_cpu_capability()}")
        for kind, result in exported.items():
            graph = "fp32 graph (before quantization)" if kind == "int8" else "export"
            print(f"{kind} {graph} verified on {result['verified_on']}: max |{result['compared']} difference| "
                  f"{result['max_abs_diff']:.2g}, {result['bytes'] / 2**20:.1f} MiB")
        report = exported["int8"]["quantization"]
        check, own = report["verification"], report["speed"]
        print(f"int8 on {check['images']} validation images: top-1 {check['int8_top1']:.2%} against "
              f"{check['fp32_top1']:.2%} in fp32, agreement {check['top1_agreement']:.2%}; `finetune export` timed "
              f"it {own['speedup_batch1']:.2f}x fp32 at batch 1, {own['speedup_batch32']:.2f}x at 32", flush=True)
        speed = model_speed({name: model.logits for name, model in models.items()}, size, BATCH, args.seconds)
    base = speed["checkpoint (eager PyTorch)"]
    print(f"\n{'side':28} {'batch-1 p50':>12} {'p95':>10} {'batch-32 img/s':>15} {'vs eager at 1':>14} {'at 32':>7}")
    for name, row in speed.items():
        latency, throughput = row["latency"], row["throughput"]["images_per_s"]
        print(f"{name:28} {latency['p50_ms']:>9.1f} ms {latency['p95_ms']:>7.1f} ms {throughput:>15.1f} "
              f"{base['latency']['p50_ms'] / latency['p50_ms']:>13.2f}x "
              f"{throughput / base['throughput']['images_per_s']:>6.2f}x")


if __name__ == "__main__":
    main()
