"""Rich tables for people, JSON for programs. Analysis modules return data; this prints it.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.utils.hardware import VNNI_FLAGS

if TYPE_CHECKING:
    from finetune.analysis.freeze_report import FreezeReport
    from finetune.analysis.gradcheck import GradReport
    from finetune.analysis.lr_find import LRFind
    from finetune.analysis.model_bench import ModelBench
    from finetune.analysis.runs import Comparison, RunRow

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
    table.add_column("norm")
    table.add_column("BatchNorm")
    table.add_column("dropout")
    table.add_column("lr", justify="right")
    table.add_column("rule", overflow="fold")
    colour = {"trainable": "green", "frozen": "blue", "mixed": "yellow"}
    for row in report.groups:
        table.add_row(row.module, f"{row.params:,}", f"{row.trainable_params:,}",
                      f"[{colour[row.state]}]{row.state}[/]", row.norm, row.batchnorm, row.random, row.lr, row.rule)
    table.add_section()
    table.add_row("total", f"{report.total_params:,}", f"{report.trainable_params:,}", "", "", "", "", "", "")
    console.print(f"model: {report.arch} ({report.norm})   weights: {report.weights}   head: {report.num_classes} "
                  f"classes   epoch: {report.epoch}", highlight=False)
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
    if report.batchnorm:
        console.print(f"BatchNorm: {eval_bn} of {len(report.batchnorm)} layers run in eval mode while training "
                      "(frozen statistics)")
    else:
        console.print(f"No BatchNorm: {report.norm} keeps no running statistics; frozen blocks run in eval mode "
                      "(no dropout or stochastic depth)")


def print_evaluation(result: dict) -> None:
    console.print(f"{result['checkpoint']} on {result['data']}, split {result['split']} ({result['images']} images)",
                  highlight=False)
    if "per_label" in result:
        _print_labels(result)
    else:
        _print_classes(result)
    if "tta" in result:
        console.print(f"with TTA ({result['tta']['mode']}): {_headline(result['tta'])}", highlight=False)
    if "top_losses" in result:
        table = Table(title=f"Top {len(result['top_losses'])} losses", title_justify="left")
        chance = "per_label" not in result  # a multi-label prediction has no one probability
        for column in ("image", "true", "predicted", *(["probability"] if chance else []), "loss"):
            table.add_column(column, justify="right" if column in ("probability", "loss") else "left",
                             overflow="fold" if column == "image" else "ellipsis")
        for row in result["top_losses"]:
            table.add_row(row["path"], row["true"], row["predicted"], *([_share(row["prob"])] if chance else []),
                          f"{row['loss']:.3f}")
        console.print(table)
        console.print(f"top losses: {result['top_losses_png']}", highlight=False, soft_wrap=True)
    if "predictions_csv" in result:
        console.print(f"every image by loss: {result['predictions_csv']}", highlight=False, soft_wrap=True)


def _print_classes(result: dict) -> None:
    console.print(f"loss {result['loss']:.4f}   accuracy (top-1) {result['top1']:.2%}   top-5 {result['top5']:.2%}   "
                  f"balanced accuracy {_share(result['balanced_accuracy'])}   macro F1 {_share(result['macro_f1'])}   "
                  f"ECE {_share(result['ece'])} ({result['ece_bins']} bins)", highlight=False)
    if result["temperature"] is not None:
        console.print(f"calibrated: probabilities are softmax(logits / {result['temperature']:.4g})", highlight=False)
    table = Table(title="Per class", title_justify="left")
    table.add_column("class")
    for column in ("precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for row in result["per_class"]:
        table.add_row(row["class"], _share(row["precision"]), _share(row["recall"]), _share(row["f1"]),
                      str(row["support"]))
    console.print(table)
    console.print(f"confusion matrix: {result['confusion_png']}", highlight=False, soft_wrap=True)


def _print_labels(result: dict) -> None:
    console.print(f"loss {result['loss']:.4f}   mAP {_share(result['map'])}   micro F1 {_share(result['micro_f1'])}   "
                  f"macro F1 {_share(result['macro_f1'])}   exact match {_share(result['exact_match'])}   "
                  f"thresholds from {result['thresholds_from']}", highlight=False)
    table = Table(title="Per label", title_justify="left")
    table.add_column("label")
    for column in ("precision", "recall", "F1", "AP", "support", "threshold"):
        table.add_column(column, justify="right")
    for row in result["per_label"]:
        table.add_row(row["label"], _share(row["precision"]), _share(row["recall"]), _share(row["f1"]),
                      _share(row["ap"]), str(row["support"]), f"{row['threshold']:.3f}")
    console.print(table)
    console.print(f"precision-recall curves: {result['pr_curves_png']}", highlight=False, soft_wrap=True)


def _headline(scores: dict) -> str:
    """The headline scores of an evaluation (multi-class or multi-label), as evaluate's TTA line shows them."""
    if "map" in scores:
        return (f"loss {scores['loss']:.4f}   mAP {_share(scores['map'])}   micro F1 {_share(scores['micro_f1'])}   "
                f"macro F1 {_share(scores['macro_f1'])}   exact match {_share(scores['exact_match'])}")
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
    thresholds = any("threshold" in guess for result in results for guess in result["predictions"])
    if thresholds:  # a multi-label model: every label at or above its threshold
        table.add_column("threshold", justify="right")
    for result in results:
        guesses = result["predictions"]
        if not guesses:
            table.add_row(result["image"], "(none above its threshold)", end_section=True)
        for rank, guess in enumerate(guesses):
            table.add_row(result["image"] if rank == 0 else "", guess["class"], f"{guess['prob']:.2%}",
                          *([f"{guess['threshold']:.3f}"] if thresholds else []),
                          end_section=rank == len(guesses) - 1)
    console.print(table)


