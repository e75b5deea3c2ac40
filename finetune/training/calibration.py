"""Calibrated probabilities by temperature scaling: the logits divided by one scalar T, fitted on validation logits.

A network trained to low loss is often over-confident: of the images it calls 97% cat, far fewer than 97% are
cats. Temperature scaling (Guo et al., 2017) divides every logit by T > 0, which leaves every prediction as it was
and only softens (T > 1) or sharpens (T < 1) the probabilities. T minimises the negative log-likelihood (NLL) of the
validation labels, found by LBFGS on log T, so T stays positive.

What the fit is worth is measured on images the fit did not see: **cross-fitting** over ``FOLDS`` folds of the
validation split. Each fold is scored with the temperature fitted on the other folds, so every image gets a
calibrated probability from a fit that never saw it; NLL, expected calibration error (ECE) and accuracy are computed
on those, against the uncalibrated probabilities of the same images. The temperature stored is then fitted on the
whole split, unless the held-out NLL would rise: then it is 1, so calibration never makes held-out NLL worse.

ECE: the predictions binned by confidence (the top probability) in ``ECE_BINS`` equal-width bins; the mean over
images of |accuracy - mean confidence| of their bin.

The math takes tensors and returns numbers, so tests need no images; :func:`calibrate_checkpoint` runs it on a
checkpoint's validation logits and stores the temperature in the checkpoint. ``train.calibrate`` calls it on
``best.pt`` when training ends, ``finetune calibrate`` on any checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data import folders
from finetune.data.loaders import default_workers, make_loader
from finetune.errors import FinetuneError, Problem
from finetune.models.arch import get_arch
from finetune.models.fastpath import FastModel
from finetune.training.checkpoint import load_checkpoint, restore_model, save_checkpoint, saved_config
from finetune.utils.files import writing

ECE_BINS = 15
FOLDS = 5
# Beyond these the fit extrapolates: a validation split the model gets all right pushes T towards 0, all wrong
# towards infinity, and neither says how sure to be of the next image.
TEMPERATURE_RANGE = (0.01, 100.0)
PLOT_NAME = "reliability.png"


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under softmax(logits / temperature)."""
    return nn.functional.cross_entropy(logits.double() / temperature, targets).item()


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin ((k/bins, (k+1)/bins], k = 0..bins-1): its edges, how many predictions fall in it, their
    mean confidence and their accuracy (None for an empty bin)."""
    confidence, predicted = probs.double().max(1)
    correct = (predicted == targets).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(index, minlength=bins)
    confidence_sum = torch.zeros(bins, dtype=torch.double).index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.double).index_add_(0, index, correct)
    return [{"low": k / bins, "high": (k + 1) / bins, "count": int(count[k]),
             "confidence": confidence_sum[k].item() / int(count[k]) if count[k] else None,
             "accuracy": correct_sum[k].item() / int(count[k]) if count[k] else None} for k in range(bins)]


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of ``probs`` over ``bins`` equal-width confidence bins (nan without images)."""
    return _ece(reliability(probs, targets, bins), len(targets))


def _ece(rows: list[dict], images: int) -> float:
    if not images:
        return float("nan")
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]) / images


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature in ``TEMPERATURE_RANGE`` that minimises the NLL of ``targets`` under softmax(logits / T)."""
    logits = logits.detach().double()
    low, high = (math.log(bound) for bound in TEMPERATURE_RANGE)
    log_t = torch.zeros((), dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.clamp(low, high).exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return math.exp(min(max(log_t.item(), low), high))


def check_temperature(value, source: str) -> float:
    """``value`` as a float when it is a usable temperature (finite, positive), else a FinetuneError naming
    ``source``, the file it comes from."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FinetuneError(f"{source} holds the temperature {value!r}, which is not a positive finite number: the "
                            "file is damaged. Fit it again with `finetune calibrate CHECKPOINT --overwrite` (and "
                            "export again).")
    return float(value)


def stored_temperature(checkpoint: dict, path: Path) -> Optional[float]:
    """The temperature stored in a loaded checkpoint, None when it was never calibrated; a damaged one is an error."""
    calibration = checkpoint.get("calibration")
    if calibration is None:
        return None
    if not isinstance(calibration, dict) or "temperature" not in calibration:
        raise FinetuneError(f"{path} holds a damaged calibration (no temperature); fit it again with "
                            f"`finetune calibrate {path} --overwrite`.")
    return check_temperature(calibration["temperature"], str(path))


def problems(config: Config) -> list[Problem]:
    """``train.calibrate`` on a validation split too small to fit and check a temperature (at least 2 images),
    found before training rather than after it. ``data.root`` must be set and free of layout problems."""
    if not config.train.calibrate or folders.demo_due(config):
        return []
    images = folders.val_images(config)
    if images >= 2:
        return []
    return [Problem("train.calibrate", f"the validation split of {config.data.root} has {images} image(s); fitting "
                                       "and checking a temperature needs at least 2 (a few hundred for a "
                                       "trustworthy one): add validation images or set train.calibrate: false")]


@dataclass
class Scores:
    nll: float
    ece: float
    accuracy: float


