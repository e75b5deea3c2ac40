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
from finetune.data.folders import load_datasets
from finetune.data.images import IMAGENET_MEAN, IMAGENET_STD
from finetune.deploy.artifacts import (
    _TEXT_KEYS,
    INPUT_NAME,
    METADATA_FILE,
    OUTPUT_NAME,
    SUFFIXES,
    TTA_NOTE,
    Preprocessed,
    Trained,
    _normalisation,
    _quiet_jit,
    load_onnx,
    load_torchscript,
    load_trained,
    to_pixels,
)
from finetune.errors import FinetuneError, describe
from finetune.models.arch import get_arch
from finetune.utils.files import atomic_write

MIN_OPSET = 18  # the lowest the torch.export-based exporter writes; onnxruntime reads it since 1.14
TOLERANCE = 1e-4  # largest absolute logit difference from the checkpoint that passes verification
VERIFY_IMAGES = 32


def metadata(trained: Trained, fmt: str) -> dict:
    """What an artifact says about itself: classes, preprocessing, architecture, version and source run."""
    size = trained.config.data.image_size
    inside = fmt != "state-dict"
    progress = trained.progress
    history = progress.get("history") or [{}]
    return {
        "classes": trained.classes,
        "image_size": size,
        "resize": (f"turn upright by the EXIF orientation, resize the shorter side to {size} px (bilinear), "
                   f"then center-crop {size}x{size}"),
        "input": (f"float32 RGB in [0, 1], N x 3 x {size} x {size}; "
                  + ("the model normalises it with mean and std itself" if inside
                     else "normalise it with (x - mean) / std before the model")),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "arch": trained.config.model.arch,
        "weights": trained.weights,
        "tta": TTA_NOTE,
        "finetune_version": __version__,
        "source": {"checkpoint": str(trained.path.resolve()), "epoch": progress.get("epoch"),
                   "val_acc": history[-1].get("val_acc")},
        "config": trained.config.model_dump(mode="json"),
    }


def default_output(checkpoint: Path, fmt: str) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def sidecar(output: Path) -> Path:
    """The JSON file beside a state-dict export."""
    return Path(output).with_suffix(".json")


def export_checkpoint(checkpoint: Path, fmt: str = "onnx", output: Optional[Path] = None,
                      opset: Optional[int] = None, overwrite: bool = False) -> dict:
    """Export ``checkpoint`` as ``fmt`` (onnx, torchscript, state-dict), verify it, then write it.

    ``output`` defaults to the checkpoint's name with the format's suffix, beside it. Returns
    ``{path, format, bytes, max_abs_diff, images, classes, verified_on, tolerance}`` (plus ``opset``
    or ``metadata_path``).
    Raises FinetuneError: exit code 2 for bad input (nothing written), 1 when verification fails
    (nothing written either).
    """
    if fmt not in SUFFIXES:
        raise FinetuneError(f"Unknown export format {fmt!r} (--format); use one of {', '.join(SUFFIXES)}.")
    opset = _check_opset(fmt, opset)
    checkpoint = Path(checkpoint)
    output = Path(output) if output is not None else default_output(checkpoint, fmt)
    targets = [output] + ([sidecar(output)] if fmt == "state-dict" else [])
    _check_outputs(checkpoint, fmt, targets, overwrite)
    trained = load_trained(checkpoint)

    meta = metadata(trained, fmt)
    data = _serialise(trained, fmt, meta, opset)
    batch, verified_on = verification_batch(trained)
    diff = _verify(trained, fmt, data, batch)
    _write(output, data)
    if fmt == "state-dict":
        try:
            _write(targets[1], (json.dumps({**meta, "state_dict": output.name}, indent=2) + "\n").encode())
        except FinetuneError:
            output.unlink()  # a state dict without its JSON would be half an export
            raise
    result = {"path": str(output), "format": fmt, "bytes": len(data), "max_abs_diff": diff, "images": len(batch),
              "classes": trained.classes, "verified_on": verified_on, "tolerance": TOLERANCE}
    if fmt == "onnx":
        result["opset"] = opset
    if fmt == "state-dict":
        result["metadata_path"] = str(targets[1])
    return result


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, lambda f: f.write(data))  # a failure leaves the old file, if any, as it was
    except OSError as exc:
        raise FinetuneError(f"Cannot write {path}: {exc.strerror or exc}. Choose another --output.") from None


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
    module = Preprocessed(trained.model).eval()
    if fmt == "torchscript":
        buffer = io.BytesIO()
        with _quiet_jit():
            torch.jit.save(torch.jit.script(module), buffer, _extra_files={METADATA_FILE: json.dumps(meta)})
        return buffer.getvalue()
    size = trained.config.data.image_size
    example = torch.rand(2, 3, size, size)  # batch 2: a batch of 1 would fix the batch dimension to 1
    try:
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                                    verbose=False)
    except Exception as exc:
        raise FinetuneError(f"torch.onnx.export failed on {trained.path}: {type(exc).__name__}: {exc}",
                            exit_code=1) from None
    program.model.metadata_props.update(
        {key: value if key in _TEXT_KEYS else json.dumps(value) for key, value in meta.items()})
    return program.model_proto.SerializeToString()