def print_export(result: dict) -> None:
    detail = f", opset {result['opset']}" if "opset" in result else ""
    detail += ", int8" if "quantization" in result else ""
    console.print(f"wrote {result['path']} ({result['format']}{detail}, {result['bytes'] / 2**20:.1f} MiB, "
                  f"{len(result['classes'])} classes)", highlight=False, soft_wrap=True)
    if "metadata_path" in result:
        console.print(f"wrote {result['metadata_path']} (classes, preprocessing, source run)", highlight=False,
                      soft_wrap=True)
    compared = "logit" if result["compared"] == "logits" else "probability"
    console.print(f"verified on {result['verified_on']}: max |{compared} difference| {result['max_abs_diff']:.2g} "
                  f"(relative {result['max_rel_diff']:.2g}; tolerance {result['tolerance']}), top-1 agreement "
                  f"{result['top1_agreement']:.0%}", highlight=False, soft_wrap=True)
    if result["temperature"] is not None:
        console.print(f"calibrated: outputs softmax(logits / {result['temperature']:.4g}), the checkpoint's "
                      "temperature" if compared == "probability" else
                      f"calibrated: apply the temperature {result['temperature']:.4g} (in the metadata) yourself: "
                      "softmax(logits / temperature)", highlight=False, soft_wrap=True)
    if "quantization" in result:
        _print_quantization(result["quantization"], result["bytes"])


