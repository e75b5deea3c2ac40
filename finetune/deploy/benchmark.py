"""How fast a trained model classifies on this CPU: latency at batch 1, throughput at a batch size, and image
decoding + preprocessing, each measured on its own.

Models are timed on what ``finetune predict`` calls (``Loaded.logits`` of a normalised batch), on seeded random
images: a CNN's time does not depend on the pixels. Decoding and preprocessing (``data.load_image``: decode, resize,
centre-crop, normalise) are timed per image on real files, or on a synthetic photo-sized JPEG.

Every measurement starts with warm-up calls (allocation, kernel choice, caches), then times calls until it has at
least a minimum count of them and a minimum duration. Several models are timed interleaved, call after call, so
that a machine shared with other work slows them alike and their ratio holds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from finetune.data.folders import eval_transform, load_image
from finetune.deploy.inference import image_paths, load_model
from finetune.errors import FinetuneError
from finetune.utils.hardware import INT8_FLAGS, SHOWN_FLAGS, read_cpu

WARMUP = 3
LATENCY_RUNS = 30  # timed batch-1 calls at least: the 95th percentile needs a tail to be read from
THROUGHPUT_RUNS = 3
SECONDS = 3.0  # each measurement runs at least this long
SYNTHETIC_PHOTO = (1024, 768)  # width, height of the JPEG timed when no --images are given
CPU_FLAGS = tuple(dict.fromkeys(SHOWN_FLAGS + INT8_FLAGS))


def time_calls(calls: dict[str, Callable[[], object]], runs: int, seconds: float,
               warmup: int = WARMUP) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, run in turn (interleaved) after ``warmup`` calls each, until every
    one ran ``runs`` times and ``seconds`` have passed."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    while min(map(len, times.values())) < runs or time.perf_counter() - start < seconds:
        for name, call in calls.items():
            tick = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - tick)
    return times


def summary(times: list[float]) -> dict:
    """p50 and p95 in milliseconds of ``times`` (seconds), and how many there were."""
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * p95, "runs": len(ordered)}


@torch.inference_mode()
def model_speed(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], image_size: int, batch_size: int = 32,
                seconds: float = SECONDS) -> dict[str, dict]:
    """Per model (called on normalised batches): ``latency`` at batch 1 (p50/p95 ms) and ``throughput`` at
    ``batch_size`` (images/s from the median batch time), the models interleaved."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    single = batch[:1].clone()
    latency = time_calls({name: lambda m=model: m(single) for name, model in models.items()}, LATENCY_RUNS, seconds)
    full = time_calls({name: lambda m=model: m(batch) for name, model in models.items()}, THROUGHPUT_RUNS, seconds,
                      warmup=1)
    return {name: {"latency": summary(latency[name]),
                   "throughput": {**summary(full[name]), "batch_size": batch_size,
                                  "images_per_s": batch_size / statistics.median(full[name])}}
            for name in models}


def preprocess_speed(files: list[Path], image_size: int, fast_decode: bool = True, seconds: float = SECONDS) -> dict:
    """Decode + resize + crop + normalise, one image at a time, cycling through ``files``: p50/p95 ms per image and
    images/s (from the mean)."""
    transform = eval_transform(image_size, fast_decode)
    turn = iter(range(10**12))
    times = time_calls({"preprocess": lambda: load_image(str(files[next(turn) % len(files)]), transform, hint="")},
                       LATENCY_RUNS, seconds, warmup=1)["preprocess"]
    return {**summary(times), "images_per_s": len(times) / sum(times)}


def synthetic_photo(folder: Path) -> Path:
    """A photo-sized JPEG (``SYNTHETIC_PHOTO``) of smooth colour with noise, written into ``folder``."""
    from PIL import Image

    width, height = SYNTHETIC_PHOTO
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, width).view(1, 1, width) * torch.linspace(0.3, 1, height).view(1, height, 1)
    pixels = torch.stack([ramp[0], ramp[0].flip(1), ramp[0].flip(0)]) * 200 + 40 * torch.rand(3, height, width,
                                                                                               generator=generator)
    path = Path(folder) / "photo.jpg"
    Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path, quality=90)
    return path


def cpu_description() -> dict:
    """This CPU's model, cores, the flags that decide fp32/bf16/int8 speed, and one line naming them."""
    cpu = read_cpu()
    return {"cpu": cpu.model, "cores": cpu.cores, "cpu_flags": {flag: flag in cpu.flags for flag in CPU_FLAGS},
            "cpu_line": cpu.describe(CPU_FLAGS)}


def runtime(kind: str) -> str:
    """What runs a model of ``kind``, with its version."""
    if kind.startswith("onnx"):
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}" + (" (TorchScript)" if kind == "torchscript" else " (eager)")


def benchmark(path: Path, batch_size: int = 32, threads: Optional[int] = None, images: Optional[Path] = None,
              seconds: float = SECONDS) -> dict:
    """Latency at batch 1 and throughput at ``batch_size`` of a checkpoint, an exported ``.onnx`` (fp32 or int8)
    or TorchScript file, and the time to decode and preprocess an image (the files of ``images``, or a synthetic
    JPEG), on this CPU with ``threads`` compute threads (default: torch's and onnxruntime's, one per core).

    Raises FinetuneError for a file that is not a model finetune can load, or bad options.
    """
    if batch_size < 1 or (threads is not None and threads < 1) or not seconds > 0:
        raise FinetuneError(f"--batch-size ({batch_size}) and --threads ({threads}) must be at least 1, and "
                            f"--seconds ({seconds}) positive.")
    files = image_paths([images]) if images is not None else None
    loaded = load_model(path, threads)
    size = loaded.config.data.image_size
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        speed = model_speed({"model": loaded.logits}, size, batch_size, seconds)["model"]
        with tempfile.TemporaryDirectory(prefix="finetune-benchmark.") as tmp:
            decode = preprocess_speed(files or [synthetic_photo(Path(tmp))], size, loaded.config.data.fast_decode,
                                      seconds)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    width, height = SYNTHETIC_PHOTO
    decode["source"] = (f"{len(files)} image file(s) of {images}" if files else
                        f"a synthetic {width}x{height} JPEG (give --images DIR to time your own files)")
    return {"model": str(path), "kind": loaded.kind, "arch": loaded.config.model.arch, "image_size": size,
            "classes": len(loaded.classes), "calibrated": loaded.temperature is not None, **cpu_description(),
            "threads": threads or used, "runtime": runtime(loaded.kind), **speed, "preprocess": decode}
