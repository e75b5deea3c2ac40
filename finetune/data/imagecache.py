"""The image cache: every image kept as uint8 once decoded, so that no image is decoded twice.

It holds what ``ImagePipeline.decode`` gives: the crop itself without augmentation, the image with room for the
random crop with it. That is a fixed function of the file, so a cache filled in any order, by any decode thread,
in a resumed run or not, holds the same bytes, and a run with it is bit-identical to one without; a resumed run
simply fills it again.

Each data set's images lie back to back. The first ``train.cache_max_gb`` of them (train first, then val) stay in
memory, the rest go to a file in the run directory, deleted when the run ends. The file is read and written with
positioned I/O (``pread``/``pwrite``) rather than memory-mapped: its pages then live in the kernel's page cache,
which the kernel reclaims as it needs, and never count in the process's RSS, so the process stays within the
budget whatever the size of the data set.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional

import numpy as np

from finetune.config.schema import Config
from finetune.data.folders import Datasets, ImageFiles, image_files
from finetune.data.images import check_image
from finetune.errors import FinetuneError

ON_DISK_NAME = "image-cache-{split}.bin"
DISK_HEADROOM = 2**30  # data.cache_images: auto spills to disk only when this much stays free afterwards


class ImageCache:
    """Decoded images (uint8 arrays of known shapes) by index: in memory up to ``memory_bytes``, then in a file
    at ``path``. ``put`` and ``get`` may run in several threads at once (never for the same index)."""

    def __init__(self, shapes: dict[int, tuple[int, int, int]], memory_bytes: int, path: Path):
        self.shapes, self.path = shapes, path
        self.slots: dict[int, tuple[bool, int]] = {}  # index -> (in memory?, byte offset there)
        in_memory = on_disk = 0
        for index in sorted(shapes):
            size = math.prod(shapes[index])
            if not on_disk and in_memory + size <= memory_bytes:
                self.slots[index], in_memory = (True, in_memory), in_memory + size
            else:
                self.slots[index], on_disk = (False, on_disk), on_disk + size
        self.memory = np.empty(in_memory, np.uint8)  # untouched pages cost no memory: it grows as it fills
        self.disk_bytes = on_disk
        self.fd = _create_file(path, on_disk) if on_disk else None
        self.filled: set[int] = set()

    @property
    def memory_bytes(self) -> int:
        return self.memory.nbytes

    def holds(self, index: int) -> bool:
        return index in self.filled

    def get(self, index: int) -> Optional[np.ndarray]:
        """The image stored for ``index`` (a view of the memory buffer, or read from the file), or None."""
        if index not in self.filled:
            return None
        in_memory, offset = self.slots[index]
        shape = self.shapes[index]
        if in_memory:
            return self.memory[offset:offset + math.prod(shape)].reshape(shape)
        image = np.empty(shape, np.uint8)
        if os.preadv(self.fd, [image], offset) != image.nbytes:
            raise FinetuneError(f"The image cache file {self.path} was cut short while the run used it; "
                                "it must not be touched during a run. Resume with --resume.")
        return image

    def put(self, index: int, image: np.ndarray) -> None:
        """Store ``image`` for ``index``; an index without a slot, or an image of another shape, is not stored."""
        if index not in self.slots or image.shape != self.shapes[index]:
            return
        in_memory, offset = self.slots[index]
        if in_memory:
            self.memory[offset:offset + image.size] = image.reshape(-1)
        else:
            _write(self.fd, image, offset, self.path)
        self.filled.add(index)

    def close(self) -> None:
        self.memory = np.empty(0, np.uint8)
        self.filled.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.path.unlink(missing_ok=True)


def _create_file(path: Path, size: int) -> int:
    """Open ``path`` for the cache and reserve ``size`` bytes on its disk now, so a full disk shows at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise _disk_error(path, exc, size) from None
    return fd


def _write(fd: int, image: np.ndarray, offset: int, path: Path) -> None:
    data = memoryview(np.ascontiguousarray(image)).cast("B")
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    except OSError as exc:
        raise _disk_error(path, exc, len(data)) from None


def _disk_error(path: Path, exc: OSError, size: int) -> FinetuneError:
    return FinetuneError(
        f"Cannot write the image cache file {path} ({_mib(size)} to go): {exc.strerror or exc}.\n"
        "Free space on that disk, put the run directory on a larger one (--output-dir), keep more of the cache "
        "in memory (raise train.cache_max_gb), or turn the cache off (--set data.cache_images=off).")


