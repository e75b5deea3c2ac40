"""Export a trained checkpoint as ONNX, TorchScript or a plain state dict, verified before it is written.

ONNX and TorchScript artifacts carry the preprocessing and finetune's metadata inside: they take
float32 RGB in [0, 1], N x 3 x S x S, normalise it themselves, and name their classes, so a consumer
only resizes and crops. A state dict is the torchvision model's weights alone, with a JSON file
beside it that says the same things.

Each artifact is serialised in memory, loaded back with its own runtime (onnxruntime,
``torch.jit.load``, a fresh torchvision model) and compared with the checkpoint on images of the
run's validation split; only then are those exact bytes written, atomically. onnx and onnxruntime
are imported only here and only when needed, so the rest of finetune starts without them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune import __version__
from finetune.data.folders import load_datasets, spread_indices
from finetune.deploy.artifacts import (
    INPUT_NAME,
    METADATA_FILE,
    OUTPUT_NAME,
    PROBABILITIES,
    SUFFIXES,
    TTA_NOTE,
    Preprocessed,
    Trained,
    _normalisation,
    _quiet_jit,
    load_onnx,
    load_torchscript,
    load_trained,
    set_onnx_metadata,
    to_pixels,
)
from finetune.deploy.quantize import Int8Options, calibration_pixels, quantize_export
from finetune.errors import FinetuneError, describe
from finetune.models.arch import get_arch
from finetune.utils.files import atomic_write, writing

MIN_OPSET = 18  # the lowest the torch.export-based exporter writes; onnxruntime reads it since 1.14
# Verification passes an output that differs from the checkpoint's by at most TOLERANCE + RELATIVE_TOLERANCE x the
# image's largest |output|, as torch.testing.assert_close adds an absolute and a relative part, but relative to the
# whole row: float rounding grows with the sums that made every logit of the image, so a logit near 0 beside ones
# near 6e4 carries the same absolute error. A ResNet-50 trained head-only from random weights, BatchNorm frozen,
# reaches logits of 6e4 at 224 px; onnxruntime's then differ by 0.016, a relative 2.5e-7: float noise.
TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-5
VERIFY_IMAGES = 32


def metadata(trained: Trained, fmt: str) -> dict:
    """What an artifact says about itself: classes, preprocessing, output, temperature, architecture, version and
    source run."""
    data = trained.config.data
    size = data.image_size
    inside = fmt != "state-dict"
    probabilities = inside and trained.temperature is not None
    state = trained.train_state
    history = state.get("history") or [{}]
    return {
        "classes": trained.classes,
        "image_size": size,
        "resize": (f"turn upright by the EXIF orientation, resize the shorter side to {data.resize_size} px "
                   f"({data.interpolation}), then center-crop {size}x{size}"),
        "input": (f"float32 RGB in [0, 1], N x 3 x {size} x {size}; "
                  + ("the model normalises it with mean and std itself" if inside
                     else "normalise it with (x - mean) / std before the model")),
        "output": (PROBABILITIES if probabilities else OUTPUT_NAME),
        "temperature": trained.temperature,
        "calibration": trained.calibration,
        "mean": list(data.mean),
        "std": list(data.std),
        "arch": trained.config.model.arch,
        "task": trained.config.model.task,
        "thresholds": trained.thresholds,  # multilabel: a label is predicted at sigmoid(logit) >= its threshold
        "weights": trained.weights,  # raw, or ema: the weight EMA's (train.ema.use_for)
        "tta": TTA_NOTE,
        "finetune_version": __version__,
        "source": {"checkpoint": str(trained.path.resolve()), "epoch": state.get("epoch"),
                   "val_acc": history[-1].get("val_acc")},
        "config": trained.config.model_dump(mode="json"),
    }


def default_output(checkpoint: Path, fmt: str, int8: bool = False) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + (".int8" if int8 else "") + SUFFIXES[fmt])


def sidecar(output: Path) -> Path:
    """The JSON file beside a state-dict export."""
    return Path(output).with_suffix(".json")


def export_checkpoint(checkpoint: Path, fmt: str = "onnx", output: Optional[Path] = None,
                      opset: Optional[int] = None, overwrite: bool = False, int8: Optional[Int8Options] = None) -> dict:
    """Export ``checkpoint`` as ``fmt`` (onnx, torchscript, state-dict), verify it, then write it.

    ``output`` defaults to the checkpoint's name with the format's suffix, beside it. A calibrated checkpoint's
    ONNX and TorchScript exports output its calibrated probabilities in place of the logits. With ``int8`` the
    verified ONNX model is quantized (:mod:`finetune.deploy.quantize`) and checked and timed before it is written.
    Returns ``{path, format, bytes, compared, max_abs_diff, max_rel_diff, top1_agreement, images, classes,
    verified_on, tolerance}`` (plus ``opset``, ``metadata_path``, ``temperature`` or ``quantization``).
    Raises FinetuneError: exit code 2 for bad input (nothing written), 1 when verification fails or int8 loses
    too much accuracy (nothing written either).
    """
    if fmt not in SUFFIXES:
        raise FinetuneError(f"Unknown export format {fmt!r} (--format); use one of {', '.join(SUFFIXES)}.")
    if int8 is not None and fmt != "onnx":
        raise FinetuneError(f"--quantize int8 applies to --format onnx only (the format is {fmt}): the int8 model "
                            "is ONNX Runtime's. Leave out --format, or --quantize.")
    opset = _check_opset(fmt, opset)
    checkpoint = Path(checkpoint)
    output = Path(output) if output is not None else default_output(checkpoint, fmt, int8 is not None)
    targets = [output] + ([sidecar(output)] if fmt == "state-dict" else [])
    _check_outputs(checkpoint, fmt, targets, overwrite)
    trained = load_trained(checkpoint)
    calibration = calibration_pixels(trained, int8) if int8 is not None else None  # bad images fail before work

    meta = metadata(trained, fmt)
    data = _serialise(trained, fmt, meta, opset)
    batch, verified_on = verification_batch(trained)
    check = _verify(trained, fmt, data, batch)
    quantization = None
    if int8 is not None:
        data, quantization = quantize_export(trained, data, meta, int8, calibration)
    _write(output, data)
    if fmt == "state-dict":
        try:
            _write(targets[1], (json.dumps({**meta, "state_dict": output.name}, indent=2) + "\n").encode())
        except FinetuneError:
            output.unlink()  # a state dict without its JSON would be half an export
            raise
    result = {"path": str(output), "format": fmt, "bytes": len(data), **check, "images": len(batch),
              "classes": trained.classes, "verified_on": verified_on, "temperature": trained.temperature,
              "tolerance": tolerance_text(check["compared"])}
    if fmt == "onnx":
        result["opset"] = opset
    if fmt == "state-dict":
        result["metadata_path"] = str(targets[1])
    if quantization is not None:
        result["quantization"] = quantization
    return result


def _write(path: Path, data: bytes) -> None:
    with writing("the export", "Choose another --output."):
        atomic_write(path, lambda f: f.write(data))  # a failure leaves the old file, if any, as it was


def _check_opset(fmt: str, opset: Optional[int]) -> Optional[int]:
    if fmt != "onnx":
        if opset is not None:
            raise FinetuneError(f"--opset applies to --format onnx only (the format is {fmt}); leave it out.")
        return None
    if opset is None:
        return MIN_OPSET
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise FinetuneError(f"--opset {opset} is out of range: torch's ONNX exporter writes opsets {MIN_OPSET} to "
                            f"{newest} (onnx {onnx.__version__}). Leave --opset out for {MIN_OPSET}, which "
                            "onnxruntime 1.14 and newer read.")
    return opset


def _check_outputs(checkpoint: Path, fmt: str, targets: list[Path], overwrite: bool) -> None:
    """Refuse, before anything is written, outputs that exist (without --overwrite) or cannot be written."""
    if fmt == "onnx" and targets[0].suffix != ".onnx":
        raise FinetuneError(f"--output {targets[0]} must end in .onnx: predict and evaluate recognise ONNX files "
                            "by that suffix.")
    for target in targets:
        if target.resolve() == checkpoint.resolve():
            raise FinetuneError(f"--output {target} is the checkpoint itself; choose another path.")
        if target.is_dir():
            raise FinetuneError(f"--output {target} is a folder; give a file path, e.g. {target / targets[0].name}.")
        if target.exists() and not overwrite:
            raise FinetuneError(f"{target} already exists; pass --overwrite to replace it, or choose another "
                                "--output.")
    folder = targets[0].parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise FinetuneError(f"Output folder {folder} {problem} (--output {targets[0]}); create it or choose "
                            "another --output.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FinetuneError(f"Output folder {folder} is not writable (--output {targets[0]}); choose another "
                            "--output.")


def _serialise(trained: Trained, fmt: str, meta: dict, opset: Optional[int]) -> bytes:
    if fmt == "state-dict":
        buffer = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in trained.model.state_dict().items()}, buffer)
        return buffer.getvalue()
    if fmt == "torchscript":
        buffer = io.BytesIO()
        with _quiet_jit():
            module = torch.jit.script(Preprocessed(trained.model, trained.config, trained.temperature).eval())
            torch.jit.save(module, buffer, _extra_files={METADATA_FILE: json.dumps(meta)})
        return buffer.getvalue()
    model = _onnx_graph(trained, opset)
    if trained.temperature is not None:
        _append_probabilities(model, trained.temperature)
    set_onnx_metadata(model, meta)
    return model.SerializeToString()


def _onnx_graph(trained: Trained, opset: int):
    """The checkpoint's network behind its normalisation (:class:`Preprocessed`), traced by torch's exporter into
    an ONNX ModelProto: pixels in, logits out, any batch size."""
    size = trained.config.data.image_size
    example = torch.rand(2, 3, size, size)  # batch 2: a batch of 1 would fix the batch dimension to 1
    try:
        program = torch.onnx.export(Preprocessed(trained.model, trained.config).eval(), (example,), dynamo=True,
                                    opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                                    verbose=False)
    except Exception as exc:
        raise FinetuneError(f"torch.onnx.export failed on {trained.path}: {type(exc).__name__}: {exc}",
                            exit_code=1) from None
    return program.model_proto


def _append_probabilities(model, temperature: float) -> None:
    """Make the graph's output softmax(logits / temperature), named PROBABILITIES: what :class:`Preprocessed` with
    a temperature computes (verification compares the two). Two nodes after the traced network, which stays as it
    is without a temperature."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph, divided = model.graph, "logits_over_temperature"
    graph.initializer.append(numpy_helper.from_array(np.array(temperature, dtype=np.float32), "temperature"))
    graph.node.extend([
        helper.make_node("Div", [OUTPUT_NAME, "temperature"], [divided], name="calibration_temperature"),
        helper.make_node("Softmax", [divided], [PROBABILITIES], name="calibration_softmax", axis=1)])
    graph.output[0].name = PROBABILITIES  # same type and shape as the logits


