"""int8 ONNX: static post-training quantization with ONNX Runtime, checked for accuracy and timed before it is
written.

The fp32 ONNX export (preprocessing inside, verified against the checkpoint) is quantized in the QDQ format:
weights int8 per output channel, activations uint8 with ranges from running the model on calibration images
(MinMax). uint8 activations against int8 weights (U8S8) are what ONNX Runtime's x86 kernels run fastest: on an
AVX2-only CPU int8 activations (S8S8) were no faster than fp32. The logits stay fp32 (the classifier's output is not
quantized, so probabilities keep their resolution), and so does a calibrated export's softmax.

The int8 model is then run beside the fp32 one over the validation split: top-1 agreement and both accuracies. A
drop above ``max_accuracy_drop`` points refuses it (exit code 1, nothing written). Last, both are timed on this CPU,
interleaved, at batch 1 and batch 32; the figures, the CPU and its flags go into the file's metadata.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from finetune.data.folders import eval_transform, image_samples, load_datasets, load_image, spread_indices
from finetune.deploy.artifacts import (
    INPUT_NAME,
    OnnxModel,
    Trained,
    load_onnx,
    set_onnx_metadata,
    to_pixels,
)
from finetune.deploy.benchmark import cpu_description, model_speed, runtime
from finetune.deploy.inference import labelled_images
from finetune.errors import FinetuneError, describe
from finetune.training.calibration import logits_of

CALIBRATION_IMAGES = 300
MAX_ACCURACY_DROP = 1.0  # percentage points of top-1 accuracy
CALIBRATION_BATCH = 16
MEASURE_SECONDS = 2.0  # per batch size, fp32 and int8 interleaved
THROUGHPUT_BATCH = 32  # and batch 1 for latency


@dataclass(frozen=True)
class Int8Options:
    """How to quantize: on how many calibration images, from where (None: the run's training split), and the
    largest top-1 accuracy drop, in percentage points, that is still written."""

    calibration_images: int = CALIBRATION_IMAGES
    calibration_data: Optional[Path] = None
    max_accuracy_drop: float = MAX_ACCURACY_DROP


def int8_options(quantize: Optional[str], calibration_images: Optional[int] = None,
                 calibration_data: Optional[Path] = None,
                 max_accuracy_drop: Optional[float] = None) -> Optional[Int8Options]:
    """The options of ``finetune export --quantize``, checked; None without ``--quantize``.

    Raises FinetuneError for an unknown ``--quantize``, a calibration option without it, or a value out of range.
    """
    given = [name for name, value in (("--calibration-images", calibration_images),
                                      ("--calibration-data", calibration_data),
                                      ("--max-accuracy-drop", max_accuracy_drop)) if value is not None]
    if quantize is None:
        if given:
            raise FinetuneError(f"{', '.join(given)} applies to --quantize int8 only; add --quantize int8 or leave "
                                "it out.")
        return None
    if quantize != "int8":
        raise FinetuneError(f"Unknown --quantize {quantize!r}; the one available is int8.")
    if calibration_images is not None and calibration_images < 1:
        raise FinetuneError(f"--calibration-images {calibration_images} must be at least 1 (a few hundred give "
                            "stable ranges).")
    if max_accuracy_drop is not None and not (math.isfinite(max_accuracy_drop) and max_accuracy_drop >= 0):
        raise FinetuneError(f"--max-accuracy-drop {max_accuracy_drop} must be a number of percentage points, 0 or "
                            "more.")
    if calibration_data is not None and not Path(calibration_data).is_dir():
        raise FinetuneError(f"--calibration-data {calibration_data} is not a folder; give an ImageFolder tree "
                            "(DIR/<class>/<image>) of the run's classes.")
    return Int8Options(CALIBRATION_IMAGES if calibration_images is None else calibration_images,
                       None if calibration_data is None else Path(calibration_data),
                       MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop)


def quantize_export(trained: Trained, fp32: bytes, meta: dict, options: Int8Options,
                    calibration: tuple[torch.Tensor, str]) -> tuple[bytes, dict]:
    """The int8 model of the verified fp32 ONNX bytes ``fp32``, calibrated on ``calibration`` (pixels and where
    they come from, by :func:`calibration_pixels`), with ``meta`` and its quantization report in its metadata; and
    that report: calibration, verification, speed.

    Raises FinetuneError: exit code 2 for validation images that cannot be had, 1 when the accuracy drop is above
    ``options.max_accuracy_drop`` or quantization fails.
    """
    pixels, source = calibration
    int8 = _with_metadata(_quantize(trained, fp32, pixels), meta)
    models = {"fp32": load_onnx(fp32)[0], "int8": load_onnx(int8)[0]}
    verification = _verify_accuracy(trained, models, options)
    speed = model_speed({name: (lambda batch, m=model: m(to_pixels(batch, trained.config)))
                         for name, model in models.items()},
                        trained.config.data.image_size, THROUGHPUT_BATCH, MEASURE_SECONDS)
    report = {"type": "int8", "format": "QDQ", "weights": "int8, per output channel", "activations": "uint8 (MinMax)",
              "calibration": {"images": len(pixels), "source": source},
              "verification": verification, "speed": _speed_report(speed), "fp32_bytes": len(fp32)}
    data = _with_metadata(int8, {**meta, "quantization": report})
    load_onnx(data)  # the file as it will be written loads, metadata and all
    return data, report


def calibration_pixels(trained: Trained, options: Int8Options) -> tuple[torch.Tensor, str]:
    """Up to ``options.calibration_images`` images, evenly spread (every class), read as the fp32 export is fed
    (``data.eval_transform``, then RGB in [0, 1]): from ``options.calibration_data`` (its train/ when it has one),
    else the run's training split. Also says where they come from."""
    config = trained.config.model_copy(deep=True)
    if options.calibration_data is not None:
        root = options.calibration_data
        config.data.root = str(root / "train" if (root / "train").is_dir() else root)
        paths = [path for path, _ in labelled_images(config, trained.classes).samples]
        where = f"--calibration-data {config.data.root}"
    else:
        try:
            paths = [path for path, _ in image_samples(load_datasets(config).train)]
        except FinetuneError as exc:
            raise FinetuneError(f"int8 calibration needs images like the run's, but the run's data cannot be read:\n"
                                f"{exc}\nGive --calibration-data DIR: images of the run's classes as DIR/<class>/"
                                "<image>.") from None
        where = f"the run's training split ({config.data.root})"
    if not paths:
        raise FinetuneError(f"No readable image to calibrate on in {config.data.root}; int8 calibration needs images "
                            f"like the run's, as {config.data.root}/<class>/<image>.")
    transform = eval_transform(config.data)
    chosen = [paths[i] for i in spread_indices(len(paths), options.calibration_images)]
    pixels = to_pixels(torch.stack([load_image(path, transform, hint="") for path in chosen]), config)
    return pixels, f"{len(chosen)} of the {len(paths)} images of {where}"


class _CalibrationBatches:
    """The calibration images in batches, as onnxruntime's calibrator reads them (``get_next``, None at the end)."""

    def __init__(self, pixels: torch.Tensor):
        self.batches = iter(pixels.split(CALIBRATION_BATCH))

    def get_next(self) -> Optional[dict]:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch.numpy()}


