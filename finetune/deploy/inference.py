"""Use a trained model (a checkpoint or a file of `finetune export`): evaluate it on a labelled folder or label file,
or predict the classes (multi-label: the labels) of images.
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
    eval_transform,
    image_samples,
    labelled_files,
    labelled_folder,
    load_datasets,
    load_image,
    load_test_set,
)
from finetune.data.labels import split_samples
from finetune.data.loaders import default_workers, make_loader
from finetune.deploy.artifacts import (
    is_torchscript_export,
    load_onnx,
    load_torchscript,
    load_trained,
    outputs_probabilities,
    to_pixels,
)
from finetune.deploy.tta import averaged_logits, check_mode, view_size
from finetune.errors import FinetuneError
from finetune.models.arch import get_arch
from finetune.models.fastpath import FastModel
from finetune.training import metrics, multilabel
from finetune.training.calibration import ECE_BINS, ece
from finetune.training.checkpoint import saved_config
from finetune.training.multilabel import DEFAULT_THRESHOLD
from finetune.utils.files import atomic_write_text, writing

PREDICT_BATCH = 32


@dataclass
class Loaded:
    """A model ready to classify: a checkpoint, or an ONNX or TorchScript file of `finetune export`.

    ``fast.head(batch)`` gives the model's output for a batch normalised as ``data.eval_transform`` makes it:
    logits, or the calibrated probabilities of an export of a calibrated checkpoint. :meth:`logits` turns either
    into the logits whose softmax is what finetune reports.
    """

    classes: list[str]
    config: Config  # the run's config: an export carries it in its metadata
    fast: Any  # a FastModel, or an _Exported
    kind: str = "checkpoint"  # checkpoint, onnx, onnx int8 or torchscript
    thresholds: Optional[list[float]] = None  # multilabel: one per label, chosen on the validation split
    temperature: Optional[float] = None  # of a calibrated checkpoint, or the one an export applies itself
    probabilities: bool = False  # the export outputs softmax(logits / temperature)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of a normalised batch (plain logits without a temperature); softmax of them gives the
        probabilities."""
        out = self.fast.head(batch)
        if self.probabilities:  # log of the probabilities: softmax gives them back; tiny keeps log(0) finite
            return out.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        return out if self.temperature is None else out / self.temperature

    def tta_logits(self, batch: torch.Tensor, mode: str) -> torch.Tensor:
        """:meth:`logits` of a batch prepared at ``deploy.tta.view_size``, averaged over the views of ``mode``."""
        return averaged_logits(self.logits, batch, mode, self.config.data.image_size, self.multilabel)

    def check_tta(self, path: Path, mode: str) -> None:
        """Refuse a TTA ``mode`` that does not exist, or a model that cannot run a batch of its views (an export
        with a fixed batch size, say), before any work is done."""
        check_mode(mode)
        size = self.config.data.image_size
        probe = torch.zeros(2, 3, view_size(mode, size), view_size(mode, size))
        try:
            with torch.inference_mode():
                self.tta_logits(probe, mode)
        except Exception as exc:  # the last line: a TorchScript error carries the script's traceback before it
            raise FinetuneError(f"TTA ({mode}): {path} cannot run it: a batch of 2 views of {size}x{size} px fails "
                                f"({str(exc).strip().splitlines()[-1]}).\nEvaluate or predict without --tta, or use "
                                "a checkpoint or an export of `finetune export`, which take any batch size.") from None

    @property
    def multilabel(self) -> bool:
        return self.config.model.task == "multilabel"

    def thresholds_for(self, fixed: Optional[float]) -> list[float]:
        """``fixed`` (``--threshold``) for every label, else the model's own (0.5 where it has none)."""
        if fixed is not None and not self.multilabel:
            raise FinetuneError("--threshold applies to multi-label models (model.task: multilabel); a multi-class "
                                "model predicts its most probable class. Leave --threshold out.")
        if fixed is not None:
            return [fixed] * len(self.classes)
        return list(self.thresholds or [DEFAULT_THRESHOLD] * len(self.classes))


