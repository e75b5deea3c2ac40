"""``finetune models --bench``: how fast each model is on this machine, through finetune's own fast path.

For each model, built with random weights and a 10-class head at the image size asked (or its weights' own), on a
synthetic batch, in the precision and memory format training would pick here:

- **features**: the frozen backbone's forward pass (no autograd, eval mode): what each image costs a head-only or
  partly frozen fine-tune in its first epoch (later epochs train from the feature cache);
- **train**: one training step (forward, backward, SGD) of finetune's epoch loop, everything trainable
  (``--freeze full``) or the head only (``--freeze head``: the backbone's forward plus the head);
- **inference**: the whole model in eval mode under ``torch.inference_mode``, as ``predict`` runs it.

Each is timed after a warm-up, repeated for about ``seconds`` (at least twice), and given in images per second.
Rows are sorted by training speed; a model is on the Pareto front when no faster model is also more accurate on
ImageNet. Data only; ``cli.render`` prints it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.models.arch import get_arch
from finetune.models.fastpath import FastModel
from finetune.training.epoch import TrainState, train_one_epoch
from finetune.training.setup import Setup, prepare
from finetune.training.validate import validate
from finetune.utils.hardware import precision_for, read_cpu

CLASSES = 10
BATCH = 16
FREEZES = {"head": "[head]", "full": '["*"]'}


@dataclass
class BenchRow:
    model: str
    acc1: float
    gflops: float  # at the weights' own size (torchvision's metadata)
    image_size: int
    memory_format: str  # of the training step
    features_per_s: float
    train_per_s: float
    inference_per_s: float
    pareto: bool = False


@dataclass
class ModelBench:
    cpu: str
    threads: int
    precision: str
    freeze: str
    batch: int
    rows: list[BenchRow] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def bench_models(names: list[str], image_size: Optional[int] = None, freeze: str = "full", batch: int = BATCH,
                 seconds: float = 1.0, on_model: Callable[[str], None] = lambda name: None) -> ModelBench:
    """Measure ``names`` (see the module docstring); ``image_size`` None: each model's own. ``on_model`` is told
    the model about to be measured (for progress). Raises FinetuneError, before measuring any, for an image size a
    model cannot take."""
    problems = [f"{name}: {get_arch(name).size_problem(image_size)}" for name in names
                if image_size and get_arch(name).size_problem(image_size)]
    if problems:
        raise FinetuneError(f"--image-size {image_size} does not fit every model:\n  " + "\n  ".join(problems)
                            + "\nChoose another size, or leave those models out with --only.")
    precision = precision_for("auto", "cpu").precision
    result = ModelBench(read_cpu().describe(), torch.get_num_threads(), precision, freeze, batch)
    for name in names:
        on_model(name)
        result.rows.append(_bench_one(name, image_size, freeze, precision, batch, seconds))
    result.rows.sort(key=lambda row: -row.train_per_s)
    mark_pareto(result.rows)
    return result


def mark_pareto(rows: list[BenchRow]) -> None:
    """Mark the rows no other row beats on both training speed and ImageNet accuracy."""
    for row in rows:
        row.pareto = not any(other.train_per_s > row.train_per_s and other.acc1 > row.acc1 for other in rows)


def _bench_one(name: str, image_size: Optional[int], freeze: str, precision: str, batch: int,
               seconds: float) -> BenchRow:
    arch = get_arch(name)
    size = image_size or arch.weights[0].crop
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(CLASSES, (batch,), generator=generator)
    _, head_only = _trainer(name, size, "head", precision)
    features = _per_second(lambda: head_only.features(x), batch, seconds)
    setup, fast = _trainer(name, size, freeze, precision)
    train = _per_second(lambda: train_one_epoch(fast, [(fast.features(x), y)], setup.loss_fn, setup.optimizer,
                                                setup.schedule, TrainState()), batch, seconds)
    whole = FastModel.whole(arch.build(CLASSES, size).eval(), arch, size)

    def infer():
        with torch.inference_mode(), whole.autocast():
            whole(x)

    return BenchRow(name, arch.weights[0].acc1, arch.weights[0].gflops, size,
                    "channels-last" if fast.layout.channels_last else "default", features,
                    train, _per_second(infer, batch, seconds))


def _trainer(name: str, size: int, freeze: str, precision: str) -> tuple[Setup, FastModel]:
    """The model prepared as ``train`` prepares it (random weights, ``freeze``, no data) and its fast path."""
    config = load_config(None, [f"model.arch={name}", "model.weights=none", f"model.num_classes={CLASSES}",
                                f"data.image_size={size}", f"freeze.trainable={FREEZES[freeze]}",
                                f"train.precision={precision}"])
    validate(config)
    setup = prepare(config)
    return setup, setup.fast_model(setup.built.plan)


def _per_second(step: Callable, batch: int, seconds: float) -> float:
    step()  # warm-up: oneDNN picks its kernels on the first call
    times, began = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)
