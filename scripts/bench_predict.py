"""Benchmark: predict latency at batch 1 and throughput at batch 32, one trained run as a checkpoint (eager
PyTorch), as ONNX Runtime and as TorchScript.

    .venv/bin/python scripts/bench_predict.py                                  # 224 px, about 2 minutes on 2 cores
    .venv/bin/python scripts/bench_predict.py --checkpoint runs/quickstart/best.pt   # an existing run, its own size
    .venv/bin/python scripts/bench_predict.py --size 32 --rounds 1 --repeats 2 # a quick smoke run

The run: without --checkpoint, a throwaway one in a temporary folder: the shapes demo set at --size px
(2 classes, 8 training and 16 validation images each) and one head-only epoch of ResNet-18 from random
weights, through the real `finetune make-dataset` and `finetune train`. Accuracy is beside the point; the
network and the image size are what cost time. Its ONNX and TorchScript exports come from `finetune
export` itself, so they are verified against the checkpoint before they are timed.

Each side is loaded as `finetune predict` loads it (``inference.load_model``) and timed on what predict
calls, ``fast(batch)``, with the same images for every side: the run's validation images, decoded once,
repeated up to 32. The sides run interleaved, round after round, each after a warm-up call; a figure is
the median over all rounds. Decoding and resizing images are left out: they are the same for every side.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.data.folders import load_datasets  # noqa: E402
from finetune.deploy.export import export_checkpoint  # noqa: E402
from finetune.deploy.inference import load_model  # noqa: E402
from finetune.utils.hardware import read_cpu  # noqa: E402

BATCH = 32
SIDES = {"checkpoint (eager PyTorch)": None, "ONNX Runtime": "onnx", "TorchScript": "torchscript"}


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


def images_of(config) -> torch.Tensor:
    """The run's validation images (``config``: the run's), as predict feeds them (``data.eval_transform``),
    repeated up to BATCH."""
    val = load_datasets(config).val
    picked = [val[i % len(val)][0] for i in range(BATCH)]
    return torch.stack(picked)


def timed(fast, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    fast(batch)
    return time.perf_counter() - start


@torch.inference_mode()
def measure(models: dict, images: torch.Tensor, rounds: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per side: median seconds of a batch-1 call (each on another image) and images/s at batch 32."""
    one: dict[str, list[float]] = {name: [] for name in models}
    full: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, fast in models.items():
            timed(fast, images[:1]), timed(fast, images)  # warm-up
            one[name] += [timed(fast, images[i % BATCH:i % BATCH + 1]) for i in range(repeats * 5)]
            full[name] += [timed(fast, images) for _ in range(repeats)]
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {name: (statistics.median(one[name]), BATCH / statistics.median(full[name])) for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an existing run's best.pt (default: train a throwaway run)")
    parser.add_argument("--size", type=int, default=224, help="image size of the throwaway run (default 224)")
    parser.add_argument("--arch", default="resnet18", help="architecture of the throwaway run (default resnet18)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="batch-32 calls per side and round (x5 at batch 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or make_run(folder, args.size, args.arch)
        exported = {fmt: export_checkpoint(checkpoint, fmt, folder / f"model{suffix}")
                    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt"))}
        models = {name: load_model(Path(exported[fmt]["path"]) if fmt else checkpoint) for name, fmt in SIDES.items()}
        config = models["checkpoint (eager PyTorch)"].config
        images = images_of(config)
        import onnxruntime

        print(f"finetune predict benchmark: {config.model.arch}, {config.data.image_size}x{config.data.image_size}, "
              f"{len(models['ONNX Runtime'].classes)} classes, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}")
        print(f"CPU: {read_cpu().describe()}; torch CPU kernels: {torch.backends.cpu.get_cpu_capability()}")
        for fmt, result in exported.items():
            print(f"{fmt} export verified on {result['verified_on']}: max |logit difference| "
                  f"{result['max_abs_diff']:.2g}")
        print(flush=True)
        results = measure({name: loaded.fast for name, loaded in models.items()}, images, args.rounds, args.repeats)
    base_latency, base_speed = results["checkpoint (eager PyTorch)"]
    print(f"{'side':28} {'batch-1 latency':>16} {'batch-32 img/s':>15} {'speed-up at 1':>14} {'at 32':>7}")
    for name, (latency, speed) in results.items():
        print(f"{name:28} {latency * 1000:>13.1f} ms {speed:>15.1f} {base_latency / latency:>13.2f}x "
              f"{speed / base_speed:>6.2f}x")


if __name__ == "__main__":
    main()
