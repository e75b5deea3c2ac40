"""Tests for finetune.models.freeze: pattern precedence, pattern errors, BatchNorm modes, what training leaves alone."""

from __future__ import annotations

import pytest
import torch
from helpers import write_config

from finetune.config.loading import load_config
from finetune.config.schema import FreezeConfig
from finetune.errors import FinetuneError
from finetune.models import freeze
from finetune.models.build import build
from finetune.models.freeze import batchnorm_modes, plan_freeze, set_train_mode
from finetune.training.optim import build_optimizer
from finetune.training.validate import validate


@pytest.fixture(scope="module")
def names() -> list[str]:
    from finetune.models.arch import get_arch

    return get_arch("resnet18").parameter_names(10)


@pytest.fixture(scope="module")
def numel() -> dict[str, int]:
    from torchvision.models import resnet18

    with torch.device("meta"):
        return {n: p.numel() for n, p in resnet18(num_classes=10).named_parameters()}


def plan(names, **freeze):
    return plan_freeze(names, FreezeConfig(**freeze))


def trainable_count(decisions, numel) -> int:
    return sum(numel[n] for n, d in decisions.items() if d.trainable)


def build_small(*sets: str):
    return build(load_config(None, ["model.weights=none", "model.num_classes=3", *sets]), show_download=False)


# --- plans -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("freeze, trainable", [
    ({}, 5_130),  # default: head only
    ({"trainable": ["layer4.*", "fc.*"]}, 8_398_858),
    ({"trainable": ["layer4", "fc"]}, 8_398_858),  # `layer4` also matches `layer4.*`
    ({"trainable": [], "default": "trainable"}, 11_181_642),
    ({"trainable": [], "frozen": ["*"], "default": "trainable"}, 0),
    ({"trainable": ["*"], "frozen": ["layer4"]}, 11_181_642 - 8_393_728),
], ids=["default", "layer4.*-fc.*", "layer4-fc", "all-by-default", "frozen-star", "all-but-layer4"])
def test_trainable_counts(names, numel, freeze, trainable):
    decisions = plan(names, **freeze)
    assert set(decisions) == set(names)
    assert trainable_count(decisions, numel) == trainable


def test_module_name_matches_children_only(names):
    decisions = plan(names, trainable=["layer1"])
    assert decisions["layer1.0.conv1.weight"].trainable and decisions["layer1.1.bn2.bias"].trainable
    assert decisions["layer1.0.conv1.weight"].rule == "trainable: layer1"
    # `layer1` is not a prefix match: nothing in layer2..4 or the stem trains
    assert not any(d.trainable for n, d in decisions.items() if not n.startswith("layer1."))
    assert decisions["conv1.weight"].rule == "default: frozen"


PRECEDENCE = [  # trainable patterns, frozen patterns, parameter, expected trainable, expected rule
    (["layer4"], ["layer4.0"], "layer4.0.conv1.weight", False, "frozen: layer4.0"),  # more specific frozen
    (["layer4"], ["layer4.0"], "layer4.1.conv1.weight", True, "trainable: layer4"),
    (["layer4.0.*"], ["layer4"], "layer4.0.bn1.bias", True, "trainable: layer4.0.*"),  # more specific trainable
    (["*.bias"], ["layer4"], "layer4.0.bn1.bias", False, "frozen: layer4"),  # 5 vs 6 literal characters
    (["*bn1.bias"], ["layer4"], "layer4.0.bn1.bias", True, "trainable: *bn1.bias"),  # 8 vs 6
    (["fc"], ["fc"], "fc.weight", False, "frozen: fc"),  # tie -> frozen
    (["fc.bias"], ["*fc.bias"], "fc.bias", False, "frozen: *fc.bias"),  # tie (7 = 7) -> frozen
    (["fc.?ias"], ["fc.*"], "fc.bias", True, "trainable: fc.?ias"),  # '?' is not literal: 6 vs 3
    # a character class matches one character: layer[34] has 5 literal characters, fewer than layer4's 6
    (["layer[34]"], ["layer4"], "layer4.0.conv1.weight", False, "frozen: layer4"),
]


@pytest.mark.parametrize("trainable, frozen, name, expect_trainable, rule", PRECEDENCE,
                         ids=[f"{c[0][0]}-vs-{c[1][0]}-{c[2]}" for c in PRECEDENCE])
def test_precedence(names, trainable, frozen, name, expect_trainable, rule):
    decision = plan(names, trainable=trainable, frozen=frozen)[name]
    assert (decision.trainable, decision.rule) == (expect_trainable, rule)


@pytest.mark.parametrize("default", ["frozen", "trainable"])
def test_unmatched_takes_default(names, default):
    decision = plan(names, trainable=["fc"], default=default)["layer2.0.conv2.weight"]
    assert decision.trainable == (default == "trainable") and decision.rule == f"default: {default}"


# --- pattern errors --------------------------------------------------------------------------------------------

def problems(names, **rules) -> dict[str, str]:
    return dict(freeze.problems(names, FreezeConfig(**rules), epochs=5))


