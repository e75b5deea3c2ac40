"""ImageFolder trees: class discovery and the layout's problems, the train/val split, unreadable images, and the
dataset that decodes them. A label file (``data.labels``, read by :mod:`finetune.data.labels`) gives the very same
datasets for the same images."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from finetune.config.loading import config_error, raise_problems
from finetune.config.schema import Config
from finetune.data import labels
from finetune.data.demo import demo_classes, make_shapes
from finetune.data.images import (
    ImageCheck,
    ImagePipeline,
    check_image,
    describe_error,
    to_upright_rgb,
)
from finetune.errors import FinetuneError, Problem
from finetune.utils.seeding import seeded


def train_folder(root: Path) -> Path:
    """``root/train`` for a split tree, else ``root`` itself (split by data.val_fraction)."""
    return root / "train" if (root / "train").is_dir() else root


def demo_due(config: Config) -> bool:
    """Whether a demo set (``data.demo``) is still to be generated at ``data.root``."""
    return config.data.demo is not None and config.data.root is not None and not Path(config.data.root).exists()


def class_names(config: Config) -> list[str]:
    """The classes in the order of the model's outputs: the sorted class folder names under the training tree of
    ``data.root``, as ImageFolder sees them, or ``data.classes``; with a label file (``data.labels``), its
    labels (:func:`finetune.data.labels.label_classes`)."""
    if config.data.labels:
        return labels.label_classes(config)
    raise_problems(config, _root_problems(config))
    return config.data.classes or _class_folders(train_folder(Path(config.data.root)))


def data_classes(config: Config) -> Optional[list[str]]:
    """The classes training will see, from a config without :func:`problems`: the demo set's when it is still to be
    generated, else ``data.root``'s class folders; None when ``data.root`` is not set."""
    if config.data.root is None:
        return None
    return sorted(demo_classes()) if demo_due(config) else class_names(config)


def problems(config: Config) -> list[Problem]:
    """``data.root`` and its layout: the folder, its class folders, ``val/`` beside ``train/`` with no class of its
    own, and at least one image in every training class folder; or those of the label file (``data.labels``).
    None for a demo set still to be generated."""
    if config.data.root is None or demo_due(config):
        return []
    if config.data.labels:
        return labels.problems(config)
    found = _root_problems(config)
    if found:
        return found
    root = Path(config.data.root)
    folder = train_folder(root)
    classes = _class_folders(folder)
    if folder != root:
        val_root = root / "val"
        if not val_root.is_dir():
            found.append(Problem("data.root", f"{root} has train/ but no val/ folder; add {val_root} or put the "
                                              "class folders directly under data.root"))
        elif extra := sorted({e.name for e in val_root.iterdir() if e.is_dir()} - set(classes)):
            found.append(Problem("data.root", f"{val_root} has class folders not in train/: {', '.join(extra)}; "
                                              "add them to train/ or remove them"))
    empty = [name for name in classes if not _holds_an_image(folder / name)]
    if empty:
        found.append(Problem("data.root", f"no image in class folder(s) {', '.join(empty)} of {folder}; every class "
                                          f"folder needs at least one image ({', '.join(IMG_EXTENSIONS)})"))
    return found


def _root_problems(config: Config) -> list[Problem]:
    root = Path(config.data.root)
    if not root.is_dir():
        return [Problem("data.root", f"folder not found: {root}")]
    folder = train_folder(root)
    names = _class_folders(folder)
    if not names:
        return [Problem("data.root", f"{folder} has no class folders; expected {folder}/<class>/<image> "
                                     "(torchvision ImageFolder layout)")]
    return _order_problems(config, names, folder)


