"""The training loop: setup, epochs, evaluation, checkpoint, summary.

Reads top to bottom. Everything a resumed run needs is in ``last.pt``: model,
optimizer (momentum buffers), scheduler, position (epoch and step), RNG states
and the metrics so far. The data order is a function of (seed, epoch) alone, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.build import build
from finetune.checkpoint import atomic_write_text, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from finetune.config import Config, config_error, load_config
from finetune.data import SeededSamples, default_workers, ensure_demo_data, load_datasets, steps_per_epoch
from finetune.distributed import Dist, setup, teardown
from finetune.errors import FinetuneError
from finetune.fastpath import FastModel, FeatureSource, cache_decision
from finetune.freeze import apply_plan, batchnorm_modes, frozen_tensors, plan_freeze, set_train_mode
from finetune.optim import add_trainable, build_optimizer, build_scheduler
from finetune.progress import Reporter

RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "summary.json")
# Keys a resumed run may change; anything else would make the result differ from an uninterrupted run.
RESUMABLE_CHANGES = {"train.epochs", "train.output_dir", "data.workers"}


@dataclass
class Progress:
    """Where a run is: completed epochs, steps done in the current one, and the metrics so far."""
    epoch: int = 0
    step: int = 0
    seen: int = 0  # training images seen in the current epoch, and their summed loss and correct count
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0  # training time spent in the current epoch
    grad_norm_sum: float = 0.0  # of the global gradient norm (before clipping) over the epoch's steps
    frozen_checksums: dict[str, str] = field(default_factory=dict)  # taken when the run started
    history: list[dict] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_val_acc: float = -1.0
    total_seconds: float = 0.0


class _Stop:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal stops at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: die at once, as by default (atomic writes keep files whole)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: Config, reporter: Reporter, *, output_dir: Optional[Path] = None, resume: Optional[Path] = None,
          overwrite: bool = False) -> dict:
    """Fine-tune as ``config`` says and write the run directory; returns the summary.

    With ``resume`` (a run directory) the run continues from its ``last.pt``. Under
    torchrun every process trains its shard and only rank 0 reports and writes.
    Raises FinetuneError for bad input, and with exit code 130/143 when interrupted.
    """
    dist = setup(config)
    try:
        return _train(config, reporter if dist.is_main else Reporter(), dist, output_dir, resume, overwrite)
    finally:
        teardown(dist)


def _train(config: Config, reporter: Reporter, dist: Dist, output_dir: Optional[Path], resume: Optional[Path],
           overwrite: bool) -> dict:
    start = time.perf_counter()
    if resume is not None:
        config = _config_for_resume(config, Path(resume))
        run_dir = Path(resume)
    else:
        run_dir = Path(output_dir or config.train.output_dir)
        _check_run_dir(run_dir, overwrite)
    config = config.model_copy(deep=True)
    config.train.output_dir = str(run_dir.resolve())
    demo = ensure_demo_data(config) if dist.is_main else None
    dist.barrier()
    if demo:
        reporter.message(f"Generated the shapes demo data set at {demo['root']} "
                         f"({demo['train']} train / {demo['val']} val images)")
    data = load_datasets(config)
    if data.bad_images:
        reporter.warn(f"skipped {len(data.bad_images)} unreadable image(s) (data.skip_bad_images: true): "
                      + ", ".join(data.bad_images[:5]) + (" ..." if len(data.bad_images) > 5 else ""))
    built = build(config, data.classes, progress=reporter.shows_progress)
    if built.weights.warning:
        reporter.warn(built.weights.warning)
    if resume is None and dist.is_main:
        _prepare_run_dir(run_dir, overwrite)  # only now: bad data or weights leave nothing behind
    dist.barrier()
    model = built.model
    optimizer = build_optimizer(model, config.optim)
    steps = steps_per_epoch(data.train, config.train.batch_size // dist.world, dist.world)
    scheduler = build_scheduler(optimizer, config.optim, config.train.epochs, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)
    phase = _Phase(config, data, model, built.plan, run_dir, reporter, dist)

    # Tensors frozen for the whole run (after the last stage) must end bit-identical.
    final_plan = plan_freeze(built.plan, config.freeze, config.where, config.train.epochs)
    frozen = frozen_tensors(model, final_plan, batchnorm_modes(model, final_plan, config.freeze.batchnorm))
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    if resume is not None:  # the checksums come from the checkpoint: those taken when the run started
        saved = load_checkpoint(run_dir / "last.pt")
        phase = _advance(phase, saved["progress"]["epoch"] + 1, optimizer, scheduler, reporter)
        progress = _restore(saved, run_dir / "last.pt", model, optimizer, scheduler, dist.world)
    else:
        progress = Progress(frozen_checksums=_checksums(frozen))
        if dist.is_main:
            atomic_write_text(run_dir / "config.yaml", config.to_yaml())

    def checkpoint(path: Path) -> None:
        if not dist.is_main:
            return
        save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "progress": asdict(progress), "rng": rng_states(), "classes": data.classes, "world": dist.world,
            "config": config.model_dump(mode="json"), "weights": built.weights.source,
            "pretrained": built.weights.pretrained})

    reporter.start(run_dir=run_dir, config=config, weights=built.weights.source, layout=data.layout,
                   train_images=len(data.train), val_images=len(data.val), classes=data.classes,
                   steps_per_epoch=steps, resumed_at=progress.epoch if resume else None)
    cache_reported = False
    with _Stop() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: phase.close())
        while progress.epoch < config.train.epochs:
            epoch = progress.epoch
            phase = _advance(phase, epoch + 1, optimizer, scheduler, reporter)
            set_train_mode(model, phase.bn_modes)
            finished = _train_epoch(phase.fast, phase.trainable, phase.train_source.epoch(epoch, progress.step),
                                    criterion, optimizer, scheduler, progress, steps, reporter, stop,
                                    config.optim.grad_clip, run_dir, dist)
            if not finished:
                checkpoint(run_dir / "last.pt")
                raise _interrupted(stop.signum, epoch, progress.step, run_dir)
            val = evaluate(phase.fast, phase.val_source.epoch(0), criterion, len(data.classes), dist)
            row = _epoch_row(epoch, progress, val, optimizer, dist)
            progress.history.append(row)
            progress.total_seconds += row["seconds"]
            progress.epoch, progress.step, progress.seen, progress.loss_sum, progress.correct = epoch + 1, 0, 0, 0, 0
            progress.seconds = progress.grad_norm_sum = 0.0
            improved = row["val_acc"] > progress.best_val_acc
            if improved:
                progress.best_epoch, progress.best_val_acc = row["epoch"], row["val_acc"]
            if dist.is_main:
                _write_metrics(run_dir, progress.history)
                checkpoint(run_dir / "last.pt")
                if improved:
                    checkpoint(run_dir / "best.pt")
                _plot_curves(run_dir, progress.history)
            reporter.epoch_end(row, improved)
            if phase.train_source.caching and not cache_reported:
                cache_reported = True
                reporter.message(f"feature cache: train {phase.train_source.describe()}, "
                                 f"val {phase.val_source.describe()}")
            if dist.any(stop.signum is not None):
                raise _interrupted(stop.signum, epoch + 1, 0, run_dir)

    changed = [name for name, digest in _checksums(frozen).items() if progress.frozen_checksums.get(name) != digest]
    summary = {
        "frozen_unchanged": not changed, "frozen_tensors": len(frozen),
        "run_dir": str(run_dir), "epochs": config.train.epochs, "best_epoch": progress.best_epoch,
        "best_val_acc": progress.best_val_acc, "final_val_acc": progress.history[-1]["val_acc"],
        "train_seconds": round(progress.total_seconds, 3), "total_seconds": round(time.perf_counter() - start, 3),
        "pretrained": built.weights.pretrained, "weights": built.weights.source,
        "weights_warning": built.weights.warning, "classes": data.classes,
        "train_images": len(data.train), "val_images": len(data.val), "skipped_images": data.bad_images,
        "processes": dist.world,
        "device": str(dist.device),
    }
    if dist.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if changed:
        raise FinetuneError(f"Frozen tensors changed during training: {', '.join(changed[:5])}"
                            f"{' ...' if len(changed) > 5 else ''}. They should be bit-identical; "
                            "this is a bug, please report it with the run's config.yaml.", exit_code=1)
    reporter.finish(summary, progress.history)
    return summary


def _train_epoch(fast: FastModel, trainable, batches, criterion, optimizer, scheduler, progress: Progress,
                 steps: int, reporter: Reporter, stop: _Stop, grad_clip: Optional[float], run_dir: Path,
                 dist: Dist = Dist()) -> bool:
    """Train over the (prefix features, targets) ``batches``; False when a signal asked to stop (after a step)."""
    model = fast.model
    watched = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    watched += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()
                and model.get_submodule(n.rsplit(".", 1)[0]).training]
    tick = time.perf_counter()
    for features, targets in batches:
        targets = targets.to(fast.device, non_blocking=True)
        logits = fast.head(features)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        loss_value = loss.item()
        if not math.isfinite(loss_value) or not torch.isfinite(norm):
            culprit = next((n for n, p in model.named_parameters()
                            if p.grad is not None and not torch.isfinite(p.grad).all()), None)
            raise _diverged(f"epoch {progress.epoch + 1}, step {progress.step + 1}: the loss is {loss_value}; "
                            "first parameter with a non-finite gradient: "
                            f"{culprit or 'none (the loss itself overflowed)'}", progress, optimizer, run_dir)
        optimizer.step()
        broken = next((name for name, t in watched if not torch.isfinite(t).all()), None)
        if broken:  # a finite but huge update, or BatchNorm statistics blown up by huge activations
            raise _diverged(f"epoch {progress.epoch + 1}, step {progress.step + 1}: non-finite values in {broken} "
                            "after the update", progress, optimizer, run_dir)
        scheduler.step()
        progress.step += 1
        progress.seen += len(targets)
        progress.grad_norm_sum += norm.item()
        progress.loss_sum += loss_value * len(targets)
        progress.correct += (logits.argmax(1) == targets).sum().item()
        now = time.perf_counter()
        progress.seconds += now - tick
        tick = now
        reporter.step(progress.epoch, progress.step, steps, progress.loss_sum / progress.seen,
                      progress.correct / progress.seen, optimizer.param_groups[0]["lr"],
                      progress.seen / max(progress.seconds, 1e-9))
        if dist.any(stop.signum is not None) and progress.step < steps:  # every process stops at the same step
            return False
    return True


@torch.inference_mode()
def evaluate(fast: FastModel, batches, criterion, num_classes: int, dist: Dist = Dist()) -> dict:
    """Loss, top-1 and top-5 accuracy (and the confusion matrix) in eval mode over (features, targets) batches.

    Under DDP each process evaluates its shard and the sums are combined.
    """
    fast.model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5, seen = 0.0, 0, 0
    k = min(5, num_classes)
    for features, targets in batches:
        logits = fast.head(features).cpu()
        loss_sum += criterion(logits, targets).item() * len(targets)
        top5 += (logits.topk(k, dim=1).indices == targets[:, None]).any(1).sum().item()
        confusion += torch.bincount(targets * num_classes + logits.argmax(1),
                                    minlength=num_classes ** 2).reshape(num_classes, num_classes)
        seen += len(targets)
    loss_sum, top5, seen = dist.sum([loss_sum, top5, seen])
    confusion = dist.sum_tensor(confusion)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "confusion": confusion, "n": 0}
    return {"loss": loss_sum / seen, "acc": confusion.diagonal().sum().item() / seen, "top5": top5 / seen,
            "confusion": confusion, "n": seen}


def _feature_sources(config: Config, data, fast: FastModel, run_dir: Path, reporter: Reporter, dist: Dist):
    """Train and val (features, targets) sources, with the feature cache when it is on."""
    use_cache, why = cache_decision(config.train.cache_features, fast, config.data.augment)
    if config.train.cache_features == "on" and not use_cache:
        raise config_error(config, [("train.cache_features", f"is 'on' but the cache cannot be used: "
                                     f"{why.removeprefix('off (').rstrip(')')}; use auto or off")])
    names = fast.prefix_names
    prefix = f"{names[0]} .. {names[-1]} (no autograd)" if names else "none"
    reporter.message(f"frozen prefix: {prefix}; precision {config.train.precision}; feature cache {why}")
    workers = config.data.workers if config.data.workers is not None else default_workers()
    cache_bytes = config.train.cache_max_gb * 2**30 if use_cache else None
    train_set = SeededSamples(data.train, config.train.seed) if config.data.augment else data.train
    common = dict(seed=config.train.seed, workers=workers, cache_bytes=cache_bytes, folder=run_dir, dist=dist)
    batch = config.train.batch_size // dist.world
    rank = f"-rank{dist.rank}" if dist.active else ""  # memory-mapped caches: one file per process
    return (FeatureSource(fast, train_set, batch, shuffle=True, split=f"train{rank}", **common),
            FeatureSource(fast, data.val, batch, shuffle=False, split=f"val{rank}", **common))


def _epoch_row(epoch: int, progress: Progress, val: dict, optimizer, dist: Dist) -> dict:
    loss_sum, correct, seen = dist.sum([progress.loss_sum, progress.correct, progress.seen])  # over all processes
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"],
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": progress.grad_norm_sum / max(progress.step, 1),
        "seconds": round(progress.seconds, 3),
        "images_per_s": round(seen / max(progress.seconds, 1e-9), 1),
    }


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def _plot_curves(run_dir: Path, history: list[dict]) -> None:
    from finetune.plots import plot_curves

    plot_curves(history, run_dir / "curves.png")


def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneError(f"Output directory {run_dir} is a file; choose another train.output_dir or --output-dir.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FinetuneError(f"Output directory {run_dir} already holds a run and is not empty.\n"
                                f"Continue it with --resume {run_dir}, replace it with --overwrite, "
                                "or choose another --output-dir.")
        others = [p.name for p in run_dir.iterdir() if p.name not in RUN_FILES]
        if others:
            raise FinetuneError(f"--overwrite refused: {run_dir} holds files finetune did not write "
                                f"({', '.join(sorted(others)[:5])}); choose another --output-dir.")


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FinetuneError(f"Cannot write to output directory {run_dir}: {exc.strerror}; "
                            "choose another train.output_dir or --output-dir.") from None


def _config_for_resume(config: Config, run_dir: Path) -> Config:
    if not (run_dir / "last.pt").is_file():
        raise FinetuneError(f"Nothing to resume in {run_dir}: no last.pt there. "
                            "Give the run directory of an earlier `finetune train`.")
    if (run_dir / "config.yaml").is_file():
        given, saved = _flat(config.model_dump()), _flat(load_config(run_dir / "config.yaml").model_dump())
        changed = sorted(k for k in given if given[k] != saved.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise FinetuneError(f"--resume {run_dir}: the config differs from the run's config.yaml in "
                                f"{', '.join(changed)}; a resumed run must use the same settings "
                                f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change).")
    return config


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _Phase:
    """What trains now: BatchNorm modes, the fast model and its feature sources. A stage starts a new phase."""

    def __init__(self, config: Config, data, model: nn.Module, plan: dict, run_dir: Path, reporter: Reporter,
                 dist: Dist, epoch: int = 1):
        self.config, self.data, self.model, self.plan, self.epoch = config, data, model, plan, epoch
        self.run_dir, self.reporter, self.dist = run_dir, reporter, dist
        self.bn_modes = batchnorm_modes(model, plan, config.freeze.batchnorm)
        self.fast = FastModel(model, plan, self.bn_modes, config.train.precision, dist.device)
        if dist.active:
            self.fast.distribute()
        self.train_source, self.val_source = _feature_sources(config, data, self.fast, run_dir, reporter, dist)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def close(self) -> None:
        self.train_source.close()
        self.val_source.close()


def _advance(phase: _Phase, epoch: int, optimizer, scheduler, reporter: Reporter) -> _Phase:
    """Start every stage due by (1-based) ``epoch``, one at a time and in order (so a resume rebuilds the same
    param groups): newly trainable parameters join the optimizer as new groups, BatchNorm modes and the fast
    path follow the new freeze state, and the old feature cache is dropped."""
    config = phase.config
    for stage in config.freeze.stages:
        if not phase.epoch < stage.epoch <= epoch:
            continue
        plan = plan_freeze(phase.plan, config.freeze, config.where, stage.epoch)
        newly = [n for n, decision in plan.items() if decision.trainable and not phase.plan[n].trainable]
        apply_plan(phase.model, plan)
        add_trainable(optimizer, phase.model, newly, config.optim)
        scheduler.apply()
        phase.close()
        phase = _Phase(config, phase.data, phase.model, plan, phase.run_dir, phase.reporter, phase.dist, stage.epoch)
        reporter.message(f"stage at epoch {stage.epoch}: {len(newly)} more tensors train "
                         f"({sum(p.numel() for n, p in phase.model.named_parameters() if n in newly):,} parameters, "
                         f"patterns {stage.trainable}); they join the optimizer as new param groups")
    return phase


def _restore(checkpoint: dict, path: Path, model, optimizer, scheduler, world: int) -> Progress:
    if checkpoint.get("world", 1) != world:
        raise FinetuneError(f"{path} was written by a run of {checkpoint.get('world', 1)} process(es); resume it "
                            f"with the same number (now {world}).")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    restore_rng_states(checkpoint["rng"])
    return Progress(**checkpoint["progress"])


def _checksums(tensors: dict) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for name, t in tensors.items()}


def _diverged(what: str, progress: Progress, optimizer, run_dir: Path) -> FinetuneError:
    kept = (f"the last good checkpoint {run_dir / 'last.pt'} (end of epoch {progress.epoch}) is kept"
            if progress.epoch else "no checkpoint was written yet")
    return FinetuneError(
        f"Training diverged at {what}.\n"
        f"Nothing was saved from it; {kept}.\n"
        f"Lower optim.lr (now {optimizer.defaults['lr']}) or set optim.grad_clip (e.g. --set optim.grad_clip=1.0).",
        exit_code=1)


def _interrupted(signum: Optional[int], epoch: int, step: int, run_dir: Path) -> FinetuneError:
    name = signal.Signals(signum).name if signum else "signal"
    return FinetuneError(f"Interrupted by {name} at epoch {epoch + 1}, step {step}: saved {run_dir / 'last.pt'} "
                         f"and the metrics so far.\nResume with: finetune train --resume {run_dir}",
                         exit_code=128 + (signum or 2))
