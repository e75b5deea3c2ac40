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

import contextlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from finetune import __version__
from finetune.arch import get_arch
from finetune.checkpoint import atomic_write
from finetune.data import IMAGENET_MEAN, IMAGENET_STD, load_datasets
from finetune.errors import FinetuneError, describe
from finetune.inference import Trained, load_trained

# Format -> the suffix of its default output, which goes beside the checkpoint (best.pt -> best.onnx).
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "state-dict": ".state_dict.pth"}
MIN_OPSET = 18  # the lowest the torch.export-based exporter writes; onnxruntime reads it since 1.14
TOLERANCE = 1e-4  # largest absolute logit difference from the checkpoint that passes verification
VERIFY_IMAGES = 32
METADATA_FILE = "finetune.json"  # the TorchScript archive's extra file
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# ONNX metadata values are strings: these keys hold text, every other one JSON.
_TEXT_KEYS = ("arch", "finetune_version", "input", "resize")

Source = Union[Path, bytes]  # a file, or an artifact's bytes before they are written


class Preprocessed(nn.Module):
    """The trained network behind ImageNet normalisation: float32 RGB in [0, 1], N x 3 x S x S, in; logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        mean, std = _normalisation()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def _normalisation() -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors, to broadcast over a batch."""
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def to_pixels(batch: torch.Tensor) -> torch.Tensor:
    """Undo ``data.eval_transform``'s normalisation: what an exported model takes, RGB in [0, 1]."""
    mean, std = _normalisation()
    return (batch * std + mean).contiguous()


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


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like a torch module: pixels in, logits out."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def load_onnx(source: Source) -> tuple[OnnxModel, dict]:
    """An exported ONNX model (a file or its bytes) in onnxruntime, and its metadata."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations, not the user's input
    try:
        session = onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                               providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FinetuneError(f"onnxruntime cannot load {_name(source)}: {describe(exc)}\nIt is corrupt or not an "
                            "ONNX file; export one with `finetune export CHECKPOINT`.") from None
    props = session.get_modelmeta().custom_metadata_map
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if "classes" not in props or names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise FinetuneError(f"{_name(source)} is an ONNX model but not one exported by finetune (it lacks the "
                            "metadata that names its classes and preprocessing); export one with "
                            "`finetune export CHECKPOINT`.")
    try:
        meta = {key: value if key in _TEXT_KEYS else json.loads(value) for key, value in props.items()}
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"{_name(source)} has damaged finetune metadata: {exc}") from None
    return OnnxModel(session), _checked(meta, source)


def is_torchscript_export(path: Path) -> bool:
    """True for a TorchScript archive written by ``finetune export`` (it holds finetune.json)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"/extra/{METADATA_FILE}") for name in archive.namelist())


def load_torchscript(source: Source) -> tuple[nn.Module, dict]:
    """An exported TorchScript model (a file or its bytes), and its metadata."""
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_jit():
            module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                    map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[METADATA_FILE])
    except Exception as exc:
        raise FinetuneError(f"torch.jit.load cannot load {_name(source)}: {describe(exc)}\nIt is corrupt or not a "
                            "TorchScript export of finetune; export one with `finetune export CHECKPOINT "
                            "--format torchscript`.") from None
    return module.eval(), _checked(meta, source)


def _checked(meta: dict, source: Source) -> dict:
    missing = [key for key in ("classes", "image_size", "config") if key not in meta]
    if missing:
        raise FinetuneError(f"{_name(source)} lacks finetune metadata ({', '.join(missing)}); export it again with "
                            "`finetune export CHECKPOINT`.")
    return meta


@contextlib.contextmanager
def _quiet_jit():
    # torch marks TorchScript deprecated on every call; finetune offers it because users ask for it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


def _name(source: Source) -> str:
    return "the exported bytes" if isinstance(source, bytes) else str(source)

