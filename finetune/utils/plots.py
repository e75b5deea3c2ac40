"""Pictures: training curves, the confusion matrix, the top losses and the lr-find curve (matplotlib, no display
needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from finetune.utils.files import atomic_write


def plot_path(output: Optional[Path], name: str) -> Path:
    """``--output``: a ``.png`` file, or else a folder to put ``name`` in; the current folder by default."""
    path = Path(output) if output is not None else Path.cwd()
    return path if path.suffix.lower() == ".png" else path / name


def load_pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    _close(fig)


def _close(fig) -> None:
    fig.clf()
    load_pyplot().close(fig)


def figure_pixels(fig):
    """A figure as an (H, W, 3) uint8 array (what TensorBoard and MLflow take as an image); closes the figure."""
    import numpy as np

    fig.set_dpi(110)
    fig.canvas.draw()
    pixels = np.array(fig.canvas.buffer_rgba())[..., :3]
    _close(fig)
    return pixels


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val; multi-label: loss, and exact match, mAP and F1; with the weight
    EMA's validation beside them when ``train.ema`` recorded it (``ema_`` keys)."""
    plt = load_pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    multilabel = "val_map" in history[0]
    scores = (("train_exact_match", "val_exact_match", "val_map", "val_micro_f1", "val_macro_f1") if multilabel
              else ("train_acc", "val_acc"))
    ema = lambda keys: [f"ema_{key}" for key in keys if f"ema_{key}" in history[0]]  # noqa: E731
    for ax, keys, title in ((loss_ax, ("train_loss", "val_loss", *ema(["val_loss"])), "loss"),
                            (acc_ax, (*scores, *ema(scores)), "exact match, mAP and F1" if multilabel else "accuracy")):
        for key in keys:
            ax.plot(epochs, [math.nan if row[key] is None else row[key] for row in history], "o-",
                    label=key.removesuffix("_loss").removesuffix("_acc"))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(0, 1.02)
    fig.tight_layout()
    _save(fig, path)


def plot_compare(histories: dict[str, list[dict]], path: Path) -> None:
    """Validation accuracy and loss per epoch of several runs (name -> metrics.jsonl rows), overlaid."""
    plt = load_pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, history in histories.items():
        epochs = [row.get("epoch") for row in history]
        acc_ax.plot(epochs, [row.get("val_acc") for row in history], "o-", label=name)
        loss_ax.plot(epochs, [row.get("val_loss") for row in history], "o-", label=name)
    for ax, title in ((acc_ax, "validation accuracy"), (loss_ax, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(0, 1.02)
    loss_ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion, classes: list[str], path: Path) -> None:
    """:func:`confusion_figure` as a PNG file."""
    _save(confusion_figure(confusion, classes), path)


def confusion_figure(confusion, classes: list[str]):
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
    return fig


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
    """:func:`top_losses_figure` as a PNG file."""
    _save(top_losses_figure(rows), path)


def top_losses_figure(rows: list[dict]):
    """A grid of the images in ``rows`` (dicts with ``path``, ``true``, ``predicted``, ``prob``, ``loss``), each
    titled with its true class, the predicted class and that prediction's probability (when not None:
    multi-label rows have one per label), and its loss.

    The images are laid out in one picture shown by one axes: a figure of an axes per image took 4x as long to draw.
    """
    import numpy as np
    from PIL import Image, ImageOps

    plt = load_pyplot()
    tile, caption, gap, title, dpi = 200, 54, 10, 40, 110  # pixels
    columns = max(1, math.ceil(math.sqrt(len(rows))))
    lines = max(1, math.ceil(len(rows) / columns))
    width, height = gap + columns * (tile + gap), title + lines * (caption + tile + gap)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for i, row in enumerate(rows):
        line, column = divmod(i, columns)
        left, top = gap + column * (tile + gap), title + line * (caption + tile + gap) + caption
        with Image.open(row["path"]) as image:
            pixels = np.asarray(ImageOps.contain(image.convert("RGB"), (tile, tile)))
        down, across = (tile - pixels.shape[0]) // 2, (tile - pixels.shape[1]) // 2  # centred in its tile
        canvas[top + down:top + down + pixels.shape[0], left + across:left + across + pixels.shape[1]] = pixels
        chance = "" if row["prob"] is None else f" ({row['prob']:.0%})"  # None: multi-label, one per label
        ax.text(left + tile / 2, top - 4, f"true {row['true']}\npred {row['predicted']}{chance}\n"
                f"loss {row['loss']:.2f}", ha="center", va="bottom", fontsize=9)
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0))
    fig.suptitle("top losses (validation images)", y=1 - 12 / height)
    return fig


def plot_pr_curves(curves: list[dict], path: Path) -> None:
    """Precision-recall curves, one panel each: ``curves`` holds per label its ``label``, ``precision`` and
    ``recall`` (at each distinct probability, highest first), ``ap`` (or None) and ``support``."""
    plt = load_pyplot()
    columns = max(1, min(4, len(curves)))
    lines = max(1, math.ceil(len(curves) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3 * lines), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, curve in zip(axes.flat, curves):
        ax.axis("on")
        ax.step([0.0, *curve["recall"]], [1.0, *curve["precision"]], where="pre")
        ap = "-" if curve["ap"] is None else f"{curve['ap']:.3f}"
        ax.set_title(f"{curve['label']}: AP {ap}, {curve['support']} images", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
    fig.suptitle("precision-recall per label")
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


def plot_reliability(before: list[dict], after: list[dict], ece_before: float, ece_after: float, after_title: str,
                     path: Path) -> None:
    """Reliability diagrams before and after calibration (titled ``after_title``), side by side, each above the
    histogram of its confidences. ``before``/``after``: one dict per equal-width confidence bin (``low``, ``high``,
    ``count``, ``confidence``, ``accuracy``), as ``training.calibration.reliability`` gives them."""
    plt = load_pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for column, (bins, ece, title) in enumerate(((before, ece_before, "before (temperature 1)"),
                                                  (after, ece_after, after_title))):
        diagram, histogram = axes[0][column], axes[1][column]
        width = bins[0]["high"] - bins[0]["low"]
        filled = [row for row in bins if row["count"]]
        diagram.bar([row["low"] for row in filled], [row["accuracy"] for row in filled], width=width, align="edge",
                    color="tab:blue", edgecolor="white", label="accuracy")
        diagram.bar([row["low"] for row in filled], [row["confidence"] - row["accuracy"] for row in filled],
                    bottom=[row["accuracy"] for row in filled], width=width, align="edge", color="tab:red",
                    alpha=0.3, edgecolor="tab:red", label="gap to confidence")
        diagram.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
        diagram.set_ylim(0, 1)
        diagram.set_ylabel("accuracy")
        diagram.set_title(f"{title}: ECE {ece:.2%}")
        diagram.legend(loc="upper left", fontsize=8)
        histogram.bar([row["low"] for row in bins], [row["count"] for row in bins], width=width, align="edge",
                      color="tab:gray", edgecolor="white")
        histogram.set_xlim(0, 1)
        histogram.set_xlabel("confidence (top probability)")
        histogram.set_ylabel("images")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.09, top=0.94, hspace=0.08, wspace=0.18)  # tight_layout: 2 s
    _save(fig, path)
