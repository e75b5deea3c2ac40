"""The fast paths give the plain path's results: frozen prefix, channels-last, feature cache, bf16."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import Messages, assert_same_weights, interrupt, tiny_config, weights

from finetune.config.loading import load_config
from finetune.errors import FinetuneError
from finetune.models import fastpath
from finetune.models.arch import get_arch
from finetune.models.build import build
from finetune.models.fastpath import FastModel, cache_plan, frozen_prefix_length
from finetune.models.freeze import set_train_mode
from finetune.training import run as engine
from finetune.training.optim import build_optimizer
from finetune.training.reporter import Reporter

CLASSES = ["blue", "green", "red"]


def built_for(tmp_path, colour_data, **freeze):
    return build(load_config(tiny_config(tmp_path, colour_data, freeze=freeze)), CLASSES)


def test_stages_chain_equals_the_model(tmp_path, colour_data):
    model = built_for(tmp_path, colour_data).model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = x
    for _, module in get_arch("resnet18").stages(model):
        out = module(out)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("freeze, split, first_trainable", [
    ({"trainable": ["fc"]}, 14, "fc"),
    ({"trainable": ["layer4", "fc"]}, 10, "layer4.0"),
    ({"trainable": ["layer4.1", "fc"]}, 11, "layer4.1"),
    ({"default": "trainable", "trainable": []}, 0, "conv1"),
])
def test_frozen_prefix_ends_before_the_first_trainable_parameter(tmp_path, colour_data, freeze, split,
                                                                  first_trainable):
    built = built_for(tmp_path, colour_data, **freeze)
    chain = built.arch.stages(built.model)
    assert frozen_prefix_length(chain, built.plan) == split
    assert chain[split][0] == first_trainable


@pytest.mark.parametrize("freeze", [{"trainable": ["fc"]}, {"trainable": ["layer4", "fc"]},
                                    {"trainable": ["layer3", "fc"], "batchnorm": "train"}],
                         ids=["head-only", "layer4+fc", "layer3+fc-bn-train"])
def test_fast_steps_equal_plain_steps(tmp_path, colour_data, freeze):
    """A few SGD steps through FastModel give the plain model's weights (float tolerance)."""
    config = load_config(tiny_config(tmp_path, colour_data, freeze=freeze))
    built = build(config, CLASSES)
    plain = copy.deepcopy(built.model)
    fast = FastModel(built.model, built.arch, built.plan, built.bn_modes, "fp32")
    assert fast.split > 0
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 32, 32, generator=generator), torch.randint(3, (6,), generator=generator))
               for _ in range(3)]
    for model, forward in ((plain, plain), (built.model, fast)):
        optimizer = build_optimizer(model, config.optim, built.arch)
        set_train_mode(model, built.bn_modes)
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(forward(x), y).backward()
            optimizer.step()
    for (name, a), b in zip(plain.state_dict().items(), built.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_prefix_builds_no_graph(tmp_path, colour_data):
    built = built_for(tmp_path, colour_data, trainable=["layer4", "fc"])
    fast = FastModel(built.model, built.arch, built.plan, built.bn_modes, "fp32")
    features = fast.features(torch.randn(2, 3, 32, 32))
    assert features.grad_fn is None and not features.requires_grad
    assert fast.head(features).grad_fn is not None


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"])
def test_a_frozen_prefix_runs_with_batchnorm_folded_into_its_convolutions(arch):
    """The prefix runs as one copy without BatchNorm layers, the same function up to float rounding; the model's
    own weights and modules are untouched (its state dict is what checkpoints save)."""
    config = load_config(None, [f"model.arch={arch}", "model.weights=none", "data.image_size=32"])
    built = build(config, CLASSES)
    before = copy.deepcopy(built.model.state_dict())
    fast = FastModel(built.model, built.arch, built.plan, built.bn_modes, "fp32", image_size=32)
    set_train_mode(built.model, built.bn_modes)
    assert fast.prefix_deterministic and fast.folded and len(fast.prefix_run) == 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.prefix_run[0].modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = x
        for _, module in fast.prefix:
            plain = module(plain)
    torch.testing.assert_close(fast.features(x), plain, rtol=1e-5, atol=1e-5)
    assert_same_weights(built.model.state_dict(), before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for _, stage in fast.prefix for m in stage.modules())


def test_a_prefix_with_train_mode_batchnorm_is_not_folded(tmp_path, colour_data):
    """freeze.batchnorm: train updates the frozen layers' statistics: the prefix runs as the model's own modules."""
    built = built_for(tmp_path, colour_data, trainable=["layer4", "fc"], batchnorm="train")
    fast = FastModel(built.model, built.arch, built.plan, built.bn_modes, "fp32")
    assert not fast.prefix_deterministic and not fast.folded
    assert fast.prefix_run == [module for _, module in fast.prefix]


def test_cache_auto_turns_off_with_augmentation_or_train_mode_batchnorm(tmp_path, colour_data):
    def plan(*sets, **freeze):
        config = load_config(tiny_config(tmp_path, colour_data, freeze=freeze), list(sets))
        built = build(config, CLASSES)
        return cache_plan(config, built.arch, built.model, built.plan, built.bn_modes)

    head_only = plan()
    assert head_only.splits == ["train", "val"] and head_only.why.startswith("on (")
    augmented = plan("data.augment=true")
    assert (augmented.train, augmented.val) == (False, True) and "data.augment" in augmented.why
    assert "on for validation" in augmented.why and augmented.splits == ["val"]
    assert plan("train.cache_features='off'").splits == []
    bn_train = plan(batchnorm="train")
    assert bn_train.splits == [] and "freeze.batchnorm" in bn_train.why
    everything = plan(default="trainable", trainable=[])
    assert everything.splits == [] and "nothing is frozen" in everything.why


def run(tmp_path, colour_data, name, reporter=None, **sections):
    config = load_config(tiny_config(tmp_path / name, colour_data, **sections))
    engine.train(config, reporter or Reporter())
    run_dir = tmp_path / name / "run"
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return state, rows, run_dir


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    # Cached features were computed in other batches than the later epochs' images would be: float32
    # rounding differs in the last bits (3e-6 of ResNet-18's features at 32 px) and grows over epochs of training.
    a, b = a.double(), b.double()
    assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-6, name


@pytest.mark.parametrize("freeze, augment", [({"trainable": ["fc"]}, False), ({"trainable": ["layer4", "fc"]}, False),
                                             ({"trainable": ["fc"]}, True)],
                         ids=["head-only", "layer4+fc", "head-only-augmented"])
def test_cached_run_equals_uncached_run(tmp_path, colour_data, freeze, augment):
    """With augmentation only the validation features can be cached (auto does so); training reads the images."""
    # 36 images: a lone last sample the training batches drop. Two epochs: the second reads the cache. (After a third
    # the runs can drift apart by up to 1% of a weight tensor: training amplifies the last-bit differences, more on
    # some trajectories than others.)
    train = {"epochs": 2, "batch_size": 5}
    messages = Messages()
    cached, cached_rows, cached_dir = run(tmp_path, colour_data, "cached", messages, freeze=freeze,
                                          data={"augment": augment},
                                          train={**train, "cache_features": "auto" if augment else "on"})
    plain, plain_rows, _ = run(tmp_path, colour_data, "plain", freeze=freeze, data={"augment": augment},
                               train={**train, "cache_features": "off"})
    for name in plain:
        assert_close_to_scale(cached[name], plain[name], name)
    for a, b in zip(cached_rows, plain_rows):
        assert a["val_acc"] == b["val_acc"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    if augment:
        assert any("feature cache off (data.augment is on" in line and "on for validation" in line
                   for line in messages.lines)
        assert any(line.startswith("feature cache: val ") for line in messages.lines)
    else:
        assert any("feature cache on" in line for line in messages.lines)
        assert any(line.startswith("feature cache: train ") for line in messages.lines)
    assert any("MiB in memory" in line for line in messages.lines)
    assert not list(cached_dir.glob("feature-cache-*"))


def test_cache_spills_to_a_memory_mapped_file_and_cleans_it_up(tmp_path, colour_data):
    messages = Messages()
    in_memory, _, _ = run(tmp_path, colour_data, "memory", train={"epochs": 2, "cache_features": "on"})
    on_disk, _, run_dir = run(tmp_path, colour_data, "disk", messages,
                              train={"epochs": 2, "cache_features": "on", "cache_max_gb": 0})
    assert any("memory-mapped file" in line for line in messages.lines)
    assert not list(run_dir.glob("feature-cache-*"))
    for name in in_memory:
        assert torch.equal(in_memory[name], on_disk[name]), name


def test_cache_on_with_augmentation_is_a_config_error(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, data={"augment": True}, train={"cache_features": "on"}))
    with pytest.raises(FinetuneError, match="train.cache_features.*data.augment"):
        engine.train(config, Reporter())
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resumed_cached_run_equals_uninterrupted(tmp_path, colour_data):
    sections = dict(freeze={"trainable": ["layer4", "fc"]}, train={"epochs": 3, "batch_size": 5})
    whole, _, _ = run(tmp_path, colour_data, "whole", **sections)
    config = load_config(tiny_config(tmp_path / "parted", colour_data, **sections))
    interrupt(engine.train, config, epoch=0, step=3)  # inside the epoch that fills the cache
    engine.train(config, Reporter(), resume=tmp_path / "parted" / "run")
    parted = torch.load(tmp_path / "parted" / "run" / "last.pt", weights_only=True)["model"]
    assert_same_weights(parted, whole)


def test_bf16_runs_end_to_end_and_learns(tmp_path, colour_data):
    state, rows, _ = run(tmp_path, colour_data, "bf16", train={"epochs": 3, "precision": "bf16"})
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())
    assert rows[-1]["val_acc"] >= 0.9
    full, rows, _ = run(tmp_path, colour_data, "bf16-full", train={"epochs": 1, "precision": "bf16"},
                        freeze={"default": "trainable", "trainable": [], "batchnorm": "train"})
    assert all(torch.isfinite(t).all() for t in full.values() if t.is_floating_point())


