"""The command line. Each command declares its options, calls one library function and renders the result.

Library modules are imported inside the commands so that ``finetune --help`` and
config errors never wait for torch to import.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.errors import FinetuneError

# Between parallel regions torch's OpenMP threads (GNU libgomp) spin 300,000 times before they sleep, and the
# spinning takes the cores from the decode threads. 10,000 keeps small kernels as fast and lets decoding run beside
# the compute: the first epoch on camera photos went from 37 to 46 img/s head-only and 20 to 22 img/s full
# (docs/performance.md, "Fast on a CPU"). Read once when torch loads, so set here, before any command imports it;
# a value the user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

app = typer.Typer(
    help="Fine-tune a pretrained torchvision image classifier (ResNet-18 by default; `finetune models` lists them) "
         "on your own images, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a config key: KEY=VALUE (dotted key, VALUE parsed as YAML). Repeatable.",
    show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
TtaOption = Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average the softmax over the image "
                                          "and its mirror image (see --tta-mode).")]
TtaModeOption = Annotated[Optional[str], typer.Option("--tta-mode", help="The views of --tta: flip (default) or "
                                                      "five-crop (four corners and the centre of the image resized "
                                                      "to 1/0.875 of the size); implies --tta.", show_default=False)]
ModelArgument = Annotated[Path, typer.Argument(help="A checkpoint (RUN_DIR/best.pt or last.pt), or a model written "
                                               "by `finetune export`: .onnx or TorchScript.")]


def _version(value: bool) -> None:
    if value:
        from finetune import __version__

        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """Fine-tune a pretrained torchvision image classifier (ResNet-18 by default) on your own images, on a CPU."""
    from finetune.utils.allocator import keep_freed_memory

    # Before any command allocates: glibc keeps the memory a step frees for the next step (docs/performance.md).
    _user_errors(keep_freed_memory)(os.environ.get("FINETUNE_MALLOC"))


def _user_errors(command):
    """Print a FinetuneError in red on stderr and exit with its code: no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as exc:
            from rich.markup import escape

            from finetune.cli.render import err_console

            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def _tta(tta: bool, mode: Optional[str]) -> Optional[str]:
    """The TTA mode of --tta / --tta-mode, or None without TTA."""
    return mode or ("flip" if tta else None)


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from finetune.config.loading import load_config

    loaded = load_config(config, overrides or [])
    if loaded.warnings:
        from rich.markup import escape

        from finetune.cli.render import err_console

        for warning in loaded.warnings:
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    return loaded


EpochOption = Annotated[int, typer.Option("--epoch", "-e", min=1, help="The (1-based) epoch whose freeze stage "
                                          "to show: freeze.stages unfreeze more as training goes on.")]


@app.command("freeze-report")
@_user_errors
def freeze_report(config: ConfigOption = None, set_: SetOption = None, epoch: EpochOption = 1,
                  json: JsonOption = False) -> None:
    """Show what a config freezes, what trains, and what the optimizer receives.

    Example:  finetune freeze-report --config configs/quickstart.yaml --set 'freeze.trainable=["layer4","fc"]'
    """
    cfg = _load(config, set_)
    from finetune.analysis.freeze_report import build_freeze_report
    from finetune.cli.render import print_freeze_report, print_json

    report = build_freeze_report(cfg, epoch)
    print_json(report.to_json()) if json else print_freeze_report(report)


@app.command("inspect-grads")
@_user_errors
def inspect_grads(
    config: ConfigOption = None,
    set_: SetOption = None,
    batches: Annotated[int, typer.Option("--batches", "-n", min=1, help="Real batches to run forward and "
                                         "backward.")] = 1,
    epoch: EpochOption = 1,
    json: JsonOption = False,
) -> None:
    """Check the gradients: frozen ones absent, trainable ones finite and equal to an independent computation.

    Exit code 0 when every check passes, 1 when any fails.

    Example:  finetune inspect-grads --config configs/quickstart.yaml --set 'freeze.trainable=["layer4","fc"]' -n 2
    """
    cfg = _load(config, set_)
    from finetune.analysis.gradcheck import inspect_grads as run_checks
    from finetune.cli.render import print_grad_report, print_json

    report = run_checks(cfg, batches, epoch)
    print_json(report.to_json()) if json else print_grad_report(report)
    if not report.passed:
        raise typer.Exit(1)