def _order_problems(config: Config, names: list[str], folder: Path) -> list[Problem]:
    """``data.classes``, when set, must name the class folders ``names`` of ``folder``, each once."""
    wanted = config.data.classes
    if wanted is None:
        return []
    missing, extra = sorted(set(names) - set(wanted)), sorted(set(wanted) - set(names))
    if not missing and not extra:
        return []
    found = ([f"lacks {', '.join(missing)} (class folders of {folder})"] if missing else []) + \
        ([f"names {', '.join(extra)}, which {folder} has no folder for"] if extra else [])
    return [Problem("data.classes", "; ".join(found) + "; list every class once, or leave data.classes out for "
                                                       "the sorted folder names")]


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _holds_an_image(folder: Path) -> bool:
    """Whether ``folder`` (or a folder below it) holds a file with an image extension; stops at the first."""
    return any(has_file_allowed_extension(name, IMG_EXTENSIONS)
               for _, _, names in os.walk(folder, followlinks=True) for name in names)


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list[str]
    layout: str  # "train/val folders" or "split by data.val_fraction"
    # Unreadable image files left out when the data were loaded (data.skip_bad_images: true), as sorted paths.
    bad_images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about the data, for the log (e.g. from a label file)

    def unreadable(self) -> list[str]:
        """Every unreadable image left out so far: :attr:`bad_images`, then those that passed the quick check but
        failed to decode during the run, in the order found."""
        found = [path for split in (self.train, self.val) if (files := image_files(split))
                 for path in files[0].found_unreadable()]
        return self.bad_images + [path for path in dict.fromkeys(found) if path not in self.bad_images]


def eval_transform(data, view: Optional[int] = None) -> ImagePipeline:
    """Resize + centre crop as the config's ``data`` section says, then normalise. Called on a PIL image it acts as
    a torchvision transform; :func:`load_image` and :class:`ImageFiles` also decode JPEGs at reduced scale
    (``data.fast_decode``). ``view``: a larger centre crop (and resize, in proportion) to cut test-time views from."""
    pipeline = ImagePipeline.of(data)
    if view is None or view == data.image_size:
        return pipeline
    return replace(pipeline, image_size=view, resize_size=round(pipeline.resize_side * view / data.image_size))


def train_transform(data) -> ImagePipeline:
    """The training images' pipeline: :func:`eval_transform`, or the random transforms ``data`` asks for
    (``data.augment`` and its settings, ``data.random_erasing``)."""
    return ImagePipeline.of(data, train=True)


def ensure_demo_data(config: Config) -> Optional[dict]:
    """Generate the demo set at data.root when data.demo is set and the folder is missing (shapes-multilabel: with
    its label file, labels.csv)."""
    if not demo_due(config):
        return None
    multilabel = config.data.demo == "shapes-multilabel"
    return make_shapes(config.data.root, layout="csv" if multilabel else "folders", multilabel=multilabel)


@dataclass
class _Listing:
    """The training images of a tree or a label file, before their files are checked."""
    train: list[tuple]  # (path, target)
    val: Optional[list[tuple]]  # None: the train images are split by data.val_fraction
    train_root: Path
    val_root: Path
    layout: str  # for the log: where the split comes from
    notes: list[str] = field(default_factory=list)


def load_datasets(config: Config) -> Datasets:
    """The train and val sets of ``data.root`` (or of the label file ``data.labels``), with their transforms.

    Raises FinetuneError for the :func:`problems` of the layout or the label file, and for unreadable files (see
    :func:`check_files`).
    """
    listing, classes = _label_listing(config) if config.data.labels else _tree_listing(config)
    train_tf = train_transform(config.data)
    val_tf = eval_transform(config.data)
    split = listing.val is None  # one set, split by data.val_fraction: its files are read twice
    val_samples = listing.train if split else listing.val
    checked = check_files(config, listing.train + ([] if split else val_samples))  # each file once
    train = checked.files(config, listing.train_root, classes, listing.train, train_tf)
    val = checked.files(config, listing.val_root, classes, val_samples, val_tf)
    _check_classes_left(config, train, len(checked.unreadable))
    if not split:
        return Datasets(train, val, classes, listing.layout, list(checked.unreadable), listing.notes)
    train_idx, val_idx = stratified_split(labels.strata(train.targets), config.data.val_fraction, config.train.seed)
    return Datasets(Subset(train, train_idx), Subset(val, val_idx), classes, listing.layout,
                    list(checked.unreadable), listing.notes)