@dataclass
class ImageCaches:
    """The image caches of one run, by split ("train", "val"), and why they are on or off. A loader reads a
    split's images through its cache (``make_loader(..., cache=caches.get(split))``)."""

    why: str  # for the log, e.g. "on (...)" or "off (...)"
    by_split: dict[str, ImageCache] = field(default_factory=dict)

    def get(self, split: str) -> Optional[ImageCache]:
        return self.by_split.get(split)

    def describe(self) -> str:
        """How full the caches are, e.g. ``120 images, 17.2 MiB in memory, 0.0 MiB on disk``."""
        caches = self.by_split.values()
        held = sum(len(cache.filled) for cache in caches)
        memory = sum(cache.memory_bytes for cache in caches)
        disk = sum(cache.disk_bytes for cache in caches)
        return f"{held} images held, {_mib(memory)} in memory, {_mib(disk)} on disk"

    def close(self) -> None:
        """Free the caches' memory and delete their files."""
        for cache in self.by_split.values():
            cache.close()
        self.by_split.clear()


def plan_image_caches(config: Config, data: Datasets, *, feature_cached: Collection[str], epochs_left: int,
                      folder: Path, suffix: str = "") -> ImageCaches:
    """Image caches for ``data``'s train and val images as ``data.cache_images`` says.

    ``auto`` caches when images are read in more than one of the ``epochs_left`` (the feature cache, for the
    splits in ``feature_cached`` when no freeze stage replaces it, serves later epochs instead) and the images
    fit in ``train.cache_max_gb`` or, beyond it, on the run directory's disk (``folder``; files named with
    ``suffix``, e.g. one per process). Raises FinetuneError when the disk cannot hold the file.
    """
    setting = config.data.cache_images
    if setting == "off":
        return ImageCaches("off (data.cache_images: off)")
    if setting == "auto" and epochs_left <= 1:
        return ImageCaches("off (each image is read once: one epoch to go)")
    served = set(feature_cached) if setting == "auto" and not config.freeze.stages else set()
    if {"train", "val"} <= served:
        return ImageCaches("off (not needed: the feature cache serves every later epoch)")
    parts = [(split, *found) for split, dataset in (("train", data.train), ("val", data.val))
             if split not in served and (found := image_files(dataset)) is not None]
    shapes = {split: _stored_shapes(files, indices) for split, files, indices in parts}
    total = sum(math.prod(shape) for per_split in shapes.values() for shape in per_split.values())
    budget = int(config.train.cache_max_gb * 2**30)
    spill = max(0, total - budget)
    if setting == "auto" and spill and spill + DISK_HEADROOM > (free := shutil.disk_usage(folder).free):
        return ImageCaches(f"off ({_mib(total)} of decoded images: {_mib(spill)} more than train.cache_max_gb "
                           f"({config.train.cache_max_gb:g}), and {folder} has only {_mib(free)} free)")
    caches = ImageCaches("")
    left = budget
    try:
        for split, _, _ in parts:
            cache = ImageCache(shapes[split], left, folder / ON_DISK_NAME.format(split=split + suffix))
            left -= cache.memory_bytes
            caches.by_split[split] = cache
    except FinetuneError:
        caches.close()
        raise
    why = "data.cache_images: on" if setting == "on" else "later epochs read the images again"
    memory = sum(cache.memory_bytes for cache in caches.by_split.values())
    where = f"{_mib(memory)} in memory (train.cache_max_gb {config.train.cache_max_gb:g})" + "".join(
        f", {_mib(cache.disk_bytes)} in {cache.path}" for cache in caches.by_split.values() if cache.disk_bytes)
    images = sum(len(cache.shapes) for cache in caches.by_split.values())
    served_by_features = "".join(f"; {split} from the feature cache" for split in ("train", "val") if split in served)
    caches.why = f"on ({why}; {images} images: {where}{served_by_features})"
    return caches


def _stored_shapes(files: ImageFiles, indices: list[int]) -> dict[int, tuple[int, int, int]]:
    """The decoded shape of each of ``indices``: from the sizes the quick check read, or the file's header."""
    shapes = {}
    for index in set(indices):
        path = files.samples[index][0]
        size = files.upright_sizes.get(path) if files.pipeline.augment != "none" else (0, 0)
        if size is None:
            size = check_image(path).size
        if size is not None:  # an unreadable file: never cached
            shapes[index] = files.pipeline.stored_shape(size)
    return shapes


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"
