"""A real multi-label data set from scikit-learn's handwritten digits, trained and evaluated with finetune.

scikit-learn ships 1,797 scans of handwritten digits, 8x8 pixels each, inside its package
(``sklearn.datasets.load_digits``: nothing is downloaded). The scans are split 60/20/20 into train, val and test
sources, so that no scan is seen in two splits. Each image is a 2x2 grid of cells: one to three of them hold scans
of different digits, the others stay blank, and the image's labels are the digits it shows. The images (scaled up to
32x32) and ``labels.csv`` (path, label, split) go to WORK_DIR/data. Then ``finetune train`` (model.task: multilabel)
and ``finetune evaluate --split test``, as a user would run them; it prints Markdown tables of mAP, F1 and exact
match per epoch, and the test scores per label.

    .venv/bin/python scripts/digits_multilabel.py [WORK_DIR] [--epochs 6] [--train 3000]

Needs scikit-learn: pip install 'finetune[demo]'.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}  # shares of the scans
CELL, SCALE = 8, 2  # a scan fills one cell of the 2x2 grid; the 16x16 image is scaled up 2x
RECIPE = ["model.task=multilabel", "model.weights=DEFAULT", "model.weights_fallback=random",
          "freeze.default=trainable", "freeze.frozen=[layer4]", "optim.lr=0.015", "optim.nesterov=true",
          "optim.weight_decay=0.0005", "optim.schedule=cosine", "optim.warmup_epochs=1", "train.batch_size=32",
          "data.image_size=32"]


def pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def finetune(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"finetune {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def scans_by_split(seed: int) -> dict[str, dict[int, list[np.ndarray]]]:
    """The digit scans as uint8 images (white on black), split by SPLITS and grouped by digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    split, start = {}, 0
    for name, share in SPLITS.items():
        end = start + round(share * len(order)) if name != "test" else len(order)
        split[name] = {d: [] for d in range(10)}
        for i in order[start:end]:
            split[name][int(digits.target[i])].append((digits.images[i] * 255 / 16).astype(np.uint8))
        start = end
    return split


def compose(scans: dict[int, list[np.ndarray]], rng: random.Random) -> tuple[Image.Image, list[int]]:
    """One image of one to three different digits, each in its own cell of the 2x2 grid."""
    shown = rng.sample(range(10), rng.randint(1, 3))
    canvas = np.zeros((2 * CELL, 2 * CELL), np.uint8)
    for digit, cell in zip(shown, rng.sample(range(4), len(shown))):
        y, x = cell // 2 * CELL, cell % 2 * CELL
        canvas[y:y + CELL, x:x + CELL] = rng.choice(scans[digit])
    image = Image.fromarray(canvas).resize((2 * CELL * SCALE,) * 2, Image.Resampling.NEAREST)
    return image, sorted(shown)


def make_data(folder: Path, sizes: dict[str, int], seed: int) -> None:
    (folder / "images").mkdir(parents=True)
    rows = []
    for split, scans in scans_by_split(seed).items():
        rng = random.Random(f"digits/{seed}/{split}")
        for i in range(sizes[split]):
            image, shown = compose(scans, rng)
            path = f"images/{split}-{i:05d}.png"
            image.save(folder / path)
            rows.append((path, " ".join(map(str, shown)), split))
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("path", "label", "split"), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", nargs="?", type=Path, default=REPO / "runs" / "digits-multilabel")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=3000, help="training images (val and test: a fifth each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, run = args.work_dir / "data", args.work_dir / "run"
    if not data.exists():
        make_data(data, {"train": args.train, "val": args.train // 5, "test": args.train // 5}, args.seed)
    if not (run / "summary.json").exists():
        sets = [f"data.labels={data / 'labels.csv'}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
                *RECIPE]
        finetune("train", "--output-dir", str(run), "--overwrite", "--quiet", *[a for s in sets for a in ("--set", s)])
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    test = json.loads(finetune("evaluate", str(run / "best.pt"), "--split", "test", "--json", "--output-dir",
                               str(args.work_dir / "test")))
    print(f"\n{summary['train_images']} train / {summary['val_images']} val / {test['images']} test images, weights "
          f"{summary['weights']}; {summary['train_seconds']:.0f} s of training\n")
    print("| epoch | train loss | val loss | val mAP | val micro F1 | val macro F1 | val exact match | s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in history:
        print(f"| {row['epoch']} | {row['train_loss']:.3f} | {row['val_loss']:.3f} | {pct(row['val_map'])} | "
              f"{pct(row['val_micro_f1'])} | {pct(row['val_macro_f1'])} | {pct(row['val_exact_match'])} | "
              f"{row['seconds']:.0f} |")
    print(f"\ntest split, best.pt (epoch {summary['best_epoch']}), thresholds chosen on val: mAP {pct(test['map'])}, "
          f"micro F1 {pct(test['micro_f1'])}, macro F1 {pct(test['macro_f1'])}, exact match "
          f"{pct(test['exact_match'])}\n")
    print("| label | precision | recall | F1 | AP | support | threshold |")
    print("|---|---|---|---|---|---|---|")
    for row in test["per_label"]:
        print(f"| {row['label']} | {pct(row['precision'])} | {pct(row['recall'])} | {pct(row['f1'])} | "
              f"{pct(row['ap'])} | {row['support']} | {row['threshold']:.2f} |")


if __name__ == "__main__":
    main()
