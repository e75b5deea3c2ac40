"""Batches from a dataset: samplers seeded by (seed, epoch), decode threads that work ahead, collate.

The order of a loader is a function of (seed, epoch) alone, whatever the number of decode threads, so a run
and a resumed run see exactly the same batches.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    Subset,
    default_collate,
)

from finetune.data.folders import ImageFiles, image_files
from finetune.data.imagecache import ImageCache
from finetune.errors import FinetuneError
from finetune.utils.seeding import mix_seed, seeded

# An image read (decode, resize, crop) this quick goes faster in the main thread than in decode threads, which
# then take turns with the compute threads for the cores and the GIL: ResNet-18's first head-only epoch on the
# digits at 32 px (0.23 ms a read) ran at 1,314 img/s without decode threads against 1,022-1,134 with two, on the
# 2-core Zen 4 EPYC. A camera photo takes tens of milliseconds even at a reduced decode scale.
CHEAP_READ_S = 0.001


def default_workers(dataset: Optional[Dataset] = None) -> int:
    """Decode threads for ``data.workers: null``: none when ``dataset``'s images are cheap to read
    (:func:`read_seconds` under ``CHEAP_READ_S``), else one per core, at most 8.

    A decode thread runs only while the prefetch window has room, that is while decoding lags behind training;
    then the compute threads are waiting for the batch, and every core should be decoding. The count changes speed
    only: every image is read and augmented alike whatever it is.
    """
    if dataset is not None and len(dataset) and read_seconds(dataset) < CHEAP_READ_S:
        return 0
    return min(8, os.cpu_count() or 1)


def read_seconds(dataset: Dataset, samples: int = 8) -> float:
    """The median time to read an item of ``dataset``, over up to ``samples`` spread across it (after one untimed
    read); it stops at the first read that takes ``CHEAP_READ_S`` or more, so slow images cost one read. Random
    transforms draw from a copy of torch's generator: the run's random numbers are untouched."""
    import time

    times = []
    with torch.random.fork_rng(devices=[]):
        dataset[0]
        for i in range(0, len(dataset), max(1, len(dataset) // samples)):
            start = time.perf_counter()
            dataset[i]
            times.append(time.perf_counter() - start)
            if times[-1] >= CHEAP_READ_S or len(times) == samples:
                break
    return sorted(times)[len(times) // 2]


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

    def item_seed(self, index: int) -> int:
        return mix_seed(self.seed, self.epoch, index)

    def __getitem__(self, index):
        return _seeded_item(self.dataset, index, self.item_seed(index))


def _seeded_item(dataset: Dataset, index: int, seed: int):
    """``dataset[index]`` with its random transforms drawn under ``seed``; image files pass the seed on, so that a
    decode thread may have drawn them already."""
    if isinstance(dataset, Subset):
        return _seeded_item(dataset.dataset, dataset.indices[index], seed)
    if isinstance(dataset, ImageFiles):
        return dataset.read(index, seed=seed)
    if isinstance(dataset, _Reading):
        return dataset.files.read(index, dataset.cache, dataset.ahead, seed)
    with seeded(seed):
        return dataset[index]


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
                weights: Optional[torch.Tensor] = None, cache: Optional[ImageCache] = None):
    """A loader whose order is a function of (seed, epoch) only, so runs and resumes repeat exactly.

    ``workers``: over image files (:class:`ImageFiles`, also under a Subset or wrapper) that many decode threads
    work ahead of the main thread (and finish items with random transforms there, each under its own seed), and
    the main thread finishes the rest and collates, so the batches are the same for any count; over other datasets,
    DataLoader worker processes.
    ``weights``: weighted sampling with replacement (see :func:`epoch_sampler`).
    ``cache``: the image cache of the image files (``imagecache``): what it holds is not decoded again."""
    dataset = for_epoch(dataset, epoch)
    sampler = epoch_sampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, skip=skip_batches * batch_size,
                            rank=rank, world=world, weights=weights)
    return _loader(dataset, workers, list(sampler), PREFETCH_BATCHES * batch_size, cache, batch_size=batch_size,
                   sampler=sampler, drop_last=drops_last(len(dataset), batch_size, shuffle, world))


def batch_loader(dataset: Dataset, batches: list[list[int]], workers: int = 0, cache: Optional[ImageCache] = None):
    """A loader of exactly ``batches`` (lists of indices), in order, with :func:`make_loader`'s decode threads and
    image cache."""
    order = list(itertools.chain.from_iterable(batches))
    return _loader(dataset, workers, order, PREFETCH_BATCHES * max(map(len, batches), default=1), cache,
                   batch_sampler=batches)


def _loader(dataset: Dataset, workers: int, order: list[int], ahead: int, cache: Optional[ImageCache],
            **batching):
    files = image_files(dataset) if workers or cache is not None else None
    if files is None:
        return _data_loader(dataset, workers, batching)
    base, index = files
    seeds = _seeds(dataset) if base.pipeline.random else None
    order = [(index[i], seeds.item_seed(i) if seeds else None) for i in order]
    return _ReadingLoader(dataset, base, cache, order, workers, ahead, batching)


def _seeds(dataset: Dataset) -> Optional[SeededSamples]:
    """The SeededSamples whose indices are ``dataset``'s (through Indexed), if any."""
    while isinstance(dataset, Indexed):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, SeededSamples) else None


