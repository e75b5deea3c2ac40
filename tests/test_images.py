"""Images: reduced-scale JPEG decoding, EXIF orientation, odd modes, decode threads, the image cache, bad files."""

from __future__ import annotations

import errno
import io
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_same_weights, interrupt, tiny_config, weights
from PIL import Image, ImageDraw
from torchvision import transforms

from finetune.config.loading import load_config
from finetune.config.schema import DataConfig
from finetune.data import imagecache
from finetune.data.folders import (
    eval_transform,
    image_files,
    load_datasets,
    load_image,
    read_image,
)
from finetune.data.imagecache import ImageCache, plan_image_caches
from finetune.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePipeline,
    augment_side,
    check_image,
    jpeg_problem,
)
from finetune.data.loaders import SeededSamples, collate_channels_last, make_loader
from finetune.errors import FinetuneError
from finetune.training import run as engine
from finetune.training.reporter import Reporter

COLOURS = {"blue": (40, 70, 190), "green": (50, 160, 70), "red": (200, 50, 40)}


def photo(rng: random.Random, rgb: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    """A small photo-like image: the class colour over a smooth random field, a few discs, speckle."""
    width, height = size
    field = Image.frombytes("RGB", (6, 5), rng.randbytes(90)).resize(size, Image.Resampling.BICUBIC)
    image = Image.blend(field, Image.new("RGB", size, rgb), 0.8)
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(3, max(4, width // 10))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.frombytes("RGB", size, bytes(rng.randrange(12) for _ in range(width * height * 3)))
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + np.asarray(noise, np.int16) - 6, 0, 255)
                           .astype(np.uint8))


def make_jpeg_split(root: Path, train: int, val: int, size=(160, 120)) -> Path:
    """root/train and root/val of three colour classes as JPEGs (quality 90)."""
    rng = random.Random(0)
    for split, count in (("train", train), ("val", val)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                photo(rng, rgb, size).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(module_tmp) -> Path:
    return make_jpeg_split(module_tmp("jpegs"), 8, 3)


def classic(image_size: int):
    """The tutorial's transform: the full decode, resized and centre-cropped, as finetune did before."""
    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def test_full_decode_gives_the_classic_pipelines_tensor_bit_for_bit(jpegs):
    path = str(next((jpegs / "train" / "red").iterdir()))
    expected = classic(32)(Image.open(path).convert("RGB"))
    assert torch.equal(load_image(path, eval_transform(DataConfig(image_size=32, fast_decode=False))), expected)
    # as a torchvision transform on PIL
    assert torch.equal(eval_transform(DataConfig(image_size=32))(read_image(path)), expected)


@pytest.mark.parametrize("image_size, scale", [(32, 4), (64, 2)])
def test_fast_decode_is_close_to_the_full_decode(tmp_path, image_size, scale):
    """The tensor the model sees, from a JPEG decoded at 1/4 or 1/2 scale, against the full decode."""
    rng = random.Random(1)
    errors = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        photo(rng, (120, 90, 60), (200, 152)).save(path, quality=90)
        with Image.open(path) as image:
            image.draft("RGB", (image_size, image_size))
            assert image.size == (200 // scale, 152 // scale)  # it really decodes at reduced scale
        fast = load_image(str(path), eval_transform(DataConfig(image_size=image_size)))
        full = load_image(str(path), eval_transform(DataConfig(image_size=image_size, fast_decode=False)))
        errors.append((fast - full).abs().mean().item())
    # In normalised units (1.0 is about 57 grey levels): measured 0.009 to 0.011, about 0.6 grey levels.
    assert max(errors) < 0.02, errors


def test_fast_decode_leaves_accuracy_unchanged(tmp_path, jpegs):
    rows = {}
    for fast in (True, False):
        config = load_config(tiny_config(tmp_path / str(fast), jpegs, data={"fast_decode": fast},
                                         optim={"lr": 0.05}, train={"epochs": 3}))
        engine.train(config, Reporter())
        lines = (tmp_path / str(fast) / "run" / "metrics.jsonl").read_text().splitlines()
        rows[fast] = [json.loads(line) for line in lines]
    accuracy = {fast: [row["val_acc"] for row in rows[fast]] for fast in rows}
    assert accuracy[True] == accuracy[False] and accuracy[True][-1] == 1.0, accuracy
    # ... from other pixels: the 160x120 JPEGs were decoded at half their size, so every loss differs a little
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(rows[True], rows[False])), rows


def oriented_jpeg(path: Path, orientation: int) -> None:
    """60x40 stored: left half red, right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied_as_photo_viewers_do(tmp_path):
    path = tmp_path / "rotated.jpg"
    oriented_jpeg(path, 6)  # "rotate 90 degrees clockwise to view": the left half ends on top
    upright = read_image(str(path))
    assert upright.size == (40, 60)
    assert upright.getpixel((20, 5))[0] > 200 and upright.getpixel((20, 55))[2] > 200
    assert check_image(str(path)).size == (40, 60)
    pipeline = ImagePipeline(32, augment=True)
    decoded = pipeline.decode(str(path))
    assert decoded.shape == pipeline.stored_shape((40, 60)) == (60, 40, 3)
    assert decoded[2, 20, 0] > 200 and decoded[57, 20, 2] > 200


def test_cmyk_grey_progressive_and_alpha_images_work(tmp_path):
    Image.new("CMYK", (80, 60), (0, 200, 200, 0)).save(tmp_path / "cmyk.jpg", quality=90)
    Image.new("L", (80, 60), 128).save(tmp_path / "grey.jpg", quality=90)
    Image.new("RGB", (80, 60), (10, 200, 30)).save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    Image.new("RGBA", (60, 80), (200, 0, 0, 90)).save(tmp_path / "alpha.png")
    for name in ("cmyk.jpg", "grey.jpg", "progressive.jpg", "alpha.png"):
        path = str(tmp_path / name)
        assert check_image(path).problem is None, name
        for augment in (False, True):
            pipeline = ImagePipeline(32, augment=augment)
            decoded = pipeline.decode(path)
            assert decoded.dtype == np.uint8 and decoded.shape == pipeline.stored_shape(check_image(path).size)
            assert pipeline.finish(decoded).shape == (3, 32, 32)
    grey = ImagePipeline(32).decode(str(tmp_path / "grey.jpg")).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and abs(grey.mean() - 128) < 3


def test_augmentation_keeps_room_for_the_random_crop():
    pipeline = ImagePipeline(224, augment=True)
    assert augment_side(224) == pipeline.decode_side == 336
    assert pipeline.stored_shape((4032, 3024)) == (336, 448, 3)  # a 12 MP photo: the whole image, shorter side 336
    assert pipeline.stored_shape((3024, 4032)) == (448, 336, 3)
    assert pipeline.stored_shape((300, 200)) == (200, 300, 3)  # smaller images are kept as they are
    assert ImagePipeline(224).stored_shape((4032, 3024)) == (224, 224, 3)


def test_jpeg_check_walks_to_the_end_of_image_marker(tmp_path):
    buffer = io.BytesIO()
    photo(random.Random(2), (90, 90, 90), (64, 48)).save(buffer, "JPEG", quality=90, progressive=True)
    data = buffer.getvalue()
    assert jpeg_problem(data) is None
    assert jpeg_problem(data + b"\x00\x00ftypmp42 a phone's appended video") is None
    assert "truncated" in jpeg_problem(data[:-2])
    assert "truncated" in jpeg_problem(data[:len(data) // 2])
    assert "truncated" in jpeg_problem(data[:40])


def undecodable_jpeg(path: Path) -> Path:
    """A JPEG whose structure is whole (it passes the quick check) but whose scan names undefined Huffman
    tables: libjpeg gives up when it decodes it, at any scale."""
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sos = data.find(b"\xff\xda")
    for k in range(data[sos + 4]):
        data[sos + 6 + 2 * k] = 0x33
    path.write_bytes(bytes(data))
    return path


def tree_with(tmp_path: Path, jpegs: Path, bad: Path) -> Path:
    root = tmp_path / "data"
    for split in ("train", "val"):
        for folder in (jpegs / split).iterdir():
            (root / split / folder.name).mkdir(parents=True)
            for image in folder.iterdir():
                (root / split / folder.name / image.name).write_bytes(image.read_bytes())
    undecodable_jpeg(root / "train" / "red" / bad.name)
    return root


def epoch_batches(dataset, workers: int, epoch: int = 0, batch: int = 5, cache=None):
    loader = make_loader(dataset, batch, shuffle=True, seed=3, epoch=epoch, workers=workers, cache=cache)
    return [(images.clone(), targets.clone()) for images, targets in loader]


def test_an_image_that_fails_to_decode_in_a_decode_thread_is_an_error_naming_it(tmp_path, jpegs):
    root = tree_with(tmp_path, jpegs, Path("broken.jpg"))
    config = load_config(tiny_config(tmp_path / "cfg", root))
    data = load_datasets(config)  # the quick check lets it through
    with pytest.raises(FinetuneError, match=r"(?s)Cannot read image .*broken\.jpg: OSError.*data\.skip_bad_images"):
        epoch_batches(data.train, workers=2)


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "filling-the-cache"])
def test_with_skip_bad_images_a_late_unreadable_image_is_left_out_of_its_batch(tmp_path, jpegs, cached):
    root = tree_with(tmp_path, jpegs, Path("broken.jpg"))
    config = load_config(tiny_config(tmp_path / "cfg", root, data={"skip_bad_images": True, "cache_images": "on"}))
    data = load_datasets(config)
    assert data.bad_images == [] and len(data.train) == 25
    caches = plan_image_caches(config, data, feature_cached=(), epochs_left=2, folder=tmp_path) if cached else None
    for epoch in (0, 1):
        batches = epoch_batches(data.train, workers=2, epoch=epoch, cache=caches and caches.get("train"))
        assert sum(len(targets) for _, targets in batches) == 24
    assert data.bad_images == []  # what the quick check at the start found
    assert data.unreadable() == [str(root / "train" / "red" / "broken.jpg")]  # reported in summary.json
    if caches:
        caches.close()


def test_a_late_unreadable_image_is_skipped_from_training_and_the_feature_cache(tmp_path, jpegs):
    root = tree_with(tmp_path, jpegs, Path("broken.jpg"))
    config = load_config(tiny_config(tmp_path / "cfg", root, data={"skip_bad_images": True, "workers": 2},
                                     train={"epochs": 3, "batch_size": 5, "cache_features": "on"}))
    summary = engine.train(config, Reporter())
    assert summary["skipped_images"] == [str(root / "train" / "red" / "broken.jpg")]
    rows = [json.loads(line) for line in (tmp_path / "cfg" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["images_per_s"] > 0 for row in rows) and len(rows) == 3


def test_decode_threads_give_the_same_batches_as_the_main_thread(jpegs, tmp_path):
    config = load_config(tiny_config(tmp_path, jpegs, data={"augment": True}))
    data = load_datasets(config)
    seeded = SeededSamples(data.train, seed=0)
    for epoch in (0, 1):
        alone = epoch_batches(seeded, workers=0, epoch=epoch)
        threaded = epoch_batches(seeded, workers=3, epoch=epoch)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, threaded))
    assert not torch.equal(epoch_batches(seeded, 0, epoch=0)[0][0], epoch_batches(seeded, 0, epoch=1)[0][0])


class Counting(ImagePipeline):
    decoded: list = []

    def decode(self, path):
        Counting.decoded.append(path)
        return super().decode(path)


@pytest.mark.parametrize("budget_images", [100, 7, 0], ids=["memory", "memory-and-file", "file"])
def test_the_image_cache_serves_later_epochs_without_decoding_bit_for_bit(tmp_path, jpegs, budget_images):
    config = load_config(tiny_config(tmp_path, jpegs, data={"augment": True}))
    data = load_datasets(config)
    files, _ = image_files(data.train)
    plain = [epoch_batches(SeededSamples(data.train, 0), workers=2, epoch=e) for e in (0, 1)]
    files.pipeline = Counting(**vars(files.pipeline))
    per_image = 48 * 64 * 3  # 160x120 stored with a shorter side of 1.5 x 32
    config.train.cache_max_gb = budget_images * per_image / 2**30
    caches = plan_image_caches(config, data, feature_cached=(), epochs_left=2, folder=tmp_path)
    assert "on (later epochs read the images again; 33 images" in caches.why
    assert ("image-cache-train.bin" in caches.why) == (budget_images < 24)
    Counting.decoded.clear()
    cached = [epoch_batches(SeededSamples(data.train, 0), workers=2, epoch=e, cache=caches.get("train"))
              for e in (0, 1)]
    assert len(Counting.decoded) == 24  # the first epoch only
    for a, b in zip(sum(plain, []), sum(cached, [])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    caches.close()
    assert not list(tmp_path.glob("image-cache-*"))


def test_auto_caches_only_what_is_read_again_and_fits(tmp_path, jpegs, monkeypatch):
    config = load_config(tiny_config(tmp_path, jpegs))
    data = load_datasets(config)
    plan = lambda **kw: plan_image_caches(config, data, folder=tmp_path, **{"feature_cached": (),
                                                                             "epochs_left": 3, **kw})
    assert plan(feature_cached=("train", "val")).why == "off (not needed: the feature cache serves every later epoch)"
    train_only = plan(feature_cached=("val",))  # augmented training images, validation features cached
    assert train_only.why.endswith("; val from the feature cache)") and "24 images" in train_only.why
    assert train_only.get("train") is not None and train_only.get("val") is None
    train_only.close()
    assert plan(epochs_left=1).why.startswith("off (each image is read once")
    on = plan()
    assert on.why.startswith("on (later epochs read the images again; 33 images: 0.1 MiB in memory")
    assert on.get("val") is not None
    on.close()
    assert on.get("val") is None
    config.train.cache_max_gb = 0
    monkeypatch.setattr(imagecache.shutil, "disk_usage", lambda folder: SimpleNamespace(free=2**20))
    off = plan()
    assert off.why.startswith("off (0.1 MiB of decoded images: 0.1 MiB more than train.cache_max_gb (0)")
    config.data.cache_images = "on"
    forced = plan(feature_cached=("train", "val"), epochs_left=1)
    assert forced.why.startswith("on (data.cache_images: on")
    forced.close()


@pytest.mark.parametrize("where", ["reserving", "writing"])
def test_a_full_disk_is_a_clear_error_naming_the_file(tmp_path, monkeypatch, where):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate" if where == "reserving" else "pwrite", full)
    with pytest.raises(FinetuneError) as error:
        cache = ImageCache({0: (4, 4, 3), 1: (4, 4, 3)}, 0, tmp_path / "image-cache-train.bin")
        cache.put(0, np.zeros((4, 4, 3), np.uint8))
    message = str(error.value)
    assert str(tmp_path / "image-cache-train.bin") in message and "No space left on device" in message
    assert "data.cache_images=off" in message and "train.cache_max_gb" in message


def test_resumed_run_with_decode_threads_and_image_cache_equals_uninterrupted(tmp_path, jpegs):
    sections = dict(data={"augment": True, "cache_images": "off"}, train={"epochs": 2})  # images read every epoch
    engine.train(load_config(tiny_config(tmp_path / "whole", jpegs, **sections)), Reporter())  # no threads, no cache
    parted = load_config(tiny_config(tmp_path / "parted", jpegs, data={"augment": True, "workers": 2,
                                                                       "cache_images": "on"}, train={"epochs": 2}))
    interrupt(engine.train, parted, epoch=1, step=1)  # in epoch 2: the filled cache is lost
    engine.train(parted, Reporter(), resume=tmp_path / "parted" / "run")  # fills a new cache
    assert not list((tmp_path / "parted" / "run").glob("image-cache-*"))  # a spilled cache is deleted at the end
    assert_same_weights(weights(tmp_path / "parted" / "run"), weights(tmp_path / "whole" / "run"))
    # validation ran from the feature cache (head-only, eval-mode BatchNorm), refilled after the resume: the same
    untimed = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
                           for line in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert untimed("parted") == untimed("whole")


def test_collate_leaves_out_skipped_items_and_refuses_an_empty_batch():
    item = (torch.zeros(3, 4, 4), 1)
    images, targets = collate_channels_last([item, None, item])
    assert images.shape == (2, 3, 4, 4) and images.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(FinetuneError, match="Every image of a batch was unreadable"):
        collate_channels_last([None, None])
