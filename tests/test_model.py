"""Tests for finetune.models.weights and .build: weights sources, the head, unsafe files, and num_classes."""

from __future__ import annotations

import pickle
import random
import time
from pathlib import Path

import pytest
import torch
from helpers import CodeRunningPayload, write_config
from torch import nn

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.models.build import resolve_num_classes
from finetune.models.weights import build_model

BACKBONE_KEYS = 120  # resnet18 state-dict entries without fc.weight / fc.bias


def make(*sets: str, num_classes: int = 10):
    return build_model(load_config(None, list(sets)), num_classes, show_download=False)


def weights_error(spec, num_classes: int = 10) -> str:
    with pytest.raises(FinetuneError) as info:
        make(f"model.weights={spec}", num_classes=num_classes)
    assert info.value.exit_code == 2
    return str(info.value)


def assert_backbone_equals(model: nn.Module, state: dict) -> None:
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert len(ours) == BACKBONE_KEYS and ours.keys() <= state.keys()
    assert all(torch.equal(v, state[k]) for k, v in ours.items())


def resnet18_state(num_classes: int = 1000, seed: int = 5) -> dict:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return resnet18(num_classes=num_classes).state_dict()


# --- random and seeded -----------------------------------------------------------------------------------------

def test_none_is_random_with_new_head():
    model, info = make("model.weights=none", num_classes=7)
    assert (info.pretrained, info.head_loaded, info.warning) == (False, False, None)
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (512, 7)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_same_seed_same_head_other_seed_other_head():
    heads = [make("model.weights=none", f"train.seed={seed}")[0].fc.weight for seed in (3, 3, 4)]
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


# --- torchvision weights API (hub cache, offline) --------------------------------------------------------------

@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1"])
def test_torchvision_weights_from_hub_cache(hub_cache, resnet_state, name):
    model, info = make(f"model.weights={name}")
    assert info.pretrained and not info.head_loaded and info.warning is None
    assert name in info.source
    assert_backbone_equals(model, torch.load(resnet_state, weights_only=True))
    assert model.fc.out_features == 10  # the 1000-class ImageNet head is replaced


def test_offline_without_cache_fails_fast_with_three_ways_out(offline):
    start = time.monotonic()
    message = weights_error("DEFAULT")
    assert time.monotonic() - start < 15
    cache = offline / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "ResNet18_Weights.DEFAULT" in message
    assert f"1. put the file in torchvision's cache: {cache}" in message
    assert "2. give a local state-dict file: --set model.weights=" in message
    assert "3. train from random weights: --set model.weights=none" in message


def test_offline_fallback_random_warns():
    model, info = make("model.weights_fallback=random")
    assert info.pretrained is False and "random" in info.source
    assert info.warning and "Three ways out" in info.warning and "RANDOM" in info.warning
    assert model.fc.out_features == 10


# --- local files -----------------------------------------------------------------------------------------------

def test_local_file_loads_backbone_and_replaces_imagenet_head(resnet_state):
    model, info = make(f"model.weights={resnet_state}")
    assert info.pretrained and not info.head_loaded and str(resnet_state) in info.source
    state = torch.load(resnet_state, weights_only=True)
    assert_backbone_equals(model, state)
    assert model.fc.weight.shape == (10, 512)


def test_local_file_path_relative_to_config(tmp_path, resnet_state, monkeypatch):
    (tmp_path / "cfg" / "w").mkdir(parents=True)
    (tmp_path / "cfg" / "w" / "r18.pth").write_bytes(resnet_state.read_bytes())
    monkeypatch.chdir(tmp_path)  # not the config's folder
    path = write_config(tmp_path / "cfg" / "c.yaml", "model:\n  weights: w/r18.pth\n")
    model, info = build_model(load_config(path), 10, show_download=False)
    assert info.pretrained
    assert_backbone_equals(model, torch.load(resnet_state, weights_only=True))


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: {"model": s, "epoch": 3},  # a finetune checkpoint
    lambda s: {"state_dict": s},
    lambda s: {f"module.{k}": v for k, v in s.items()},  # saved from DataParallel
], ids=["plain", "checkpoint", "state_dict", "module-prefix"])
def test_file_with_matching_head_loads_head(tmp_path, wrap):
    state = resnet18_state(num_classes=10)
    path = tmp_path / "w.pth"
    torch.save(wrap(state), path)
    model, info = make(f"model.weights={path}")
    assert info.head_loaded
    assert torch.equal(model.fc.weight, state["fc.weight"]) and torch.equal(model.fc.bias, state["fc.bias"])
    assert_backbone_equals(model, state)


