"""lr-find: the ramp, smoothing and suggestion rules, the sweep (restores the model, stops on divergence), the
cached path against the image path, and the command end to end on tiny data."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, tiny_config
from torch import nn

from finetune.analysis.lr_find import (
    Smoother,
    check_range,
    lr_find,
    overrides,
    ramp,
    range_test,
    suggest,
    train_command,
)
from finetune.config.loading import load_config
from finetune.errors import FinetuneError


def test_ramp_is_exponential_from_start_to_end():
    lrs = ramp(1e-6, 1.0, 7)
    assert lrs[0] == 1e-6 and lrs[-1] == pytest.approx(1.0)
    assert [math.log10(lr) for lr in lrs] == pytest.approx([-6, -5, -4, -3, -2, -1, 0])


def test_smoother_is_a_bias_corrected_moving_average():
    smooth = Smoother(0.9)
    assert smooth(2.0) == pytest.approx(2.0)  # no pull towards zero at the start
    assert smooth(4.0) == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81))


def test_suggestion_is_the_steepest_descent_checked_against_minimum_over_ten():
    lrs = ramp(1e-5, 1.0, 11)  # 1e-5 ... 1 in decades of 0.5
    smoothed = [2.0, 2.0, 1.99, 1.97, 1.9, 1.5, 0.9, 0.6, 0.5, 0.8, 3.0]
    s = suggest(lrs, smoothed)
    assert s.minimum == pytest.approx(lrs[8]) and s.steepest == pytest.approx(lrs[5])
    assert s.lr == s.steepest and "steepest descent" in s.rule and "within 10x" in s.rule


def test_suggestion_falls_back_to_minimum_over_ten_when_the_steepest_descent_is_far_below():
    lrs = ramp(1e-6, 1.0, 25)
    smoothed = [2.0] * 3 + [1.0] + [0.99 - 0.005 * i for i in range(20)] + [3.0]  # a noisy dip, then a slow fall
    s = suggest(lrs, smoothed)
    assert s.minimum == pytest.approx(lrs[23]) and s.steepest < s.minimum / 100
    assert s.lr == pytest.approx(lrs[23] / 10) and s.rule.startswith("minimum of the smoothed loss / 10")


def test_the_first_tenth_of_the_curve_is_left_out():
    lrs = ramp(1e-6, 1.0, 30)
    smoothed = [9.0, 0.1, 0.1] + [2.0 - 0.05 * i for i in range(25)] + [5.0, 9.0]  # settling noise, then a valley
    s = suggest(lrs, smoothed)
    assert s.minimum == pytest.approx(lrs[27]) and s.lr is not None


def test_no_suggestion_from_too_few_points_a_rising_or_a_flat_loss():
    assert suggest([1e-3, 1e-2], [1.0, 0.5]).lr is None
    rising = suggest(ramp(1e-2, 1, 6), [1, 2, 3, 4, 5, 6])
    assert rising.lr is None and "lower --start" in rising.rule
    flat = suggest(ramp(1e-6, 1, 20), [1.0 - 0.001 * i for i in range(19)] + [4.0])
    assert flat.lr is None and "fell only 1.6%" in flat.rule and "raise --steps" in flat.rule
    still_falling = suggest(ramp(1e-4, 1e-1, 6), [6, 5, 4, 3, 2, 1])
    assert still_falling.lr is not None and "raise --end" in still_falling.rule


def test_overrides_scale_param_groups_and_the_command_replaces_the_rate(tmp_path):
    config = load_config(None, ["optim.lr=0.01", "optim.param_groups=[{params: [layer4], lr: 0.002}]"])
    sets = overrides(config, 0.05)
    assert sets[0] == "optim.lr=0.05"
    assert json.loads(sets[1].split("=", 1)[1]) == [{"params": ["layer4"], "lr": 0.01}]
    command = train_command(tmp_path / "c.yaml", ["optim.lr=0.01", "train.epochs=3"], sets)
    assert command.startswith(f"finetune train --config {tmp_path / 'c.yaml'} --set train.epochs=3 "
                              "--set optim.lr=0.05 --set 'optim.param_groups=")
    assert "optim.lr=0.01" not in command


@pytest.mark.parametrize("start, end, steps, message", [
    (1.0, 0.1, 100, "empty range"), (0.0, 1.0, 100, "empty range"), (1e-3, 1e-3, 100, "empty range"),
    (1e-6, 20.0, 100, "above 10"), (1e-6, 1.0, 3, "too few")])
def test_bad_ranges(start, end, steps, message):
    with pytest.raises(FinetuneError, match=message) as error:
        check_range(start, end, steps)
    assert error.value.exit_code == 2


def _linear_sweep():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1, "initial_lr": 0.1},
                                 {"params": [model.bias], "lr": 0.05, "initial_lr": 0.05}], lr=0.1, momentum=0.9)
    fast = SimpleNamespace(model=model, head=model, device=torch.device("cpu"))
    batches = [(torch.randn(8, 4), torch.randint(3, (8,))) for _ in range(30)]
    return model, optimizer, fast, batches


def test_sweep_scales_every_group_and_restores_model_and_optimizer():
    model, optimizer, fast, batches = _linear_sweep()
    optimizer.step()  # momentum buffers exist: they must come back too
    model_before, optimizer_before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    seen = []

    def criterion(logits, targets):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return nn.functional.cross_entropy(logits, targets)

    lrs = ramp(1e-4, 1e-2, 10)
    curve = range_test(fast, optimizer, batches, criterion, lrs, base_lr=0.1)
    assert curve.lrs == lrs and len(curve.losses) == len(curve.smoothed) == 10
    assert seen == [pytest.approx([lr, lr / 2]) for lr in lrs]  # both groups, in their 2:1 ratio
    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [0.1, 0.05]
    assert all(torch.equal(optimizer_before["state"][i]["momentum_buffer"], after["state"][i]["momentum_buffer"])
               for i in after["state"])


def test_sweep_stops_when_the_loss_diverges_or_turns_nan():
    model, optimizer, fast, batches = _linear_sweep()
    curve = range_test(fast, optimizer, batches, nn.CrossEntropyLoss(), ramp(1e-3, 1e4, 30), base_lr=0.1)
    assert len(curve.lrs) < 30 and "the smoothed loss exceeded 4x its minimum" in curve.stopped  # before any NaN
    calls = iter(range(100))
    nan_at_5 = lambda logits, targets: (nn.functional.cross_entropy(logits, targets)
                                        * (math.nan if next(calls) == 5 else 1.0))
    curve = range_test(fast, optimizer, batches, nan_at_5, ramp(1e-4, 1e-3, 20), base_lr=0.1)
    assert len(curve.losses) == 5 and curve.stopped.startswith("the loss turned nan")
    assert all(math.isfinite(v) for v in curve.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cached_sweep_equals_the_sweep_from_images(tmp_path, colour_data):
    """Head-only: the cache path (one pass of the prefix, then cached epochs) gives the image path's losses."""
    results = {}
    for cache in ("auto", "off"):
        config = load_config(tiny_config(tmp_path / cache, colour_data, train={"cache_features": cache}))
        results[cache] = lr_find(config, start=1e-4, end=1.0, steps=12, output=tmp_path / cache)
    assert "feature cache" in results["auto"].source and "feature cache" not in results["off"].source
    # 12 steps of 8 from 36 images: the sweep crosses into epochs 2 and 3, served from the cache
    assert results["auto"].curve.losses == pytest.approx(results["off"].curve.losses, rel=1e-4, abs=1e-5)
    assert (tmp_path / "auto" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_with_class_weights_and_the_balanced_sampler(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, data={"sampler": "balanced"},
                                     train={"class_weights": [1, 2, 3], "label_smoothing": 0.1}))
    result = lr_find(config, start=1e-4, end=1.0, steps=8, output=tmp_path / "plot.png")
    assert len(result.curve.losses) >= 5 and (tmp_path / "plot.png").is_file()