@app.command("lr-find")
@_user_errors
def lr_find(
    config: ConfigOption = None,
    set_: SetOption = None,
    start: Annotated[float, typer.Option("--start", help="The first learning rate of the sweep.")] = 1e-6,
    end: Annotated[float, typer.Option("--end", help="The last learning rate of the sweep (at most 10).")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", "-n", help="Training steps (batches), one per learning "
                                       "rate.")] = 100,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the plot: a .png file "
                                                   "or a folder (default: lr_find.png in the current folder).",
                                                   show_default=False)] = None,
    json: JsonOption = False,
) -> None:
    """Find a learning rate: train briefly while it grows exponentially, and suggest one from the loss curve.

    It sweeps what `train` trains in epoch 1: freeze rules, BatchNorm modes, param groups (scaled together).

    A frozen prefix runs once, then the sweep runs from the feature cache. Writes lr_find.png, no run directory.

    Exit code 1 when the curve gives no suggestion.

    Example:  finetune lr-find --config configs/quickstart.yaml --steps 100
    """
    cfg = _load(config, set_)
    from finetune.analysis.lr_find import lr_find as run_sweep
    from finetune.cli.render import print_json, print_lr_find

    result = run_sweep(cfg, start=start, end=end, steps=steps, output=output, sets=set_ or [])
    print_json(result.to_json()) if json else print_lr_find(result)
    if result.suggestion.lr is None:
        raise typer.Exit(1)


@app.command()
@_user_errors
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (overrides "
                                                       "train.output_dir).", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory from its "
                                                   "last.pt.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run files in an existing output "
                                            "directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Train in this many processes on this machine "
                                       "(launches torchrun; train.batch_size is the global batch).")] = 1,
) -> None:
    """Fine-tune a model (model.arch) on an ImageFolder tree or a label file (data.labels); write a run directory.

    Example:  finetune train --config configs/quickstart.yaml --set train.epochs=3
    """
    if resume is not None and config is None:
        config = resume / "config.yaml"
    cfg = _load(config, set_)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from finetune.training.validate import validate
        from finetune.utils.distributed import launch

        validate(cfg, data_needed_by="train", processes=nproc)  # once, here: not once per process after the launch
        raise typer.Exit(launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    from finetune.cli.live import make_reporter
    from finetune.training.run import train as run_training

    reporter = make_reporter(quiet)
    try:
        run_training(cfg, reporter, output_dir=output_dir, resume=resume, overwrite=overwrite)
    finally:
        reporter.close()


ThresholdOption = Annotated[Optional[float], typer.Option(
    "--threshold", min=0.0, max=1.0, help="Multi-label models: predict a label at this probability or above, for "
    "every label (default: each label's own threshold, chosen on the validation split).", show_default=False)]


@app.command("evaluate")
@_user_errors
def evaluate_command(
    checkpoint: ModelArgument,
    data: Annotated[Optional[Path], typer.Option("--data", help="An ImageFolder tree (its SPLIT/ folder if it has "
                                                 "one) or a label file (its rows of SPLIT if it has a split "
                                                 "column); default: the run's own data.",
                                                 show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="val or test: the run's validation images, or its test "
                                       "images (data.root/test, or the label file's rows of split test).")] = "val",
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where to write confusion.png "
                                                       "(default: beside the checkpoint).", show_default=False)] = None,
    top_losses: Annotated[int, typer.Option("--top-losses", "-t", min=0, max=100, help="Also write top_losses.png "
                                            "(the K images with the highest loss) and predictions.csv (every "
                                            "image, by loss).", show_default=False)] = 0,
    threshold: ThresholdOption = None,
    tta: TtaOption = False,
    tta_mode: TtaModeOption = None,
    json: JsonOption = False,
) -> None:
    """Loss, top-1/top-5, per-class precision/recall/F1, balanced accuracy and macro F1, with a confusion matrix.

    A multi-label model: mAP, micro/macro F1 and exact match; per label precision, recall, F1, AP and support;
    pr_curves.png and predictions.csv (every label's probability). With --tta the headline metrics with test-time
    augmentation are shown beside those without.

    Example:  finetune evaluate runs/quickstart/best.pt --data data/shapes --top-losses 16 --tta
    """
    if split not in ("val", "test"):
        raise FinetuneError(f"--split {split!r}: use val or test.")
    from finetune.cli.render import print_evaluation, print_json
    from finetune.deploy.inference import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, output_dir, top_losses, split, threshold, _tta(tta, tta_mode))
    print_json(result) if json else print_evaluation(result)