def _tree_listing(config: Config) -> tuple[_Listing, list[str]]:
    raise_problems(config, problems(config))
    classes = class_names(config)
    root = Path(config.data.root)
    if train_folder(root) == root:
        return _Listing(scan(root, classes), None, root, root, "split by data.val_fraction"), classes
    return _Listing(scan(root / "train", classes), scan(root / "val", classes), root / "train", root / "val",
                    "train/val folders"), classes


def _label_listing(config: Config) -> tuple[_Listing, list[str]]:
    table, classes = labels.read_checked(config)
    train, val = labels.training_samples(config, table, classes)
    how = "split by data.val_fraction" if val is None else "split column"
    root = Path(config.data.root)
    listing = _Listing(train, val, root, root, f"label file {table.file.name}, {how}", labels.notes(config, table))
    return listing, classes


def load_test_set(config: Config, classes: list[str]) -> "ImageFiles":
    """The run's test images, labelled by ``classes``: data.root/test/<class>/*, or the label file's rows of split
    test."""
    if config.data.labels:
        return labelled_files(config, classes, Path(config.data.root), labels.split_samples(config, classes, "test"))
    folder = Path(config.data.root) / "test"
    if not folder.is_dir():
        raise FinetuneError(f"There is no test split: {folder} is not a folder. Put test images in "
                            f"{folder}/<class>/, or give a folder or label file with --data.")
    return labelled_folder(config, folder, classes)


def labelled_folder(config: Config, folder: Path, classes: list[str]) -> "ImageFiles":
    """Every image of ``folder``/<class>/* for evaluation, labelled by ``classes`` (a trained model's)."""
    if not folder.is_dir():
        raise FinetuneError(f"Folder not found: {folder}")
    found = set(_class_folders(folder))
    if not found:
        raise FinetuneError(f"{folder} has no class folders; expected {folder}/<class>/<image> (torchvision "
                            "ImageFolder layout), or a label file.")
    unknown = sorted(found - set(classes))
    if unknown:
        raise FinetuneError(f"{folder} has classes the checkpoint does not know: {', '.join(unknown)} "
                            f"(it knows {', '.join(classes)}).")
    return labelled_files(config, classes, folder, scan(folder, classes))


def labelled_files(config: Config, classes: list[str], root: Path, samples: list[tuple]) -> "ImageFiles":
    """``samples`` (path, target) for evaluation, read as the validation images are; unreadable images are an
    error naming them, or left out with ``data.skip_bad_images``."""
    pipeline = eval_transform(config.data)
    return check_files(config, samples).files(config, root, classes, samples, pipeline)


def image_samples(dataset: Dataset) -> list[tuple]:
    """(image path, class index or multi-hot row) of every item of an ImageFolder, a Subset of one, or a wrapper of
    either (anything with ``.dataset``), in item order."""
    if isinstance(dataset, Subset):
        inner = image_samples(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if hasattr(dataset, "samples"):
        return list(dataset.samples)
    return image_samples(dataset.dataset)


def spread_indices(total: int, count: int) -> list[int]:
    """Up to ``count`` indices evenly spread over ``range(total)``, first and last included: over a folder's images
    (sorted by class) every class gets its share."""
    count = min(count, total)
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})


def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out ``val_fraction`` of each class (at least one image when a class has two or more)."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(seed)
    train, val = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        n_val = _held_out(len(indices), val_fraction)
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def _held_out(images: int, val_fraction: float) -> int:
    """How many of a class's ``images`` :func:`stratified_split` holds out."""
    return min(max(1, round(images * val_fraction)), images - 1) if images > 1 else 0


def val_images(config: Config) -> int:
    """How many image files the validation split of ``data.root`` will hold, from the folder listings alone (an
    unreadable file counts: it is found only when read). ``data.root`` must be free of :func:`problems`."""
    root = Path(config.data.root)
    classes = class_names(config)
    if train_folder(root) != root:
        return len(scan(root / "val", classes))
    per_class = Counter(target for _, target in scan(root, classes))
    return sum(_held_out(images, config.data.val_fraction) for images in per_class.values())


