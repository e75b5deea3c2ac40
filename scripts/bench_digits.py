"""Benchmark on a real small-image data set: `finetune train` end to end against the PyTorch tutorial's plain loop.

    .venv/bin/python scripts/digits.py data/digits          # once: 1,437 train / 360 val images, 32 px, 10 classes
    .venv/bin/python scripts/bench_digits.py data/digits    # about 3 minutes on 2 cores

Issue #20's measurement: a full fine-tune of ResNet-18 at 32 px on scikit-learn's digits, fp32, random weights,
batch 32, SGD (lr 0.01, momentum 0.9), 3 epochs. Each side runs in a fresh process, alternately, ``--repeats``
times:

- **plain loop**: scripts/bench_photos.py's, the tutorial's: ImageFolder + Resize + CenterCrop (which leave a 32 px
  image as it is) + ToTensor + Normalize, a DataLoader with default workers (none), model.train(), SGD over every
  parameter, the default memory format, validation after every epoch;
- **finetune**: ``finetune train`` with the same data, model, batch, learning rate and epochs, fp32, every other
  option at its default (image cache, decode threads, memory-format rule, checkpoints, curves).

It prints each side's training images/s per epoch (neither side's validation counted) and the whole process's wall
time (start-up, validation, checkpoints and exit included), and their ratios: plain / finetune, so above 1 means
finetune is faster. The figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_photos import plain_loop, run_measured  # noqa: E402

EPOCHS, BATCH, LR = 3, 32, 0.01


def finetune_run(data: Path, freeze: str, folder: Path) -> tuple[float, list[float]]:
    config = {"model": {"weights": "none"},
              "data": {"root": str(data), "image_size": 32, "resize_size": 32},
              "freeze": {"trainable": ["fc"] if freeze == "head-only" else ["*"]},
              "optim": {"lr": LR, "momentum": 0.9},
              "train": {"epochs": EPOCHS, "batch_size": BATCH, "seed": 0, "precision": "fp32",
                        "output_dir": str(folder / "run")}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    seconds, _, _ = run_measured([sys.executable, "-m", "finetune", "train", "--config", str(folder / "config.yaml"),
                                  "--overwrite", "--quiet"])
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return seconds, [row["images_per_s"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="the digits tree written by scripts/digits.py")
    parser.add_argument("--freeze", choices=["full", "head-only"], default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:  # the child process of the plain side
        plain_loop(args.data, args.freeze, False, EPOCHS, 32, LR)
        return

    import torch

    from finetune.utils.hardware import read_cpu

    print(f"finetune digits benchmark: {read_cpu().describe()}; torch {torch.__version__}, CPU kernels "
          f"{torch.backends.cpu.get_cpu_capability()}; ResNet-18, 32 px, {args.freeze}, fp32, {EPOCHS} epochs")
    results: dict[str, list] = {"plain": [], "finetune": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            seconds, _, text = run_measured([sys.executable, __file__, str(args.data), "--freeze", args.freeze,
                                             "--plain-loop"])
            results["plain"].append((seconds, json.loads(text.strip().splitlines()[-1])))
            results["finetune"].append(finetune_run(args.data, args.freeze, Path(folder)))
    median = {side: (statistics.median(s for s, _ in runs),
                     [statistics.median(speeds[e] for _, speeds in runs) for e in range(EPOCHS)])
              for side, runs in results.items()}
    print(f"\n{'side':<9} {'wall s':>7}  training img/s per epoch")
    for side, (seconds, speeds) in median.items():
        print(f"{side:<9} {seconds:>7.1f}  {'  '.join(f'{s:.0f}' for s in speeds)}")
    (plain_s, plain_speeds), (fast_s, fast_speeds) = median["plain"], median["finetune"]
    ratios = "  ".join(f"{f / p:.2f}x" for f, p in zip(fast_speeds, plain_speeds))
    print(f"ratio     {plain_s / fast_s:>6.2f}x  {ratios}  (above 1: finetune faster; medians of {args.repeats})")


if __name__ == "__main__":
    main()
