"""Benchmark on camera photos: `finetune train` end to end against the plain loop of the PyTorch tutorial.

    .venv/bin/python scripts/bench_photos.py              # 64 + 16 photos of 12 MP: several minutes on 2 cores
    .venv/bin/python scripts/bench_photos.py --train 8 --val 4 --width 800 --height 600 --image-size 64
                                                           # a smoke run of every case, in about a minute

It generates camera-sized JPEGs once (4032x3024, quality 90, about 2.5 MB each; four classes told apart by their
colour cast) into a temporary folder, then runs each case in a fresh process, both sides in the same run:

- **plain loop**: the tutorial's - ImageFolder + Resize(224) + CenterCrop(224) + ToTensor + Normalize (with
  augmentation: RandomResizedCrop + RandomHorizontalFlip), a DataLoader with default workers (none), batch 32,
  ResNet-18 from random weights, ``requires_grad=False`` on frozen parameters, model.train(), SGD, fp32, and
  validation after every epoch;
- **finetune**: ``finetune train`` with the same data, model, batch, learning rate and epochs, fp32, and every
  data option at its default (reduced-scale decoding, decode threads, image and feature caches).

Each case reports first-epoch and later-epoch training images/s (the plain loop times its epochs as finetune
does, without validation), the whole run's wall time and its ratio (process start to exit, validation and
start-up included), and the peak RSS of the process (ru_maxrss). Smaller sections follow: the augmented case with
an image cache that spills to disk, decoding beside compute with threads or with processes, and finetune's first
epoch for data.workers 0, 1, 2 and null.

``--recipes`` measures instead the cost of each accuracy-recipe piece against ``data.augment: light`` (head-only,
two epochs: the first decodes the photos, the second reads the image cache), light first and last to show the
drift of a shared machine; target: the first epoch of every augmentation preset within 15% of light's.

    .venv/bin/python scripts/bench_photos.py --recipes --train 96 --val 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = {"red": (200, 60, 50), "green": (60, 170, 70), "blue": (50, 80, 200), "yellow": (210, 190, 40)}
BATCH = 32
LR = 0.001
CASES = [  # (name, freeze, augment, epochs, target ratio of the whole run)
    ("head-only, no augmentation", "head-only", False, 3, 5.0),
    ("head-only, augmentation", "head-only", True, 3, 4.0),
    ("full fine-tune", "full", False, 2, 2.0),
]
FIRST_EPOCH_TARGET = 2.5


def make_photos(root: Path, train: int, val: int, size: tuple[int, int]) -> None:
    """Camera-like JPEGs: a smooth random field with the class's colour cast, discs, sensor-like noise."""
    from PIL import Image, ImageChops, ImageDraw

    width, height = size
    noise = Image.effect_noise(size, 3.5).convert("RGB")  # one noise frame for all: it only sets the file size
    rng = random.Random(0)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            name = list(CLASSES)[i % len(CLASSES)]
            field = Image.frombytes("RGB", (width // 48, height // 48), rng.randbytes(width // 48 * (height // 48) * 3))
            image = Image.blend(field.resize(size, Image.Resampling.BICUBIC), Image.new("RGB", size, CLASSES[name]),
                                0.5)
            draw = ImageDraw.Draw(image)
            for _ in range(30):
                x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(width // 80, width // 10)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            ImageChops.add(image, noise, offset=-128).save(folder / f"{i:03d}.jpg", quality=90)


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; its wall time (s), peak RSS (MiB, ru_maxrss) and stdout. Raises when it fails."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if process.returncode:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{text}")
    return seconds, usage.ru_maxrss / 1024, text


def plain_loop(data: Path, freeze: str, augment: bool, epochs: int, image_size: int, lr: float = LR) -> list[float]:
    """The tutorial's loop (in a child process); prints each epoch's training images/s as JSON. (Also
    scripts/bench_digits.py's plain loop: a 32 px image goes through Resize(32) and CenterCrop(32) unchanged.)"""
    import torch
    from torch import nn
    from torchvision import datasets, transforms
    from torchvision.models import resnet18

    torch.manual_seed(0)
    normalise = [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    plain = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), *normalise])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   *normalise]) if augment else plain
    train = torch.utils.data.DataLoader(datasets.ImageFolder(data / "train", train_tf), batch_size=BATCH,
                                        shuffle=True)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(data / "val", plain), batch_size=BATCH)
    model = resnet18(weights=None)
    if freeze == "head-only":
        for p in model.parameters():
            p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(train.dataset.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    speeds = []
    for _ in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            seen += len(y)
        speeds.append(seen / (time.perf_counter() - start))
        model.eval()
        with torch.no_grad():
            for x, y in val:
                model(x)
    print(json.dumps(speeds))
    return speeds


def finetune_config(folder: Path, data: Path, freeze: str, augment: bool, epochs: int, image_size: int, *,
                    data_keys: Optional[dict] = None, train_keys: Optional[dict] = None) -> Path:
    import yaml

    config = {
        "model": {"weights": "none"},
        "data": {"root": str(data), "image_size": image_size, "augment": augment, **(data_keys or {})},
        "freeze": {"trainable": ["fc"] if freeze == "head-only" else ["*"]},
        "optim": {"lr": LR, "momentum": 0.9},
        "train": {"epochs": epochs, "batch_size": BATCH, "seed": 0, "precision": "fp32",
                  "output_dir": str(folder / "run"), **(train_keys or {})},
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def run_finetune(config: Path) -> tuple[float, float, list[float], list[str]]:
    """Wall time, peak RSS, training images/s per epoch and the cache log lines of one `finetune train`."""
    seconds, rss, text = run_measured([sys.executable, "-m", "finetune", "train", "--config", str(config)])
    rows = [json.loads(line) for line in (config.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    notes = [line for line in text.splitlines() if "cache" in line or "decode" in line]
    return seconds, rss, [row["images_per_s"] for row in rows], notes


def run_plain(data: Path, freeze: str, augment: bool, epochs: int, image_size: int) -> tuple[float, float, list]:
    seconds, rss, text = run_measured([sys.executable, __file__, "--plain-loop", str(data), freeze,
                                       str(int(augment)), str(epochs), str(image_size)])
    return seconds, rss, json.loads(text.strip().splitlines()[-1])


def later(speeds: list[float]) -> str:
    return f"{sum(speeds[1:]) / len(speeds[1:]):.1f}" if len(speeds) > 1 else "-"


def end_to_end(data: Path, work: Path, image_size: int) -> None:
    print(f"\n{'case':<28} {'side':<9} {'epoch 1 img/s':>14} {'later img/s':>12} {'wall s':>8} {'ratio':>7} "
          f"{'target':>7} {'peak RSS MiB':>13}")
    for name, freeze, augment, epochs, target in CASES:
        plain_s, plain_rss, plain_speeds = run_plain(data, freeze, augment, epochs, image_size)
        config = finetune_config(work / name.replace(" ", "_").replace(",", ""), data, freeze, augment, epochs,
                                 image_size)
        fast_s, fast_rss, fast_speeds, notes = run_finetune(config)
        print(f"{name:<28} {'plain':<9} {plain_speeds[0]:>14.1f} {later(plain_speeds):>12} {plain_s:>8.1f} "
              f"{'':>7} {'':>7} {plain_rss:>13.0f}")
        print(f"{'':<28} {'finetune':<9} {fast_speeds[0]:>14.1f} {later(fast_speeds):>12} {fast_s:>8.1f} "
              f"{plain_s / fast_s:>6.2f}x {f'>={target:g}x':>7} {fast_rss:>13.0f}")
        print(f"{'':<28} first epoch {fast_speeds[0] / plain_speeds[0]:.2f}x (target >={FIRST_EPOCH_TARGET:g}x)")
        for note in notes:
            print(f"{'':<28} | {note}")


def spilled_cache(data: Path, work: Path, image_size: int) -> None:
    """Head-only with augmentation again, with an image-cache budget far below the data set: it spills to disk."""
    config = finetune_config(work / "spilled", data, "head-only", True, 3, image_size,
                             train_keys={"cache_max_gb": 0.005})
    seconds, rss, speeds, notes = run_finetune(config)
    print(f"\nhead-only, augmentation, train.cache_max_gb 0.005 (the image cache spills to the run directory): "
          f"epoch 1 {speeds[0]:.1f} img/s, later {later(speeds)} img/s, {seconds:.1f} s, peak RSS {rss:.0f} MiB")
    for note in notes:
        print(f"  | {note}")


def threads_or_processes(data: Path, image_size: int, rounds: int = 2) -> None:
    """Decode the training photos beside a head-only forward+backward loop: serially, with threads, with processes."""
    import torch
    from torch import nn
    from torchvision.models import resnet18

    from finetune.config.schema import DataConfig
    from finetune.data.folders import eval_transform

    pipeline = eval_transform(DataConfig(image_size=image_size))
    paths = sorted(str(p) for p in (data / "train").rglob("*.jpg"))

    class Photos(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return torch.from_numpy(pipeline.decode(paths[i]))

    model = resnet18(weights=None).eval().to(memory_format=torch.channels_last)
    body, head = nn.Sequential(*list(model.children())[:-1]), nn.Linear(512, len(CLASSES))
    optimizer = torch.optim.SGD(head.parameters(), lr=LR)

    def step(batch):
        x = batch.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            features = body(x).flatten(1)
        loss = nn.functional.cross_entropy(head(features), torch.zeros(len(x), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def threads(n):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(Photos().__getitem__, i) for i in range(len(paths))]
            for i in range(0, len(paths), BATCH):
                step(torch.stack([f.result() for f in futures[i:i + BATCH]]))

    def processes(n):
        for batch in torch.utils.data.DataLoader(Photos(), batch_size=BATCH, num_workers=n):
            step(batch)

    def serial():
        for i in range(0, len(paths), BATCH):
            step(torch.stack([Photos()[j] for j in range(i, min(i + BATCH, len(paths)))]))

    ways = {"serial (main thread)": serial, "1 decode thread": lambda: threads(1),
            "2 decode threads": lambda: threads(2), "1 worker process": lambda: processes(1),
            "2 worker processes": lambda: processes(2)}
    best = {name: 0.0 for name in ways}
    step(torch.stack([Photos()[0]]))  # warm-up
    for _ in range(rounds):  # interleaved rounds, best of each
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            best[name] = max(best[name], len(paths) / (time.perf_counter() - start))
    print(f"\ndecoding beside compute ({len(paths)} photos at 1/N scale, head-only step, batch {BATCH}, "
          f"best of {rounds}):")
    for name, speed in best.items():
        print(f"  {name:<22} {speed:6.1f} img/s")


def workers_sweep(data: Path, work: Path, image_size: int) -> None:
    """finetune's first epoch (head-only, no augmentation) for data.workers 0, 1, 2 and null."""
    print("\nfinetune first epoch by data.workers (decode threads), head-only, no augmentation:")
    for workers in (0, 1, 2, None):
        config = finetune_config(work / f"workers-{workers}", data, "head-only", False, 1, image_size,
                                 data_keys={"workers": workers})
        seconds, _, speeds, _ = run_finetune(config)
        print(f"  data.workers {str(workers) if workers is not None else 'null':<5} {speeds[0]:6.1f} img/s  "
              f"(run {seconds:.1f} s)")


RECIPE_PIECES = [  # (name, data keys, train keys): each against light
    ("light", {"augment": "light"}, {}),
    ("trivialaugment", {"augment": "trivialaugment"}, {}),
    ("randaugment", {"augment": "randaugment"}, {}),
    ("augmix", {"augment": "augmix"}, {}),
    ("light + random_erasing 0.25", {"augment": "light", "random_erasing": 0.25}, {}),
    ("light + mixup/cutmix", {"augment": "light"}, {"mixup": 0.2, "cutmix": 1.0}),
    ("light + ema", {"augment": "light"}, {"ema": {}}),
    ("light (again)", {"augment": "light"}, {}),
]
PRESET_TARGET = 1.15


def recipe_costs(data: Path, work: Path, image_size: int) -> None:
    """Images/s of each recipe piece against light, head-only, first epoch (decoding) and second (image cache)."""
    print(f"\nrecipe pieces, head-only, 2 epochs (epoch 1 decodes the photos, epoch 2 reads the image cache), "
          f"batch {BATCH}:")
    print(f"  {'piece':<28} {'epoch 1 img/s':>14} {'x light':>8} {'epoch 2 img/s':>14} {'x light':>8}")
    light = None
    for name, data_keys, train_keys in RECIPE_PIECES:
        config = finetune_config(work / f"recipe-{name.replace(' ', '_').replace('/', '-')}", data, "head-only",
                                 False, 2, image_size, data_keys=data_keys, train_keys=train_keys)
        _, _, speeds, _ = run_finetune(config)
        light = light or speeds
        slower = [light[i] / speeds[i] for i in range(2)]
        mark = f" (target <={PRESET_TARGET:g}x)" if data_keys.get("augment") not in (None, "light") else ""
        print(f"  {name:<28} {speeds[0]:>14.1f} {slower[0]:>7.2f}x {speeds[1]:>14.1f} {slower[1]:>7.2f}x{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=64, help="training photos (default 64)")
    parser.add_argument("--val", type=int, default=16, help="validation photos (default 16)")
    parser.add_argument("--width", type=int, default=4032)
    parser.add_argument("--height", type=int, default=3024)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data", type=Path, help="keep the photos in this folder (made once, reused later)")
    parser.add_argument("--skip-extra", action="store_true", help="only the end-to-end cases")
    parser.add_argument("--recipes", action="store_true", help="only the cost of each accuracy-recipe piece")
    parser.add_argument("--plain-loop", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        data, freeze, augment, epochs, size = args.plain_loop
        plain_loop(Path(data), freeze, augment == "1", int(epochs), int(size))
        return

    import torch

    from finetune.utils.hardware import read_cpu

    print(f"finetune photo benchmark: {read_cpu().describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU kernels {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or Path(folder) / "photos"
        if not (data / "train").is_dir():
            start = time.perf_counter()
            make_photos(data, args.train, args.val, (args.width, args.height))
            print(f"generated {args.train} + {args.val} JPEGs of {args.width}x{args.height} "
                  f"({sum(p.stat().st_size for p in data.rglob('*.jpg')) / 2**20 / (args.train + args.val):.1f} MiB "
                  f"each) in {time.perf_counter() - start:.0f} s at {data}")
        work = Path(folder) / "runs"
        if args.recipes:
            recipe_costs(data, work, args.image_size)
            return
        end_to_end(data, work, args.image_size)
        if not args.skip_extra:
            spilled_cache(data, work, args.image_size)
            threads_or_processes(data, args.image_size)
            workers_sweep(data, work, args.image_size)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