def test_file_head_with_other_class_count_is_an_error(tmp_path):
    path = tmp_path / "w7.pth"
    torch.save(resnet18_state(num_classes=7), path)
    message = weights_error(path, num_classes=10)
    assert str(path) in message and "7-class head" in message and "model.num_classes is 10" in message


def _write(kind: str, path: Path) -> None:
    if kind == "truncated":
        buffer = path.with_suffix(".full")
        torch.save(resnet18_state(), buffer)
        path.write_bytes(buffer.read_bytes()[: buffer.stat().st_size // 2])
    elif kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "resnet34":
        from torchvision.models import resnet34

        torch.save(resnet34().state_dict(), path)
    elif kind == "wrong-keys":
        torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    elif kind == "wrong-shape":
        state = resnet18_state()
        state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
        torch.save(state, path)
    elif kind == "not-a-state-dict":
        torch.save([torch.zeros(2)], path)
    elif kind != "missing":
        raise ValueError(kind)


@pytest.mark.parametrize("kind, fragments", [
    ("missing", ["not found"]),
    ("truncated", ["corrupt or truncated"]),
    ("random-bytes", []),
    ("empty", []),
    ("resnet34", ["do not fit ResNet-18", "unexpected: layer1.2.conv1.weight"]),
    ("wrong-keys", ["missing: conv1.weight, bn1.weight", "unexpected: encoder.weight"]),
    ("wrong-shape", ["wrong shape: conv1.weight (64, 1, 7, 7) != (64, 3, 7, 7)"]),
    ("not-a-state-dict", ["does not hold a state dict"]),
], ids=lambda v: v if isinstance(v, str) else "expected")
def test_bad_local_file(tmp_path, kind, fragments):
    path = tmp_path / f"{kind}.pth"
    _write(kind, path)
    message = weights_error(path)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_corrupt_file_is_not_reported_as_unsafe(tmp_path):
    path = tmp_path / "corrupt.pth"
    _write("random-bytes", path)
    message = weights_error(path)
    # random bytes are a damaged file, not a file holding code: the message must not blame the user for that
    assert "could run code" not in message and "corrupt" in message, message


# --- files that would run code when unpickled ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["torch.save", "pickle", "torch.save-in-state-dict", "hub-cache"])
def test_code_running_pickle_is_refused(tmp_path, offline, how):
    marker = tmp_path / "MARKER"
    payload = CodeRunningPayload(marker)
    if how == "hub-cache":
        path = offline / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        path.parent.mkdir(parents=True)
        spec = "DEFAULT"
    else:
        path = spec = tmp_path / "evil.pth"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"conv1.weight": payload}))
    elif how == "torch.save-in-state-dict":
        torch.save({**resnet18_state(), "extra": payload}, path)
    else:
        torch.save(payload, path)
    with pytest.raises(FinetuneError) as info:
        make(f"model.weights={spec}")
    assert not marker.exists(), "loading the weights ran code from the file"
    assert str(path) in str(info.value)


# --- num_classes -----------------------------------------------------------------------------------------------

def test_num_classes_null_without_data_is_an_error():
    config = load_config(None)
    with pytest.raises(FinetuneError) as info:
        resolve_num_classes(config, None)
    assert info.value.exit_code == 2 and "model.num_classes" in str(info.value) and "data.root" in str(info.value)


def test_num_classes_mismatch_with_data(tmp_path):
    path = write_config(tmp_path / "c.yaml", "model:\n  num_classes: 3\ndata:\n  root: imgs\n")
    config = load_config(path)
    with pytest.raises(FinetuneError) as info:
        resolve_num_classes(config, ["cat", "dog"])
    message = str(info.value)
    assert f"{path}:2  model.num_classes" in message and "is 3" in message and "2 classes" in message


@pytest.mark.parametrize("wanted, classes, expected", [(None, ["a", "b", "c"], 3), (3, ["a", "b", "c"], 3),
                                                       (5, None, 5)], ids=["from-data", "agrees", "no-data"])
def test_num_classes_resolved(wanted, classes, expected):
    config = load_config(None, [f"model.num_classes={'null' if wanted is None else wanted}"])
    assert resolve_num_classes(config, classes) == expected


def test_single_class_folder_is_an_error():
    with pytest.raises(FinetuneError) as info:
        resolve_num_classes(load_config(None, ["data.root=imgs"]), ["only"])
    assert "--set data.root" in str(info.value) and "at least 2" in str(info.value)