def verification_batch(trained: Trained) -> tuple[torch.Tensor, str]:
    """Up to VERIFY_IMAGES images of the run's validation split, evenly spread over it (so every class
    shows up), normalised as finetune feeds them to the checkpoint; seeded random ones when the data are
    gone. Also says which it is."""
    try:
        val = load_datasets(trained.config).val
    except FinetuneError as exc:
        reason = str(exc).splitlines()[-1].strip()
        return _random_batch(trained.config), f"random inputs (the run's data cannot be read: {reason})"
    if len(val) == 0:
        return _random_batch(trained.config), "random inputs (the run's validation split is empty)"
    items = [item for item in map(val.__getitem__, spread_indices(len(val), VERIFY_IMAGES))
             if item is not None]  # None: skipped as unreadable
    if not items:
        return _random_batch(trained.config), "random inputs (no readable image in the run's validation split)"
    images = torch.stack([image for image, _ in items]).contiguous()
    return images, f"{len(items)} images of the run's validation split ({trained.config.data.root})"


def _random_batch(config) -> torch.Tensor:
    size = config.data.image_size
    pixels = torch.rand(VERIFY_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean, std = _normalisation(config)
    return (pixels - mean) / std


@torch.inference_mode()
def _verify(trained: Trained, fmt: str, data: bytes, batch: torch.Tensor) -> dict:
    """Compare the artifact (loaded back from ``data``) with the checkpoint on ``batch``: its outputs (logits, or the
    calibrated probabilities of a calibrated checkpoint) within the tolerance, and the same top-1 class but where
    the checkpoint's top two are within it. Returns what was compared, the largest differences and the agreement.

    The artifact runs the batch in two calls, of 1 and of the rest, so a fixed batch size would fail here.
    """
    what = f"the {fmt} export of {trained.path}"
    try:
        if fmt == "state-dict":
            runner, inputs = _fresh_torchvision(trained, data), batch
        else:
            runner, _ = (load_onnx if fmt == "onnx" else load_torchscript)(data)
            inputs = to_pixels(batch, trained.config)
        got = torch.cat([runner(inputs[:1]), runner(inputs[1:])] if len(inputs) > 1 else [runner(inputs)])
    except Exception as exc:
        problem = str(exc) if isinstance(exc, FinetuneError) else describe(exc)
        raise FinetuneError(f"Verification failed: {what} does not load back and run: {problem}\n"
                            "Nothing was written.", exit_code=1) from None
    expected = (trained.model if fmt == "state-dict"
                else Preprocessed(trained.model, trained.config, trained.temperature))(inputs)
    compared = OUTPUT_NAME if fmt == "state-dict" or trained.temperature is None else PROBABILITIES
    if got.shape != expected.shape:
        raise FinetuneError(f"Verification failed: {what} gives {compared} of shape {tuple(got.shape)}, the "
                            f"checkpoint {tuple(expected.shape)}.\nNothing was written.", exit_code=1)
    check = compare_outputs(got.float(), expected)
    check["compared"] = compared
    if check["over"]:
        raise FinetuneError(f"Verification failed: {what} differs from the checkpoint by up to "
                            f"{check['max_abs_diff']:.3g} in the {compared} of {len(batch)} images, beyond the "
                            f"tolerance ({tolerance_text(compared)}) "
                            f"on {check['over']} of them.\nNothing was written.", exit_code=1)
    if check["flipped"]:
        raise FinetuneError(f"Verification failed: {what} picks another top-1 class than the checkpoint on "
                            f"{check['flipped']} of {len(batch)} images.\nNothing was written.", exit_code=1)
    return {key: value for key, value in check.items() if key not in ("over", "flipped")}


def tolerance_text(compared: str) -> str:
    """The verification tolerance in words, for ``compared`` outputs (logits or probabilities)."""
    one = {OUTPUT_NAME: "logit", PROBABILITIES: "probability"}[compared]
    return f"{TOLERANCE:g} + {RELATIVE_TOLERANCE:g} x the image's largest |{one}|"


def compare_outputs(got: torch.Tensor, expected: torch.Tensor) -> dict:
    """How far ``got`` is from ``expected`` (N x classes): ``max_abs_diff``; ``max_rel_diff``, relative to each
    image's largest |expected|; ``over``, the images with a difference beyond TOLERANCE + RELATIVE_TOLERANCE x that
    (NaN counts); ``top1_agreement``; and ``flipped``, the images whose top-1 class differs although the expected
    top-1 leads the other class by more than the image's tolerance (a closer tie may flip on rounding)."""
    diff = (got - expected).abs()
    scale = expected.abs().amax(1, keepdim=True)
    allowed = TOLERANCE + RELATIVE_TOLERANCE * scale
    top_got, top_expected = got.argmax(1, keepdim=True), expected.argmax(1, keepdim=True)
    lead = expected.gather(1, top_expected) - expected.gather(1, top_got)
    return {"max_abs_diff": _largest(diff), "max_rel_diff": _largest(diff / scale.clamp_min(TOLERANCE)),
            "over": int((~(diff <= allowed)).any(1).sum()), "top1_agreement": (top_got == top_expected).double()
            .mean().item(), "flipped": int((lead > allowed).sum())}


def _largest(values: torch.Tensor) -> float:
    return values.max().item() if values.numel() else 0.0


def _fresh_torchvision(trained: Trained, data: bytes) -> nn.Module:
    model = get_arch(trained.config.model.arch).build(len(trained.classes), trained.config.data.image_size)
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as exc:
        raise FinetuneError(f"{type(exc).__name__}: {exc}") from None
    return model.eval()