def verification_batch(trained: Trained) -> tuple[torch.Tensor, str]:
    """Up to VERIFY_IMAGES images of the run's validation split, evenly spread over it (so every class
    shows up), normalised as finetune feeds them to the checkpoint; seeded random ones when the data are
    gone. Also says which it is."""
    size = trained.config.data.image_size
    try:
        val = load_datasets(trained.config).val
    except FinetuneError as exc:
        reason = str(exc).splitlines()[-1].strip()
        return _random_batch(size), f"random inputs (the run's data cannot be read: {reason})"
    if len(val) == 0:
        return _random_batch(size), "random inputs (the run's validation split is empty)"
    count = min(VERIFY_IMAGES, len(val))
    indices = sorted({round(i * (len(val) - 1) / max(1, count - 1)) for i in range(count)})
    items = [item for item in map(val.__getitem__, indices) if item is not None]  # None: skipped as unreadable
    if not items:
        return _random_batch(size), "random inputs (no readable image in the run's validation split)"
    images = torch.stack([image for image, _ in items]).contiguous()
    return images, f"{len(items)} images of the run's validation split ({trained.config.data.root})"


def _random_batch(size: int) -> torch.Tensor:
    pixels = torch.rand(VERIFY_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean, std = _normalisation()
    return (pixels - mean) / std


@torch.inference_mode()
def _verify(trained: Trained, fmt: str, data: bytes, batch: torch.Tensor) -> float:
    """The largest absolute logit difference between the artifact (loaded back from ``data``) and the checkpoint.

    The artifact runs the batch in two calls, of 1 and of the rest, so a fixed batch size would fail here.
    """
    what = f"the {fmt} export of {trained.path}"
    try:
        if fmt == "state-dict":
            runner, inputs = _fresh_torchvision(trained, data), batch
        else:
            runner, _ = (load_onnx if fmt == "onnx" else load_torchscript)(data)
            inputs = to_pixels(batch)
        got = torch.cat([runner(inputs[:1]), runner(inputs[1:])] if len(inputs) > 1 else [runner(inputs)])
    except Exception as exc:
        problem = str(exc) if isinstance(exc, FinetuneError) else describe(exc)
        raise FinetuneError(f"Verification failed: {what} does not load back and run: {problem}\n"
                            "Nothing was written.", exit_code=1) from None
    expected = trained.model.eval()(batch)
    if got.shape != expected.shape:
        raise FinetuneError(f"Verification failed: {what} gives logits of shape {tuple(got.shape)}, the checkpoint "
                            f"{tuple(expected.shape)}.\nNothing was written.", exit_code=1)
    diff = (got.float() - expected).abs().max().item()
    if not diff <= TOLERANCE:  # also catches NaN
        raise FinetuneError(f"Verification failed: {what} differs from the checkpoint by up to {diff:.3g} in the "
                            f"logits of {len(batch)} images (tolerance {TOLERANCE:g}).\nNothing was written.",
                            exit_code=1)
    return diff


def _fresh_torchvision(trained: Trained, data: bytes) -> nn.Module:
    model = get_arch(trained.config.model.arch).build(len(trained.classes))
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as exc:
        raise FinetuneError(f"{type(exc).__name__}: {exc}") from None
    return model.eval()