class _Exported:
    """An exported model as evaluate and predict call a model: normalised batches in, logits out."""

    def __init__(self, model: nn.Module, config: Config):
        self.model = model  # takes RGB in [0, 1] and normalises it itself
        self.config = config

    def head(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(to_pixels(batch, self.config))

    __call__ = head


def load_model(path: Path, threads: Optional[int] = None) -> Loaded:
    """A checkpoint, or an exported ``.onnx`` (run by onnxruntime) or TorchScript file, ready to classify.

    Classes, image size, thresholds and the run's config of an export come from its own metadata. ``threads``:
    onnxruntime's threads for an ONNX file (torch's are set with ``torch.set_num_threads``).
    """
    path = Path(path)
    if path.suffix == ".onnx" or is_torchscript_export(path):
        if not path.is_file():
            raise FinetuneError(f"Exported model not found: {path}")
        kind = "onnx" if path.suffix == ".onnx" else "torchscript"
        model, meta = load_onnx(path, threads) if kind == "onnx" else load_torchscript(path)
        try:
            config = saved_config(meta["config"])
            config.data.image_size = int(meta["image_size"])
            classes = [str(name) for name in meta["classes"]]
            thresholds = [float(t) for t in meta["thresholds"]] if meta.get("thresholds") else None
        except Exception as exc:
            raise FinetuneError(f"{path} has finetune metadata this version cannot use "
                                f"({type(exc).__name__}); export it again with this finetune.") from None
        kind += " int8" if meta.get("quantization") else ""
        return Loaded(classes, config, _Exported(model, config), kind, thresholds, meta.get("temperature"),
                      outputs_probabilities(meta))
    trained = load_trained(path)
    fast = FastModel.whole(trained.model, get_arch(trained.config.model.arch), trained.config.data.image_size)
    return Loaded(trained.classes, trained.config, fast, "checkpoint", trained.thresholds, trained.temperature)


def evaluate_checkpoint(path: Path, data: Optional[Path] = None, output_dir: Optional[Path] = None,
                        top_losses: int = 0, split: str = "val", threshold: Optional[float] = None,
                        tta: Optional[str] = None) -> dict:
    """Loss, top-1, top-5, per-class precision/recall/F1/support, balanced accuracy, macro F1 and expected
    calibration error of a checkpoint, with confusion.png (counts, and normalised per true class). A multi-label
    model instead gets mAP, micro and macro F1 and exact match at its thresholds (or ``threshold`` for every
    label), per-label precision, recall, F1, AP and support, pr_curves.png, and predictions.csv.

    A calibrated checkpoint (or its export) is evaluated with its temperature: the loss and ECE are those of its
    calibrated probabilities.

    ``data`` is an ImageFolder tree (its ``split/`` folder when it has one) or a label file (its rows of ``split``
    when it has a split column); by default the run's own ``split``, val or test. With ``top_losses`` K it also
    writes top_losses.png (the K images with the highest loss) and predictions.csv (every image: path, true and
    predicted class, the probability of each class, loss; by loss). Pictures go beside the checkpoint or in
    ``output_dir``. With ``tta`` (a mode of ``deploy.tta``) the headline metrics with test-time augmentation
    follow under ``tta``; everything else is without it.
    """
    from finetune.utils.plots import plot_top_losses

    trained = load_model(path)
    thresholds = trained.thresholds_for(threshold) if trained.multilabel else None
    if tta is not None:
        trained.check_tta(path, tta)
    config = trained.config.model_copy(deep=True)
    dataset, source = _eval_set(config, trained, data, split)
    logits, targets = _logits(trained.logits, make_loader(dataset, config.train.batch_size, shuffle=False,
                                                       workers=default_workers(dataset)), trained)
    out = Path(output_dir) if output_dir else Path(path).parent
    with writing("the evaluation's files", "Choose another --output-dir: a writable folder with room."):
        out.mkdir(parents=True, exist_ok=True)
        losses = _losses(logits, targets, trained.multilabel)
        result = {"checkpoint": str(path), "data": source, "split": split, "images": len(targets),
                  "loss": _mean(losses), "classes": trained.classes}
        if trained.multilabel:
            result.update(_multilabel_scores(logits, targets, trained.classes, thresholds, threshold, out))
        else:
            result.update(_multiclass_scores(logits, targets, trained.classes, out))
            result.update(ece=ece(logits.softmax(1), targets), ece_bins=ECE_BINS, temperature=trained.temperature)
        if tta is not None:
            result["tta"] = {"mode": tta, **_headline(_tta_logits(trained, config, data, split, tta), targets,
                                                      trained, thresholds)}
        if top_losses or trained.multilabel:
            rows = _by_loss(dataset, logits, targets, losses, trained, thresholds)
            _write_predictions(rows, trained.classes, out / "predictions.csv")
            result["predictions_csv"] = str(out / "predictions.csv")
        if top_losses:
            plot_top_losses(rows[:top_losses], out / "top_losses.png")
            result.update(top_losses=[{k: v for k, v in row.items() if k != "probs"} for row in rows[:top_losses]],
                          top_losses_png=str(out / "top_losses.png"))
        return result


def _headline(logits: torch.Tensor, targets: torch.Tensor, loaded: Loaded, thresholds: Optional[list[float]]) -> dict:
    """The loss and the summary scores (multi-class: top-1, top-5, balanced accuracy, macro F1; multi-label: mAP,
    micro and macro F1, exact match) of ``logits``."""
    scores = {"loss": _mean(_losses(logits, targets, loaded.multilabel))}
    if loaded.multilabel:
        found = multilabel.scores(logits.sigmoid(), targets, thresholds)
        return {**scores, **{key: found[key] for key in ("map", "micro_f1", "macro_f1", "exact_match")}}
    predicted = logits.argmax(1)
    confusion = metrics.confusion_matrix(targets, predicted, len(loaded.classes))
    return {**scores, "top1": _mean(predicted == targets), "top5": _mean(metrics.top_k_hits(logits, targets)),
            "balanced_accuracy": metrics.balanced_accuracy(confusion), "macro_f1": metrics.macro_f1(confusion)}


@torch.inference_mode()
def _tta_logits(loaded: Loaded, config: Config, data: Optional[Path], split: str, mode: str) -> torch.Tensor:
    """:meth:`Loaded.tta_logits` of every image of the evaluation set, in loader order."""
    views_config = config.model_copy(deep=True)
    views_config.data.image_size = view_size(mode, config.data.image_size)
    dataset, _ = _eval_set(views_config, loaded, data, split)
    loader = make_loader(dataset, config.train.batch_size, shuffle=False, workers=default_workers(dataset))
    return torch.cat([torch.empty(0, len(loaded.classes)),
                      *(loaded.tta_logits(images, mode).float().cpu() for images, _ in loader)])


def _multiclass_scores(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], out: Path) -> dict:
    from finetune.utils.plots import plot_confusion

    predicted = logits.argmax(1)
    confusion = metrics.confusion_matrix(targets, predicted, len(classes))
    scores = metrics.summary(confusion)
    plot_confusion(confusion, classes, out / "confusion.png")
    return {"top1": _mean(predicted == targets), "top5": _mean(metrics.top_k_hits(logits, targets)),
            "balanced_accuracy": scores["balanced_accuracy"], "macro_f1": scores["macro_f1"],
            "per_class": [{"class": name, **row} for name, row in zip(classes, scores["per_class"])],
            "confusion": confusion.tolist(), "confusion_png": str(out / "confusion.png")}