@dataclass
class Calibration:
    """A fitted temperature and what it does on held-out images (cross-fitted), before and after.

    ``applied`` is False when the held-out NLL would rise: then the temperature is 1 (the model as trained) and
    ``after`` is ``before``.
    """

    temperature: float
    applied: bool
    images: int
    folds: int
    fold_temperatures: list[float]
    fitted: float  # the temperature fitted on the whole split, applied or not
    before: Scores
    after: Scores
    bins_before: list[dict]
    bins_after: list[dict]

    @property
    def held_out(self) -> str:
        return (f"cross-fitting over {self.folds} folds of the validation split ({self.images} images): each fold "
                "scored with the temperature fitted on the other folds")

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "applied": self.applied, "fitted_temperature": self.fitted,
                "images": self.images, "held_out": self.held_out, "folds": self.folds,
                "fold_temperatures": self.fold_temperatures, "bins": ECE_BINS, "before": asdict(self.before),
                "after": asdict(self.after), "reliability_before": self.bins_before,
                "reliability_after": self.bins_after}


def cross_fit(logits: torch.Tensor, targets: torch.Tensor, folds: int = FOLDS, seed: int = 0) -> Calibration:
    """Fit the temperature on all of ``logits`` and score it by cross-fitting over ``folds`` folds (fewer when
    there are fewer images; at least 2 images). Folds are a seeded shuffle, so the same logits give the same
    report. Where the held-out NLL would rise, the temperature is 1: calibration never makes the model worse on
    what it minimises."""
    n = len(targets)
    if n < 2:
        raise ValueError(f"cross-fitting needs at least 2 images, got {n}")
    folds = min(folds, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held_out = torch.empty(n, logits.shape[1], dtype=torch.double)
    fold_temperatures = []
    for fold in range(folds):
        scored, fitted = order[fold::folds], torch.cat([order[k::folds] for k in range(folds) if k != fold])
        temperature = fit_temperature(logits[fitted], targets[fitted])
        held_out[scored] = logits[scored].double() / temperature
        fold_temperatures.append(temperature)
    (before, bins_before), (after, bins_after) = _scores(logits.double(), targets), _scores(held_out, targets)
    fitted = fit_temperature(logits, targets)
    applied = after.nll <= before.nll
    if not applied:
        after, bins_after = before, bins_before
    return Calibration(temperature=fitted if applied else 1.0, applied=applied, images=n, folds=folds,
                       fold_temperatures=fold_temperatures, fitted=fitted, before=before, after=after,
                       bins_before=bins_before, bins_after=bins_after)


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[Scores, list[dict]]:
    probs = logits.softmax(1)
    bins = reliability(probs, targets)
    return Scores(nll(logits, targets), _ece(bins, len(targets)), _accuracy(probs, targets)), bins


def _accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    return (probs.argmax(1) == targets).double().mean().item()


@torch.no_grad()  # not inference_mode: the temperature fit takes these logits into autograd
def logits_of(model: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int, num_classes: int,
              workers: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (``model`` of each normalised batch) and targets of every item of ``dataset``, in order."""
    workers = default_workers(dataset) if workers is None else workers
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
    logits, targets = [torch.empty(0, num_classes)], [torch.empty(0, dtype=torch.long)]
    for images, labels in loader:
        logits.append(model(images).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def calibrate_checkpoint(path: Path, dataset, batch_size: int, model: Optional[nn.Module] = None) -> dict:
    """Fit the temperature of the checkpoint at ``path`` on ``dataset`` (its validation split), store it in the
    checkpoint (rewritten atomically; the weights are the same tensors) and draw reliability.png beside it.

    ``model``: the checkpoint's model when the caller has built it already (else it is built here).
    Returns :meth:`Calibration.to_json` with ``checkpoint`` and ``reliability_png``.
    Raises FinetuneError when the split has fewer than 2 images or the model's logits are not finite.
    """
    from finetune.utils.plots import plot_reliability

    path = Path(path)
    checkpoint = load_checkpoint(path)
    config = saved_config(checkpoint["config"])
    model = model if model is not None else restore_model(checkpoint)[0]
    fast = FastModel.whole(model, get_arch(config.model.arch), config.data.image_size)
    logits, targets = logits_of(fast.head, dataset, batch_size, len(checkpoint["classes"]))
    if len(targets) < 2:
        raise FinetuneError(f"Cannot calibrate {path}: its validation split ({config.data.root}) has {len(targets)} "
                            "image(s); fitting and checking a temperature needs at least 2 (a few hundred for a "
                            "trustworthy one).")
    if not torch.isfinite(logits).all():
        raise FinetuneError(f"Cannot calibrate {path}: it gives non-finite logits on "
                            f"{int((~torch.isfinite(logits)).any(1).sum())} validation image(s).", exit_code=1)
    result = cross_fit(logits, targets)
    plot = path.parent / PLOT_NAME
    report = result.to_json()
    with writing(f"the calibration of {path}", "Make its folder writable, on a disk with room."):
        plot_reliability(result.bins_before, result.bins_after, result.before.ece, result.after.ece,
                         f"after (temperature {result.temperature:.3g}, held out)" if result.applied else
                         "after: temperature kept at 1", plot)
        save_checkpoint(path, {**checkpoint, "calibration": {k: v for k, v in report.items()
                                                             if not k.startswith("reliability")}})
    return {"checkpoint": str(path), **report, "reliability_png": str(plot)}