PREFETCH_BATCHES = 2  # how far decode threads work ahead of training


class _Prefetch:
    """Decode threads working through ``order`` ((index of ``files``, seed or None) pairs) ahead of the main
    thread, at most ``ahead`` images at a time. An item with a seed is decoded (or taken from ``cache``) and
    finished with its random transforms there; one without is only decoded, and left to the main thread when
    ``cache`` holds it already."""

    def __init__(self, files: ImageFiles, cache: Optional[ImageCache], order: list[tuple[int, Optional[int]]],
                 threads: int, ahead: int):
        self.files, self.cache, self.order, self.ahead = files, cache, iter(order), ahead
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="finetune-decode")
        self.pending: dict[int, Future] = {}
        self._top_up()

    def take(self, index: int) -> Optional[Future]:
        future = self.pending.pop(index, None)
        self._top_up()
        return future

    def _top_up(self) -> None:
        while len(self.pending) < self.ahead:
            index, seed = next(self.order, (None, None))
            if index is None:
                return
            if index in self.pending:
                continue
            if seed is not None:
                self.pending[index] = self.pool.submit(self.files.finished, index, seed, self.cache)
            elif not (self.cache is not None and self.cache.holds(index)):
                self.pending[index] = self.pool.submit(self.files.decode, index, self.cache)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Reading(Dataset):
    """``files`` read through an image cache and decode threads working ahead (either may be None)."""

    def __init__(self, files: ImageFiles, cache: Optional[ImageCache], ahead: Optional[_Prefetch]):
        self.files, self.cache, self.ahead = files, cache, ahead

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.files.read(index, self.cache, self.ahead)


def _read_through(dataset: Dataset, files: ImageFiles, reading: _Reading) -> Dataset:
    """A copy of the wrappers around ``files`` (Subset, SeededSamples, Indexed...) over ``reading`` instead."""
    if dataset is files:
        return reading
    wrapper = copy.copy(dataset)
    wrapper.dataset = _read_through(dataset.dataset, files, reading)
    return wrapper


class _ReadingLoader:
    """A DataLoader (run in the main thread) over ``dataset``, whose image files are read through ``cache`` and
    ``threads`` decode threads working ahead through ``order``; both belong to one iteration."""

    def __init__(self, dataset: Dataset, files: ImageFiles, cache: Optional[ImageCache],
                 order: list[tuple[int, Optional[int]]], threads: int, ahead: int, batching: dict):
        self.dataset, self.files, self.cache, self.order = dataset, files, cache, order
        self.threads, self.ahead, self.batching = threads, ahead, batching

    def __len__(self) -> int:
        return len(self._over(self.dataset))

    def __iter__(self):
        prefetch = _Prefetch(self.files, self.cache, self.order, self.threads, self.ahead) if self.threads else None
        try:
            yield from self._over(_read_through(self.dataset, self.files, _Reading(self.files, self.cache, prefetch)))
        finally:
            if prefetch is not None:
                prefetch.close()

    def _over(self, dataset: Dataset) -> DataLoader:
        return _data_loader(dataset, 0, self.batching)


def _data_loader(dataset: Dataset, workers: int, batching: dict) -> DataLoader:
    # Each iteration of a DataLoader draws a seed for its worker processes from its generator, by default torch's
    # global one: a generator of its own leaves the global random state (and a run's, finetune.training.rng) alone.
    return DataLoader(dataset, num_workers=workers, collate_fn=collate_channels_last, generator=torch.Generator(),
                      **batching)


def steps_per_epoch(dataset: Dataset, batch_size: int, world: int = 1) -> int:
    """Training batches per epoch and process, as :func:`make_loader` yields them."""
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    return batches - drops_last(len(dataset), batch_size, shuffle=True, world=world)