@app.command()
@_user_errors
def predict(
    checkpoint: ModelArgument,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (walked for images).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to show per image "
                                       "(multi-class models).")] = 3,
    threshold: ThresholdOption = None,
    tta: TtaOption = False,
    tta_mode: TtaModeOption = None,
    json: JsonOption = False,
) -> None:
    """Predict the classes of images with a trained checkpoint, or a model written by `finetune export`.

    A multi-label model shows every label at or above its threshold, with its probability.

    Example:  finetune predict runs/quickstart/best.pt data/shapes/val/star --top-k 2 --tta
    """
    from finetune.cli.render import print_json, print_predictions
    from finetune.deploy.inference import predict as run_predict

    results = run_predict(checkpoint, images, top_k, threshold, _tta(tta, tta_mode))
    print_json(results) if json else print_predictions(results)


@app.command()
@_user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint: RUN_DIR/best.pt or last.pt.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or state-dict.")] = "onnx",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The file to write (default: beside the "
                                                   "checkpoint: best.onnx, best.int8.onnx, best.torchscript.pt or "
                                                   "best.state_dict.pth + best.state_dict.json).",
                                                   show_default=False)] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 18).",
                                                 show_default=False)] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8: quantize the ONNX model "
                                                    "(ONNX Runtime static quantization, QDQ, per-channel weights), "
                                                    "then check its accuracy and time it.",
                                                    show_default=False)] = None,
    calibration_images: Annotated[Optional[int], typer.Option("--calibration-images", help="Images the int8 "
                                                              "ranges are calibrated on (default 300).",
                                                              show_default=False)] = None,
    calibration_data: Annotated[Optional[Path], typer.Option("--calibration-data", help="Calibrate on this "
                                                             "ImageFolder tree (DIR/<class>/<image>, its train/ if "
                                                             "it has one) instead of the run's training split.",
                                                             show_default=False)] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Refuse int8 (exit code "
                                                               "1, no file) when its validation top-1 accuracy is "
                                                               "more than this many points below fp32's "
                                                               "(default 1).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    json: JsonOption = False,
) -> None:
    """Export a checkpoint as ONNX, TorchScript or a plain state dict, verified against the checkpoint.

    ONNX and TorchScript take float32 RGB in [0, 1], N x 3 x S x S, and normalise it themselves; of a calibrated
    checkpoint they output its calibrated probabilities.

    Their metadata names the classes, the preprocessing, the temperature, the architecture and the source run.

    The export is loaded back and compared on up to 32 of the run's validation images: exit code 1, no file, when
    it differs by more than 1e-4 + 1e-5 x the image's largest |logit| or picks another class.

    With --quantize int8 the ONNX model is quantized, its accuracy checked on the validation split against fp32,
    and both timed on this CPU (in its metadata).

    Example:  finetune export runs/quickstart/best.pt --quantize int8
    """
    from finetune.cli.render import print_export, print_json
    from finetune.deploy.export import export_checkpoint
    from finetune.deploy.quantize import int8_options

    int8 = int8_options(quantize, calibration_images, calibration_data, max_accuracy_drop)
    result = export_checkpoint(checkpoint, format_, output, opset, overwrite, int8)
    print_json(result) if json else print_export(result)


