"""Rich tables for people, JSON for programs. Analysis modules return data; this prints it.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from finetune.analysis.freeze_report import FreezeReport
    from finetune.analysis.gradcheck import GradReport
    from finetune.analysis.lr_find import LRFind

console = Console()
err_console = Console(stderr=True)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def print_freeze_report(report: "FreezeReport") -> None:
    table = Table(title="Freeze report", title_justify="left")
    table.add_column("module", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("trainable", justify="right", no_wrap=True)
    table.add_column("state")
    table.add_column("BatchNorm")
    table.add_column("lr", justify="right")
    table.add_column("rule", overflow="fold")
    colour = {"trainable": "green", "frozen": "blue", "mixed": "yellow"}
    for row in report.groups:
        table.add_row(row.module, f"{row.params:,}", f"{row.trainable_params:,}",
                      f"[{colour[row.state]}]{row.state}[/]", row.batchnorm, row.lr, row.rule)
    table.add_section()
    table.add_row("total", f"{report.total_params:,}", f"{report.trainable_params:,}", "", "", "", "")
    console.print(f"weights: {report.weights}   head: {report.num_classes} classes   epoch: {report.epoch}")
    console.print(f"precision: {report.precision} ({report.precision_reason})", highlight=False)
    console.print(table)
    console.print(f"trainable {report.trainable_params:,} ({_pct(report.trainable_params, report.total_params)})"
                  f"   frozen {report.frozen_params:,} ({_pct(report.frozen_params, report.total_params)})"
                  f"   total {report.total_params:,}")
    same = report.optimizer_params == report.trainable_params and report.optimizer_tensors == report.trainable_tensors
    mark = "[green]OK[/]" if same else "[red]MISMATCH[/]"
    console.print(f"optimizer receives {report.optimizer_params:,} parameters in {report.optimizer_tensors} tensors "
                  f"(trainable set: {report.trainable_params:,} in {report.trainable_tensors}) {mark}")
    eval_bn = sum(1 for b in report.batchnorm if b["mode"] == "eval")
    console.print(f"BatchNorm: {eval_bn} of {len(report.batchnorm)} layers run in eval mode while training "
                  "(frozen statistics)")


def print_evaluation(result: dict) -> None:
    console.print(f"{result['checkpoint']} on {result['data']} ({result['images']} images)", highlight=False)
    console.print(_headline(result), highlight=False)
    if "tta" in result:
        console.print(f"with TTA ({result['tta']['mode']}): {_headline(result['tta'])}", highlight=False)
    table = Table(title="Per class", title_justify="left")
    table.add_column("class")
    for column in ("precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for row in result["per_class"]:
        table.add_row(row["class"], _share(row["precision"]), _share(row["recall"]), _share(row["f1"]),
                      str(row["support"]))
    console.print(table)
    console.print(f"confusion matrix: {result['confusion_png']}", highlight=False, soft_wrap=True)
    if "top_losses" in result:
        table = Table(title=f"Top {len(result['top_losses'])} losses", title_justify="left")
        for column in ("image", "true", "predicted", "probability", "loss"):
            table.add_column(column, justify="right" if column in ("probability", "loss") else "left",
                             overflow="fold" if column == "image" else "ellipsis")
        for row in result["top_losses"]:
            table.add_row(row["path"], row["true"], row["predicted"], f"{row['prob']:.2%}", f"{row['loss']:.3f}")
        console.print(table)
        console.print(f"top losses: {result['top_losses_png']}\nevery image by loss: {result['predictions_csv']}",
                      highlight=False, soft_wrap=True)


def _headline(scores: dict) -> str:
    return (f"loss {scores['loss']:.4f}   accuracy (top-1) {scores['top1']:.2%}   top-5 {scores['top5']:.2%}   "
            f"balanced accuracy {_share(scores['balanced_accuracy'])}   macro F1 {_share(scores['macro_f1'])}")


def _share(value) -> str:
    """A fraction as a percentage, or '-' when it is undefined (0/0)."""
    return "-" if value is None else f"{value:.2%}"


def print_predictions(results: list[dict]) -> None:
    table = Table(title="Predictions", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for result in results:
        for rank, guess in enumerate(result["predictions"]):
            table.add_row(result["image"] if rank == 0 else "", guess["class"], f"{guess['prob']:.2%}",
                          end_section=rank == len(result["predictions"]) - 1)
    console.print(table)


def print_export(result: dict) -> None:
    detail = f", opset {result['opset']}" if "opset" in result else ""
    console.print(f"wrote {result['path']} ({result['format']}{detail}, {result['bytes'] / 2**20:.1f} MiB, "
                  f"{len(result['classes'])} classes)", highlight=False, soft_wrap=True)
    if "metadata_path" in result:
        console.print(f"wrote {result['metadata_path']} (classes, preprocessing, source run)", highlight=False,
                      soft_wrap=True)
    console.print(f"verified on {result['verified_on']}: max |logit difference| {result['max_abs_diff']:.2g} "
                  f"(tolerance {result['tolerance']:.0e})", highlight=False, soft_wrap=True)


def _fmt(value) -> str:
    return "none" if value is None else f"{value:.3e}"


def print_grad_report(report: "GradReport") -> None:
    console.print(f"data: {report.data}")
    table = Table(title="Gradients by module", title_justify="left")
    for column in ("module", "tensors", "trainable", "grad norm", "max |grad|", "finite"):
        table.add_column(column, justify="left" if column == "module" else "right")
    groups: dict[str, list[dict]] = {}
    for row in report.parameters:
        groups.setdefault(row["module"], []).append(row)
    for module, rows in groups.items():
        norms = [r["grad_norm"] for r in rows if r["grad_norm"] is not None]
        maxes = [r["max_abs_grad"] for r in rows if r["max_abs_grad"] is not None]
        trainable = sum(r["trainable"] for r in rows)
        finite = all(r["finite"] for r in rows)
        table.add_row(module, str(len(rows)), f"{trainable}/{len(rows)}",
                      _fmt(sum(n * n for n in norms) ** 0.5 if norms else None), _fmt(max(maxes) if maxes else None),
                      "yes" if finite else "[red]NO[/]")
    console.print(table)
    for check in report.checks:
        mark = "[green]PASS[/]" if check.passed else "[bold red]FAIL[/]"
        console.print(f"{mark} {check.name}: {check.detail}", highlight=False)
    console.print("[green]all checks passed[/]" if report.passed else "[bold red]some checks failed[/]")


def print_lr_find(result: "LRFind") -> None:
    curve = result.curve
    ratios = ", ".join(f"{g['lr_ratio']:.3g}x ({g['tensors']} tensors)" for g in result.groups)
    console.print(f"lr-find: {len(curve.lrs)} of {result.steps} steps from {result.start:.1e} to {result.end:.1e}, "
                  f"{result.seconds:.1f}s; features from {result.source}", highlight=False)
    console.print(f"stopped: {curve.stopped}", highlight=False)
    console.print(f"param groups scale together, at these shares of optim.lr: {ratios}", highlight=False)
    suggestion = result.suggestion
    if suggestion.lr is None:
        console.print(f"[bold red]no suggestion:[/] {escape(suggestion.rule)}", highlight=False)
    else:
        console.print(f"[bold green]suggestion: optim.lr = {suggestion.lr:g}[/]  ({escape(suggestion.rule)})",
                      highlight=False)
        console.print(f"use it:  {escape(result.command)}", highlight=False, soft_wrap=True)
    console.print(f"plot: {escape(result.plot)}", highlight=False, soft_wrap=True)
