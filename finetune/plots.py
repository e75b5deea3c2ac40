"""Pictures: training curves and the confusion matrix (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from finetune.checkpoint import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    fig.clf()
    _pyplot().close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="val")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(0, 1.02)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion, classes: list[str], path: Path) -> None:
    """A labelled confusion matrix: rows are true classes, columns predictions, cells counts."""
    plt = _pyplot()
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    matrix = confusion.tolist()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, matrix[i][j], ha="center", va="center",
                    color="white" if matrix[i][j] > peak / 2 else "black")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    _save(fig, path)
