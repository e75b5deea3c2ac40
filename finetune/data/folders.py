"""ImageFolder trees: class discovery, the train/val split, unreadable images, and the dataset that decodes them."""

from __future__ import annotations

import random
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config.loading import config_error
from finetune.config.schema import Config, DataConfig
from finetune.data.images import (  # noqa: F401 (imported from here by export)
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageCheck,
    ImagePipeline,
    check_image,
    describe_error,
    to_upright_rgb,
)
from finetune.errors import FinetuneError
from finetune.utils.seeding import seeded


def train_folder(root: Path) -> Path:
    """``root/train`` for a split tree, else ``root`` itself (split by data.val_fraction)."""
    return root / "train" if (root / "train").is_dir() else root


def class_names(config: Config) -> list[str]:
    """Sorted class folder names under the training tree of ``data.root``, as ImageFolder sees them."""
    root = Path(config.data.root)
    if not root.is_dir():
        raise config_error(config, [("data.root", f"folder not found: {root}")])
    folder = train_folder(root)
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise config_error(config, [("data.root", f"{folder} has no class folders; expected "
                                     f"{folder}/<class>/<image> (torchvision ImageFolder layout)")])
    return names


def class_names_or_none(config: Config) -> Optional[list[str]]:
    return class_names(config) if config.data.root else None


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list[str]
    layout: str  # "train/val folders" or "split by data.val_fraction"
    # Unreadable image files left out (data.skip_bad_images: true), as paths; empty otherwise.
    bad_images: list[str] = field(default_factory=list)


def eval_transform(image_size: int, fast_decode: bool = True) -> ImagePipeline:
    """Resize + centre crop to ``image_size``, then normalise. Called on a PIL image it acts as a torchvision
    transform; :func:`load_image` and :class:`ImageFiles` also decode JPEGs at reduced scale (``fast_decode``)."""
    return ImagePipeline(image_size, augment=False, fast_decode=fast_decode)


def train_transform(data: DataConfig) -> ImagePipeline:
    """The training images' pipeline: :func:`eval_transform`, or the random transforms ``data`` asks for
    (``data.augment`` and its settings, ``data.random_erasing``)."""
    return ImagePipeline(data.image_size, augment=data.augment, fast_decode=data.fast_decode,
                         magnitude=data.magnitude, random_erasing=data.random_erasing, crop_scale=data.crop_scale,
                         hflip=data.hflip)


def ensure_demo_data(config: Config) -> Optional[dict]:
    """Generate the shapes demo set at data.root when data.demo is set and the folder is missing."""
    if config.data.demo != "shapes" or config.data.root is None or Path(config.data.root).exists():
        return None
    from finetune.data.demo import make_shapes

    return make_shapes(config.data.root)


def load_datasets(config: Config) -> Datasets:
    """The train and val sets of ``data.root``, with their transforms; class names from the folders."""
    classes = class_names(config)
    root = Path(config.data.root)
    train_tf = train_transform(config.data)
    val_tf = eval_transform(config.data.image_size, config.data.fast_decode)
    if (root / "train").is_dir():
        train = image_folder(config, root / "train", classes, train_tf)
        val_root = root / "val"
        if not val_root.is_dir():
            raise config_error(config, [("data.root", f"{root} has train/ but no val/ folder; add {val_root} "
                                         "or put the class folders directly under data.root")])
        extra = sorted({e.name for e in val_root.iterdir() if e.is_dir()} - set(classes))
        if extra:
            raise config_error(config, [("data.root", f"{val_root} has class folders not in train/: "
                                         f"{', '.join(extra)}; add them to train/ or remove them")])
        val = image_folder(config, val_root, classes, val_tf, allow_empty=True)
        bad = drop_bad_images(config, [train, val], train)
        return Datasets(train, val, classes, "train/val folders", bad)
    full_train = image_folder(config, root, classes, train_tf)
    full_val = image_folder(config, root, classes, val_tf)
    bad = drop_bad_images(config, [full_train, full_val], full_train)  # the same files: each is checked once
    train_idx, val_idx = stratified_split(full_train.targets, config.data.val_fraction, config.train.seed)
    return Datasets(Subset(full_train, train_idx), Subset(full_val, val_idx), classes, "split by data.val_fraction",
                    bad)


