"""A procedurally drawn demo data set, so a quick start needs nothing from the internet.

``make_shapes`` writes ``train/<class>/<i>.png`` and ``val/<class>/<i>.png`` in
torchvision ImageFolder layout. Each image is one shape (the class) on a speckled
background. Colours, size, position and rotation are random and drawn the same
way for every class, so only the shape tells the classes apart. With ``layout="csv"``
the same images go to ``images/`` with a label file, ``labels.csv`` (path, label, split);
with ``multilabel`` each image holds one to three different shapes, each in its own
quarter of the image, and its label lists them all.

Only Pillow and a seeded ``random.Random`` are used: the same arguments give
byte-identical files, and the global random state is never touched.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from finetune.errors import FinetuneError
from finetune.utils.files import writing

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


def _placed(shape: str, fg: tuple, box: tuple[float, float, float], rng: random.Random) -> tuple:
    """``shape`` in colour ``fg`` at a random size, place and rotation inside the square ``box`` (x, y, side)."""
    x, y, side = box
    r = rng.uniform(*SIZE_RANGE) * side / 2
    cx, cy = x + rng.uniform(r, side - r), y + rng.uniform(r, side - r)
    return shape, fg, cx, cy, r, rng.uniform(0, 2 * math.pi)  # circle and ring simply ignore the angle


def _image(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One RGB image of ``shape`` with random colours, size, position, rotation and speckle."""
    bg, fg = _colours(rng)
    return _render(size, bg, [_placed(shape, fg, (0, 0, size), rng)], rng)


