"""Use a trained model (a checkpoint or a file of `finetune export`): evaluate it on a labelled folder, or predict
classes of images.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config.schema import Config
from finetune.data.folders import (
    class_names,
    drop_bad_images,
    eval_transform,
    image_folder,
    image_samples,
    load_datasets,
    load_image,
)
from finetune.data.loaders import default_workers, make_loader
from finetune.deploy.artifacts import is_torchscript_export, load_onnx, load_torchscript, load_trained, to_pixels
from finetune.deploy.tta import check_mode, probabilities, view_size
from finetune.errors import FinetuneError
from finetune.models.arch import get_arch
from finetune.models.fastpath import FastModel
from finetune.training import metrics
from finetune.utils.files import atomic_write_text

PREDICT_BATCH = 32


@dataclass
class Loaded:
    """A model ready to classify: a checkpoint, or an ONNX or TorchScript file of `finetune export`.

    ``fast(batch)`` (and ``fast.head(batch)``) gives the logits of a batch normalised as ``data.eval_transform``
    makes it.
    """

    classes: list[str]
    config: Config  # the run's config: an export carries it in its metadata
    fast: Any  # a FastModel, or an _Exported


class _Exported:
    """An exported model as evaluate and predict call a model: normalised batches in, logits out."""

    def __init__(self, model: nn.Module):
        self.model = model  # takes RGB in [0, 1] and normalises it itself

    def head(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(to_pixels(batch))

    __call__ = head


def load_model(path: Path) -> Loaded:
    """A checkpoint, or an exported ``.onnx`` (run by onnxruntime) or TorchScript file, ready to classify.

    Classes, image size and the run's config of an export come from its own metadata.
    """
    path = Path(path)
    if path.suffix == ".onnx" or is_torchscript_export(path):
        if not path.is_file():
            raise FinetuneError(f"Exported model not found: {path}")
        kind = "onnx" if path.suffix == ".onnx" else "torchscript"
        model, meta = load_onnx(path) if kind == "onnx" else load_torchscript(path)
        try:
            config = Config.model_validate(meta["config"])
            config.data.image_size = int(meta["image_size"])
            classes = [str(name) for name in meta["classes"]]
        except Exception as exc:
            raise FinetuneError(f"{path} has finetune metadata this version cannot use "
                                f"({type(exc).__name__}); export it again with this finetune.") from None
        return Loaded(classes, config, _Exported(model))
    trained = load_trained(path)
    fast = FastModel.whole(trained.model, get_arch(trained.config.model.arch))
    return Loaded(trained.classes, trained.config, fast)


def evaluate_checkpoint(path: Path, data: Optional[Path] = None, output_dir: Optional[Path] = None,
                        top_losses: int = 0, tta: Optional[str] = None) -> dict:
    """Loss, top-1, top-5, per-class precision/recall/F1/support, balanced accuracy and macro F1 of a checkpoint,
    with confusion.png (counts, and normalised per true class).

    ``data`` is an ImageFolder tree (its ``val/`` when it has one); by default the
    validation split of the run's own config. With ``top_losses`` K it also writes
    top_losses.png (the K images with the highest loss) and predictions.csv (every
    image: path, true and predicted class, the probability of each class, loss; by loss).
    Pictures go beside the checkpoint or in ``output_dir``. With ``tta`` (a mode of ``deploy.tta``) the same
    headline metrics with test-time augmentation follow under ``tta``; the rest is without it.
    """
    from finetune.utils.plots import plot_confusion, plot_top_losses

    trained = load_model(path)
    config = trained.config.model_copy(deep=True)
    if tta is not None:
        check_tta(trained, path, tta)
    if data is not None:
        data = Path(data)
        config.data.root = str(data / "val" if (data / "val").is_dir() else data)
    dataset = _eval_set(config, trained.classes, whole=data is not None)
    n = len(trained.classes)
    logits, targets = _logits(trained.fast, make_loader(dataset, config.train.batch_size, shuffle=False,
                                                       workers=default_workers()), n)
    headline, confusion, losses = _headline(logits.log_softmax(1), targets, n)
    scores = metrics.summary(confusion)
    out = Path(output_dir) if output_dir else Path(path).parent
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(confusion, trained.classes, out / "confusion.png")
    result = {"checkpoint": str(path), "data": config.data.root, "images": len(targets), **headline,
              "per_class": [{"class": name, **row} for name, row in zip(trained.classes, scores["per_class"])],
              "confusion": confusion.tolist(), "classes": trained.classes, "confusion_png": str(out / "confusion.png")}
    if tta is not None:
        result["tta"] = {"mode": tta, **_headline(_tta_log_probs(trained.fast, config, tta, trained.classes,
                                                                 whole=data is not None), targets, n)[0]}
    if top_losses:
        rows = _by_loss(dataset, logits, targets, losses, trained.classes)
        _write_predictions(rows, trained.classes, out / "predictions.csv")
        plot_top_losses(rows[:top_losses], out / "top_losses.png")
        result.update(top_losses=[{k: v for k, v in row.items() if k != "probs"} for row in rows[:top_losses]],
                      top_losses_png=str(out / "top_losses.png"), predictions_csv=str(out / "predictions.csv"))
    return result


def _headline(log_probs: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """Loss, top-1, top-5, balanced accuracy and macro F1 of per-image log-probabilities; with the confusion matrix
    and the loss of every image."""
    predicted = log_probs.argmax(1)
    confusion = metrics.confusion_matrix(targets, predicted, num_classes)
    losses = nn.functional.nll_loss(log_probs, targets, reduction="none")  # of log_softmax: the cross-entropy
    top5 = metrics.top_k_hits(log_probs, targets)
    scores = {"loss": _mean(losses), "top1": _mean(predicted == targets), "top5": _mean(top5),
              "balanced_accuracy": metrics.balanced_accuracy(confusion), "macro_f1": metrics.macro_f1(confusion)}
    return scores, confusion, losses


def check_tta(loaded: "Loaded", path: Path, mode: str) -> None:
    """Refuse a TTA ``mode`` that does not exist, or a model that cannot run a batch of its views (an export with
    a fixed batch size or image size, say), before any work is done."""
    check_mode(mode)
    size = loaded.config.data.image_size
    probe = torch.zeros(2, 3, view_size(mode, size), view_size(mode, size))
    try:
        with torch.inference_mode():
            probabilities(loaded.fast, probe, mode, size)
    except Exception as exc:  # the last line: a TorchScript error carries the script's traceback before it
        raise FinetuneError(f"--tta {mode}: {path} cannot run it: a batch of 2 views of {size}x{size} px fails "
                            f"({str(exc).strip().splitlines()[-1]}).\nEvaluate or predict without --tta, or use a checkpoint or an "
                            "export of `finetune export`, which take any batch size.") from None


@torch.inference_mode()
def _tta_log_probs(fast, config: Config, mode: str, classes: list[str], whole: bool) -> torch.Tensor:
    """Log of the TTA-averaged softmax of every image of the evaluation set, in loader order."""
    views_config = config.model_copy(deep=True)
    views_config.data.image_size = view_size(mode, config.data.image_size)
    loader = make_loader(_eval_set(views_config, classes, whole), config.train.batch_size, shuffle=False,
                         workers=default_workers())
    probs = [torch.empty(0, len(classes))]
    for images, _ in loader:
        probs.append(probabilities(fast.head, images, mode, config.data.image_size))
    return torch.cat(probs).clamp_min(torch.finfo(torch.float32).tiny).log()


def _mean(values: torch.Tensor) -> float:
    return values.double().mean().item() if len(values) else float("nan")  # no images: nothing to average


@torch.inference_mode()
def _logits(fast, loader, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and targets of every image, in loader order."""
    logits, targets = [torch.empty(0, num_classes)], [torch.empty(0, dtype=torch.long)]
    for images, labels in loader:
        logits.append(fast.head(images).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def _by_loss(dataset, logits, targets, losses, classes: list[str]) -> list[dict]:
    """One row per image, highest loss first: its file, true and predicted class, probabilities and loss."""
    probs = logits.softmax(1)
    rows = [{"path": path, "true": classes[t], "predicted": classes[p], "prob": prob[p], "loss": loss, "probs": prob}
            for (path, _), t, p, prob, loss in zip(image_samples(dataset), targets.tolist(),
                                                   logits.argmax(1).tolist(), probs.tolist(), losses.tolist())]
    return sorted(rows, key=lambda row: -row["loss"])


def _write_predictions(rows: list[dict], classes: list[str], path: Path) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", *(f"prob_{name}" for name in classes), "loss"])
    for row in rows:
        writer.writerow([row["path"], row["true"], row["predicted"], *(f"{p:.6g}" for p in row["probs"]),
                         f"{row['loss']:.6g}"])
    atomic_write_text(path, text.getvalue())


def _eval_set(config: Config, classes: list[str], whole: bool):
    if not whole:
        return load_datasets(config).val
    found = class_names(config)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise FinetuneError(f"{config.data.root} has classes the checkpoint does not know: {', '.join(unknown)} "
                            f"(it knows {', '.join(classes)}).")
    transform = eval_transform(config.data.image_size, config.data.fast_decode)
    folder = image_folder(config, Path(config.data.root), classes, transform, allow_empty=True)
    drop_bad_images(config, [folder])  # a clear error naming unreadable files, or skipped by data.skip_bad_images
    return folder


def predict(path: Path, inputs: list[Path], top_k: int = 3, tta: Optional[str] = None) -> list[dict]:
    """Top-k classes with probabilities for each image (directories are walked for images).

    ``path`` is a checkpoint or an exported .onnx / TorchScript file. With ``tta`` (a mode of ``deploy.tta``) the
    probabilities are averaged over the views of each image.
    """
    loaded = load_model(path)
    size = loaded.config.data.image_size
    if tta is not None:
        check_tta(loaded, path, tta)
    transform = eval_transform(view_size(tta, size) if tta else size, loaded.config.data.fast_decode)
    k = max(1, min(top_k, len(loaded.classes)))
    images = _images(inputs)
    results = []
    for start in range(0, len(images), PREDICT_BATCH):
        chunk = images[start:start + PREDICT_BATCH]
        batch = torch.stack([load_image(str(image_path), transform, hint="") for image_path in chunk])
        with torch.inference_mode():
            probs = probabilities(loaded.fast, batch, tta, size) if tta else loaded.fast(batch).float().softmax(1)
            top = probs.topk(k)
        for image_path, probs, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"image": str(image_path), "predictions": [
                {"class": loaded.classes[i], "prob": p} for p, i in zip(probs, indices)]})
    return results


def _images(inputs: list[Path]) -> list[Path]:
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        elif item.is_file():
            found.append(item)
        else:
            raise FinetuneError(f"No such image or folder: {item}")
    if not found:
        raise FinetuneError(f"No images found in {', '.join(map(str, inputs))} "
                            f"(looked for {', '.join(IMG_EXTENSIONS)}).")
    return found
