"""Progress while training: rich bars on a terminal, one plain line per epoch elsewhere, or nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from finetune.cli.render import calibration_line
from finetune.training.reporter import Reporter

# The scores an epoch line and the summary table show, by task: (key in the metrics row, table heading).
SCORES = {
    "multiclass": [("train_acc", "train acc"), ("val_loss", "val loss"), ("val_acc", "val acc"),
                   ("val_top5", "val top-5")],
    "multilabel": [("train_exact_match", "train exact"), ("val_loss", "val loss"), ("val_map", "val mAP"),
                   ("val_micro_f1", "val micro F1"), ("val_macro_f1", "val macro F1"),
                   ("val_exact_match", "val exact")],
}


# The weight EMA's validation score, beside the raw weights' when train.ema is on.
EMA_SCORES = [("ema_val_acc", "EMA val acc"), ("ema_val_map", "EMA val mAP")]


def _scores(row: dict) -> list[tuple[str, str]]:
    return SCORES["multilabel" if "val_map" in row else "multiclass"] + [s for s in EMA_SCORES if s[0] in row]


def _value(key: str, value) -> str:
    if value is None:  # undefined (0/0), e.g. mAP without a positive label among the validation images
        return "-"
    return f"{value:.4f}" if key.endswith("_loss") else f"{value:.2%}"


def _epoch_line(row: dict, epochs: int) -> str:
    scores = "  ".join(f"{key} {_value(key, row[key])}" for key, _ in _scores(row))
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  {scores}  "
            f"lr {row['lr']:.3g}  grad_norm {row['grad_norm']:.3g}  {row['seconds']:.1f}s  "
            f"{row['images_per_s']:.0f} img/s")


STOPPED = {"early_stopping": "stopped early by train.early_stopping", "time_limit": "stopped by train.time_limit_min"}


def summary_line(summary: dict) -> str:
    score = summary["score"]
    weights = " (EMA weights)" if summary.get("best_weights") == "ema" else ""
    best = (f"best {score} {summary[f'best_{score}']:.2%}{weights} at epoch {summary['best_epoch']}"
            if summary["best_epoch"] else "no epoch finished")
    stopped = (f"; {STOPPED[summary['stopped']]} after {summary['epochs_done']} of {summary['epochs']} epochs "
               "(resume to go on)" if summary["stopped"] else "")
    calibrated = f"; {calibration_line(summary['calibration'])}" if summary.get("calibration") else ""
    return (f"done: {best}, {summary['total_seconds']:.1f}s in all; {summary['frozen_tensors']} frozen tensors "
            f"unchanged; run directory {summary['run_dir']}{stopped}{calibrated}")


class PlainReporter(Reporter):
    """One line per event, no control characters: for CI logs and pipes."""

    def _print(self, text: str) -> None:
        print(text, flush=True)

    def start(self, *, config, run_dir, weights, layout, train_images, val_images, classes, steps_per_epoch,
              resumed_at) -> None:
        super().start(config=config)
        resumed = f", resuming after epoch {resumed_at}" if resumed_at is not None else ""
        self._print(f"run {run_dir}: {train_images} train / {val_images} val images ({layout}), "
                    f"{len(classes)} classes, {steps_per_epoch} steps per epoch, weights {weights}{resumed}")

    def message(self, text: str) -> None:
        self._print(text)

    def warn(self, text: str) -> None:
        self._print(f"WARNING: {text}")

    def epoch_end(self, row: dict, improved: bool) -> None:
        self._print(_epoch_line(row, self.epochs) + ("  *best*" if improved else ""))

    def finish(self, summary: dict, history: list[dict]) -> None:
        self._print(summary_line(summary))


class RichReporter(PlainReporter):
    """An overall bar and a per-epoch bar (loss, accuracy, lr, images/s, ETA); a summary table at the end."""

    shows_progress = True

    def _print(self, text: str) -> None:
        self.console.print(escape(text), highlight=False)

    def start(self, **info) -> None:
        super().start(**info)
        self.steps = info["steps_per_epoch"]
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                             console=self.console, transient=True)
        done = info["resumed_at"] or 0
        self.overall = self.bars.add_task("overall", total=self.epochs * self.steps, completed=done * self.steps,
                                          stats="")
        self.epoch_bar = self.bars.add_task("epoch", total=self.steps, stats="")
        self.bars.start()

    def warn(self, text: str) -> None:
        self.console.print(f"[bold yellow]WARNING:[/] [yellow]{escape(text)}[/]")

    def step(self, epoch, step, steps, loss, acc, lr, images_per_s) -> None:
        stats = f"loss {loss:.4f} acc {acc:.1%} lr {lr:.3g} {images_per_s:.0f} img/s"
        self.bars.update(self.epoch_bar, description=f"epoch {epoch + 1}/{self.epochs}", completed=step,
                         stats=stats)
        self.bars.update(self.overall, completed=epoch * self.steps + step)

    def epoch_end(self, row: dict, improved: bool) -> None:
        mark = " [green]*best*[/]" if improved else ""
        self.console.print(escape(_epoch_line(row, self.epochs)) + mark, highlight=False)

    def finish(self, summary: dict, history: list[dict]) -> None:
        self.bars.stop()
        table = Table(title="Epochs", title_justify="left")
        scores = _scores(history[0]) if history else []
        for column in ("epoch", "train loss", *(heading for _, heading in scores), "lr", "grad norm", "time"):
            table.add_column(column, justify="right")
        for row in history:
            style = "bold green" if row["epoch"] == summary["best_epoch"] else None
            table.add_row(str(row["epoch"]), f"{row['train_loss']:.4f}", *(_value(key, row[key]) for key, _ in scores),
                          f"{row['lr']:.3g}", f"{row['grad_norm']:.3g}", f"{row['seconds']:.1f}s", style=style)
        self.console.print(table)
        self.console.print(escape(summary_line(summary)), highlight=False)

    def close(self) -> None:
        if hasattr(self, "bars"):
            self.bars.stop()


def make_reporter(quiet: bool) -> Reporter:
    console = Console()
    if quiet:
        return Reporter(console)
    return RichReporter(console) if console.is_terminal else PlainReporter(console)