def _scene(names: list[str], size: int, rng: random.Random) -> tuple[Image.Image, list[str]]:
    """One RGB image of one to three different shapes of ``names``, each in its own quarter, and their names."""
    shapes = rng.sample(names, rng.randint(1, min(3, len(names))))
    quarters = rng.sample(range(4), len(shapes))
    bg = tuple(rng.randrange(256) for _ in range(3))
    half = size / 2
    parts = [_placed(shape, _contrasting(bg, rng), (q % 2 * half, q // 2 * half, half), rng)
             for shape, q in zip(shapes, quarters)]
    return _render(size, bg, parts, rng), sorted(shapes, key=names.index)


def _contrasting(bg: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    while True:
        fg = tuple(rng.randrange(256) for _ in range(3))
        if abs(_luma(bg) - _luma(fg)) >= MIN_CONTRAST:
            return fg


def _render(size: int, bg: tuple, parts: list[tuple], rng: random.Random) -> Image.Image:
    """The ``parts`` (shape, colour, centre x, centre y, radius, angle) on a ``bg`` background, then speckle."""
    img = Image.new("RGB", (size, size), bg)
    big = size * SUPERSAMPLE
    for shape, fg, cx, cy, r, angle in parts:
        mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, angle)
        mask = mask.resize((size, size), Image.Resampling.BOX)
        img = Image.composite(Image.new("RGB", (size, size), fg), img, mask)

    # randbytes is seeded and fast; offset=-NOISE makes the speckle signed.
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    noise = noise.point(lambda v: v * 2 * NOISE // 255)
    return ImageChops.add(img, noise, offset=-NOISE)


def class_sizes(per_class: int, classes: int, imbalance: float) -> list[int]:
    """Images per class: ``per_class`` for the first, falling geometrically to ``per_class / imbalance`` for the
    last (all ``per_class`` when ``imbalance`` is 1)."""
    return [round(per_class * imbalance ** (-i / (classes - 1))) for i in range(classes)]


LAYOUTS = ("folders", "csv")
LABEL_FILE = "labels.csv"


def demo_classes(count: int = DEFAULT_CLASSES) -> list[str]:
    """The class names of a shapes set of ``count`` classes, in the order they are drawn."""
    return list(SHAPES[:count])


def make_shapes(out_dir, *, classes: int = DEFAULT_CLASSES, train_per_class: int = 1000, val_per_class: int = 100,
                image_size: int = 64, seed: int = 0, imbalance: float = 1.0, layout: str = "folders",
                multilabel: bool = False) -> dict:
    """Write out_dir/train/<class>/<i>.png and out_dir/val/<class>/<i>.png; return a summary dict
    {"root": str(out_dir), "classes": [names], "train": n_train_total, "val": n_val_total, "image_size": image_size,
    "train_sizes": [per class], "val_sizes": [per class]}, and "labels": the label file, in the csv layout.

    ``imbalance`` r > 1 makes an imbalanced set, in both splits: the first class has ``*_per_class`` images, the
    last r times fewer, the ones between geometrically in between. Each class's images are the first ones of the
    balanced set's, so the two differ only in how many there are.

    ``layout="csv"`` writes the same images as out_dir/images/<n>.png with out_dir/labels.csv (path, label,
    split). ``multilabel`` (csv only) draws ``*_per_class`` x ``classes`` images of one to three shapes each; the
    sizes are then the images holding each shape.

    Raises FinetuneError on bad arguments or if out_dir exists and is not empty.
    """
    _check_int(classes, 2, len(SHAPES), "--classes")
    _check_int(train_per_class, 1, None, "--train-per-class")
    _check_int(val_per_class, 1, None, "--val-per-class")
    _check_int(image_size, 16, None, "--image-size")
    if layout not in LAYOUTS:
        raise FinetuneError(f"--format must be one of {', '.join(LAYOUTS)} (got {layout!r}).")
    if multilabel and (layout != "csv" or imbalance != 1):
        raise FinetuneError("--multilabel writes a label file (--format csv) of balanced shapes: leave out "
                            "--format folders and --imbalance.")
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
    drawn = _scenes(names, sizes, image_size, seed) if multilabel else _shapes(names, sizes, image_size, seed)
    with writing(f"the data set {out}", "Choose another folder: one you can write to, on a disk with room."):
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build next to out_dir and rename at the end, so an interrupted run never
        # leaves a half-written out_dir behind.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not secret
        try:
            counts = _write(tmp, drawn, layout, names)
            if out.is_dir():
                out.rmdir()  # empty (checked above); os.replace cannot replace a folder everywhere
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    summary = {"root": str(out_dir), "classes": names, "train": counts["train"], "val": counts["val"],
               "image_size": image_size, "train_sizes": counts["train_sizes"], "val_sizes": counts["val_sizes"]}
    return {**summary, "labels": str(out / LABEL_FILE)} if layout == "csv" else summary


def _shapes(names: list[str], sizes: dict[str, list[int]], image_size: int, seed: int):
    """(split, labels, index in its class, image) of the one-shape images."""
    for split in ("train", "val"):
        for name, count in zip(names, sizes[split]):
            # One stream per (seed, split, class): splits never share images,
            # and a class's images do not depend on how many classes there are.
            rng = random.Random(f"shapes/{seed}/{split}/{name}")
            for i in range(count):
                yield split, [name], i, _image(name, image_size, rng)


def _scenes(names: list[str], sizes: dict[str, list[int]], image_size: int, seed: int):
    """(split, labels, index, image) of the images of one to three shapes: as many as the one-shape set has."""
    for split in ("train", "val"):
        rng = random.Random(f"shapes-multilabel/{seed}/{split}")
        for i in range(sum(sizes[split])):
            image, labels = _scene(names, image_size, rng)
            yield split, labels, i, image


def _write(folder: Path, drawn, layout: str, names: list[str]) -> dict:
    """Save the ``drawn`` images under ``folder`` in ``layout`` (and the label file); count them per split and
    class."""
    counts = {"train": 0, "val": 0, "train_sizes": [0] * len(names), "val_sizes": [0] * len(names)}
    rows = []
    for split, labels, i, image in drawn:
        if layout == "folders":
            path = folder / split / labels[0] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            path = folder / "images" / f"{len(rows):05d}.png"
            path.parent.mkdir(exist_ok=True)
            rows.append((path.relative_to(folder).as_posix(), " ".join(labels), split))
        image.save(path)
        counts[split] += 1
        for label in labels:
            counts[f"{split}_sizes"][names.index(label)] += 1
    if rows:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerows([("path", "label", "split"), *rows])
        (folder / LABEL_FILE).write_text(text.getvalue(), encoding="utf-8")
    return counts