def _multilabel_scores(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], thresholds: list[float],
                       fixed: Optional[float], out: Path) -> dict:
    from finetune.utils.plots import plot_pr_curves

    probs = logits.sigmoid()
    scores = multilabel.scores(probs, targets, thresholds)
    curves = []
    for label, (name, row) in enumerate(zip(classes, scores["per_label"])):
        precision, recall = multilabel.precision_recall(probs[:, label], targets[:, label])
        curves.append({"label": name, "precision": precision.tolist(), "recall": recall.tolist(), "ap": row["ap"],
                       "support": row["support"]})
    plot_pr_curves(curves, out / "pr_curves.png")
    return {"thresholds_from": "--threshold" if fixed is not None else "the model (chosen on the validation split)",
            "map": scores["map"], "micro_f1": scores["micro_f1"], "macro_f1": scores["macro_f1"],
            "exact_match": scores["exact_match"],
            "per_label": [{"label": name, **row} for name, row in zip(classes, scores["per_label"])],
            "pr_curves_png": str(out / "pr_curves.png")}


def _mean(values: torch.Tensor) -> float:
    return values.double().mean().item() if len(values) else float("nan")  # no images: nothing to average


def _losses(logits: torch.Tensor, targets: torch.Tensor, multilabel_task: bool) -> torch.Tensor:
    """Each image's loss: cross-entropy, or binary cross-entropy averaged over the labels (multi-label)."""
    if multilabel_task:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    return nn.functional.cross_entropy(logits, targets, reduction="none")


