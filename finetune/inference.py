"""Use a trained checkpoint: evaluate it on a labelled folder, or predict classes of images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.models import resnet18

from finetune.checkpoint import load_checkpoint
from finetune.config import Config
from finetune.data import (
    class_names,
    drop_bad_images,
    eval_transform,
    image_folder,
    load_datasets,
    make_loader,
    read_image,
)
from finetune.engine import evaluate
from finetune.errors import FinetuneError
from finetune.fastpath import FastModel
from finetune.model import FEATURES


@dataclass
class Trained:
    model: nn.Module
    classes: list[str]
    config: Config
    path: Path


def load_trained(path: Path) -> Trained:
    """The model of a finetune checkpoint, in eval mode, with its class names and config."""
    checkpoint = load_checkpoint(path)
    try:
        classes = [str(name) for name in checkpoint["classes"]]
        model = resnet18(weights=None)
        model.fc = nn.Linear(FEATURES, len(classes))
        model.load_state_dict(checkpoint["model"])
        config = Config.model_validate(checkpoint["config"])
    except Exception as exc:  # a damaged or foreign file that merely looks like a checkpoint
        problem = " ".join(str(exc).split())
        problem = problem if len(problem) <= 300 else problem[:297] + "..."
        raise FinetuneError(f"{path} is not a usable finetune checkpoint: {type(exc).__name__}"
                            f"{': ' + problem if problem else ''}\n"
                            "Give last.pt or best.pt from a run directory of `finetune train`.") from None
    return Trained(model.eval(), classes, config, Path(path))


def evaluate_checkpoint(path: Path, data: Optional[Path] = None, output_dir: Optional[Path] = None) -> dict:
    """Loss, top-1, top-5, per-class accuracy and a confusion.png for a checkpoint.

    ``data`` is an ImageFolder tree (its ``val/`` when it has one); by default the
    validation split of the run's own config.
    """
    trained = load_trained(path)
    config = trained.config.model_copy(deep=True)
    if data is not None:
        data = Path(data)
        config.data.root = str(data / "val" if (data / "val").is_dir() else data)
    datasets = _eval_set(config, trained.classes, whole=data is not None)
    loader = make_loader(datasets, config.train.batch_size, shuffle=False)
    result = evaluate(FastModel.whole(trained.model), loader, nn.CrossEntropyLoss(), len(trained.classes))
    confusion = result.pop("confusion")
    per_class = []
    for i, name in enumerate(trained.classes):
        total = confusion[i].sum().item()
        per_class.append({"class": name, "images": total,
                          "acc": confusion[i, i].item() / total if total else None})
    out = Path(output_dir) if output_dir else Path(path).parent
    out.mkdir(parents=True, exist_ok=True)
    from finetune.plots import plot_confusion

    plot_confusion(confusion, trained.classes, out / "confusion.png")
    return {"checkpoint": str(path), "data": config.data.root, "images": result["n"], "loss": result["loss"],
            "top1": result["acc"], "top5": result["top5"], "per_class": per_class,
            "confusion": confusion.tolist(), "classes": trained.classes, "confusion_png": str(out / "confusion.png")}


def _eval_set(config: Config, classes: list[str], whole: bool):
    if not whole:
        return load_datasets(config).val
    found = class_names(config)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise FinetuneError(f"{config.data.root} has classes the checkpoint does not know: {', '.join(unknown)} "
                            f"(it knows {', '.join(classes)}).")
    folder = image_folder(config, Path(config.data.root), classes, eval_transform(config.data.image_size),
                          allow_empty=True)
    drop_bad_images(config, [folder])  # a clear error naming unreadable files, or skipped by data.skip_bad_images
    return folder


def predict(path: Path, inputs: list[Path], top_k: int = 3) -> list[dict]:
    """Top-k classes with probabilities for each image (directories are walked for images)."""
    trained = load_trained(path)
    transform = eval_transform(trained.config.data.image_size)
    k = max(1, min(top_k, len(trained.classes)))
    results = []
    for image_path in _images(inputs):
        batch = transform(read_image(str(image_path), hint=""))[None]
        with torch.inference_mode():
            probs = trained.model(batch).softmax(1)[0]
        top = probs.topk(k)
        results.append({"image": str(image_path), "predictions": [
            {"class": trained.classes[i], "prob": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]})
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