@pytest.mark.parametrize("setting, arch, precision, deterministic, images, size, compiles, why", [
    ("auto", "resnet18", "fp32", True, 1_797, 32, False, "auto: 1,797 images at 32 px would not win back "
                                                         "torch.compile's 13 s"),
    ("auto", "resnet18", "fp32", True, 5_000, 224, False, "auto: 5,000 images at 224 px would not win back"),
    ("auto", "resnet18", "fp32", True, 10**6, 32, True, "auto: ResNet at 32 px runs 1.47x as fast compiled"),
    ("auto", "resnet18", "fp32", True, 10**6, 128, True, "auto: ResNet at 128 px runs 1.34x as fast compiled"),
    ("auto", "mobilenet_v3_large", "fp32", True, 10**6, 224, True, "auto: MobileNetV3 at 224 px runs 1.18x"),
    ("auto", "convnext_tiny", "fp32", True, 10**6, 224, False, ""),  # no gain once memory is reused
    ("auto", "convnext_tiny", "bf16", True, 10**6, 224, False, ""),  # measured in fp32 only
    ("auto", "swin_t", "fp32", True, 10**6, 224, False, ""),  # its gain varied from run to run
    ("on", "swin_t", "fp32", True, 10, 24, True, "train.compile: on"),
    ("on", "resnet18", "fp32", False, 10, 24, False, "frozen BatchNorm or dropout runs in train mode"),
    ("off", "convnext_tiny", "fp32", True, 10**6, 224, False, ""),
])
def test_compile_auto_compiles_the_families_that_gain_when_the_run_wins_the_compile_time_back(
        setting, arch, precision, deterministic, images, size, compiles, why):
    from finetune.models.fastpath import compile_decision

    decided = compile_decision(setting, get_arch(arch), precision, deterministic, True, images, size)
    assert decided[0] is compiles and decided[1].startswith(why) and bool(decided[1]) == bool(why)