def scan(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class index) of every image file in ``folder``/<class>/ (and below), sorted as ImageFolder sorts
    them; a class folder that is missing or empty gives none."""
    return make_dataset(str(folder), {name: i for i, name in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                        allow_empty=True)


SKIP_HINT = "set data.skip_bad_images: true to train without unreadable images"
Decoded = Union[np.ndarray, str]  # a decoded image, or why the file cannot be read


@dataclass(frozen=True)
class Checked:
    """The quick check of a set of image files (:func:`check_files`)."""
    unreadable: dict[str, str]  # path -> why, sorted by path; empty unless data.skip_bad_images
    sizes: dict[str, tuple[int, int]]  # upright (width, height) by path, of the readable files

    def files(self, config: Config, folder: Path, classes: list[str], samples: list[tuple[str, int]],
              pipeline: ImagePipeline) -> "ImageFiles":
        """The readable ``samples`` as :class:`ImageFiles` read through ``pipeline``."""
        return ImageFiles(folder, classes, [s for s in samples if s[0] not in self.unreadable], pipeline,
                          sizes=self.sizes, skip_bad=config.data.skip_bad_images)


def check_files(config: Config, samples: list[tuple[str, int]]) -> Checked:
    """Check that every image file of ``samples`` can be read (:func:`check_image`), each file once.

    Unreadable files are an error naming them, or with ``data.skip_bad_images: true`` are returned to be left out.
    """
    checked: dict[str, ImageCheck] = {}
    for path, _ in samples:
        if path not in checked:
            checked[path] = check_image(path)
    bad = {path: check.problem for path, check in sorted(checked.items()) if check.problem}
    if bad and not config.data.skip_bad_images:
        shown = "".join(f"\n    {path}: {why}" for path, why in list(bad.items())[:5])
        more = f"\n    ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise config_error(config, [Problem("data.root", f"{len(bad)} image file{'s' if len(bad) > 1 else ''} "
                                                         f"cannot be read (corrupt or truncated):{shown}{more}\n"
                                                         f"  Replace or delete {'them' if len(bad) > 1 else 'it'}, "
                                                         f"or {SKIP_HINT}.")])
    return Checked(bad, {path: check.size for path, check in checked.items() if check.size})


def present_classes(targets: list) -> set[int]:
    """The class indices that some target holds: class indices, or multi-hot rows (multi-label)."""
    if targets and isinstance(targets[0], torch.Tensor):
        return set(torch.stack(targets).nonzero()[:, 1].tolist())
    return set(targets)


def _check_classes_left(config: Config, train: "ImageFiles", skipped: int) -> None:
    """A class of ``train`` left without images by skipping unreadable ones is an error."""
    left = present_classes(train.targets)
    empty = [name for i, name in enumerate(train.classes) if i not in left]
    if empty:
        raise config_error(config, [Problem("data.root", f"no readable image left in class folder(s) "
                                                         f"{', '.join(empty)} of {train.root} after skipping "
                                                         f"{skipped} unreadable image(s); add readable images to "
                                                         "them")])


class ImageFiles(Dataset):
    """Image files with their class indices (multi-label: multi-hot rows), read through an :class:`ImagePipeline`:
    an item is decoded (a JPEG at reduced scale), then finished into the model's input.

    A loader may pass an image cache (``imagecache``) and decode threads working ahead (``loaders``) to
    :meth:`read`. A file that passed the quick check (:func:`check_files`) but fails to decode is an error naming
    it, or with ``data.skip_bad_images`` an item of None, which the collate leaves out of its batch: the same in
    every epoch and in a resumed run.
    """

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]], pipeline: ImagePipeline, *,
                 sizes: Optional[dict[str, tuple[int, int]]] = None, skip_bad: bool = False):
        self.root, self.classes, self.samples = Path(root), list(classes), list(samples)
        self.targets = [target for _, target in self.samples]
        self.pipeline, self.skip_bad = pipeline, skip_bad
        self.upright_sizes = sizes or {}  # (width, height) by path, from the quick check
        self._unreadable: dict[int, str] = {}  # items found unreadable while decoding: index -> path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.read(index)

    def read(self, index: int, cache=None, ahead=None, seed: Optional[int] = None):
        """Item ``index`` as (model input, class index), or None when it is skipped as unreadable.

        ``cache``: an ``imagecache.ImageCache`` that may hold the decoded image (and keeps it once decoded);
        ``ahead``: decode threads working ahead (their ``take(index)`` gives the decoding's future, if any).
        ``seed``: the pipeline's random transforms draw under it (``utils.seeding.seeded``), in the decode thread
        that prepared the item (:meth:`finished`) or here; without one they draw from torch's generator as it is.
        """
        if seed is None:
            image = self.load(index, cache, ahead)
            return None if image is None else (self.pipeline.finish(image), self.targets[index])
        if index in self._unreadable:
            return None
        future = ahead.take(index) if ahead is not None else None
        finished = future.result() if future is not None else self.finished(index, seed, cache)
        return self._skip(index, finished) if isinstance(finished, str) else (finished, self.targets[index])

    def load(self, index: int, cache=None, ahead=None) -> Optional[np.ndarray]:
        """Item ``index`` decoded: from ``cache``, from a decode thread, or decoded now; None when skipped."""
        if index in self._unreadable:
            return None
        if cache is not None and (image := cache.get(index)) is not None:
            return image
        future = ahead.take(index) if ahead is not None else None
        decoded = future.result() if future is not None else self.decode(index, cache)
        return self._skip(index, decoded) if isinstance(decoded, str) else decoded

    def decode(self, index: int, cache=None) -> Decoded:
        """Decode item ``index`` (and keep it in ``cache``, if given); runs in decode threads."""
        try:
            image = self.pipeline.decode(self.samples[index][0])
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            return describe_error(exc)
        if cache is not None:
            cache.put(index, image)
        return image

    def finished(self, index: int, seed: int, cache=None) -> Union[torch.Tensor, str]:
        """Item ``index`` decoded (or taken from ``cache``: never augmented pixels) and finished under ``seed``;
        why it cannot be read instead. Runs in decode threads."""
        image = cache.get(index) if cache is not None else None
        if image is None:
            image = self.decode(index, cache)
            if isinstance(image, str):
                return image
        with seeded(seed):
            return self.pipeline.finish(image)

    def found_unreadable(self) -> list[str]:
        """The files that passed the quick check but failed to decode (left out, data.skip_bad_images), in the
        order found."""
        return list(dict.fromkeys(self._unreadable.values()))

    def _skip(self, index: int, why: str) -> None:
        path = self.samples[index][0]
        if not self.skip_bad:
            raise _read_error(path, why, SKIP_HINT)
        self._unreadable[index] = path


def image_files(dataset: Dataset) -> Optional[tuple[ImageFiles, list[int]]]:
    """The :class:`ImageFiles` under ``dataset`` (through Subset and wrappers with ``.dataset``) and, for each
    item of ``dataset``, its index there; None when there is none."""
    if isinstance(dataset, ImageFiles):
        return dataset, list(range(len(dataset)))
    inner = getattr(dataset, "dataset", None)
    found = image_files(inner) if isinstance(inner, Dataset) else None
    if found is not None and isinstance(dataset, Subset):
        return found[0], [found[1][i] for i in dataset.indices]
    return found


def read_image(path: str, hint: str = SKIP_HINT) -> Image.Image:
    """The image file at ``path`` as an RGB PIL image, upright as its EXIF orientation says, with an error naming
    the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return to_upright_rgb(Image.open(f))
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise _read_error(path, describe_error(exc), hint) from None


def load_image(path: str, transform: ImagePipeline, hint: str = SKIP_HINT) -> torch.Tensor:
    """The model's input for the image file at ``path``: :func:`read_image` then ``transform``, but a JPEG is
    decoded at the reduced scale the transform allows (``predict``)."""
    try:
        image = transform.decode(path)
    except Exception as exc:
        raise _read_error(path, describe_error(exc), hint) from None
    return transform.finish(image)


def _read_error(path: str, why: str, hint: str) -> FinetuneError:
    fix = f"Replace or delete it, or {hint}." if hint else "Replace or delete it."
    return FinetuneError(f"Cannot read image {path}: {why}.\n{fix}")
