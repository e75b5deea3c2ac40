"""Imbalanced classes: loss weights, sampling weights, the balanced sampler and the warning."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from finetune.data.loaders import drops_last, epoch_sampler, make_loader
from finetune.training.losses import (
    class_counts,
    class_weights,
    imbalance_warning,
    problems,
    sampling_weights,
)

TARGETS = [0] * 60 + [1] * 30 + [2] * 10  # 6:3:1


def test_class_weights():
    assert class_weights("none", TARGETS, 3) is None
    balanced = class_weights("balanced", TARGETS, 3)
    assert balanced.mean().item() == pytest.approx(1.0)
    assert (balanced * torch.tensor(class_counts(TARGETS, 3), dtype=torch.float32)).tolist() == pytest.approx(
        [balanced[0].item() * 60] * 3)  # weight x count is the same for every class
    assert balanced.tolist() == pytest.approx([1 / 3, 2 / 3, 2])
    assert class_weights([1, 2.5, 4], TARGETS, 3).tolist() == [1.0, 2.5, 4.0]


def test_sampling_weights_give_every_class_the_same_total():
    assert sampling_weights("shuffle", TARGETS, 3) is None
    weights = sampling_weights("balanced", TARGETS, 3)
    totals = [weights[torch.tensor(TARGETS) == c].sum().item() for c in range(3)]
    assert totals == pytest.approx([1.0, 1.0, 1.0])


def test_balanced_sampler_draws_classes_equally_and_repeats_for_seed_and_epoch():
    weights = sampling_weights("balanced", TARGETS, 3)
    draws = lambda **kw: list(epoch_sampler(len(TARGETS), shuffle=True, weights=weights, **kw))
    assert draws(seed=1, epoch=2) == draws(seed=1, epoch=2)
    assert draws(seed=1, epoch=2) != draws(seed=1, epoch=3) != draws(seed=2, epoch=2)
    assert len(draws(seed=0, epoch=0)) == len(TARGETS)  # as many steps per epoch as the plain shuffle
    counts = Counter(TARGETS[i] for epoch in range(50) for i in draws(seed=0, epoch=epoch))
    assert all(abs(counts[c] / 5000 - 1 / 3) < 0.03 for c in range(3)), counts


def test_balanced_sampler_shards_like_distributed_sampler_and_skips():
    weights = sampling_weights("balanced", TARGETS, 3)
    whole = list(epoch_sampler(len(TARGETS), shuffle=True, seed=3, epoch=1, weights=weights, world=1))
    shards = [list(epoch_sampler(len(TARGETS), shuffle=True, seed=3, epoch=1, weights=weights, rank=r, world=3))
              for r in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]  # ceil(100 / 3) each, as DistributedSampler gives
    plain = [len(list(epoch_sampler(len(TARGETS), shuffle=True, rank=r, world=3))) for r in range(3)]
    assert plain == [34, 34, 34]
    assert whole == list(epoch_sampler(len(TARGETS), shuffle=True, seed=3, epoch=1, weights=weights))
    assert list(epoch_sampler(len(TARGETS), shuffle=True, seed=3, epoch=1, weights=weights, skip=40)) == whole[40:]
    interleaved = [shards[r][i] for i in range(34) for r in range(3)]
    assert len(set(interleaved)) > 40  # the shards are different draws, not copies


def test_make_loader_uses_the_weights():
    dataset = torch.utils.data.TensorDataset(torch.tensor(TARGETS))
    weights = sampling_weights("balanced", TARGETS, 3)
    loader = make_loader(dataset, 10, shuffle=True, seed=0, epoch=4, weights=weights)
    got = [int(x) for (batch,) in loader for x in batch]
    expected = [TARGETS[i] for i in epoch_sampler(len(TARGETS), shuffle=True, seed=0, epoch=4, weights=weights)]
    assert got == expected
    assert not drops_last(len(TARGETS), 10, shuffle=True)


def test_warning_at_three_times_and_above():
    classes = ["a", "b", "c"]
    text = imbalance_warning(TARGETS, classes)
    assert "'a' has 60" in text and "'c' 10" in text and "6.0x" in text
    assert "train.class_weights=balanced" in text and "data.sampler=balanced" in text
    assert imbalance_warning([0] * 30 + [1] * 10, ["a", "b"]) is not None  # exactly 3x
    assert imbalance_warning([0] * 29 + [1] * 10, ["a", "b"]) is None


def test_problems_need_one_weight_per_class():
    config = lambda weights: SimpleNamespace(train=SimpleNamespace(class_weights=weights))
    assert problems(config([1, 2, 3]), 3) == []
    assert problems(config("balanced"), 3) == []
    [(key, message)] = problems(config([1, 2]), 3)
    assert key == "train.class_weights" and "2 weights but there are 3 classes" in message


def test_config_keys_and_their_errors():
    from finetune.config.loading import load_config
    from finetune.errors import FinetuneError

    config = load_config(None, [])
    assert config.train.class_weights == "none" and config.data.sampler == "shuffle"
    config = load_config(None, ["train.class_weights=[1, 2.5]", "data.sampler=balanced"])
    assert config.train.class_weights == [1.0, 2.5] and config.data.sampler == "balanced"
    for value, message in (("[1, 0]", "weight 2 of 2 is 0"), ("[1, -3]", "weight 2 of 2 is -3"),
                           ("[]", "must be none, balanced, or a list"), ("inverse", "must be none, balanced"),
                           ("[1, .inf]", "weight 2 of 2 is inf"), ("[true, 1]", "weight 1 of 2 is True")):
        with pytest.raises(FinetuneError, match="--set train.class_weights  train.class_weights: ") as error:
            load_config(None, [f"train.class_weights={value}"])
        assert message in str(error.value)
    with pytest.raises(FinetuneError, match="data.sampler: Input should be 'shuffle' or 'balanced'"):
        load_config(None, ["data.sampler=weighted"])


def test_feature_source_serves_the_balanced_order_from_images_and_from_the_cache(tmp_path, colour_data):
    """The cached path (filled first, in the plain order) gives the very batches the image path gives."""
    from helpers import tiny_config

    from finetune.config.loading import load_config
    from finetune.data.folders import image_samples, load_datasets
    from finetune.models.build import build
    from finetune.models.fastpath import FastModel, FeatureSource

    config = load_config(tiny_config(tmp_path, colour_data, data={"sampler": "balanced"}))
    data = load_datasets(config)
    data.train = torch.utils.data.Subset(data.train, list(range(20)))  # 12 blue, 8 green, no red
    targets = [t for _, t in image_samples(data.train)]
    weights = sampling_weights("balanced", targets, 3)
    built = build(config, data.classes, show_download=False)
    fast = FastModel(built.model.eval(), built.arch, built.plan, built.bn_modes, "fp32")
    source = lambda cache: FeatureSource(fast, data.train, 8, shuffle=True, seed=0, workers=0, weights=weights,
                                         cache_bytes=2**30 if cache else None, folder=tmp_path)
    plain, cached = source(False), source(True)
    for epoch in (0, 1):
        indices = list(epoch_sampler(20, shuffle=True, seed=0, epoch=epoch, weights=weights))
        assert len(set(indices)) < 20  # weighted draws with replacement, not a permutation
        expected = [targets[i] for i in indices]
        got_plain = list(plain.epoch(epoch))
        got_cached = list(cached.epoch(epoch))
        assert [int(t) for _, y in got_plain for t in y] == expected
        assert [int(t) for _, y in got_cached for t in y] == expected
        for (a, _), (b, _) in zip(got_plain, got_cached):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cached.cache_complete


@pytest.mark.parametrize("trainable", [["fc"], ["layer4", "fc"]], ids=["head-from-cache", "layer4-from-images"])
def test_balanced_training_resumes_exactly(tmp_path, colour_data, trainable):
    """data.sampler: balanced and train.class_weights: balanced keep the exact-resume guarantee."""
    import json

    from helpers import assert_same_weights, interrupt, tiny_config, weights

    from finetune.config.loading import load_config
    from finetune.training.reporter import Reporter
    from finetune.training.run import train

    overrides = dict(freeze={"trainable": trainable}, data={"sampler": "balanced"},
                     train={"epochs": 3, "batch_size": 6, "class_weights": "balanced"})
    train(load_config(tiny_config(tmp_path / "whole", colour_data, **overrides)), Reporter())
    parted = load_config(tiny_config(tmp_path / "parted", colour_data, **overrides))
    interrupt(train, parted, epoch=1, step=2)
    train(parted, Reporter(), resume=tmp_path / "parted" / "run")
    assert_same_weights(weights(tmp_path / "parted" / "run"), weights(tmp_path / "whole" / "run"))
    rows = [json.loads(line) for line in (tmp_path / "whole" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_balanced_acc", "val_macro_f1"} <= row.keys() for row in rows)
