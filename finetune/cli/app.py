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
# (README, "Fast on a CPU"). Read once when torch loads, so set here, before any command imports it; a value the
# user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

app = typer.Typer(
    help="Fine-tune a pretrained torchvision ResNet (ResNet-18 by default) on your own images, on a CPU.",
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
    """Fine-tune a pretrained torchvision ResNet (ResNet-18 by default) on your own images, on a CPU."""


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

    return load_config(config, overrides or [])


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
    """Fine-tune a ResNet (model.arch) on an ImageFolder tree and write a run directory.

    Example:  finetune train --config configs/quickstart.yaml --set train.epochs=3
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from finetune.training.distributed import launch

        raise typer.Exit(launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    if resume is not None and config is None:
        config = resume / "config.yaml"
    cfg = _load(config, set_)
    from finetune.cli.live import make_reporter
    from finetune.training.run import train as run_training

    reporter = make_reporter(quiet)
    try:
        run_training(cfg, reporter, output_dir=output_dir, resume=resume, overwrite=overwrite)
    finally:
        reporter.close()


@app.command("evaluate")
@_user_errors
def evaluate_command(
    checkpoint: ModelArgument,
    data: Annotated[Optional[Path], typer.Option("--data", help="ImageFolder tree to evaluate on (its val/ if it "
                                                 "has one); default: the run's validation split.",
                                                 show_default=False)] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where to write confusion.png "
                                                       "(default: beside the checkpoint).", show_default=False)] = None,
    top_losses: Annotated[int, typer.Option("--top-losses", "-t", min=0, max=100, help="Also write top_losses.png "
                                            "(the K images with the highest loss) and predictions.csv (every "
                                            "image, by loss).", show_default=False)] = 0,
    tta: TtaOption = False,
    tta_mode: TtaModeOption = None,
    json: JsonOption = False,
) -> None:
    """Loss, top-1/top-5, per-class precision/recall/F1, balanced accuracy and macro F1, with a confusion matrix.

    With --tta the headline metrics with test-time augmentation are shown beside those without.

    Example:  finetune evaluate runs/quickstart/best.pt --data data/shapes --top-losses 16 --tta
    """
    from finetune.cli.render import print_evaluation, print_json
    from finetune.deploy.inference import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, output_dir, top_losses, _tta(tta, tta_mode))
    print_json(result) if json else print_evaluation(result)


@app.command()
@_user_errors
def predict(
    checkpoint: ModelArgument,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (walked for images).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to show per image.")] = 3,
    tta: TtaOption = False,
    tta_mode: TtaModeOption = None,
    json: JsonOption = False,
) -> None:
    """Predict the classes of images with a trained checkpoint, or a model written by `finetune export`.

    Example:  finetune predict runs/quickstart/best.pt data/shapes/val/star --top-k 2 --tta
    """
    from finetune.cli.render import print_json, print_predictions
    from finetune.deploy.inference import predict as run_predict

    results = run_predict(checkpoint, images, top_k, _tta(tta, tta_mode))
    print_json(results) if json else print_predictions(results)


@app.command()
@_user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint: RUN_DIR/best.pt or last.pt.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or state-dict.")] = "onnx",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The file to write (default: beside the "
                                                   "checkpoint: best.onnx, best.torchscript.pt or "
                                                   "best.state_dict.pth + best.state_dict.json).",
                                                   show_default=False)] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 18).",
                                                 show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    json: JsonOption = False,
) -> None:
    """Export a checkpoint as ONNX, TorchScript or a plain state dict, verified against the checkpoint.

    ONNX and TorchScript take float32 RGB in [0, 1], N x 3 x S x S, and normalise it themselves.

    Their metadata names the classes, the preprocessing, the architecture and the source run.

    The export is loaded back and compared on up to 32 of the run's validation images: exit code 1, no file, above 1e-4.

    Example:  finetune export runs/quickstart/best.pt --format onnx
    """
    from finetune.cli.render import print_export, print_json
    from finetune.deploy.export import export_checkpoint

    result = export_checkpoint(checkpoint, format_, output, opset, overwrite)
    print_json(result) if json else print_export(result)


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
) -> None:
    """Generate the built-in demo data set (shapes on noisy backgrounds) as an ImageFolder tree.

    Example:  finetune make-dataset shapes data/shapes --classes 6 --seed 1
    Imbalanced:  finetune make-dataset shapes data/shapes-imb --imbalance 10
    """
    if kind != "shapes":
        raise FinetuneError(f"Unknown demo data set {kind!r}; the one available is 'shapes'.")
    from finetune.data.demo import make_shapes

    info = make_shapes(out_dir, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                       image_size=image_size, seed=seed, imbalance=imbalance)
    names = info["classes"] if imbalance == 1 else [
        f"{name} {train}/{val}" for name, train, val in zip(info["classes"], info["train_sizes"], info["val_sizes"])]
    typer.echo(f"Wrote {info['train']} train and {info['val']} val images of {len(info['classes'])} classes "
               f"({', '.join(names)}{' train/val images' if imbalance != 1 else ''}) to {info['root']}")


def main() -> None:
    try:
        app(prog_name="finetune")
    finally:
        # The garbage collector's passes over torch's millions of objects while the interpreter shuts down take
        # about a second; freezing them skips those passes (objects are still freed, files still closed).
        gc.freeze()
