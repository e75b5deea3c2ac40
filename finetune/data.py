"""ImageFolder trees: class discovery, train/val split, transforms and loaders."""

from __future__ import annotations

import itertools
import math
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config import Config, config_error
from finetune.errors import FinetuneError
from finetune.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (imported from here by export)
from finetune.images import ImageCheck, ImagePipeline, check_image, describe_error, to_upright_rgb


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


def train_transform(image_size: int, augment: bool, fast_decode: bool = True) -> ImagePipeline:
    """:func:`eval_transform`, or with ``augment`` a random resized crop and horizontal flip."""
    return ImagePipeline(image_size, augment=augment, fast_decode=fast_decode)


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
    train_tf = train_transform(config.data.image_size, config.data.augment, config.data.fast_decode)
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
        self.prefetch: Optional[_Prefetch] = None  # set while a loader's decode threads work ahead
        self._skipped: set[int] = set()

    def find_classes(self, directory):  # the train classes, so val labels mean the same thing
        return self._class_list, {name: i for i, name in enumerate(self._class_list)}

    def __getitem__(self, index: int):
        image = self.load(index)
        return None if image is None else (self.pipeline.finish(image), self.samples[index][1])

    def load(self, index: int) -> Optional[np.ndarray]:
        """Item ``index`` decoded: from the cache, from a decode thread, or decoded now; None when skipped."""
        if index in self._skipped:
            return None
        if self.cache is not None and (image := self.cache.get(index)) is not None:
            return image
        future = self.prefetch.take(index) if self.prefetch is not None else None
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


def default_workers() -> int:
    """Decode threads for ``data.workers: null``: one per core, at most 8.

    A decode thread runs only while the prefetch window has room, that is while decoding lags behind training;
    then the compute threads are waiting for the batch, and every core should be decoding.
    """
    return min(8, os.cpu_count() or 1)


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

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues a seed for every lazy accelerator module
            # (CUDA, XPU, MTIA), formatting a stack trace for each, about 1 ms an image.
            torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]


class Indexed(Dataset):
    """Items as (image, target, index), so batches can be matched with cached features."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return None if item is None else (*item, index)


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
    """The default collate, with image batches in channels-last memory format (what the fast path runs in).

    Items of None (unreadable images skipped by ``data.skip_bad_images``) are left out of the batch.
    """
    batch = [item for item in batch if item is not None]
    if not batch:
        raise skipped_batch_error()
    collated = default_collate(batch)
    images = collated[0]
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        collated[0] = images.contiguous(memory_format=torch.channels_last)
    return collated


def skipped_batch_error() -> FinetuneError:
    return FinetuneError("Every image of a batch was unreadable and skipped (data.skip_bad_images: true), so "
                         "there is nothing to train on in that step. Replace or delete the unreadable files (see "
                         "the warnings, or skipped_images in summary.json) and start the run again.")


def for_epoch(dataset: Dataset, epoch: int) -> Dataset:
    """``dataset`` as it samples in ``epoch``: a new view with that epoch's seeds; ``dataset`` is left as it is."""
    if isinstance(dataset, Indexed):
        return Indexed(for_epoch(dataset.dataset, epoch))
    if isinstance(dataset, SeededSamples):
        return SeededSamples(dataset.dataset, dataset.seed, epoch)
    return dataset


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                skip_batches: int = 0, workers: int = 0, rank: int = 0, world: int = 1,
                weights: Optional[torch.Tensor] = None):
    """A loader whose order is a function of (seed, epoch) only, so runs and resumes repeat exactly.

    ``workers``: over image files (:class:`ImageFiles`, also under a Subset or wrapper) that many decode threads
    work ahead of the main thread, which finishes each item (the seeded random transforms) and collates, so the
    batches are the same for any count; over other datasets, DataLoader worker processes.
    ``weights``: weighted sampling with replacement (see :func:`epoch_sampler`)."""
    dataset = for_epoch(dataset, epoch)
    sampler = epoch_sampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, skip=skip_batches * batch_size,
                            rank=rank, world=world, weights=weights)
    return _loader(dataset, workers, list(sampler), PREFETCH_BATCHES * batch_size, batch_size=batch_size,
                   sampler=sampler, drop_last=drops_last(len(dataset), batch_size, shuffle, world))


def batch_loader(dataset: Dataset, batches: list[list[int]], workers: int = 0):
    """A loader of exactly ``batches`` (lists of indices), in order, with :func:`make_loader`'s decode threads."""
    order = list(itertools.chain.from_iterable(batches))
    return _loader(dataset, workers, order, PREFETCH_BATCHES * max(map(len, batches), default=1),
                   batch_sampler=batches)


def _loader(dataset: Dataset, workers: int, order: list[int], ahead: int, **batching):
    files = image_files(dataset) if workers else None
    loader = DataLoader(dataset, num_workers=0 if files else workers, collate_fn=collate_channels_last, **batching)
    if files is None:
        return loader
    base, index = files
    return _PrefetchingLoader(loader, base, [index[i] for i in order], workers, ahead)


PREFETCH_BATCHES = 2  # how far decode threads work ahead of training


class _Prefetch:
    """Decode threads working through ``order`` (indices of ``files``) ahead of the main thread, at most ``ahead``
    images at a time; images the cache already holds are left to the main thread."""

    def __init__(self, files: ImageFiles, order: list[int], threads: int, ahead: int):
        self.files, self.order, self.ahead = files, iter(order), ahead
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="finetune-decode")
        self.pending: dict[int, Future] = {}
        self._top_up()

    def take(self, index: int) -> Optional[Future]:
        future = self.pending.pop(index, None)
        self._top_up()
        return future

    def _top_up(self) -> None:
        cache = self.files.cache
        while len(self.pending) < self.ahead:
            index = next(self.order, None)
            if index is None:
                return
            if index not in self.pending and not (cache is not None and cache.holds(index)):
                self.pending[index] = self.pool.submit(self.files.decode, index)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _PrefetchingLoader:
    """``loader`` (run in the main thread) with decode threads working ahead of it."""

    def __init__(self, loader: DataLoader, files: ImageFiles, order: list[int], threads: int, ahead: int):
        self.loader, self.files, self.order, self.threads, self.ahead = loader, files, order, threads, ahead

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        prefetch = _Prefetch(self.files, self.order, self.threads, self.ahead)
        self.files.prefetch = prefetch
        try:
            yield from self.loader
        finally:
            self.files.prefetch = None
            prefetch.close()


def steps_per_epoch(dataset: Dataset, batch_size: int, world: int = 1) -> int:
    """Training batches per epoch and process, as :func:`make_loader` yields them."""
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    return batches - drops_last(len(dataset), batch_size, shuffle=True, world=world)
