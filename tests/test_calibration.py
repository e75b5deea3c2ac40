"""Temperature scaling as math: ECE and its bins, the LBFGS fit, cross-fitting, and what a usable temperature is.
No images, no model: logits drawn from known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.training import calibration
from finetune.training.calibration import check_temperature, cross_fit, ece, fit_temperature, nll, reliability


def sampled(n: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model."""
    generator = torch.Generator().manual_seed(seed)
    logits = spread * torch.randn(n, classes, generator=generator)
    targets = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
    return logits, targets


def test_ece_of_a_hand_made_example():
    # confidences 0.9, 0.9 (one right) and 0.7 (right): bins (13/15, 14/15] and (10/15, 11/15]
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3]])
    targets = torch.tensor([0, 0, 0])
    rows = reliability(probs, targets)
    assert len(rows) == calibration.ECE_BINS and sum(row["count"] for row in rows) == 3
    high, low = rows[13], rows[10]
    assert (high["count"], high["accuracy"], low["count"], low["accuracy"]) == (2, 0.5, 1, 1.0)
    assert high["confidence"] == pytest.approx(0.9) and low["confidence"] == pytest.approx(0.7)
    assert ece(probs, targets) == pytest.approx((2 * 0.4 + 1 * 0.3) / 3)
    assert rows[0]["accuracy"] is None and rows[0]["confidence"] is None  # an empty bin says so


def test_bins_are_closed_on_the_right():
    probs = torch.tensor([[1.0, 0.0], [1 / 15, 14 / 15]])
    rows = reliability(probs, torch.tensor([0, 1]))
    assert rows[-1]["count"] == 2  # both confidences, 1.0 and 14/15, in (14/15, 1]
    assert reliability(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))[7]["count"] == 1  # 0.5 in (7/15, 8/15]


def test_fit_finds_the_temperature_that_made_a_model_over_confident():
    logits, targets = sampled(3000, 5, 1.5, seed=0)
    temperature = fit_temperature(3 * logits, targets)
    assert temperature == pytest.approx(3, rel=0.1)
    assert nll(3 * logits, targets, temperature) < nll(3 * logits, targets, 2.5)
    assert nll(3 * logits, targets, temperature) < nll(3 * logits, targets, 3.5)


def test_an_all_correct_split_stops_at_the_bound():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]] * 5)
    targets = torch.tensor([0, 1] * 5)
    temperature = fit_temperature(logits, targets)
    assert calibration.TEMPERATURE_RANGE[0] <= temperature < 1  # sharper, never 0


def test_cross_fitting_halves_the_held_out_ece_of_an_over_confident_model():
    logits, targets = sampled(1000, 4, 1.5, seed=1)
    result = cross_fit(4 * logits, targets)
    assert result.applied and result.folds == calibration.FOLDS and result.images == 1000
    assert result.after.ece <= result.before.ece / 2
    assert result.after.nll < result.before.nll
    assert result.after.accuracy == result.before.accuracy  # a temperature changes no prediction
    assert result.temperature == pytest.approx(fit_temperature(4 * logits, targets))
    assert all(t == pytest.approx(4, rel=0.2) for t in result.fold_temperatures)


@pytest.mark.parametrize("seed", range(4))
def test_held_out_nll_is_never_worse(seed):
    logits, targets = sampled(120, 3, 1.0, seed=seed)  # calibrated already: the fit can only add noise
    result = cross_fit(logits, targets)
    assert result.after.nll <= result.before.nll
    if not result.applied:
        assert result.temperature == 1.0 and result.after == result.before and result.fitted != 1.0


def test_cross_fitting_is_deterministic_and_needs_two_images():
    logits, targets = sampled(50, 3, 2.0, seed=2)
    assert cross_fit(logits, targets).to_json() == cross_fit(logits, targets).to_json()
    assert cross_fit(logits[:3], targets[:3]).folds == 3
    with pytest.raises(ValueError):
        cross_fit(logits[:1], targets[:1])


@pytest.mark.parametrize("value", [0, -1.5, math.nan, math.inf, "2", True, None])
def test_unusable_temperatures_are_errors_naming_the_file(value):
    with pytest.raises(FinetuneError) as error:
        check_temperature(value, "runs/x/best.pt")
    assert "runs/x/best.pt" in str(error.value) and "--overwrite" in str(error.value)
    assert error.value.exit_code == 2


def test_a_usable_temperature_passes():
    assert check_temperature(2, "f") == 2.0 and check_temperature(0.25, "f") == 0.25
