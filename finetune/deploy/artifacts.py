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
from typing import Optional, Union

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.errors import FinetuneError, describe
from finetune.training.calibration import check_temperature, stored_temperature
from finetune.training.checkpoint import TRAIN_STATE, load_checkpoint, restore_model


@dataclass
class Trained:
    model: nn.Module
    classes: list[str]
    config: Config
    path: Path
    train_state: dict = field(default_factory=dict)  # the checkpoint's training state: epoch, history, ...
    thresholds: Optional[list[float]] = None  # multilabel: one per label, chosen on the validation split
    calibration: Optional[dict] = None  # what `finetune calibrate` stored: the temperature and its report
    weights: str = "raw"  # which weights the checkpoint serves: "raw", or "ema" (train.ema.use_for)

    @property
    def temperature(self) -> Optional[float]:
        """What the logits are divided by for calibrated probabilities; None when never calibrated."""
        return self.calibration["temperature"] if self.calibration else None


def load_trained(path: Path) -> Trained:
    """The model of a finetune checkpoint, in eval mode, with its class names, config, (multi-label) thresholds and
    calibration."""
    checkpoint = load_checkpoint(path)
    stored_temperature(checkpoint, Path(path))  # a damaged temperature is an error here, not a wrong answer later
    try:
        model, classes, config = restore_model(checkpoint)
        thresholds = [float(t) for t in checkpoint["thresholds"]] if checkpoint.get("thresholds") else None
    except Exception as exc:  # a damaged or foreign file that merely looks like a checkpoint
        raise FinetuneError(f"{path} is not a usable finetune checkpoint: {describe(exc)}\n"
                            "Give last.pt or best.pt from a run directory of `finetune train`.") from None
    return Trained(model, classes, config, Path(path), dict(checkpoint.get(TRAIN_STATE) or {}), thresholds,
                   checkpoint.get("calibration"), checkpoint.get("serves", "raw"))


# Format -> the suffix of its default output, which goes beside the checkpoint (best.pt -> best.onnx).
INPUT_NAME, OUTPUT_NAME = "images", "logits"
PROBABILITIES = "probabilities"  # the output of an export of a calibrated checkpoint, in place of its logits
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "state-dict": ".state_dict.pth"}
METADATA_FILE = "finetune.json"  # the TorchScript archive's extra file
# ONNX metadata values are strings: these keys hold text, every other one JSON.
_TEXT_KEYS = ("arch", "finetune_version", "input", "output", "resize", "weights", "tta")
TTA_NOTE = ("not inside: the model is a single pass; finetune evaluate/predict --tta average its probabilities "
            "over flipped or cropped views outside it")

Source = Union[Path, bytes]  # a file, or an artifact's bytes before they are written


def set_onnx_metadata(model, meta: dict) -> None:
    """Make ``meta`` the ``metadata_props`` of an ONNX ModelProto, in place of any there: strings, JSON but for the
    text keys (as :func:`load_onnx` reads them)."""
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value if key in _TEXT_KEYS else json.dumps(value))


class Preprocessed(nn.Module):
    """The trained network behind its normalisation (the config's ``data.mean`` and ``data.std``): float32 RGB in
    [0, 1], N x 3 x S x S, in; logits out, or with a ``temperature`` the calibrated probabilities,
    softmax(logits / temperature)."""

    def __init__(self, model: nn.Module, config: Config, temperature: Optional[float] = None):
        super().__init__()
        self.model = model
        mean, std = _normalisation(config)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.calibrated = temperature is not None
        self.temperature = 1.0 if temperature is None else float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model((images - self.mean) / self.std)
        if self.calibrated:
            return (logits / self.temperature).softmax(1)
        return logits


def _normalisation(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The config's mean and std as (1, 3, 1, 1) tensors, to broadcast over a batch."""
    return torch.tensor(config.data.mean).view(1, 3, 1, 1), torch.tensor(config.data.std).view(1, 3, 1, 1)


def to_pixels(batch: torch.Tensor, config: Config) -> torch.Tensor:
    """Undo the data pipeline's normalisation (``config``'s mean and std): what an exported model takes, RGB in
    [0, 1]."""
    mean, std = _normalisation(config)
    return (batch * std + mean).contiguous()


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like a torch module: pixels in, logits (or calibrated
    probabilities) out."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.output = session.get_outputs()[0].name

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output], {INPUT_NAME: array})[0])


def load_onnx(source: Source, threads: Optional[int] = None) -> tuple[OnnxModel, dict]:
    """An exported ONNX model (a file or its bytes) in onnxruntime, and its metadata.

    ``threads``: onnxruntime's threads within an operator (default: one per physical core).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations, not the user's input
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                               providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FinetuneError(f"onnxruntime cannot load {_name(source)}: {describe(exc)}\nIt is corrupt or not an "
                            "ONNX file; export one with `finetune export CHECKPOINT`.") from None
    props = session.get_modelmeta().custom_metadata_map
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if "classes" not in props or names not in (([INPUT_NAME], [OUTPUT_NAME]), ([INPUT_NAME], [PROBABILITIES])):
        raise FinetuneError(f"{_name(source)} is an ONNX model but not one exported by finetune (it lacks the "
                            "metadata that names its classes and preprocessing); export one with "
                            "`finetune export CHECKPOINT`.")
    try:
        meta = {key: value if key in _TEXT_KEYS else json.loads(value) for key, value in props.items()}
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"{_name(source)} has damaged finetune metadata: {exc}") from None
    if names[1] != [meta.get("output", OUTPUT_NAME)]:
        raise FinetuneError(f"{_name(source)} has damaged finetune metadata: its output is {names[1][0]}, its "
                            f"metadata says {meta.get('output', OUTPUT_NAME)}.")
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
    if meta.get("temperature") is not None:
        check_temperature(meta["temperature"], _name(source))
    return meta


def outputs_probabilities(meta: dict) -> bool:
    """Whether an export (by its metadata) outputs calibrated probabilities rather than logits."""
    return meta.get("output") == PROBABILITIES


@contextlib.contextmanager
def _quiet_jit():
    # torch marks TorchScript deprecated on every call; finetune offers it because users ask for it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


def _name(source: Source) -> str:
    return "the exported bytes" if isinstance(source, bytes) else str(source)
