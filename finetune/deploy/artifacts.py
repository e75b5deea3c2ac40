"""Trained models as files: a finetune checkpoint, or an ONNX or TorchScript export with its preprocessing inside.

Exports take float32 RGB in [0, 1], N x 3 x S x S, normalise it themselves, and carry finetune's metadata
(classes, preprocessing, the run's config). onnx and onnxruntime are imported only when needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data.images import IMAGENET_MEAN, IMAGENET_STD
from finetune.errors import FinetuneError, describe
from finetune.models.arch import get_arch
from finetune.models.weights import served_state_dict
from finetune.training.checkpoint import load_checkpoint


@dataclass
class Trained:
    model: nn.Module
    classes: list[str]
    config: Config
    path: Path
    progress: dict = field(default_factory=dict)  # the checkpoint's training state: epoch, history, ...
    weights: str = "raw"  # which weights the checkpoint serves: "raw", or "ema" (train.ema.use_for)


def load_trained(path: Path) -> Trained:
    """The model of a finetune checkpoint, in eval mode, with its class names and config."""
    checkpoint = load_checkpoint(path)
    try:
        classes = [str(name) for name in checkpoint["classes"]]
        config = Config.model_validate(checkpoint["config"])
        model = get_arch(config.model.arch).build(len(classes))
        model.load_state_dict(served_state_dict(checkpoint))
    except Exception as exc:  # a damaged or foreign file that merely looks like a checkpoint
        raise FinetuneError(f"{path} is not a usable finetune checkpoint: {describe(exc)}\n"
                            "Give last.pt or best.pt from a run directory of `finetune train`.") from None
    return Trained(model.eval(), classes, config, Path(path), dict(checkpoint.get("progress") or {}),
                   checkpoint.get("serves", "raw"))

# Format -> the suffix of its default output, which goes beside the checkpoint (best.pt -> best.onnx).
INPUT_NAME, OUTPUT_NAME = "images", "logits"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "state-dict": ".state_dict.pth"}
METADATA_FILE = "finetune.json"  # the TorchScript archive's extra file
# ONNX metadata values are strings: these keys hold text, every other one JSON.
_TEXT_KEYS = ("arch", "finetune_version", "input", "resize", "weights", "tta")
TTA_NOTE = ("not inside: the model is a single pass; finetune evaluate/predict --tta average its softmax over "
            "flipped or cropped views outside it")

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
