"""Gradient checks (inspect-grads) and the guards inside training."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, tiny_config
from torchvision.models import resnet18

from finetune.analysis.gradcheck import check_gradients, inspect_grads
from finetune.config.loading import load_config
from finetune.data.folders import load_datasets
from finetune.data.loaders import make_loader
from finetune.errors import FinetuneError
from finetune.models.build import build
from finetune.training import run as engine
from finetune.training.reporter import Reporter

CHECKS = ["frozen parameters have no gradient", "trainable gradients are finite and non-zero",
          "head gradient equals the softmax cross-entropy closed form",
          "float64 finite differences agree with autograd", "one SGD step moves trainable parameters only"]


@pytest.mark.parametrize("freeze, trainable_tensors", [
    ({"trainable": ["fc"]}, 2),
    ({"trainable": ["layer4", "fc"], "batchnorm": "train"}, 17),
    ({"default": "trainable", "trainable": [], "batchnorm": "train"}, 62),
], ids=["head-only", "layer4+head", "everything"])
def test_checks_pass_on_correct_setups(tmp_path, colour_data, freeze, trainable_tensors):
    # Residual branches not started at zero, so that every trainable tensor gets a gradient (test_recipes checks
    # the zero-started ones).
    config = load_config(tiny_config(tmp_path, colour_data, freeze=freeze, train={"label_smoothing": 0.1},
                                     model={"zero_init_residual": False}))
    report = inspect_grads(config, batches=2)
    assert [c.name for c in report.checks] == CHECKS
    assert report.passed, [c for c in report.checks if not c.passed]
    assert "2 batch(es)" in report.data
    rows = report.parameters
    assert sum(r["trainable"] for r in rows) == trainable_tensors
    assert all(r["grad_norm"] is None for r in rows if not r["trainable"])
    assert all(r["grad_norm"] > 0 for r in rows if r["trainable"])


def test_head_check_agrees_with_an_independent_computation_and_catches_a_wrong_gradient(tmp_path, colour_data):
    """Check 3 passes on autograd's head gradient, which the closed form written out here confirms on the same
    batch, and fails when the head's gradient is 1% off."""
    config = load_config(tiny_config(tmp_path, colour_data))
    x, y = next(iter(make_loader(load_datasets(config).train, 8, shuffle=True)))
    built = build(config, ["blue", "green", "red"])
    features = []
    built.model.fc.register_forward_hook(lambda m, i, o: features.append(i[0].detach()))
    report = check_gradients(built, [x], [y], config)
    assert report.checks[2].name == CHECKS[2] and report.checks[2].passed, report.checks[2]
    # The closed form again, written out here: (softmax(z) - onehot(y))^T h / B, with z and h of the same batch.
    h = features[0]  # of the check's first pass (the finite differences pass more, in float64)
    delta = built.model.fc(h).detach().softmax(1) - torch.nn.functional.one_hot(y, 3)
    torch.testing.assert_close(built.model.fc.weight.grad, delta.T @ h / 8, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(built.model.fc.bias.grad, delta.mean(0), rtol=1e-5, atol=1e-6)

    wrong = build(config, ["blue", "green", "red"])
    wrong.model.fc.weight.register_hook(lambda grad: grad * 1.01)  # an autograd bug in the head's weight gradient
    check = check_gradients(wrong, [x], [y], config).checks[2]
    assert not check.passed and "weight: max rel. error 1.0" in check.detail, check


def test_cli_json_without_data_uses_a_random_batch():
    result = run_cli("inspect-grads", "--set", "model.weights=none", "--set", "model.num_classes=4",
                     "--set", "data.image_size=32", "--set", "train.batch_size=4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and "random batch" in report["data"]
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert {"name", "trainable", "grad_norm", "finite"} <= report["parameters"][0].keys()
    assert report["parameters"][0]["grad_norm"] is None  # conv1.weight is frozen


def test_nan_weights_in_a_trainable_layer_fail_checks_2_and_4(tmp_path, colour_data):
    state = resnet18(weights=None).state_dict()
    state["layer4.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    config = tiny_config(tmp_path, colour_data, model={"weights": str(tmp_path / "nan.pth")},
                         freeze={"trainable": ["layer4.1", "fc"]})  # the block holding the NaN, and the head
    result = run_cli("inspect-grads", "--config", str(config), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    passed = {c["name"]: c["passed"] for c in report["checks"]}
    assert not report["passed"]
    assert not passed[CHECKS[1]] and not passed[CHECKS[3]]
    assert passed[CHECKS[0]]
    text = run_cli("inspect-grads", "--config", str(config))
    assert text.returncode == 1 and "FAIL" in text.stdout and "non-finite" in text.stdout


def test_a_frozen_parameter_that_gets_a_gradient_is_caught(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data))
    built = build(config, ["blue", "green", "red"])
    built.model.layer3[0].conv1.weight.requires_grad_(True)  # a bug: the plan says frozen
    x, y = next(iter(make_loader(load_datasets(config).train, 8, shuffle=True)))
    report = check_gradients(built, [x], [y], config)
    first = report.checks[0]
    assert not first.passed and "layer3.0.conv1.weight" in first.detail


def test_a_step_below_float32_resolution_is_told_apart_from_a_tensor_the_optimizer_skips(tmp_path, colour_data,
                                                                                          monkeypatch):
    """Random weights can shrink the signal so far that lr x gradient rounds away (EfficientNet's and ConvNeXt's
    smallest members did): the step check says so and passes; a tensor the optimizer leaves out still fails it."""
    import finetune.analysis.gradcheck as gradcheck

    config = load_config(tiny_config(tmp_path, colour_data))
    x, y = next(iter(make_loader(load_datasets(config).train, 8, shuffle=True)))
    faint = build(config, ["blue", "green", "red"])
    faint.model.fc.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 1e-12,))
    step = check_gradients(faint, [x], [y], config).checks[4]
    assert step.passed and "1 of 2 trainable tensors moved; 1 did not" in step.detail, step
    assert "below float32 resolution" in step.detail and step.detail.endswith("fc.weight")

    real_optimizer = gradcheck.build_optimizer
    monkeypatch.setattr(gradcheck, "build_optimizer", lambda model, optim, arch: torch.optim.SGD(
        [model.fc.weight], lr=0.01) if real_optimizer(model, optim, arch) else None)  # a bug: fc.bias left out
    skipped = check_gradients(build(config, ["blue", "green", "red"]), [x], [y], config).checks[4]
    assert not skipped.passed and "trainable tensors did not move: fc.bias" in skipped.detail, skipped