def image_samples(dataset: Dataset) -> list[tuple[str, int]]:
    """(image path, class index) of every item of an ImageFolder, a Subset of one, or a wrapper of either
    (anything with ``.dataset``), in item order."""
    if isinstance(dataset, Subset):
        inner = image_samples(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if hasattr(dataset, "samples"):
        return list(dataset.samples)
    return image_samples(dataset.dataset)


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
        n_val = min(max(1, round(len(indices) * val_fraction)), len(indices) - 1) if len(indices) > 1 else 0
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def image_folder(config: Config, folder: Path, classes: list[str], transform: ImagePipeline,
                 allow_empty: bool = False) -> "ImageFiles":
    """The images of ``folder``/<class>/*, labelled by their index in ``classes``, read through ``transform``."""
    try:
        return ImageFiles(folder, classes, transform, allow_empty=allow_empty,
                          skip_bad=config.data.skip_bad_images)
    except FileNotFoundError as exc:
        raise config_error(config, [("data.root", f"{exc}; every class folder under {folder} needs at least "
                                     f"one image ({', '.join(IMG_EXTENSIONS)})")]) from None


SKIP_HINT = "set data.skip_bad_images: true to train without unreadable images"
Decoded = Union[np.ndarray, str]  # a decoded image, or why the file cannot be read


class ImageFiles(ImageFolder):
    """An ImageFolder read through an :class:`ImagePipeline`: an item is decoded (a JPEG at reduced scale), kept
    in the image cache when one is attached (``imagecache``), then finished into the model's input.

    Decoding may happen ahead, in the decode threads of :func:`make_loader`. A file that passed the quick check
    (:func:`drop_bad_images`) but fails to decode is an error naming it, or with ``data.skip_bad_images`` an item
    of None, which the collate leaves out of its batch: the same in every epoch and in a resumed run.
    """

    def __init__(self, folder: Path, classes: list[str], pipeline: ImagePipeline, *, allow_empty: bool = False,
                 skip_bad: bool = False):
        self._class_list = classes
        super().__init__(str(folder), allow_empty=allow_empty)  # items come from __getitem__ below, not its loader
        self.pipeline, self.skip_bad = pipeline, skip_bad
        self.unreadable: list[str] = []  # paths skipped as unreadable: the list in Datasets.bad_images
        self.upright_sizes: dict[str, tuple[int, int]] = {}  # (width, height) by path, from the quick check
        self.cache = None  # an imagecache.ImageCache, attached by imagecache.plan_image_caches
        self.prefetch = None  # a loaders._Prefetch  # set while a loader's decode threads work ahead
        self._skipped: set[int] = set()

    def find_classes(self, directory):  # the train classes, so val labels mean the same thing
        return self._class_list, {name: i for i, name in enumerate(self._class_list)}

    def __getitem__(self, index: int):
        return self.item(index)

    def item(self, index: int, seed: Optional[int] = None):
        """(model input, target) of item ``index``, or None when it is skipped as unreadable.

        With a ``seed`` the pipeline's random transforms draw under it (``utils.seeding.seeded``), in the decode
        thread that prepared the item or here; without one they draw from torch's generator as it stands.
        """
        if index in self._skipped:
            return None
        future = self.prefetch.take(index) if self.prefetch is not None else None
        if seed is not None:
            finished = future.result() if future is not None else self.finished(index, seed)
            return self._unreadable(index, finished) if isinstance(finished, str) else (finished,
                                                                                         self.samples[index][1])
        image = self.load(index, future)
        return None if image is None else (self.pipeline.finish(image), self.samples[index][1])

    def load(self, index: int, future: Optional[Future] = None) -> Optional[np.ndarray]:
        """Item ``index`` decoded: from the cache, from a decode thread's ``future``, or decoded now; None when
        skipped."""
        if index in self._skipped:
            return None
        if self.cache is not None and (image := self.cache.get(index)) is not None:
            return image
        decoded = future.result() if future is not None else self.decode(index)
        return self._unreadable(index, decoded) if isinstance(decoded, str) else decoded

    def decode(self, index: int) -> Decoded:
        """Decode item ``index`` and keep it in the cache, if any; runs in decode threads."""
        try:
            image = self.pipeline.decode(self.samples[index][0])
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            return describe_error(exc)
        if self.cache is not None:
            self.cache.put(index, image)
        return image

    def finished(self, index: int, seed: int) -> Union[torch.Tensor, str]:
        """Item ``index`` decoded (or taken from the cache: never augmented pixels) and finished under ``seed``;
        why it cannot be read instead. Runs in decode threads."""
        image = self.cache.get(index) if self.cache is not None else None
        if image is None:
            image = self.decode(index)
            if isinstance(image, str):
                return image
        with seeded(seed):
            return self.pipeline.finish(image)

    def _unreadable(self, index: int, why: str) -> None:
        path = self.samples[index][0]
        if not self.skip_bad:
            raise _read_error(path, why, SKIP_HINT)
        self._skipped.add(index)
        if path not in self.unreadable:
            self.unreadable.append(path)


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


def drop_bad_images(config: Config, folders: list, train=None) -> list[str]:
    """Check that every image file of the ImageFolder ``folders`` can be read, each file once.

    Unreadable files are an error naming them, or with ``data.skip_bad_images: true`` are dropped from every
    folder and returned (sorted paths) so that they can be reported. A class of ``train`` left without images
    is an error either way.
    """
    checked: dict[str, ImageCheck] = {}
    for folder in folders:
        for path, _ in folder.samples:
            if path not in checked:
                checked[path] = check_image(path)
    bad = {path: check.problem for path, check in sorted(checked.items()) if check.problem}
    skipped = list(bad)  # one list, shared: files found unreadable later, when decoded, join it
    sizes = {path: check.size for path, check in checked.items() if check.size}
    for folder in folders:
        folder.unreadable, folder.upright_sizes = skipped, sizes
    if not bad:
        return skipped
    if not config.data.skip_bad_images:
        shown = "".join(f"\n    {path}: {why}" for path, why in list(bad.items())[:5])
        more = f"\n    ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise config_error(config, [("data.root", f"{len(bad)} image file{'s' if len(bad) > 1 else ''} cannot be "
                                     f"read (corrupt or truncated):{shown}{more}\n"
                                     f"  Replace or delete {'them' if len(bad) > 1 else 'it'}, or {SKIP_HINT}.")])
    for folder in folders:
        folder.samples = folder.imgs = [(path, target) for path, target in folder.samples if path not in bad]
        folder.targets = [target for _, target in folder.samples]
    if train is not None:
        left = set(train.targets)
        empty = [name for i, name in enumerate(train.classes) if i not in left]
        if empty:
            raise config_error(config, [("data.root", f"no readable image left in class folder(s) "
                                         f"{', '.join(empty)} of {train.root} after skipping {len(bad)} unreadable "
                                         "image(s); add readable images to them")])
    return skipped