def test_the_compile_gain_is_the_measured_one_at_the_sizes_measured_and_between_them():
    from finetune.models.fastpath import CompileGain

    gain = CompileGain(10.0, (1000.0, 1.5), (20.0, 1.1))
    assert gain.at(32) == pytest.approx((1 / 1000, 1.5)) and gain.at(224) == pytest.approx((1 / 20, 1.1))
    seconds, speedup = gain.at(160)  # the time per image grows with the pixels, the speed-up moves between the two
    assert 1 / 1000 < seconds < 1 / 20 and 1.1 < speedup < 1.5
    assert gain.at(448)[0] > 1 / 20 and gain.at(448)[1] == pytest.approx(1.1)  # held beyond the sizes measured
    assert 0 <= gain.at(8)[0] < 1 / 1000 and gain.at(8)[1] == pytest.approx(1.5)


# The prefix: RegNetY-400MF's stem, the cheapest prefix to compile, in the default layout on every CPU: the layout
# rule for AVX2 CPUs, which keeps RegNet's training at 32 px in it (AVX-512 ones train it channels-last).
COMPILED = dict(model={"arch": "regnet_y_400mf"}, freeze={"trainable": ["trunk_output", "head"]},
                train={"epochs": 2, "compile": "on"})


@pytest.fixture
def avx2_layout(monkeypatch):
    monkeypatch.setattr(fastpath, "kernel_class", lambda: "AVX2")


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                    reason="torch.compile's inductor needs a C++ compiler")
def test_a_compiled_prefix_never_recompiles_resumes_exactly_and_trains_as_the_eager_one(tmp_path, colour_data,
                                                                                         avx2_layout):
    """train.compile: on compiles the frozen stem (BatchNorm folded) for the 8-image training batch; the last,
    smaller batches run it eagerly: one graph. An interrupted run resumes to the uninterrupted one's weights, bit for
    bit, and both end where the eager run does, within rounding."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    messages = Messages()
    config = load_config(tiny_config(tmp_path / "a", colour_data, **COMPILED))
    engine.train(config, messages)
    line = next(text for text in messages.lines if text.startswith("frozen prefix:"))
    if "its outputs differ from the prefix's own" in line:  # the check below caught a wrong compile
        pytest.skip(f"torch.compile gives wrong outputs on this CPU ({line}); the fallback has its own test")
    assert "stem .. stem (no autograd, BatchNorm folded; compiled in " in line
    assert line.split("compiled in ")[1].startswith(tuple("0123456789")) and ", train.compile: on)" in line
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # 36 train / 12 val images: 8 and 4
    resumed = load_config(tiny_config(tmp_path / "b", colour_data, **COMPILED))
    interrupt(engine.train, resumed, epoch=1, step=2)
    engine.train(resumed, Reporter(), resume=tmp_path / "b" / "run")
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run"))
    eager = {**COMPILED, "train": {"epochs": 2, "compile": "off"}}
    engine.train(load_config(tiny_config(tmp_path / "c", colour_data, **eager)), Reporter())
    a, c = weights(tmp_path / "a" / "run"), weights(tmp_path / "c" / "run")
    for name in a:
        torch.testing.assert_close(a[name], c[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_compiled_prefix_with_other_outputs_is_not_used(tmp_path, colour_data, monkeypatch, avx2_layout):
    """With torch's kernels capped to AVX2 inductor's convolutions gave NaN and 1e21: a compiled prefix whose
    outputs differ from the eager one's is dropped, and the run is the eager run, bit for bit."""
    monkeypatch.setattr(torch, "compile", lambda module, **options: lambda x: module(x) * 2)
    messages = Messages()
    engine.train(load_config(tiny_config(tmp_path / "a", colour_data, **COMPILED)), messages)
    line = next(text for text in messages.lines if text.startswith("frozen prefix:"))
    assert ("not compiled, torch.compile failed: on this CPU its outputs differ from the prefix's own (largest "
            "difference 1.0e+00 of the largest output)") in line
    eager = {**COMPILED, "train": {"epochs": 2, "compile": "off"}}
    engine.train(load_config(tiny_config(tmp_path / "b", colour_data, **eager)), Reporter())
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run"))


