"""``finetune lr-find``: the learning-rate range test (Smith 2015; fastai's ``lr_find``).

It trains for a few dozen steps while the learning rate grows exponentially from
``start`` to ``end``, and watches the loss: it falls, flattens, then blows up. The
rate to train at sits on the steep part of the fall, before the minimum.

What it sweeps is exactly what ``train`` trains in epoch 1, prepared by the same
:func:`finetune.training.setup.prepare` and stepped by the same ``train_step``: the model
(weights, head, freeze rules, BatchNorm modes), the optimizer with its param groups, the
loss (label smoothing, class weights), the data order, gradient clipping and precision. ``optim.lr`` is the swept value; every
param group's rate is scaled with it, so layer_lr_decay and param_groups keep their
ratios. When the frozen prefix can be cached (as in training) the images pass through
it at most once and the later steps run from the feature cache. The model and the
optimizer are restored afterwards; nothing is written but the plot.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.training.epoch import Updated, train_step
from finetune.training.setup import prepare
from finetune.training.validate import validate
from finetune.utils.files import writing

SMOOTHING = 0.98  # fastai's: the loss of one batch is noisy, the curve needs about 50 of them to settle
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum
MIN_POINTS = 5  # fewer finite points than this tell nothing
SKIP_START = 0.1  # share of the curve left out of the suggestion while the moving average settles (as fastai)
MIN_DROP = 0.02  # a smoothed loss that never falls by this share has no descent to read
MAX_LR = 10.0  # the largest optim.lr the config accepts


class Smoother:
    """fastai's bias-corrected exponential moving average of the loss."""

    def __init__(self, beta: float = SMOOTHING):
        self.beta, self.average, self.count = beta, 0.0, 0

    def __call__(self, value: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta ** self.count)


