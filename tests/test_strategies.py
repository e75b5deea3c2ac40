"""Gradual unfreezing (freeze.stages), discriminative learning rates and weight-decay hygiene."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_weights, interrupt, run_cli, tiny_config, weights

from finetune.config.loading import load_config
from finetune.config.schema import OptimConfig
from finetune.models.arch import get_arch
from finetune.models.build import build
from finetune.training import run as engine
from finetune.training.optim import Schedule, build_optimizer, lr_factor
from finetune.training.reporter import Reporter

STAGED = dict(freeze={"trainable": ["fc"], "stages": [{"epoch": 2, "trainable": ["layer4"]}]},
              optim={"lr": 0.02, "schedule": "cosine", "layer_lr_decay": 0.5},
              train={"epochs": 3, "batch_size": 6})


class EpochRecorder(Reporter):
    """What each epoch of training ran with, as the run tells its reporter: param groups, learning rates,
    requires_grad and BatchNorm mode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def epoch_start(self, epoch):
        self.seen.append({"epoch": epoch.epoch, "groups": len(epoch.lrs), "lrs": list(epoch.lrs),
                          "layer4_trains": "layer4.0.conv1.weight" in epoch.trainable,
                          "layer4_bn_training": "layer4.0.bn1" in epoch.batchnorm_train,
                          "prefix": epoch.frozen_prefix[-1]})


@pytest.fixture(scope="module")
def staged_run(module_tmp, colour_data):
    """One uninterrupted run of STAGED: its config, what each epoch ran with, and its run directory."""
    folder = module_tmp("staged")
    config = load_config(tiny_config(folder, colour_data, **STAGED))
    recorder = EpochRecorder()
    engine.train(config, recorder)
    return config, recorder.seen, folder / "run"


def test_a_stage_unfreezes_exactly_at_its_epoch(staged_run):
    _, epochs_seen, run_dir = staged_run
    assert [e["layer4_trains"] for e in epochs_seen] == [False, True, True]
    assert [e["layer4_bn_training"] for e in epochs_seen] == [False, True, True]  # BatchNorm follows the freeze
    assert [e["groups"] for e in epochs_seen] == [1, 2, 2]  # a new param group when layer4 joins
    assert [e["prefix"] for e in epochs_seen] == ["flatten", "layer3.1", "layer3.1"]  # the fast path follows too
    state = torch.load(run_dir / "last.pt", weights_only=True)["optimizer"]
    assert [g["names"][0] for g in state["param_groups"]] == ["fc.weight", "layer4.0.conv1.weight"]


def test_group_learning_rates_follow_decay_and_schedule(staged_run):
    config, epochs_seen, _ = staged_run
    steps = 6  # 36 images, batch 6
    for seen in epochs_seen:  # the rate at the first step of each epoch
        factor = lr_factor((seen["epoch"] - 1) * steps, steps, 3, config.optim)
        assert seen["lrs"][0] == pytest.approx(0.02 * factor)  # fc: depth 0
        if seen["groups"] == 2:
            assert seen["lrs"][1] == pytest.approx(0.02 * 0.5 * factor)  # layer4: depth 1


def test_schedule_scales_groups_added_later():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1), get_arch("resnet18"))
    schedule = Schedule(optimizer, OptimConfig(lr=0.1, schedule="step", gamma=0.5), epochs=4, steps_per_epoch=1)
    schedule.step()
    optimizer.add_param_group({"params": list(model[1].parameters()), "initial_lr": 0.04})
    schedule.apply()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.02])


def test_resume_in_a_later_stage_equals_uninterrupted(tmp_path, colour_data, staged_run):
    parted = load_config(tiny_config(tmp_path / "parted", colour_data, **STAGED))
    interrupt(engine.train, parted, epoch=2, step=2)  # inside epoch 3, after the stage started
    engine.train(parted, Reporter(), resume=tmp_path / "parted" / "run")
    assert_same_weights(weights(tmp_path / "parted" / "run"), weights(staged_run[2]))


def test_no_decay_for_batchnorm_and_biases(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, freeze={"trainable": ["layer4", "fc"]},
                                     optim={"weight_decay": 1e-4, "no_decay_bn_bias": True}))
    built = build(config, ["blue", "green", "red"])
    decay = {name: group["weight_decay"] for group in build_optimizer(built.model, config.optim, built.arch).param_groups
             for name in group["names"]}
    assert decay["layer4.0.conv1.weight"] == 1e-4 and decay["fc.weight"] == 1e-4
    assert decay["layer4.0.bn1.weight"] == 0 and decay["layer4.0.bn1.bias"] == 0 and decay["fc.bias"] == 0


def test_param_groups_set_learning_rates_by_pattern(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, freeze={"trainable": ["layer4", "fc"]},
                                     optim={"lr": 0.1, "param_groups": [{"params": ["layer4"], "lr": 0.001},
                                                                        {"params": ["layer4.1.conv2"], "lr": 0.002}]}))
    built = build(config, ["blue", "green", "red"])
    lr = {name: group["lr"] for group in build_optimizer(built.model, config.optim, built.arch).param_groups
          for name in group["names"]}
    assert lr["fc.weight"] == 0.1 and lr["layer4.0.conv1.weight"] == 0.001 and lr["layer4.1.conv2.weight"] == 0.002


@pytest.mark.parametrize("sections, key", [
    ({"freeze": {"stages": [{"epoch": 2, "trainable": ["layer5"]}]}}, "freeze.stages[0].trainable[0]"),
    ({"freeze": {"stages": [{"epoch": 9, "trainable": ["layer4"]}]}}, "freeze.stages[0].epoch"),
    ({"optim": {"param_groups": [{"params": ["nothing.here"], "lr": 0.1}]}}, "optim.param_groups[0].params[0]"),
], ids=["stage-pattern", "stage-after-last-epoch", "group-pattern"])
def test_strategy_config_errors(tmp_path, colour_data, sections, key):
    config = tiny_config(tmp_path, colour_data, **sections)
    result = run_cli("freeze-report", "--config", str(config))
    assert result.returncode == 2
    assert key in result.stderr and "Traceback" not in result.stderr


def test_freeze_report_and_inspect_grads_at_a_later_epoch(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data, **STAGED)
    reports = [json.loads(run_cli("freeze-report", "--config", str(config), "--epoch", str(e), "--json").stdout)
               for e in (1, 2)]
    assert [r["trainable_params"] for r in reports] == [1_539, 8_395_267]
    lr = {p["name"]: p["lr"] for p in reports[1]["parameters"]}
    assert lr["fc.weight"] == pytest.approx(0.02) and lr["layer4.0.conv1.weight"] == pytest.approx(0.01)
    assert lr["conv1.weight"] is None
    grads = run_cli("inspect-grads", "--config", str(config), "--epoch", "2", "--json")
    assert grads.returncode == 0, grads.stdout + grads.stderr
    report = json.loads(grads.stdout)
    assert report["passed"] and sum(p["trainable"] for p in report["parameters"]) == 17