def test_a_failed_compile_leaves_the_prefix_eager_and_says_why(tmp_path, colour_data, monkeypatch, avx2_layout):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    messages = Messages()
    summary = engine.train(load_config(tiny_config(tmp_path, colour_data, **COMPILED)), messages)
    line = next(text for text in messages.lines if text.startswith("frozen prefix:"))
    assert "not compiled, torch.compile failed: RuntimeError: no C++ compiler found" in line
    assert summary["epochs_done"] == 2


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                    reason="torch.compile's inductor needs a C++ compiler")
def test_the_compiled_prefix_holds_the_frozen_weights_as_constants(tmp_path, colour_data):
    """Inductor's freezing, where the compiled prefix's speed comes from (weights packed once, not on every call):
    changing the weights after the compile changes the eager prefix's outputs, not the compiled one's."""
    config = load_config(tiny_config(tmp_path, colour_data, **COMPILED))
    built = build(config, CLASSES)
    fast = FastModel(built.model, built.arch, built.plan, built.bn_modes, "fp32", image_size=32)
    fast.compile_prefix((4, 3, 32, 32))
    assert fast.compile_error == ""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = fast.features(x)
    (compiled,) = fast.prefix_run
    with torch.no_grad():
        for parameter in compiled.eager.parameters():
            parameter.mul_(2)
    assert torch.equal(fast.features(x), before)
    assert not torch.allclose(compiled.eager(x), before)


