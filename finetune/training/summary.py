"""What a run records: a row of metrics per epoch, checksums of the tensors training must leave alone, and the
summary (``summary.json``) of the whole run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.training.epoch import TrainState
from finetune.training.metrics import balanced_accuracy, macro_f1
from finetune.training.setup import Setup
from finetune.utils.distributed import Dist


def score_key(config: Config) -> str:
    """The validation score that picks best.pt: ``val_acc``, or ``val_map`` for ``model.task: multilabel``."""
    return "val_map" if config.model.task == "multilabel" else "val_acc"


def epoch_row(state: TrainState, val: dict, lr: float, dist: Dist) -> dict:
    """The metrics of the epoch ``state`` has just trained (not yet counted), with its validation ``val`` (that of
    :func:`~finetune.training.epoch.evaluate`, or with ``map`` that of ``multilabel.evaluate``)."""
    loss_sum, correct, seen = dist.sum([state.loss_sum, state.correct, state.seen])  # over all processes
    if "map" in val:  # multilabel: the running "correct" counts images with every label right
        scores = {"train_exact_match": correct / max(seen, 1), "val_loss": val["loss"], "val_map": val["map"],
                  "val_micro_f1": val["micro_f1"], "val_macro_f1": val["macro_f1"],
                  "val_exact_match": val["exact_match"]}
    else:
        scores = {"train_acc": correct / max(seen, 1), "val_loss": val["loss"], "val_acc": val["acc"],
                  "val_top5": val["top5"], "val_balanced_acc": balanced_accuracy(val["confusion"]),
                  "val_macro_f1": macro_f1(val["confusion"])}
    return {
        "epoch": state.epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        **scores,
        "lr": lr,
        "grad_norm": state.grad_norm_sum / max(state.step, 1),
        "seconds": round(state.seconds, 3),
        "images_per_s": round(seen / max(state.seconds, 1e-9), 1),
    }


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A SHA-256 of each tensor's bytes."""
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for name, t in tensors.items()}


def changed(tensors: dict[str, torch.Tensor], before: dict[str, str]) -> list[str]:
    """The names of ``tensors`` whose checksum differs from ``before``."""
    return [name for name, digest in checksums(tensors).items() if before.get(name) != digest]


def frozen_changed_error(names: list[str]) -> FinetuneError:
    """The error of a run whose frozen tensors ``names`` changed (exit code 1: a failed guard)."""
    return FinetuneError(f"Frozen tensors changed during training: {', '.join(names[:5])}"
                         f"{' ...' if len(names) > 5 else ''}. They should be bit-identical; this is a bug, please "
                         "report it with the run's config.yaml.", exit_code=1)


def run_summary(setup: Setup, state: TrainState, run_dir: Path, *, frozen: int, altered: list[str],
                seconds: float) -> dict:
    """summary.json of a run: how it ended, its best and final score (:func:`score_key`), times, model, precision,
    data, processes.

    ``frozen``: how many tensors had to stay bit-identical, ``altered``: those that did not; ``seconds``: the
    run's time in all.
    """
    config, data, weights = setup.config, setup.data, setup.built.weights
    score = score_key(config)
    return {
        "frozen_unchanged": not altered, "frozen_tensors": frozen,
        "run_dir": str(run_dir), "epochs": config.train.epochs, "epochs_done": state.epoch,
        "stopped": state.stopped, "best_epoch": state.best_epoch, "score": score, f"best_{score}": state.best_val_acc,
        "best_weights": state.best_serves,  # raw, or ema: the weights best.pt serves (train.ema.use_for)
        f"final_{score}": state.history[-1][score] if state.history else None,
        "train_seconds": round(state.total_seconds, 3), "total_seconds": round(seconds, 3),
        "arch": config.model.arch, "precision": setup.precision.precision, "precision_reason": setup.precision.reason,
        "pretrained": weights.pretrained, "weights": weights.source, "weights_warning": weights.warning,
        "zero_init_residual": weights.zero_init_residual,
        "classes": data.classes, "train_images": len(data.train), "val_images": len(data.val),
        "skipped_images": data.unreadable(), "processes": setup.dist.world, "device": str(setup.dist.device),
    }