def ramp(start: float, end: float, steps: int) -> list[float]:
    """``steps`` learning rates from ``start`` to ``end``, evenly spaced on a log scale."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


@dataclass
class Curve:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "reached the end of the range"


def range_test(fast, optimizer: torch.optim.Optimizer, batches: Iterable, criterion, lrs: Sequence[float],
               base_lr: float, grad_clip: Optional[float] = None) -> Curve:
    """One training step (``train_step``, as ``train`` takes it) per learning rate in ``lrs`` over ``batches`` of
    (prefix features, targets).

    Each param group trains at its base rate (``initial_lr``) times ``lr / base_lr``. The sweep stops early
    when the smoothed loss exceeds ``DIVERGED`` times its minimum, or at a step that fails (a non-finite loss or
    gradient: that step is left out and not taken). ``fast.model`` and ``optimizer`` are restored to their state
    before the sweep.
    """
    model_state = copy.deepcopy(fast.model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    base_rates = [group["initial_lr"] for group in optimizer.param_groups]
    updated = Updated.of(fast.model)
    curve, smoother, best = Curve(), Smoother(), math.inf
    try:
        for lr, (features, targets) in zip(lrs, batches):
            for group, base in zip(optimizer.param_groups, base_rates):
                group["lr"] = base * lr / base_lr
            step = train_step(fast, features, targets, criterion, optimizer, updated, grad_clip=grad_clip)
            if step.problem:
                what = f"the loss turned {step.loss}" if not math.isfinite(step.loss) else step.problem
                curve.stopped = f"{what} at lr {lr:.2e}"
                break
            smoothed = smoother(step.loss)
            curve.lrs.append(lr)
            curve.losses.append(step.loss)
            curve.smoothed.append(smoothed)
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                curve.stopped = f"the smoothed loss exceeded {DIVERGED:g}x its minimum at lr {lr:.2e}"
                break
        else:
            if len(curve.lrs) < len(lrs):
                curve.stopped = "ran out of batches"
    finally:
        fast.model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
    return curve


@dataclass
class Suggestion:
    lr: Optional[float]  # None when the curve shows no usable descent
    rule: str  # how it was chosen, or why there is none
    steepest: Optional[float] = None  # lr of the steepest descent of the smoothed loss (before its minimum)
    minimum: Optional[float] = None  # lr of the smoothed loss's minimum


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> Suggestion:
    """The learning rate to train at: the steepest descent of the smoothed loss, checked against minimum/10.

    The first ``SKIP_START`` of the curve is left out, as fastai does: the moving average is still settling
    there. The steepest descent (most negative slope against log lr, before the minimum) is used when it lies
    within 10x of minimum/10, i.e. between minimum/100 and the minimum; otherwise (a noisy dip far below)
    minimum/10 is used. Both are classic rules of thumb (fastai's "steep" and "minimum/10"). A curve whose
    smoothed loss never falls by ``MIN_DROP`` has no descent to read, and gives no suggestion.
    """
    first = int(len(smoothed) * SKIP_START)
    if len(smoothed) - first < MIN_POINTS:
        return Suggestion(None, f"only {len(smoothed)} finite loss value(s), too few for a curve: lower --start "
                                "or raise --steps")
    low = min(range(first, len(smoothed)), key=smoothed.__getitem__)
    drop = 1 - smoothed[low] / smoothed[first]
    if low == first:
        return Suggestion(None, f"the loss rose from the start, at {lrs[first]:.2e}: the range starts too high; "
                                "lower --start", minimum=lrs[low])
    if drop < MIN_DROP:
        return Suggestion(None, f"the smoothed loss fell only {drop:.1%} before rising (from {lrs[first]:.2e} to its "
                                f"minimum at {lrs[low]:.2e}): no descent to read a rate from. More steps average "
                                "more images per rate (raise --steps); a model far from learning anything (random "
                                "weights) may need a few epochs first", minimum=lrs[low])
    x = [math.log10(lr) for lr in lrs[first:low + 1]]
    y = list(smoothed[first:low + 1])
    last = len(y) - 1
    slopes = [(y[min(i + 1, last)] - y[max(i - 1, 0)]) / (x[min(i + 1, last)] - x[max(i - 1, 0)])
              for i in range(last + 1)]
    steepest, minimum = lrs[first + min(range(last + 1), key=slopes.__getitem__)], lrs[low]
    notes = f"; the smoothed loss fell {drop:.1%} to its minimum"
    if low == len(lrs) - 1:
        notes += "; it was still falling at the end of the range: raise --end"
    if steepest >= minimum / 100:
        return Suggestion(steepest, f"steepest descent of the smoothed loss, at {steepest:.2e}; checked against "
                                    f"minimum/10 = {minimum / 10:.2e}: within 10x{notes}", steepest, minimum)
    return Suggestion(minimum / 10, f"minimum of the smoothed loss / 10 = {minimum:.2e} / 10; the steepest descent, "
                                    f"at {steepest:.2e}, is more than 10x below it{notes}", steepest, minimum)


def overrides(config: Config, lr: float) -> list[str]:
    """The ``--set`` values that train at ``lr``: ``optim.lr``, and ``optim.param_groups`` scaled with it."""
    sets = [f"optim.lr={lr:g}"]
    if config.optim.param_groups:
        factor = lr / config.optim.lr
        groups = [{"params": group.params, "lr": float(f"{group.lr * factor:.2g}")}
                  for group in config.optim.param_groups]
        sets.append("optim.param_groups=" + json.dumps(groups))  # JSON is YAML
    return sets


def train_command(config_path: Optional[Path], sets: Sequence[str], new: Sequence[str]) -> str:
    """``finetune train`` with the same config and ``--set`` options, those for the keys in ``new`` replaced."""
    replaced = {item.split("=", 1)[0].strip() for item in new}
    words = ["finetune", "train"] + (["--config", str(config_path)] if config_path else [])
    for item in [s for s in sets if s.split("=", 1)[0].strip() not in replaced] + list(new):
        words += ["--set", item]
    return shlex.join(words)


@dataclass
class LRFind:
    curve: Curve
    suggestion: Suggestion
    start: float
    end: float
    steps: int
    source: str  # where the features came from, in words
    groups: list[dict]  # each param group's share of optim.lr and its tensor count
    overrides: list[str]
    command: Optional[str]
    plot: str
    seconds: float

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(data.pop("curve"))
        data["suggestion"] = self.suggestion.lr
        data.update({f"suggestion_{k}": v for k, v in asdict(self.suggestion).items() if k != "lr"})
        return data


def check_range(start: float, end: float, steps: int) -> None:
    """Raise FinetuneError (exit 2) for a range that is empty or outside what ``optim.lr`` accepts."""
    if not 0 < start < end:
        raise FinetuneError(f"--start {start:g} and --end {end:g} give an empty range: need 0 < --start < --end, "
                            "e.g. --start 1e-6 --end 1.")
    if end > MAX_LR:
        raise FinetuneError(f"--end {end:g} is above {MAX_LR:g}, the largest optim.lr the config accepts; "
                            f"use --end {MAX_LR:g} or less.")
    if steps < MIN_POINTS:
        raise FinetuneError(f"--steps {steps} is too few for a curve; use at least {MIN_POINTS} (100 is usual).")


def lr_find(config: Config, start: float = 1e-6, end: float = 1.0, steps: int = 100,
            output: Optional[Path] = None, sets: Sequence[str] = ()) -> LRFind:
    """Run the range test over what ``train`` trains in epoch 1 and write the plot; returns curve and suggestion.

    ``sets`` are the ``--set`` options given, repeated in the suggested command. Raises FinetuneError (exit 2)
    for a bad range or config (see ``validate``; lr-find needs training data).
    """
    from finetune.utils.plots import plot_lr_find, plot_path

    check_range(start, end, steps)
    validate(config, data_needed_by="lr-find")
    out = plot_path(output, "lr_find.png")
    cannot = ("the lr-find plot", "Choose another --output: a .png file or a folder you can write to.")
    with writing(*cannot):  # before the test, not after it
        out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    setup = prepare(config)
    optimizer = setup.optimizer
    with tempfile.TemporaryDirectory(prefix="finetune-lr-find-") as spill:
        phase = setup.phase(setup.built.plan, Path(spill))
        try:
            batches = itertools.chain.from_iterable(map(phase.train_source.epoch, itertools.count()))
            curve = range_test(phase.fast, optimizer, batches, setup.loss_fn, ramp(start, end, steps),
                               config.optim.lr, config.optim.grad_clip)
        finally:
            phase.close()
    suggestion = suggest(curve.lrs, curve.smoothed)
    if suggestion.lr is not None:
        suggestion.lr = float(f"{suggestion.lr:.2g}")  # a rate people can type; the curve is not that precise
    with writing(*cannot):
        plot_lr_find(curve.lrs, curve.losses, curve.smoothed, suggestion.lr, out)
    names = phase.fast.prefix_names
    where = (f"the feature cache (the images pass once through the frozen prefix {names[0]} .. {names[-1]})"
             if phase.train_source.caching else
             f"images through the whole model{' (frozen prefix without autograd)' if names else ''}")
    where += f", precision {setup.precision.precision}"
    new = overrides(config, suggestion.lr) if suggestion.lr is not None else []
    return LRFind(curve, suggestion, start, end, steps, where,
                  [{"lr_ratio": group["initial_lr"] / config.optim.lr, "tensors": len(group["params"])}
                   for group in optimizer.param_groups],
                  new, train_command(config.path, sets, new) if new else None, str(out),
                  round(time.perf_counter() - began, 3))
