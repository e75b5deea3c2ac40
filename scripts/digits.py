"""Write scikit-learn's handwritten digits as an ImageFolder tree: a small, real data set for accuracy experiments.

The 1,797 images (8x8, 16 grey levels, 10 classes) are split as scikit-learn's ``train_test_split`` splits them
(stratified, 20% held out: 1,437 train / 360 val), upscaled (bicubic) to ``--image-size`` and saved as PNG:

    OUT/train/0/0000.png ... OUT/val/9/1796.png

It needs scikit-learn (``pip install 'finetune[digits]'``), which ships the images: nothing is downloaded.
A script rather than ``finetune make-dataset digits``: the data is for measuring recipes (docs/recipes.md), and
scikit-learn stays out of the CLI's dependencies.

    python scripts/digits.py data/digits            # then: finetune train --set data.root=data/digits ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def split_digits(seed: int = 0, val_fraction: float = 0.2):
    """(train images, train labels, val images, val labels, val indices...) of scikit-learn's digits: uint8 arrays
    (N, 8, 8) in 0-255, split stratified by ``train_test_split`` with ``random_state=seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("scripts/digits.py needs scikit-learn: pip install 'finetune[digits]' (or scikit-learn)")
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0-16 grey levels -> 0-255
    indices = np.arange(len(pixels))
    train, val = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    return {"train": (pixels[train], digits.target[train], train), "val": (pixels[val], digits.target[val], val)}


def write_tree(out: Path, splits: dict, image_size: int) -> dict[str, int]:
    """Save every split as ``out/<split>/<label>/<index>.png``, upscaled to ``image_size``; the count per split."""
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; choose a new folder")
    counts = {}
    for split, (images, labels, indices) in splits.items():
        for image, label, index in zip(images, labels, indices):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).save(
                folder / f"{index:04d}.png")
        counts[split] = len(images)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument("--image-size", type=int, default=32, help="width and height of the saved images (px)")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the train/val split")
    args = parser.parse_args()
    counts = write_tree(args.out, split_digits(args.seed), args.image_size)
    print(f"wrote {counts['train']} train / {counts['val']} val digit images ({args.image_size} px, 10 classes) "
          f"to {args.out}")


if __name__ == "__main__":
    main()