def _quantize(trained: Trained, fp32: bytes, pixels: torch.Tensor) -> bytes:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="finetune-int8.") as tmp:
        source, prepared, target = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        try:
            # shapes for every tensor, and the graph optimised (e.g. BatchNorm folded into convolutions) as it runs
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            softmax = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Softmax"]
            quantize_static(str(prepared), str(target), _CalibrationBatches(pixels), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=softmax,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                                           # LayerNorm's scale (ConvNeXt, ViT, Swin) is 1-D: per channel along
                                           # its only axis, not the default axis 1 (a warning, then per tensor)
                                           "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0}})
        except Exception as exc:
            raise FinetuneError(f"onnxruntime could not quantize the export of {trained.path}: {describe(exc)}\n"
                                "Nothing was written.", exit_code=1) from None
        return target.read_bytes()


def _with_metadata(data: bytes, meta: dict) -> bytes:
    import onnx

    model = onnx.load_from_string(data)
    set_onnx_metadata(model, meta)  # in place of the quantizer's own notes, which are not finetune metadata
    return model.SerializeToString()


def _verify_accuracy(trained: Trained, models: dict[str, OnnxModel], options: Int8Options) -> dict:
    """Top-1 accuracy of fp32 and int8 and their agreement over the validation split; refused above the drop."""
    val, where = _validation_images(trained, options)
    n = len(trained.classes)

    def both(batch: torch.Tensor) -> torch.Tensor:
        pixels = to_pixels(batch, trained.config)
        return torch.cat([models["fp32"](pixels), models["int8"](pixels)], 1)

    outputs, targets = logits_of(both, val, trained.config.train.batch_size, 2 * n)
    fp32, int8 = outputs[:, :n].argmax(1), outputs[:, n:].argmax(1)
    result = {"images": len(targets), "data": where, "fp32_top1": _share(fp32 == targets),
              "int8_top1": _share(int8 == targets), "top1_agreement": _share(fp32 == int8)}
    result["drop_points"] = 100 * (result["fp32_top1"] - result["int8_top1"])
    result["max_drop_points"] = options.max_accuracy_drop
    if result["drop_points"] > options.max_accuracy_drop + 1e-9:
        raise FinetuneError(
            f"int8 refused: on {result['images']} images of {where} its top-1 accuracy is "
            f"{result['int8_top1']:.2%} against {result['fp32_top1']:.2%} in fp32, a drop of "
            f"{result['drop_points']:.2f} points (--max-accuracy-drop {options.max_accuracy_drop:g}); the two agree "
            f"on {result['top1_agreement']:.2%} of the images. Nothing was written.\nCalibrate on more images, or "
            "ones more like the validation images (--calibration-images, --calibration-data), or allow a larger "
            "drop.", exit_code=1)
    return result


def _share(hits: torch.Tensor) -> float:
    return hits.double().mean().item()


def _validation_images(trained: Trained, options: Int8Options):
    """The run's validation split, else the val/ of ``--calibration-data``; also says which."""
    try:
        val = load_datasets(trained.config).val
        where = f"the run's validation split ({trained.config.data.root})"
    except FinetuneError as exc:
        spare = options.calibration_data / "val" if options.calibration_data else None
        if spare is None or not spare.is_dir():
            raise FinetuneError(f"int8 export checks accuracy on the run's validation split, which cannot be read:\n"
                                f"{exc}\nGive --calibration-data a tree with val/ (DIR/val/<class>/<image>) to check "
                                "on instead.") from None
        config = trained.config.model_copy(deep=True)
        config.data.root = str(spare)
        val, where = labelled_images(config, trained.classes), f"--calibration-data {spare}"
    if len(val) == 0:
        raise FinetuneError(f"int8 export checks accuracy on {where}, which has no images; add validation images.")
    return val, where


def _speed_report(speed: dict) -> dict:
    """Batch-1 latency and batch-32 throughput of fp32 and int8, their ratios (above 1: int8 is faster), and the
    CPU they were measured on."""
    rows = {name: {"batch1_ms": speed[name]["latency"]["p50_ms"],
                   "batch32_images_per_s": speed[name]["throughput"]["images_per_s"]} for name in ("fp32", "int8")}
    fp32, int8 = rows["fp32"], rows["int8"]
    return {**cpu_description(), "runtime": runtime("onnx"), **rows,
            "speedup_batch1": fp32["batch1_ms"] / int8["batch1_ms"],
            "speedup_batch32": int8["batch32_images_per_s"] / fp32["batch32_images_per_s"]}
