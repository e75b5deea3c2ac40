"""ImageFolder trees: class discovery, train/val split, transforms and loaders."""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, default_collate
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config import Config, config_error
from finetune.errors import FinetuneError


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


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation torchvision's ResNet-18 weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list[str]
    layout: str  # "train/val folders" or "split by data.val_fraction"
    # Unreadable image files left out (data.skip_bad_images: true), as paths; empty otherwise.
    bad_images: list[str] = field(default_factory=list)


def eval_transform(image_size: int):
    return transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(image_size: int, augment: bool):
    if not augment:
        return eval_transform(image_size)
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def ensure_demo_data(config: Config) -> Optional[dict]:
    """Generate the shapes demo set at data.root when data.demo is set and the folder is missing."""
    if config.data.demo != "shapes" or config.data.root is None or Path(config.data.root).exists():
        return None
    from finetune.demo import make_shapes

    return make_shapes(config.data.root)


def load_datasets(config: Config) -> Datasets:
    """The train and val sets of ``data.root``, with their transforms; class names from the folders."""
    classes = class_names(config)
    root = Path(config.data.root)
    train_tf = train_transform(config.data.image_size, config.data.augment)
    val_tf = eval_transform(config.data.image_size)
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


def image_folder(config: Config, folder: Path, classes: list[str], transform, allow_empty: bool = False):
    class _Folder(ImageFolder):
        def find_classes(self, directory):  # the train classes, so val labels mean the same thing
            return classes, {name: i for i, name in enumerate(classes)}

    try:
        return _Folder(str(folder), transform=transform, loader=read_image, allow_empty=allow_empty)
    except FileNotFoundError as exc:
        raise config_error(config, [("data.root", f"{exc}; every class folder under {folder} needs at least "
                                     f"one image ({', '.join(IMG_EXTENSIONS)})")]) from None


SKIP_HINT = "set data.skip_bad_images: true to train without unreadable images"


def read_image(path: str, hint: str = SKIP_HINT) -> Image.Image:
    """ImageFolder's loader (an RGB PIL image), with an error naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        fix = f"Replace or delete it, or {hint}." if hint else "Replace or delete it."
        raise FinetuneError(f"Cannot read image {path}: {_reason(exc)}.\n{fix}") from None


def unreadable(path: str) -> Optional[str]:
    """Why the image file at ``path`` cannot be read, or None when it can.

    A PNG is checked with ``verify()``: every chunk's checksum, to the end of the file, without decoding the
    pixels. Other formats are decoded; a JPEG at reduced scale (``draft``), which still reads all its data.
    """
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.draft("RGB", (64, 64))
                image.load()
    except Exception as exc:
        return _reason(exc)
    return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def drop_bad_images(config: Config, folders: list, train=None) -> list[str]:
    """Check that every image file of the ImageFolder ``folders`` can be read, each file once.

    Unreadable files are an error naming them, or with ``data.skip_bad_images: true`` are dropped from every
    folder and returned (sorted paths) so that they can be reported. A class of ``train`` left without images
    is an error either way.
    """
    checked: dict[str, Optional[str]] = {}
    for folder in folders:
        for path, _ in folder.samples:
            if path not in checked:
                checked[path] = unreadable(path)
    bad = {path: why for path, why in sorted(checked.items()) if why}
    if not bad:
        return []
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
    return list(bad)


def default_workers() -> int:
    # On a small machine the compute threads need every core: load in the main process.
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


class _SkipSampler(Sampler):
    """The wrapped sampler's indices, less the first ``skip`` (to resume inside an epoch)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class SeededSamples(Dataset):
    """Random transforms seeded by (seed, epoch, index): the same sample gets the same augmentation
    whatever the worker count or where a resumed run starts."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]


class Indexed(Dataset):
    """Items as (image, target, index), so batches can be matched with cached features."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        return image, target, index


class _WeightedSampler(Sampler):
    """``len(weights)`` draws with replacement, each index with probability proportional to its weight, seeded by
    (seed, epoch); sharded as DistributedSampler shards: process ``rank`` takes draws rank, rank + world, ..."""

    def __init__(self, weights: torch.Tensor, seed: int, epoch: int, rank: int, world: int):
        self.weights, self.seed, self.epoch, self.rank, self.world = weights, seed, epoch, rank, world
        self.per_rank = math.ceil(len(weights) / world)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # no two (seed, epoch) alike
        draws = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=generator)
        return iter(draws[self.rank::self.world].tolist())

    def __len__(self):
        return self.per_rank


def epoch_sampler(size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, skip: int = 0, rank: int = 0,
                  world: int = 1, weights: Optional[torch.Tensor] = None) -> Sampler:
    """Sample indices for one epoch, a function of (seed, epoch) only, less the first ``skip``.

    The shuffle comes from DistributedSampler (one replica when not distributed). With ``weights`` (one per
    index, e.g. from ``imbalance.sampling_weights``) the epoch is instead ``size`` weighted draws with
    replacement, as many per process as the shuffle gives.
    """
    if weights is not None:
        return _SkipSampler(_WeightedSampler(weights, seed, epoch, rank, world), skip)
    sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return _SkipSampler(sampler, skip)


def drops_last(size: int, batch_size: int, shuffle: bool, world: int = 1) -> bool:
    # A trailing training batch of one sample would break BatchNorm layers in train mode.
    per_rank = math.ceil(size / world)
    return shuffle and per_rank % batch_size == 1 and per_rank > 1


def collate_channels_last(batch):
    """The default collate, with image batches in channels-last memory format (what the fast path runs in)."""
    collated = default_collate(batch)
    images = collated[0]
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        collated[0] = images.contiguous(memory_format=torch.channels_last)
    return collated


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                skip_batches: int = 0, workers: int = 0, rank: int = 0, world: int = 1,
                weights: Optional[torch.Tensor] = None) -> DataLoader:
    """A loader whose order is a function of (seed, epoch) only, so runs and resumes repeat exactly.

    ``weights``: weighted sampling with replacement (see :func:`epoch_sampler`)."""
    inner = dataset.dataset if isinstance(dataset, Indexed) else dataset
    if isinstance(inner, SeededSamples):
        inner.epoch = epoch
    sampler = epoch_sampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, skip=skip_batches * batch_size,
                            rank=rank, world=world, weights=weights)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drops_last(len(dataset), batch_size, shuffle, world), collate_fn=collate_channels_last)


def steps_per_epoch(dataset: Dataset, batch_size: int, world: int = 1) -> int:
    """Training batches per epoch and process, as :func:`make_loader` yields them."""
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    return batches - drops_last(len(dataset), batch_size, shuffle=True, world=world)
