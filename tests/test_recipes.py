"""Accuracy recipes: zero-init residual branches, augmentation presets, MixUp/CutMix, weight EMA, test-time
augmentation, the digits data set, and their bad inputs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import REPO, SignalAtStep, assert_same_weights, run_cli, tiny_config, weights
from torch import nn

from finetune.config.loading import load_config
from finetune.config.schema import DataConfig
from finetune.data.folders import image_files, load_datasets
from finetune.data.imagecache import plan_image_caches
from finetune.data.loaders import SeededSamples, make_loader
from finetune.data.mixing import Mixer
from finetune.deploy.artifacts import TTA_NOTE, load_trained
from finetune.deploy.tta import averaged_logits
from finetune.errors import FinetuneError
from finetune.models.build import build
from finetune.training.ema import WeightEMA, served, warm_decay
from finetune.training.metrics import correct_count
from finetune.training.reporter import Reporter
from finetune.training.run import train

# Every piece at once, on the decode threads, with layer4 training in train-mode BatchNorm.
RECIPE = dict(freeze={"trainable": ["layer4", "fc"], "batchnorm": "train"},
              data={"augment": "trivialaugment", "crop_scale": 0.35, "random_erasing": 0.5, "workers": 2},
              train={"epochs": 1, "batch_size": 6, "mixup": 0.2, "cutmix": 1.0, "mix_prob": 0.8,
                     "label_smoothing": 0.1, "class_weights": "balanced", "calibrate": True,
                     "ema": {"decay": 0.9, "use_for": "ema"}})


@pytest.fixture(scope="module")
def recipe_run(module_tmp, colour_data):
    folder = module_tmp("recipe")
    summary = train(load_config(tiny_config(folder, colour_data, **RECIPE)), Reporter())
    return folder / "run", summary


def untimed_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_recipe_run_records_the_ema_beside_the_raw_model(recipe_run):
    run_dir, summary = recipe_run
    rows = untimed_rows(run_dir)
    assert all(0 <= row["ema_val_acc"] <= 1 and row["ema_val_loss"] > 0 for row in rows)
    assert all(0 <= row["train_acc"] <= 1 for row in rows)  # soft targets count shares of an image
    assert summary["best_weights"] == "ema" and summary["best_val_acc"] == max(r["ema_val_acc"] for r in rows)
    assert summary["zero_init_residual"] is False and "residual branches as drawn" in summary["weights"]  # layer4+fc
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["serves"] == "ema" and last["ema"]["n_averaged"] == 6  # an update per step
    frozen = [name for name in last["model"] if name.startswith("layer1.") and name.endswith(("weight", "bias"))]
    assert all(torch.equal(last["ema"][f"module.{name}"], last["model"][name]) for name in frozen)
    best = load_trained(run_dir / "best.pt")  # what export, evaluate and predict load: the EMA weights
    saved = torch.load(run_dir / "best.pt", weights_only=True)["ema"]
    assert best.weights == "ema"
    assert all(torch.equal(value, saved[f"module.{name}"]) for name, value in best.model.state_dict().items())
    # train.calibrate fitted best.pt's temperature on the weights it serves: the EMA's
    calibration = summary["calibration"]
    assert best.temperature == calibration["temperature"]
    assert calibration["before"]["accuracy"] == pytest.approx(rows[-1]["ema_val_acc"])


def test_a_recipe_run_resumes_bit_for_bit(recipe_run, tmp_path, colour_data):
    parted = load_config(tiny_config(tmp_path, colour_data, **RECIPE))
    with pytest.raises(FinetuneError):
        train(parted, SignalAtStep(epoch=0, step=2))  # mid-epoch: augmentation, mixing and EMA all carry on
    train(parted, Reporter(), resume=tmp_path / "run")
    assert_same_weights(weights(tmp_path / "run"), weights(recipe_run[0]))
    ema = [torch.load(run / "last.pt", weights_only=True)["ema"] for run in (tmp_path / "run", recipe_run[0])]
    assert_same_weights(*ema)
    assert untimed_rows(tmp_path / "run") == untimed_rows(recipe_run[0])


def test_changing_the_ema_on_resume_is_refused_and_nothing_is_written(recipe_run):
    run_dir, _ = recipe_run
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "summary.json")}
    result = run_cli("train", "--resume", str(run_dir), "--set", "train.ema.decay=0.99")
    assert result.returncode == 2 and "train.ema.decay" in result.stderr and "Traceback" not in result.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_export_metadata_says_which_weights_and_that_tta_is_not_inside(recipe_run, tmp_path):
    run_dir, _ = recipe_run
    out = tmp_path / "model.state_dict.pth"
    result = run_cli("export", str(run_dir / "best.pt"), "--format", "state-dict", "--output", str(out), "--json")
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["weights"] == "ema" and meta["tta"] == TTA_NOTE


def test_evaluate_with_tta_reports_both_side_by_side_and_averages_the_flip(recipe_run, colour_data, tmp_path):
    run_dir, _ = recipe_run
    result = run_cli("evaluate", str(run_dir / "best.pt"), "--tta", "--json", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    trained = load_trained(run_dir / "best.pt")
    images, targets = next(iter(make_loader(load_datasets(trained.config).val, 100, shuffle=False)))
    with torch.inference_mode():  # calibrated (train.calibrate): softmax(logits / temperature), of each view
        plain = (trained.model(images) / trained.temperature).softmax(1)
        flipped = (plain + (trained.model(images.flip(3)) / trained.temperature).softmax(1)) / 2
    assert report["top1"] == pytest.approx((plain.argmax(1) == targets).double().mean().item())
    assert report["tta"]["mode"] == "flip"
    assert report["tta"]["top1"] == pytest.approx((flipped.argmax(1) == targets).double().mean().item())
    nll = -flipped[torch.arange(len(targets)), targets].log().mean().item()
    assert report["tta"]["loss"] == pytest.approx(nll, rel=1e-4, abs=1e-6)
    table = run_cli("evaluate", str(run_dir / "best.pt"), "--tta-mode", "five-crop", "--output-dir", str(tmp_path))
    assert table.returncode == 0, table.stderr
    assert "accuracy (top-1)" in table.stdout and "with TTA (five-crop): loss" in table.stdout


def test_predict_with_tta_averages_the_softmax_of_the_views(recipe_run, colour_data):
    run_dir, _ = recipe_run
    image = next((colour_data / "val" / "red").iterdir())
    result = run_cli("predict", str(run_dir / "best.pt"), str(image), "--tta", "--top-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    got = {p["class"]: p["prob"] for p in json.loads(result.stdout)[0]["predictions"]}
    trained = load_trained(run_dir / "best.pt")
    from finetune.data.folders import eval_transform, load_image

    x = load_image(str(image), eval_transform(DataConfig(image_size=32)))[None]
    with torch.inference_mode():
        logits = [trained.model(view) / trained.temperature for view in (x, x.flip(3))]
        expected = (logits[0].softmax(1) + logits[1].softmax(1))[0] / 2
    assert got == pytest.approx(dict(zip(trained.classes, expected.tolist())), abs=1e-6)


def test_flip_views_average_what_the_model_says_of_each():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(2, 3, 4, 4)
    expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    assert torch.allclose(averaged_logits(model, x, "flip", 4).softmax(1), expected)
    five = averaged_logits(lambda v: model(v.contiguous()), torch.randn(2, 3, 5, 5), "five-crop", 4).softmax(1)
    assert five.shape == (2, 3) and torch.allclose(five.sum(1), torch.ones(2))
    labels = (model(x).sigmoid() + model(x.flip(-1)).sigmoid()) / 2  # multi-label: each label's sigmoid averaged
    assert torch.allclose(averaged_logits(model, x, "flip", 4, multilabel=True).sigmoid(), labels, atol=1e-6)


def test_bad_recipe_keys_are_reported_together_and_nothing_is_written(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data)
    result = run_cli("train", "--config", str(config), "--set", "data.augment=trivalaugment",
                     "--set", "train.mixup=0", "--set", "train.cutmix=-1", "--set", "train.mix_prob=1.5",
                     "--set", "data.random_erasing=2", "--set", "train.ema.decay=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "6 problems" in result.stderr and "did you mean 'trivialaugment'?" in result.stderr
    for key in ("train.mixup", "train.cutmix", "train.mix_prob", "data.random_erasing", "train.ema.decay"):
        assert key in result.stderr, key
    assert not (tmp_path / "run").exists()
    assert load_config(None, ["data.augment=false"]).data.augment == "none"


def test_bad_tta_is_refused_before_anything_is_written(recipe_run, tmp_path):
    run_dir, _ = recipe_run
    result = run_cli("evaluate", str(run_dir / "best.pt"), "--tta-mode", "five-crap", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "Unknown --tta-mode 'five-crap'; did you mean 'five-crop'?" in result.stderr
    # An export that runs one image at a time cannot run a batch of views.
    trained = load_trained(run_dir / "best.pt")

    class OneAtATime(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            if x.shape[0] != 1:
                raise RuntimeError("this model takes batches of exactly 1 image")
            return self.model(x)

    meta = {"classes": trained.classes, "image_size": 32, "config": trained.config.model_dump(mode="json")}
    path = tmp_path / "one.torchscript.pt"
    torch.jit.save(torch.jit.script(OneAtATime(trained.model)), str(path),
                   _extra_files={"finetune.json": json.dumps(meta)})
    result = run_cli("evaluate", str(path), "--tta", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and f"{path} cannot run it" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["trivialaugment", "randaugment", "augmix"])
def test_presets_on_decode_threads_and_the_image_cache_equal_the_main_thread(tmp_path, colour_data, preset):
    config = load_config(tiny_config(tmp_path, colour_data, data={"augment": preset, "random_erasing": 0.5,
                                                                 "cache_images": "on"}))
    data = load_datasets(config)
    caches = plan_image_caches(config, data, feature_cached=(), epochs_left=2, folder=tmp_path)
    cache = caches.get("train")
    epoch = lambda workers, e, cache=None: list(make_loader(SeededSamples(data.train, 0), 8, shuffle=True,  # noqa: E731
                                                             epoch=e, workers=workers, cache=cache))
    alone = [epoch(0, e) for e in (0, 1)]
    threaded = [epoch(2, e, cache) for e in (0, 1)]  # epoch 1 reads the cache epoch 0 filled
    for a, b in zip(sum(alone, []), sum(threaded, [])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(alone[0][0][0], alone[1][0][0])  # another epoch, other augmentations
    files, _ = image_files(data.train)
    assert cache.filled
    for index in cache.filled:  # the decoded pixels, never augmented ones
        assert (cache.get(index) == files.pipeline.decode(files.samples[index][0])).all()
    caches.close()


def test_mixing_gives_soft_targets_seeded_per_batch():
    config = load_config(None, ["train.mixup=0.4", "train.cutmix=1.0"])
    mixer = Mixer(config.train, num_classes=4)
    images, targets = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, soft = mixer(images, targets, epoch=0, batch=0)
    assert soft.shape == (6, 4) and torch.allclose(soft.sum(1), torch.ones(6))
    assert not torch.equal(mixed, images) and (soft.max(1).values < 1).any()
    again = mixer(images, targets, epoch=0, batch=0)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)
    assert not torch.equal(mixer(images, targets, epoch=0, batch=1)[0], mixed)
    config.train.mix_prob = 0
    plain, one_hot = Mixer(config.train, num_classes=4)(images, targets, epoch=0, batch=0)
    assert torch.equal(plain, images) and torch.equal(one_hot, nn.functional.one_hot(targets, 4).float())
    logits = torch.tensor([[2.0, 1.0, 0, 0], [0, 3.0, 0, 0]])
    assert correct_count(logits, torch.tensor([[0.7, 0.3, 0, 0], [0.6, 0.4, 0, 0]])) == pytest.approx(1.1)
    assert correct_count(logits, torch.tensor([0, 0])) == 1
    # multi-label: multi-hot rows are mixed with the images' weights
    hot = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    config.train.mix_prob, config.train.cutmix = 1.0, None
    _, mixed_hot = Mixer(config.train, num_classes=4)(images, hot, epoch=0, batch=0)
    weight = mixed_hot[0, 0]  # image 0 mixed with image 5 (the batch shifted by one): weight * row 0 + ... row 5
    assert torch.allclose(mixed_hot, weight * hot + (1 - weight) * hot.roll(1, 0))


def test_inspect_grads_holds_for_soft_targets_and_zero_started_branches(tmp_path, colour_data):
    config = tiny_config(tmp_path, colour_data, freeze={"default": "trainable"},  # whole: branches start at zero
                         train={"mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1})
    result = run_cli("inspect-grads", "--config", str(config), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and "soft targets" in report["data"]
    checks = {check["name"]: check["detail"] for check in report["checks"]}
    assert "(32 of them zero: inside residual branches that start at zero" in \
        checks["trainable gradients are finite and non-zero"]  # 8 blocks x conv1, bn1 (2), conv2
    zero = {row["name"] for row in report["parameters"] if row["grad_norm"] == 0}
    assert zero == {f"layer{layer}.{b}.{name}" for layer in (1, 2, 3, 4) for b in (0, 1)
                    for name in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight")}


def test_ema_is_torchs_average_with_warmup_and_keeps_frozen_tensors_exact():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    config = load_config(None, ["train.ema.decay=0.5"]).train.ema
    ema = WeightEMA(model, config)
    expected = model[0].weight.detach().clone()
    for updates in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 3))  # BatchNorm statistics move: they are averaged too
        ema.update(model)
        decay = warm_decay(0.5, updates, warmup=True) if updates else 0  # torch's first update copies
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, expected)
    assert torch.equal(ema.module[0].bias, model[0].bias)
    assert not torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert warm_decay(0.999, 0, True) == 0.1 and warm_decay(0.999, 10**6, True) == 0.999
    assert warm_decay(0.999, 0, False) == 0.999
    use = lambda choice: load_config(None, [f"train.ema.use_for={choice}"]).train.ema  # noqa: E731
    assert served(use("best"), 0.8, 0.9) == "ema" and served(use("best"), 0.9, 0.9) == "raw"
    assert served(use("raw"), 0.1, 0.9) == "raw" and served(use("ema"), 0.9, 0.1) == "ema"
    assert served(None, 0.1, None) == "raw" and served(use("best"), None, 0.9) == "raw"


def test_random_init_starts_residual_branches_at_zero_when_the_whole_network_trains(tmp_path, resnet_state):
    blocks = lambda model: [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4)  # noqa: E731
                            for block in layer]
    whole = ["model.weights=none", "model.num_classes=3", "freeze.default=trainable"]
    random_init = build(load_config(None, whole))
    assert random_init.weights.zero_init_residual
    assert random_init.weights.source.endswith("random init), residual branches start at zero")
    assert all(not block.bn2.weight.any() for block in blocks(random_init.model))
    assert all(block.bn1.weight.all() for block in blocks(random_init.model))
    # Only when the whole network trains: with layer4 frozen (the quick start) or head-only, nothing starts at zero
    for frozen in (["freeze.frozen=[layer4]"], ["freeze.default=frozen", "freeze.trainable=[head]"]):
        part = build(load_config(None, [*whole, *frozen]))
        assert not part.weights.zero_init_residual and all(b.bn2.weight.all() for b in blocks(part.model))
        assert "residual branches as drawn (they start at zero only when the whole network trains)" in \
            part.weights.source
    staged = build(load_config(None, [*whole, "freeze.default=frozen", "freeze.trainable=[head]", "train.epochs=2",
                                      "freeze.stages=[{epoch: 2, trainable: ['*']}]"]))  # the rest from epoch 2
    assert staged.weights.zero_init_residual and not any(b.bn2.weight.any() for b in blocks(staged.model))
    off = build(load_config(None, [*whole, "model.zero_init_residual=false"]))
    assert not off.weights.zero_init_residual and all(block.bn2.weight.all() for block in blocks(off.model))
    pretrained = build(load_config(None, [f"model.weights={resnet_state}", "model.num_classes=3"]))
    assert not pretrained.weights.zero_init_residual
    state = torch.load(resnet_state, weights_only=True)
    assert torch.equal(pretrained.model.layer1[0].bn2.weight, state["layer1.0.bn2.weight"])


def test_digits_script_writes_the_issues_split(tmp_path):
    spec = importlib.util.spec_from_file_location("digits", REPO / "scripts" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    splits = digits.split_digits(seed=0)
    assert {split: len(images) for split, (images, _, _) in splits.items()} == {"train": 1437, "val": 360}
    assert sorted(set(splits["val"][1].tolist())) == list(range(10))
    assert splits["train"][0].dtype.name == "uint8" and splits["train"][0].max() == 255
    few = {split: tuple(part[:3] for part in values) for split, values in splits.items()}
    assert digits.write_tree(tmp_path / "digits", few, image_size=32) == {"train": 3, "val": 3}
    written = sorted((tmp_path / "digits").rglob("*.png"))
    assert len(written) == 6 and all(path.parent.parent.name in ("train", "val") for path in written)


def test_multilabel_mixes_multi_hot_targets_keeps_an_ema_and_averages_each_labels_sigmoid(tmp_path):
    made = run_cli("make-dataset", "shapes", str(tmp_path / "data"), "--multilabel", "--classes", "3",
                   "--train-per-class", "4", "--val-per-class", "2", "--image-size", "32")
    assert made.returncode == 0, made.stderr
    config = tiny_config(tmp_path, tmp_path / "data", model={"task": "multilabel", "weights": "none"},
                         data={"labels": str(tmp_path / "data" / "labels.csv")},
                         train={"epochs": 1, "batch_size": 4, "mixup": 0.4, "cutmix": 1.0,
                                "ema": {"decay": 0.9, "use_for": "ema"}})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert 0 <= row["train_exact_match"] <= 1 and 0 <= row["ema_val_map"] <= 1 and "ema_val_map" in result.stdout
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["serves"] == "ema" and len(best["thresholds"]) == 3  # the EMA's thresholds, chosen on validation
    evaluated = run_cli("evaluate", str(tmp_path / "run" / "best.pt"), "--tta", "--json",
                        "--output-dir", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert {"map", "micro_f1", "macro_f1", "exact_match", "loss"} <= report["tta"].keys()
    predicted = run_cli("predict", str(tmp_path / "run" / "best.pt"), str(tmp_path / "data" / "images"), "--tta",
                        "--json")
    assert predicted.returncode == 0, predicted.stderr