def test_pattern_matching_nothing_names_key_and_closest(names):
    found = problems(names, trainable=["fc", "layer5.*"])
    assert list(found) == ["freeze.trainable[1]"]
    message = found["freeze.trainable[1]"]
    assert "'layer5.*'" in message
    assert "closest names:" in message and "layer4" in message.split("closest names:")[1]


def test_several_bad_patterns_reported_together(names):
    found = problems(names, trainable=["fc", "layer9", "fc.wieght"], frozen=["conv"])
    assert sorted(found) == ["freeze.frozen[0]", "freeze.trainable[1]", "freeze.trainable[2]"]
    assert "fc.weight" in found["freeze.trainable[2]"]  # closest name to the misspelling


def test_every_config_problem_is_reported_at_once(tmp_path):
    path = write_config(tmp_path / "c.yaml", "model:\n  weights: none\n  num_classes: 4\n"
                                              "freeze:\n  trainable: [fc, layer5]\n"
                                              "  stages: [{epoch: 9, trainable: [layer4]}]\n"
                                              "optim:\n  param_groups: [{params: [layer7], lr: 0.1}]\n"
                                              "train:\n  epochs: 3\n")
    with pytest.raises(FinetuneError) as info:
        validate(load_config(path))
    message = str(info.value)
    assert info.value.exit_code == 2 and "3 problems" in message
    assert f"{path}:5  freeze.trainable[1]: pattern 'layer5' matches no parameter" in message
    assert f"{path}:6  freeze.stages[0].epoch: is 9 but train.epochs is 3" in message
    assert f"{path}:8  optim.param_groups[0].params[0]: pattern 'layer7' matches no parameter" in message


def test_bad_pattern_in_file_names_file_and_line(tmp_path):
    path = write_config(tmp_path / "c.yaml", "model:\n  weights: none\n  num_classes: 4\n"
                                              "freeze:\n  trainable: [fc, layer5]\n")
    with pytest.raises(FinetuneError) as info:
        validate(load_config(path))
    assert f"{path}:5  freeze.trainable[1]" in str(info.value)


# --- BatchNorm modes -------------------------------------------------------------------------------------------

BN_COUNT = 20
LAYER4_BN = {"layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1", "layer4.1.bn2"}


@pytest.mark.parametrize("sets, policy, train_bn", [
    ((), "eval", set()),
    (('freeze.trainable=["layer4", "fc"]',), "eval", LAYER4_BN),
    (('freeze.trainable=["bn1.weight", "fc"]',), "eval", {"bn1"}),  # half-trainable BN layer trains
    ((), "train", "all"),
], ids=["head-only", "layer4", "half-trainable-bn1", "policy-train"])
def test_batchnorm_modes(sets, policy, train_bn):
    built = build_small(f"freeze.batchnorm={policy}", *sets)
    assert len(built.bn_modes) == BN_COUNT
    assert batchnorm_modes(built.model, built.plan, policy) == built.bn_modes
    expected = set(built.bn_modes) if train_bn == "all" else train_bn
    assert {m for m, mode in built.bn_modes.items() if mode == "train"} == expected
    assert {m for m, mode in built.bn_modes.items() if mode == "eval"} == set(built.bn_modes) - expected

    built.model.eval()
    set_train_mode(built.model, built.bn_modes)
    modules = dict(built.model.named_modules())
    for name, mode in built.bn_modes.items():
        assert modules[name].training is (mode == "train"), name
    assert built.model.training and modules["conv1"].training and modules["layer4.1"].training


# --- training leaves frozen things bit-identical ---------------------------------------------------------------

def _train_steps(built, steps: int = 3) -> None:
    torch.manual_seed(0)
    optimizer = build_optimizer(built.model, load_config(None, ["optim.lr=0.1"]).optim, built.arch)
    set_train_mode(built.model, built.bn_modes)
    for _ in range(steps):
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2,))
        loss = torch.nn.functional.cross_entropy(built.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _snapshot(built) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in built.model.state_dict().items()}


def _changed(before, after, keys) -> set[str]:
    return {k for k in keys if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("policy", ["eval", "train"])
def test_training_head_only(policy):
    built = build_small(f"freeze.batchnorm={policy}")
    before = _snapshot(built)
    _train_steps(built)
    after = _snapshot(built)

    frozen = {n for n, d in built.plan.items() if not d.trainable}
    stats = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert len(frozen) == 60 and len(stats) == 3 * BN_COUNT
    assert _changed(before, after, frozen) == set()  # frozen parameters never move
    assert _changed(before, after, ["fc.weight", "fc.bias"]) == {"fc.weight", "fc.bias"}  # the head did train
    if policy == "eval":
        assert _changed(before, after, stats) == set()  # frozen BatchNorm keeps its statistics
    else:
        assert _changed(before, after, stats) == stats  # the tutorial way: every statistic drifts


def test_training_layer4_with_eval_policy_updates_only_layer4_stats():
    built = build_small('freeze.trainable=["layer4", "fc"]')
    before = _snapshot(built)
    _train_steps(built)
    after = _snapshot(built)
    stats = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert {k.rsplit(".", 1)[0] for k in _changed(before, after, stats)} == LAYER4_BN
    assert _changed(before, after, [n for n, d in built.plan.items() if not d.trainable]) == set()
