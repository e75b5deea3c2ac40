"""A procedurally drawn demo data set, so a quick start needs nothing from the internet.

``make_shapes`` writes ``train/<class>/<i>.png`` and ``val/<class>/<i>.png`` in
torchvision ImageFolder layout. Each image is one shape (the class) on a speckled
background. Colours, size, position and rotation are random and drawn the same
way for every class, so only the shape tells the classes apart.

Only Pillow and a seeded ``random.Random`` are used: the same arguments give
byte-identical files, and the global random state is never touched.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from finetune.errors import FinetuneError

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
DEFAULT_CLASSES = 4  # what data.demo: shapes generates

SUPERSAMPLE = 4  # draw the shape mask larger, then downsample, for smooth edges
NOISE = 24  # speckle amplitude: each channel of each pixel moves by up to +-NOISE
MIN_CONTRAST = 70  # minimum luma difference between shape and background
SIZE_RANGE = (0.55, 0.9)  # shape diameter as a share of the image: big enough to survive the stem's 4x downsampling


def _check_int(value, low: int, high: int | None, option: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        valid = f"between {low} and {high}" if high is not None else f"an integer >= {low}"
        raise FinetuneError(f"{option} must be {valid} (got {value!r}); pass {option} with a value in that range.")


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Points at evenly spaced angles around (cx, cy), one per radius."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + i * step), cy + r * math.sin(angle + i * step)) for i, r in enumerate(radii)]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """A plus sign whose arm tips lie on the circle of radius r."""
    w = 0.3 * r  # half the arm width
    arm = math.sqrt(r * r - w * w)
    pts = [(w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
           (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Fill ``shape`` (255) into a mask; everything fits in the circle of radius r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        hole = 0.55 * r  # a thick ring, so it stays a ring after downsampling
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=255)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r, angle), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A random background and a random fill that differs from it clearly in brightness."""
    while True:
        bg = tuple(rng.randrange(256) for _ in range(3))
        fg = tuple(rng.randrange(256) for _ in range(3))
        if abs(_luma(bg) - _luma(fg)) >= MIN_CONTRAST:
            return bg, fg


def _image(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One RGB image of ``shape`` with random colours, size, position, rotation and speckle."""
    bg, fg = _colours(rng)
    r = rng.uniform(*SIZE_RANGE) * size / 2
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)  # circle and ring simply ignore it

    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, angle)
    mask = mask.resize((size, size), Image.Resampling.BOX)
    img = Image.composite(Image.new("RGB", (size, size), fg), Image.new("RGB", (size, size), bg), mask)

    # randbytes is seeded and fast; offset=-NOISE makes the speckle signed.
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    noise = noise.point(lambda v: v * 2 * NOISE // 255)
    return ImageChops.add(img, noise, offset=-NOISE)


def class_sizes(per_class: int, classes: int, imbalance: float) -> list[int]:
    """Images per class: ``per_class`` for the first, falling geometrically to ``per_class / imbalance`` for the
    last (all ``per_class`` when ``imbalance`` is 1)."""
    return [round(per_class * imbalance ** (-i / (classes - 1))) for i in range(classes)]


def demo_classes(count: int = DEFAULT_CLASSES) -> list[str]:
    """The class names of a shapes set of ``count`` classes, in the order they are drawn."""
    return list(SHAPES[:count])


def make_shapes(out_dir, *, classes: int = DEFAULT_CLASSES, train_per_class: int = 1000, val_per_class: int = 100,
                image_size: int = 64, seed: int = 0, imbalance: float = 1.0) -> dict:
    """Write out_dir/train/<class>/<i>.png and out_dir/val/<class>/<i>.png; return a summary dict
    {"root": str(out_dir), "classes": [names], "train": n_train_total, "val": n_val_total, "image_size": image_size,
    "train_sizes": [per class], "val_sizes": [per class]}.

    ``imbalance`` r > 1 makes an imbalanced set, in both splits: the first class has ``*_per_class`` images, the
    last r times fewer, the ones between geometrically in between. Each class's images are the first ones of the
    balanced set's, so the two differ only in how many there are.

    Raises FinetuneError on bad arguments or if out_dir exists and is not empty.
    """
    _check_int(classes, 2, len(SHAPES), "--classes")
    _check_int(train_per_class, 1, None, "--train-per-class")
    _check_int(val_per_class, 1, None, "--val-per-class")
    _check_int(image_size, 16, None, "--image-size")
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not 1 <= imbalance < math.inf:
        raise FinetuneError(f"--imbalance must be a number >= 1 (got {imbalance!r}); 1 is balanced, 10 gives the "
                            "first class 10 times the images of the last.")
    sizes = {"train": class_sizes(train_per_class, classes, imbalance),
             "val": class_sizes(val_per_class, classes, imbalance)}
    for split, option in (("train", "--train-per-class"), ("val", "--val-per-class")):
        if sizes[split][-1] < 1:
            raise FinetuneError(f"--imbalance {imbalance:g} leaves the last class no {split} images "
                                f"({option} {sizes[split][0]} / {imbalance:g} < 0.5); raise {option} or lower "
                                "--imbalance.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"{out} exists and is not a folder; choose another output folder.")
    if out.is_dir() and any(out.iterdir()):
        raise FinetuneError(f"{out} exists and is not empty; choose a new folder or empty this one first.")

    names = demo_classes(classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to out_dir and rename at the end, so an interrupted run never
    # leaves a half-written out_dir behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not secret
    try:
        for split in ("train", "val"):
            for name, count in zip(names, sizes[split]):
                # One stream per (seed, split, class): splits never share images,
                # and a class's images do not depend on how many classes there are.
                rng = random.Random(f"shapes/{seed}/{split}/{name}")
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    _image(name, image_size, rng).save(folder / f"{i}.png")
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace cannot replace a folder everywhere
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": str(out_dir), "classes": names, "train": sum(sizes["train"]), "val": sum(sizes["val"]),
            "image_size": image_size, "train_sizes": sizes["train"], "val_sizes": sizes["val"]}