@app.command()
@_user_errors
def models(
    bench: Annotated[bool, typer.Option("--bench", help="Measure each model on this machine: feature extraction, "
                                        "a training step and inference, in images/s (a few seconds per "
                                        "model).")] = False,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=32, max=1024, help="--bench: the image "
                                                      "size (default: each model's own).", show_default=False)] = None,
    freeze: Annotated[str, typer.Option("--freeze", help="--bench: the training step measured: full (everything "
                                        "trains) or head (the head only).")] = "full",
    only: Annotated[Optional[str], typer.Option("--only", help="Only these models, comma-separated, e.g. "
                                                "resnet18,mobilenet_v3_large.", show_default=False)] = None,
    json: JsonOption = False,
) -> None:
    """List the supported models: parameters, GFLOPs, ImageNet accuracy, default image size (no download).

    With --bench, measure them on this machine, sorted by training speed, the Pareto front marked.

    Example:  finetune models --bench --image-size 128 --only resnet18,mobilenet_v3_large,regnet_y_400mf
    """
    from finetune.cli.render import print_json, print_models
    from finetune.models.catalog import model_names, model_rows

    if freeze not in ("full", "head"):
        raise FinetuneError(f"--freeze {freeze!r}: use full or head.")
    names = model_names(only)
    if not bench:
        rows = model_rows(names)
        print_json(rows) if json else print_models(rows)
        return
    from finetune.analysis.model_bench import bench_models
    from finetune.cli.render import err_console, print_model_bench

    result = bench_models(names, image_size, freeze,
                          on_model=lambda name: err_console.print(f"measuring {name} ...", highlight=False))
    print_json(result.to_json()) if json else print_model_bench(result)


@app.command()
@_user_errors
def runs(
    folders: Annotated[Optional[list[Path]], typer.Argument(metavar="DIR...", help="Run directories, or folders "
                                                            "that hold them (default: runs/).",
                                                            show_default=False)] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Compare the given run directories: overlay their "
                                          "validation curves in one plot and list the config keys that differ.")
                       ] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --compare: where to write the plot, "
                                                   "a .png file or a folder (default: compare.png in the current "
                                                   "folder).", show_default=False)] = None,
    json: JsonOption = False,
) -> None:
    """List the runs in run folders, best validation accuracy first: model, trained parameters, epochs, how each
    ended, best and final val_acc, training time, images/s.

    Broken or partial run directories are listed as such.

    Example:  finetune runs

    Compare:  finetune runs --compare runs/a runs/b runs/c --output compare.png
    """
    from finetune.analysis.runs import compare_runs, list_runs
    from finetune.cli.render import print_comparison, print_json, print_runs

    if compare:
        result = compare_runs(folders or [], output)
        print_json(result.to_json()) if json else print_comparison(result)
        return
    if output is not None:
        raise FinetuneError("--output is the plot of --compare; add --compare and the run directories to compare.")
    folders = folders or [Path("runs")]
    found = list_runs(folders)
    print_json([row.to_json() for row in found]) if json else print_runs(found, folders)


@app.command()
@_user_errors
def calibrate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint: RUN_DIR/best.pt or last.pt.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Fit again a checkpoint that is already "
                                            "calibrated.")] = False,
    json: JsonOption = False,
) -> None:
    """Calibrate a checkpoint's probabilities: fit a temperature on the run's validation split and store it.

    Reports NLL, expected calibration error (15 bins) and accuracy before and after, on held-out images
    (5-fold cross-fitting), and writes reliability.png beside the checkpoint. The weights are not touched.

    evaluate, predict and export then use the temperature.

    Example:  finetune calibrate runs/quickstart/best.pt
    """
    from finetune.cli.render import print_calibration, print_json
    from finetune.deploy.calibrate import calibrate as run_calibration

    result = run_calibration(checkpoint, overwrite)
    print_json(result) if json else print_calibration(result)


