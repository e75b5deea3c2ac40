"""Pictures: training curves, the confusion matrix, the top losses and the lr-find curve (matplotlib, no display
needed).
"""

from __future__ import annotations

import math
from pathlib import Path

from finetune.utils.files import atomic_write


def load_pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    fig.clf()
    load_pyplot().close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val (and the weight EMA's val when ``train.ema`` recorded it)."""
    plt = load_pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="val")
        if f"ema_val_{key}" in history[0]:
            ax.plot(epochs, [row[f"ema_val_{key}"] for row in history], "o-", label="val (EMA weights)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(0, 1.02)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion, classes: list[str], path: Path) -> None:
    """Two labelled confusion matrices side by side (rows true classes, columns predictions): the counts, and the
    counts normalised per true class (each row sums to 1: the diagonal is each class's recall)."""
    plt = load_pyplot()
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig, (count_ax, share_ax) = plt.subplots(1, 2, figsize=(2 * size, size))
    counts = confusion.tolist()
    shares = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in counts]
    peak = max(max(row) for row in counts) or 1
    _matrix(count_ax, counts, classes, "counts", lambda i, j: str(counts[i][j]), peak)
    _matrix(share_ax, shares, classes, "normalised per true class",
            lambda i, j: f"{shares[i][j]:.0%}" if sum(counts[i]) else "-", 1.0)
    fig.tight_layout()
    _save(fig, path)


def _matrix(ax, values: list[list[float]], classes: list[str], title: str, label, peak: float) -> None:
    n = len(classes)
    ax.imshow(values, cmap="Blues", vmin=0, vmax=peak)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, label(i, j), ha="center", va="center", color="white" if values[i][j] > peak / 2 else "black")
    ax.set_title(title)


def plot_top_losses(rows: list[dict], path: Path) -> None:
    """A grid of the images in ``rows`` (dicts with ``path``, ``true``, ``predicted``, ``prob``, ``loss``), each
    titled with its true class, the predicted class and that prediction's probability, and its loss."""
    from PIL import Image

    plt = load_pyplot()
    columns = max(1, math.ceil(math.sqrt(len(rows))))
    lines = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 3.2 * lines), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        with Image.open(row["path"]) as image:
            ax.imshow(image.convert("RGB"))
        ax.set_title(f"true {row['true']}\npred {row['predicted']} ({row['prob']:.0%})\nloss {row['loss']:.2f}",
                     fontsize=9)
    fig.suptitle("top losses (validation images)")
    _save(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion, path: Path) -> None:
    """Loss against learning rate on a log scale: each step faintly, the smoothed curve, the suggestion marked."""
    plt = load_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed")
    if suggestion is not None:
        at = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggestion)))
        ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([suggestion], [smoothed[at]], "o", color="tab:red", label=f"suggestion {suggestion:g}")
    if smoothed:  # the blow-up at the end would squash the part worth reading: clip it
        low, high = min(losses + smoothed), min(max(losses + smoothed), 2.5 * min(smoothed))
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.set_title("lr-find")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