def _print_quantization(report: dict, size: int) -> None:
    check, speed = report["verification"], report["speed"]
    console.print(f"int8 calibrated on {report['calibration']['source']}", highlight=False, soft_wrap=True)
    console.print(f"int8 checked on {check['images']} images of {check['data']}: top-1 {check['int8_top1']:.2%} "
                  f"(fp32 {check['fp32_top1']:.2%}, drop {check['drop_points']:.2f} points, at most "
                  f"{check['max_drop_points']:g}), agreement with fp32 {check['top1_agreement']:.2%}",
                  highlight=False, soft_wrap=True)
    console.print(f"timed on this CPU: {speed['cpu_line']}; {speed['runtime']}", highlight=False, soft_wrap=True)
    table = Table()
    for column in ("model", "batch-1 latency (p50)", "batch-32 throughput", "size"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, nbytes in (("fp32", report["fp32_bytes"]), ("int8", size)):
        row = speed[name]
        table.add_row(name, f"{row['batch1_ms']:.2f} ms", f"{row['batch32_images_per_s']:.1f} img/s",
                      f"{nbytes / 2**20:.1f} MiB")
    table.add_row("int8 / fp32", f"{speed['speedup_batch1']:.2f}x faster", f"{speed['speedup_batch32']:.2f}x faster",
                  f"{size / report['fp32_bytes']:.2f}x")
    console.print(table)
    slower = [f"batch {batch}" for batch, ratio in (("1", speed["speedup_batch1"]), ("32", speed["speedup_batch32"]))
              if ratio < 1]
    if slower:
        flags = speed.get("cpu_flags", {})
        vnni = [flag for flag in VNNI_FLAGS if flags.get(flag)]
        where = (f"this CPU has {', '.join(vnni)} already, so the model's layers are what int8 does not speed up; "
                 "on another CPU it may differ" if vnni else
                 f"on a CPU with VNNI ({', '.join(VNNI_FLAGS[:-1])} or {VNNI_FLAGS[-1]}) it may well be faster")
        console.print(f"[bold yellow]int8 is not faster than fp32 on this CPU[/] at {' and '.join(slower)}. The file "
                      f"is written all the same: {where}; time it there with `finetune benchmark`.", highlight=False)


def calibration_line(result: dict) -> str:
    """One line on a calibration: the temperature and the held-out NLL and ECE before and after."""
    before, after = result["before"], result["after"]
    if not result["applied"]:
        return (f"calibration kept temperature 1: the fitted {result['fitted_temperature']:.3g} would raise the "
                f"held-out NLL ({before['nll']:.4f}); ECE {before['ece']:.2%}")
    return (f"calibrated: temperature {result['temperature']:.4g}; held-out NLL {before['nll']:.4f} -> "
            f"{after['nll']:.4f}, ECE {before['ece']:.2%} -> {after['ece']:.2%}")


def print_calibration(result: dict) -> None:
    console.print(f"{result['checkpoint']}: {calibration_line(result)}", highlight=False, soft_wrap=True)
    console.print(f"held out: {result['held_out']}", highlight=False, soft_wrap=True)
    table = Table()
    for column in ("", "NLL", f"ECE ({result['bins']} bins)", "accuracy"):
        table.add_column(column, justify="right" if column else "left")
    for name in ("before", "after"):
        row = result[name]
        table.add_row(name, f"{row['nll']:.4f}", f"{row['ece']:.2%}", f"{row['accuracy']:.2%}")
    console.print(table)
    folds = ", ".join(f"{t:.3g}" for t in result["fold_temperatures"])
    console.print(f"temperature {result['temperature']:.4g} stored in {result['checkpoint']} (fitted on all "
                  f"{result['images']} images: {result['fitted_temperature']:.4g}; on each fold's others: {folds}); "
                  f"reliability diagram: {result['reliability_png']}", highlight=False, soft_wrap=True)


def print_benchmark(result: dict) -> None:
    console.print(f"{result['model']}: {result['kind']}, {result['arch']}, {result['image_size']}x"
                  f"{result['image_size']}, {result['classes']} classes{', calibrated' if result['calibrated'] else ''}"
                  f"; {result['runtime']}, {result['threads']} threads", highlight=False, soft_wrap=True)
    console.print(f"CPU: {result['cpu_line']}", highlight=False, soft_wrap=True)
    table = Table(title="Benchmark", title_justify="left")
    for column in ("measurement", "p50", "p95", "images/s", "runs"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    latency, throughput, decode = result["latency"], result["throughput"], result["preprocess"]
    table.add_row("model, batch 1", f"{latency['p50_ms']:.2f} ms", f"{latency['p95_ms']:.2f} ms",
                  f"{1000 / latency['p50_ms']:.1f}", str(latency["runs"]))
    table.add_row(f"model, batch {throughput['batch_size']}", f"{throughput['p50_ms']:.1f} ms",
                  f"{throughput['p95_ms']:.1f} ms", f"{throughput['images_per_s']:.1f}", str(throughput["runs"]))
    table.add_row("decode + preprocess, 1 image", f"{decode['p50_ms']:.2f} ms", f"{decode['p95_ms']:.2f} ms",
                  f"{decode['images_per_s']:.1f}", str(decode["runs"]))
    console.print(table)
    console.print(f"decode + preprocess timed on {decode['source']}", highlight=False, soft_wrap=True)


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


def print_models(rows: list[dict]) -> None:
    table = Table(title="Models (ImageNet figures: torchvision's metadata of the default weights)",
                  title_justify="left")
    for column in ("model", "params", "GFLOPs", "acc@1", "size", "resize", "weights"):
        table.add_column(column, justify="right" if column in ("params", "GFLOPs", "acc@1", "size") else "left",
                         no_wrap=column != "weights")
    family = None
    for row in rows:
        if family is not None and row["family"] != family:
            table.add_section()
        family = row["family"]
        name = f"{row['model']} (default)" if row["default"] else row["model"]
        table.add_row(name, f"{row['params_m']:.1f} M", f"{row['gflops']:.2f}", f"{row['acc1']:.1f}",
                      str(row["image_size"]), f"{row['resize']} {row['interpolation']}", " ".join(row["weights"]))
    console.print(table)
    console.print("size: the crop the weights were trained at (data.image_size: null); resize: the shorter side "
                  "before it; weights: the first is DEFAULT. Which to pick: docs/models.md; speed on this machine: "
                  "finetune models --bench", highlight=False)


def print_model_bench(bench: "ModelBench") -> None:
    console.print(f"CPU: {bench.cpu}; {bench.threads} threads; precision {bench.precision}; batch {bench.batch}; "
                  f"random weights, 10 classes, synthetic images", highlight=False)
    table = Table(title=f"Images per second on this machine, by training speed (train: --freeze {bench.freeze})",
                  title_justify="left")
    for column in ("model", "acc@1", "GFLOPs", "size", "layout", "features/s", "train/s", "inference/s", "Pareto"):
        table.add_column(column, justify="left" if column in ("model", "layout") else "right")
    for row in bench.rows:
        table.add_row(row.model, f"{row.acc1:.1f}", f"{row.gflops:.2f}", str(row.image_size), row.memory_format,
                      f"{row.features_per_s:.1f}", f"{row.train_per_s:.1f}", f"{row.inference_per_s:.1f}",
                      "[green]*[/]" if row.pareto else "")
    console.print(table)
    console.print("features: the frozen backbone, what each image of a head-only fine-tune costs (once: later epochs "
                  "train from the feature cache); Pareto *: no faster model is more accurate on ImageNet",
                  highlight=False)


ENDED_STYLE = {"finished": "green", "early stop": "green", "time limit": "yellow", "running": "cyan",
               "interrupted": "yellow", "failed": "red", "killed": "red", "partial": "yellow", "broken": "bold red"}


def _runs_table(rows: list["RunRow"], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("run", overflow="fold")
    for column in ("model", "trained params", "epochs", "ended", "best val_acc", "final val_acc", "train time",
                   "img/s"):
        table.add_column(column, justify="left" if column in ("model", "ended") else "right")
    for row in rows:
        params = "-" if row.trained_params is None else f"{row.trained_params:,}"
        epochs = f"{row.epochs_done}/{row.epochs if row.epochs is not None else '?'}"
        table.add_row(escape(row.name), row.model or "-", params, epochs,
                      f"[{ENDED_STYLE.get(row.ended, 'default')}]{row.ended}[/]", _share(row.best_val_acc),
                      _share(row.final_val_acc), f"{row.train_seconds:.1f}s",
                      "-" if row.images_per_s is None else f"{row.images_per_s:.0f}")
    return table


def print_runs(rows: list["RunRow"], folders) -> None:
    if not rows:
        console.print(f"no run directories in {', '.join(map(str, folders))}", highlight=False)
        return
    console.print(_runs_table(rows, "Runs (best val_acc first)"))
    for row in rows:
        if row.problem and row.ended != "finished":
            console.print(f"{escape(row.name)}: {row.ended}: {escape(row.problem)}", highlight=False, soft_wrap=True)


def print_comparison(comparison: "Comparison") -> None:
    console.print(_runs_table(comparison.runs, "Runs"))
    if comparison.differences:
        table = Table(title="Config keys that differ", title_justify="left")
        table.add_column("key", no_wrap=True)
        for run in comparison.runs:
            table.add_column(escape(run.name), overflow="fold")
        for key, values in comparison.differences.items():
            table.add_row(key, *("-" if v is None else escape(v if isinstance(v, str) else json.dumps(v))
                                 for v in values))
        console.print(table)
    else:
        console.print("the runs' configs are the same (apart from train.output_dir)", highlight=False)
    console.print(f"validation curves: {escape(comparison.plot)}", highlight=False, soft_wrap=True)
