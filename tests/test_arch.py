"""The ResNet family: every architecture works through the one description in finetune/arch.py."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, tiny_config

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.models.arch import ARCHS, get_arch
from finetune.models.build import build
from finetune.models.freeze import plan_freeze
from finetune.training.reporter import Reporter
from finetune.training.run import train
from finetune.training.validate import validate


def counts(arch: str, trainable: list[str]) -> tuple[int, int]:
    """(total, trainable) parameters of ``arch`` with a 10-class head, on the meta device."""
    config = load_config(None, [f"model.arch={arch}", f"freeze.trainable={trainable}"])
    with torch.device("meta"):
        model = get_arch(arch).build(10)
    plan = plan_freeze([n for n, _ in model.named_parameters()], config.freeze, head=get_arch(arch).head)
    params = dict(model.named_parameters())
    return sum(p.numel() for p in params.values()), sum(params[n].numel() for n, d in plan.items() if d.trainable)


@pytest.mark.parametrize("arch, total, head, layer4_fc", [
    ("resnet18", 11_181_642, 5_130, 8_398_858),
    ("resnet34", 21_289_802, 5_130, 13_119_498),
    ("resnet50", 23_528_522, 20_490, 14_985_226),
    ("resnext50_32x4d", 23_000_394, 20_490, 14_565_386),
])
def test_known_parameter_counts(arch, total, head, layer4_fc):
    assert counts(arch, ["fc"]) == (total, head)
    assert counts(arch, ["layer4", "fc"]) == (total, layer4_fc)


@pytest.mark.parametrize("name", [name for name, arch in ARCHS.items() if arch.family.name == "ResNet"])
def test_every_arch_builds_and_its_stage_chain_equals_the_model(name):
    arch = get_arch(name)
    with torch.device("meta"):
        model = arch.build(3)
    assert arch.head_features(model) == (512 if name in ("resnet18", "resnet34") else 2048)
    names = {n for n, _ in model.named_parameters()}
    chained = {f"{stage}.{p}" for stage, module in arch.stages(model) for p, _ in module.named_parameters()}
    assert chained == names  # every parameter sits in exactly one stage of the chain
    assert {arch.depth(n) for n in names} == set(range(arch.max_depth + 1))
    groups = {arch.group(n) for n in names}
    assert {"stem", "fc", "layer4.0"} <= groups


def test_resnet50_chain_runs_like_the_model():
    arch = get_arch("resnet50")
    torch.manual_seed(0)
    model = arch.build(4).eval()
    x = torch.randn(2, 3, 32, 32)
    out = x
    for _, module in arch.stages(model):
        out = module(out)
    assert torch.allclose(out, model(x), atol=1e-5)


@pytest.mark.parametrize("arch, file", [
    ("resnet18", "resnet18-f37072fd.pth"), ("resnet34", "resnet34-b627a593.pth"),
    ("resnet50", "resnet50-11ad3fa6.pth"), ("wide_resnet50_2", "wide_resnet50_2-9ba9bcbe.pth"),
])
def test_default_weights_cache_file_per_arch(offline, arch, file):
    assert get_arch(arch).cache_file("DEFAULT") == offline / "hub" / "checkpoints" / file


def test_weights_from_the_cache_of_another_arch(offline):
    """resnet34's DEFAULT weights load from its own cache file, offline; the message names the right file."""
    torch.manual_seed(3)
    state = get_arch("resnet34").build(1000).state_dict()
    config = load_config(None, ["model.arch=resnet34", "model.num_classes=3", "model.weights=DEFAULT"])
    with pytest.raises(FinetuneError) as info:
        build(config, show_download=False)
    assert "ResNet34_Weights.DEFAULT" in str(info.value) and "resnet34-b627a593.pth" in str(info.value)
    target = offline / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    target.parent.mkdir(parents=True, exist_ok=True)  # the failed attempt may have made the folder
    torch.save(state, target)
    built = build(config, show_download=False)
    assert built.weights.pretrained and "ResNet34_Weights.DEFAULT" in built.weights.source
    assert torch.equal(built.model.layer4[2].conv2.weight, state["layer4.2.conv2.weight"])


def test_a_weights_name_the_arch_lacks_names_the_key():
    sets = ["model.num_classes=3", "model.weights=IMAGENET1K_V2"]
    with pytest.raises(FinetuneError) as info:
        validate(load_config(None, ["model.arch=resnet18", *sets]))
    assert ("--set model.weights  model.weights: torchvision has no IMAGENET1K_V2 weights for resnet18"
            in str(info.value))
    assert "IMAGENET1K_V1" in str(info.value)
    validate(load_config(None, ["model.arch=resnet50", *sets]))  # resnet50 has them


def test_an_unknown_arch_names_the_closest():
    with pytest.raises(FinetuneError) as info:
        validate(load_config(None, ["model.arch=resnet19", "model.num_classes=3"]))
    assert "model.arch: 'resnet19' is not an architecture finetune knows; did you mean resnet18" in str(info.value)


def test_weights_of_another_arch_are_a_clear_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(get_arch("resnet18").build(1000).state_dict(), path)
    config = load_config(None, ["model.arch=resnet50", "model.num_classes=3", f"model.weights={path}"])
    with pytest.raises(FinetuneError) as info:
        build(config, show_download=False)
    assert "do not fit ResNet-50 (model.arch = resnet50)" in str(info.value)


def test_freeze_report_of_resnet50():
    result = run_cli("freeze-report", "--set", "model.arch=resnet50", "--set", "model.weights=none",
                     "--set", "model.num_classes=10", "--set", 'freeze.trainable=["layer4","fc"]',
                     "--set", "optim.layer_lr_decay=0.5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["total_params"], report["trainable_params"]) == (23_528_522, 14_985_226)
    rows = {row["module"]: row for row in report["groups"]}
    assert list(rows) == ["stem"] + [f"layer{i}.{b}" for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for b in range(n)] \
        + ["fc"]
    assert rows["layer4.2"]["state"] == "trainable" and rows["layer4.2"]["batchnorm"] == "train"
    assert rows["layer3.5"]["state"] == "frozen" and rows["layer3.5"]["batchnorm"] == "eval"
    assert float(rows["fc"]["lr"]) == 0.01 and float(rows["layer4.0"]["lr"]) == 0.005  # layer_lr_decay by depth


def test_resnet50_trains_head_only_from_the_feature_cache_and_predicts(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, model={"arch": "resnet50"}, train={"epochs": 2}))
    summary = train(config, Reporter())
    assert summary["arch"] == "resnet50" and summary["frozen_unchanged"]
    result = run_cli("predict", str(tmp_path / "run" / "best.pt"), str(colour_data / "val" / "red"), "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 4