@app.command()
@_user_errors
def benchmark(
    model: ModelArgument,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size of the throughput "
                                            "measurement.")] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Compute threads (default: one "
                                                   "per core).", show_default=False)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", "-i", help="Time decoding and preprocessing on these "
                                                   "image files (a folder is walked; default: a synthetic "
                                                   "1024x768 JPEG).", show_default=False)] = None,
    seconds: Annotated[float, typer.Option("--seconds", min=0.01, help="Time each measurement for at least this "
                                           "long, after warm-up.")] = 3.0,
    json: JsonOption = False,
) -> None:
    """Time a model on this CPU: latency at batch 1 (p50, p95), throughput at --batch-size, and image decoding +
    preprocessing, measured apart.

    Takes a checkpoint, an exported .onnx (fp32 or int8) or a TorchScript export.

    Example:  finetune benchmark runs/quickstart/best.int8.onnx --images data/shapes/val
    """
    from finetune.cli.render import print_benchmark, print_json
    from finetune.deploy.benchmark import benchmark as run_benchmark

    result = run_benchmark(model, batch_size, threads, images, seconds)
    print_json(result) if json else print_benchmark(result)


@app.command("make-dataset")
@_user_errors
def make_dataset(
    kind: Annotated[str, typer.Argument(help="Which demo data set: shapes.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (must not exist or be empty).")],
    classes: Annotated[int, typer.Option("--classes", help="Number of shape classes (2-6).")] = 4,
    train_per_class: Annotated[int, typer.Option("--train-per-class", help="Training images per class.")] = 1000,
    val_per_class: Annotated[int, typer.Option("--val-per-class", help="Validation images per class.")] = 100,
    image_size: Annotated[int, typer.Option("--image-size", help="Image width and height in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same images.")] = 0,
    imbalance: Annotated[float, typer.Option("--imbalance", help="Make the classes imbalanced: the first class gets "
                                             "this many times the images of the last (in train and val), the "
                                             "others in between. 1 = balanced.")] = 1.0,
    format_: Annotated[Optional[str], typer.Option("--format", help="folders: an ImageFolder tree; csv: images/ "
                                                   "and a label file, labels.csv (path, label, split). [default: "
                                                   "folders; csv with --multilabel]", show_default=False)] = None,
    multilabel: Annotated[bool, typer.Option("--multilabel", help="One to three shapes per image, all named in "
                                             "its label (a label file; train/val-per-class x classes images).")]
    = False,
) -> None:
    """Generate the built-in demo data set (shapes on noisy backgrounds) as an ImageFolder tree or a label file.

    Example:  finetune make-dataset shapes data/shapes --classes 6 --seed 1
    Imbalanced:  finetune make-dataset shapes data/shapes-imb --imbalance 10
    Label file:  finetune make-dataset shapes data/shapes-csv --format csv
    Multi-label:  finetune make-dataset shapes data/shapes-multilabel --multilabel
    """
    if kind != "shapes":
        raise FinetuneError(f"Unknown demo data set {kind!r}; the one available is 'shapes'.")
    from finetune.data.demo import make_shapes

    info = make_shapes(out_dir, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                       image_size=image_size, seed=seed, imbalance=imbalance,
                       layout=format_ or ("csv" if multilabel else "folders"), multilabel=multilabel)
    counted = imbalance != 1 or multilabel
    names = info["classes"] if not counted else [
        f"{name} {train}/{val}" for name, train, val in zip(info["classes"], info["train_sizes"], info["val_sizes"])]
    typer.echo(f"Wrote {info['train']} train and {info['val']} val images of {len(info['classes'])} classes "
               f"({', '.join(names)}{' train/val images' if counted else ''}) to {info['root']}"
               + (f"; labels in {info['labels']}" if "labels" in info else ""))


def main() -> None:
    try:
        app(prog_name="finetune")
    finally:
        # The garbage collector's passes over torch's millions of objects while the interpreter shuts down take
        # about a second; freezing them skips those passes (objects are still freed, files still closed).
        gc.freeze()