def test_a_resumed_run_decides_train_compile_on_its_phase_s_whole_epochs(tmp_path, colour_data, monkeypatch):
    """auto counts the images of the whole freeze phase, not of the epochs left, so a run resumed within a phase
    decides as the run it continues (a compiled and an eager prefix differ in rounding: a resume would not be
    exact)."""
    from finetune.training.setup import Setup

    seen, phase = [], Setup.phase

    def recording(self, plan, folder, image_caches=None, epochs=0):
        seen.append(epochs)
        return phase(self, plan, folder, image_caches, epochs=epochs)

    monkeypatch.setattr(Setup, "phase", recording)
    config = load_config(tiny_config(tmp_path, colour_data, train={"epochs": 4},
                                     freeze={"trainable": ["fc"], "stages": [{"epoch": 2, "trainable": ["layer4"]}]}))
    interrupt(engine.train, config, epoch=2, step=1)  # in the third epoch: the second phase's second
    assert seen == [1, 3]
    engine.train(config, Reporter(), resume=tmp_path / "run")
    assert seen == [1, 3, 3]


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                    reason="torch.compile's inductor needs a C++ compiler")
def test_a_bf16_prefix_compiles_and_is_checked_to_bf16_rounding(tmp_path, colour_data):
    """train.compile: on in bf16: the compiled prefix rounds elsewhere than the eager one (by a few of bf16's 8-bit
    steps), which the check allows; it stays within that of the eager outputs and is used."""
    freeze = {"trainable": ["layer2", "layer3", "layer4", "fc"]}  # the prefix: ResNet-18's stem and layer1
    built = build(load_config(tiny_config(tmp_path, colour_data, freeze=freeze)), CLASSES)
    fast = FastModel(built.model, built.arch, built.plan, built.bn_modes, "bf16", image_size=32)
    eager = fast.features(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    fast.compile_prefix((4, 3, 32, 32))
    assert fast.compile_error == "" and fast.compile_seconds is not None
    compiled = fast.features(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert ((compiled.float() - eager.float()).abs().max() / eager.float().abs().max()).item() <= 3e-2


# (in, out, kernel, stride, padding, groups, bias, input size, computed as a product): ResNet's last stage at 32 px
# (3x3 on 1x1; its strided 3x3 from 2x2), a squeeze-and-excitation 1x1 on its pooled input, a strided depthwise 5x5
# (MobileNetV3, EfficientNet), a grouped 3x3 (RegNet); and two with more than one output position.
CONVOLUTIONS = [
    (16, 24, 3, 1, 1, 1, False, 1, True), (8, 24, 3, 2, 1, 1, False, 2, True), (16, 4, 1, 1, 0, 1, True, 1, True),
    (16, 16, 5, 2, 2, 16, False, 2, True), (16, 16, 3, 1, 1, 4, True, 1, True), (16, 24, 3, 1, 1, 1, False, 2, False),
    (8, 8, 3, 2, 1, 8, False, 4, False)]


@pytest.mark.parametrize("channels, out, kernel, stride, padding, groups, bias, size, product", CONVOLUTIONS)
def test_a_convolution_with_one_output_position_is_a_product_with_the_same_values_and_gradients(
        channels, out, kernel, stride, padding, groups, bias, size, product):
    """The same outputs and gradients (the taps outside the input get a zero gradient, as from the convolution)
    whether or not the convolution runs as a product; and it does where its output is one position."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, out, kernel, stride, padding, groups=groups, bias=bias).double()
    fast = copy.deepcopy(conv)
    assert fastpath.single_positions_as_products([fast]) == 1
    calls = []
    fast._conv_forward = lambda *args: calls.append(1) or torch.nn.Conv2d._conv_forward(fast, *args)
    x = torch.randn(3, channels, size, size, dtype=torch.double, requires_grad=True)
    expected, got = conv(x), fast(x)
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, [x, *conv.parameters()], upstream)
    fast_grads = torch.autograd.grad(got, [x, *fast.parameters()], upstream)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads, fast_grads))
    assert calls == ([] if product else [1])


def test_the_fast_path_runs_single_position_convolutions_as_products_and_leaves_the_state_dict():
    """ResNet-18 at 32 px: all its plain convolutions get the forward (the folded prefix's copies too); the model
    keeps its class and keys; its outputs are the plain model's within float rounding."""
    config = load_config(None, ["model.weights=none", "data.image_size=32", "freeze.trainable=[layer4, head]"])
    built = build(config, CLASSES)
    model = built.model
    plain = copy.deepcopy(model).eval()
    keys = list(model.state_dict())
    fast = FastModel(model, built.arch, built.plan, built.bn_modes, "fp32", image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.forward.__func__ is fastpath._single_position_forward for m in convs) and len(convs) == 20
    copies = [m for stage in fast.prefix_run for m in stage.modules() if isinstance(m, torch.nn.Conv2d)]
    assert fast.folded and copies and all(m.forward.__func__ is fastpath._single_position_forward for m in copies)
    assert list(model.state_dict()) == keys and type(model) is type(plain)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), rtol=1e-4, atol=1e-5)