def test_an_update_that_overflows_a_parameter_stops_the_epoch(tmp_path, colour_data):
    """Finite gradients, an update too large for float32: the check after the epoch's steps names the tensor, before
    anything is validated or saved (the parameters are not scanned after every step)."""
    from finetune.training.epoch import TrainState, train_one_epoch
    from finetune.training.setup import prepare
    from finetune.training.validate import validate

    config = load_config(tiny_config(tmp_path, colour_data))
    validate(config)
    setup = prepare(config)
    fast = setup.fast_model(setup.built.plan)
    for group in setup.optimizer.param_groups:
        group["lr"] = 3e38  # near float32's largest number, far beyond optim.lr's range: only a test can set it
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def loss_fn(logits, targets):  # gradients of about 100: finite, and so is their norm
        return 1000 * setup.loss_fn(logits, targets)

    with pytest.raises(FinetuneError, match=r"epoch 1, by step 1: non-finite values in fc\.weight after an update"):
        train_one_epoch(fast, [(fast.features(x), y)], loss_fn, setup.optimizer, setup.schedule, TrainState())


def test_diverging_learning_rate_stops_training_with_exit_1(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data, optim={"lr": 10.0}, train={"epochs": 4},
                         freeze={"default": "trainable", "trainable": [], "batchnorm": "train"})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 1
    assert "Training diverged at epoch" in result.stderr and ", step " in result.stderr
    assert "first parameter with a non-finite gradient" in result.stderr or "non-finite values in" in result.stderr
    assert "optim.grad_clip" in result.stderr and "Traceback" not in result.stderr
    run_dir = tmp_path / "run"
    kept = "The last checkpoint written" in result.stderr
    assert kept or "No checkpoint was written yet" in result.stderr
    assert (run_dir / "last.pt").exists() == kept
    if kept:  # the last good checkpoint holds finite weights
        state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_grad_clip_bounds_the_update(tmp_path, colour_data):
    # One step over the whole set with plain SGD: the update is exactly lr * the clipped gradient.
    config = load_config(tiny_config(tmp_path, colour_data, optim={"lr": 1.0, "momentum": 0.0, "grad_clip": 0.01},
                                     train={"epochs": 1, "batch_size": 36}))
    before = build(config, ["blue", "green", "red"]).model.fc.state_dict()
    engine.train(config, Reporter())
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    step = torch.cat([(after[f"fc.{k}"] - before[k]).flatten() for k in ("weight", "bias")])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-3)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["grad_norm"] > 0.01  # logged before clipping


def test_batchnorm_drift_in_frozen_layers_is_an_error(tmp_path, colour_data, monkeypatch):
    # Simulate the classic bug: BatchNorm of frozen layers left in train mode. The frozen layer4 after the trainable
    # layer3 runs as the model's own layers (the frozen prefix before layer3 runs as a folded copy, without them).
    monkeypatch.setattr(engine, "set_train_mode", lambda model, modes: model.train())
    config = load_config(tiny_config(tmp_path, colour_data, train={"epochs": 1},
                                     freeze={"trainable": ["layer3", "fc"]}))
    with pytest.raises(FinetuneError) as error:
        engine.train(config, Reporter())
    assert error.value.exit_code == 1
    assert "Frozen tensors changed" in str(error.value) and "running_mean" in str(error.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["frozen_unchanged"] is False


def test_the_step_finds_the_first_non_finite_tensor_and_no_false_alarm_from_huge_values():
    from finetune.training.epoch import first_non_finite

    fine = [("a", torch.ones(3)), ("b", torch.full((2, 2), 3e38))]  # finite, though their norm overflows
    assert first_non_finite(fine) is None and first_non_finite([]) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = fine + [("c.running_var", torch.tensor([1.0, bad])), ("d", torch.tensor([bad]))]
        assert first_non_finite(tensors) == "c.running_var"