@torch.inference_mode()
def _logits(logits_of, loader, loaded: Loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (``logits_of`` each batch: calibrated when the model has a temperature) and targets
    (class indices, or multi-hot rows) of every image, in loader order."""
    n = len(loaded.classes)
    logits = [torch.empty(0, n)]
    targets = [torch.empty(0, n) if loaded.multilabel else torch.empty(0, dtype=torch.long)]
    for images, labels in loader:
        logits.append(logits_of(images).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def _by_loss(dataset, logits, targets, losses, loaded: Loaded, thresholds: Optional[list[float]]) -> list[dict]:
    """One row per image, highest loss first: its file, true and predicted classes (multi-label: the labels, split
    by data.label_delim), the probability of the prediction (multi-label: None), each class's, and the loss."""
    classes = loaded.classes
    if loaded.multilabel:
        probs = logits.sigmoid()
        names = lambda hot: loaded.config.data.label_delim.join(c for c, on in zip(classes, hot) if on)  # noqa: E731
        true = [names(row) for row in (targets > 0.5).tolist()]
        predicted = [names(row) for row in (probs >= torch.tensor(thresholds)).tolist()]
        chosen = [None] * len(targets)
    else:
        probs = logits.softmax(1)
        true, top = [classes[t] for t in targets.tolist()], logits.argmax(1).tolist()
        predicted = [classes[p] for p in top]
        chosen = [prob[p] for prob, p in zip(probs.tolist(), top)]
    rows = [{"path": path, "true": t, "predicted": p, "prob": c, "loss": loss, "probs": prob}
            for (path, _), t, p, c, prob, loss in zip(image_samples(dataset), true, predicted, chosen, probs.tolist(),
                                                      losses.tolist())]
    return sorted(rows, key=lambda row: -row["loss"])


def _write_predictions(rows: list[dict], classes: list[str], path: Path) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", *(f"prob_{name}" for name in classes), "loss"])
    for row in rows:
        writer.writerow([row["path"], row["true"], row["predicted"], *(f"{p:.6g}" for p in row["probs"]),
                         f"{row['loss']:.6g}"])
    atomic_write_text(path, text.getvalue())


def _eval_set(config: Config, loaded: Loaded, data: Optional[Path], split: str):
    """The images to evaluate and where they come from: ``data`` (a folder tree, or a label file) or else the
    run's own ``split``."""
    if data is None:
        dataset = load_datasets(config).val if split == "val" else load_test_set(config, loaded.classes)
        return dataset, config.data.labels or config.data.root
    data = Path(data).resolve()
    if data.is_file():
        config.data.labels, config.data.root = str(data), str(data.parent)
        samples = split_samples(config, loaded.classes, split)
        return labelled_files(config, loaded.classes, data.parent, samples), str(data)
    if loaded.multilabel:
        raise FinetuneError(f"--data {data} is a folder, but a multi-label model is evaluated on a label file (a "
                            "CSV or TSV of path and labels): class folders give each image one label.")
    folder = data / split if (data / split).is_dir() else data
    config.data.labels = None
    return labelled_folder(config, folder, loaded.classes), str(folder)


def labelled_images(config: Config, classes: list[str]):
    """The images of the ImageFolder tree at ``data.root`` (root/<class>/<image>), labelled by ``classes``, as
    ``data.eval_transform`` reads them; see :func:`~finetune.data.folders.labelled_folder`."""
    return labelled_folder(config, Path(config.data.root), classes)


def predict(path: Path, inputs: list[Path], top_k: int = 3, threshold: Optional[float] = None,
            tta: Optional[str] = None) -> list[dict]:
    """Top-k classes with probabilities for each image (directories are walked for images); for a multi-label
    model every label at or above its threshold (``threshold`` for all, when given), most probable first.

    ``path`` is a checkpoint or an exported .onnx / TorchScript file. With ``tta`` (a mode of ``deploy.tta``) the
    probabilities are averaged over the views of each image.
    """
    loaded = load_model(path)
    thresholds = loaded.thresholds_for(threshold)
    if tta is not None:
        loaded.check_tta(path, tta)
    transform = eval_transform(loaded.config.data, view_size(tta, loaded.config.data.image_size) if tta else None)
    k = max(1, min(top_k, len(loaded.classes)))
    images = image_paths(inputs)
    results = []
    for start in range(0, len(images), PREDICT_BATCH):
        chunk = images[start:start + PREDICT_BATCH]
        batch = torch.stack([load_image(str(image_path), transform, hint="") for image_path in chunk])
        with torch.inference_mode():
            logits = (loaded.tta_logits(batch, tta) if tta else loaded.logits(batch)).float()
        for image_path, row in zip(chunk, logits):
            results.append({"image": str(image_path),
                            "predictions": _labels(row, loaded.classes, thresholds) if loaded.multilabel
                            else _top(row, loaded.classes, k)})
    return results


def _top(logits: torch.Tensor, classes: list[str], k: int) -> list[dict]:
    top = logits.softmax(0).topk(k)
    return [{"class": classes[i], "prob": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]


def _labels(logits: torch.Tensor, classes: list[str], thresholds: list[float]) -> list[dict]:
    chosen = [{"class": name, "prob": p, "threshold": t}
              for name, p, t in zip(classes, logits.sigmoid().tolist(), thresholds) if p >= t]
    return sorted(chosen, key=lambda guess: -guess["prob"])


def image_paths(inputs: list[Path]) -> list[Path]:
    """The image files among ``inputs``, with the folders among them walked (sorted); an error when none."""
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