def test_cli_head_only_json_writes_the_plot_and_no_run_directory(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data)
    result = run_cli("lr-find", "--config", str(config), "--steps", "20", "--json", "--set", "train.epochs=3",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 20 and len(report["lrs"]) == len(report["losses"]) == len(report["smoothed"])
    assert "feature cache" in report["source"] and report["groups"] == [{"lr_ratio": 1.0, "tensors": 2}]
    assert 1e-6 <= report["suggestion"] <= 1.0 and report["suggestion_rule"]
    assert report["overrides"] == [f"optim.lr={report['suggestion']:g}"]
    assert report["command"].endswith(f"--set train.epochs=3 --set optim.lr={report['suggestion']:g}")
    assert report["plot"] == str(tmp_path / "lr_find.png") and (tmp_path / "lr_find.png").is_file()
    assert not (tmp_path / "run").exists()


def test_cli_table_output(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data, freeze={"trainable": ["layer4", "fc"]}, optim={"layer_lr_decay": 0.5})
    result = run_cli("lr-find", "--config", str(config), "--steps", "12", "--start", "1e-4", "--output",
                     str(tmp_path / "pictures"))
    assert result.returncode == 0, result.stderr  # seeded fp32 sweep: it finds a descent to suggest from
    assert "param groups scale together" in result.stdout and "0.5x" in result.stdout
    assert "suggestion: optim.lr = " in result.stdout
    assert (tmp_path / "pictures" / "lr_find.png").is_file()


@pytest.mark.parametrize("args, key", [
    (["--start", "1", "--end", "0.1"], "--start 1 and --end 0.1 give an empty range"),
    (["--set", "freeze.trainable=[]"], "freeze.trainable: no parameter is trainable"),
    (["--set", "train.class_weights=[1, 2]"], "train.class_weights: has 2 weights but there are 3 classes"),
    (["--set", "train.class_weights=[1, 0, 2]"], "train.class_weights: weight 2 of 3 is 0"),
    (["--set", "data.root=null"], "data.root: is not set"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, colour_data, args, key):
    config = tiny_config(tmp_path / "config", colour_data)
    (tmp_path / "cwd").mkdir()
    result = run_cli("lr-find", "--config", str(config), "--steps", "10", *args, cwd=tmp_path / "cwd")
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "cwd").iterdir()) == []


def test_an_output_that_cannot_be_written_is_refused_before_the_test(tmp_path, colour_data):
    (tmp_path / "file.txt").write_text("not a folder\n")
    config = tiny_config(tmp_path / "config", colour_data)
    result = run_cli("lr-find", "--config", str(config), "--output", str(tmp_path / "file.txt" / "plots" / "a.png"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Cannot write the lr-find plot ({tmp_path / 'file.txt' / 'plots'}): Not a directory." in result.stderr
    assert "Choose another --output" in result.stderr and "Traceback" not in result.stderr
    assert "range test" not in result.stdout and (tmp_path / "file.txt").read_text() == "not a folder\n"
