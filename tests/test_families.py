"""Every family beside ResNet (MobileNetV3, EfficientNet, RegNet, ConvNeXt, Swin, ViT) through its one description
in finetune/models/arch.py: metadata, head, freeze plan, chain, frozen blocks, fast path, weights, bad input.

Each family is tested with its smallest member at 32 px (ViT: its smallest grid, 2x2 patches) on a batch of four;
one family (MobileNetV3-Small) also end to end through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, tiny_config, write_config

from finetune.config.loading import load_config
from finetune.config.schema import IMAGENET_MEAN, IMAGENET_STD
from finetune.errors import FinetuneError
from finetune.models.arch import ARCHS, fill_preprocessing, get_arch, unit_parameters
from finetune.models.build import build
from finetune.models.fastpath import FastModel, frozen_prefix_length, memory_layout
from finetune.models.freeze import batchnorm_modes, frozen_tensors, plan_freeze, set_train_mode
from finetune.training.optim import build_optimizer

SMALLEST = ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "swin_t", "vit_b_16"]


def test_the_catalogue_matches_torchvision_metadata(offline):
    """Preprocessing, ImageNet figures, the default weights and cache files: what arch.py says is torchvision's."""
    import torchvision.models

    for name, arch in ARCHS.items():
        enum = torchvision.models.get_model_weights(name)
        assert enum.__name__ == arch.weights_class and enum.DEFAULT.name == arch.weights[0].name, name
        assert {w.name for w in enum} == set(arch.weight_names), name
        assert enum.DEFAULT.meta["num_params"] == arch.params, name
        for ours in arch.weights:
            theirs = enum[ours.name]
            transforms = theirs.transforms()
            assert (transforms.crop_size, transforms.resize_size, transforms.interpolation.value) == \
                ([ours.crop], [ours.resize], ours.interpolation), (name, ours.name)
            assert (tuple(transforms.mean), tuple(transforms.std)) == (IMAGENET_MEAN, IMAGENET_STD)
            assert theirs.meta["_metrics"]["ImageNet-1K"]["acc@1"] == ours.acc1 and theirs.meta["_ops"] == ours.gflops
            assert arch.cache_file(ours.name).name == Path(theirs.url).name
            assert arch.cache_file(ours.name).parent == offline / "hub" / "checkpoints"


@pytest.mark.parametrize("arch, image_size, total, head, head_module", [
    ("mobilenet_v3_large", 224, 4_214_842, 12_810, "classifier.3"),
    ("efficientnet_b0", 224, 4_020_358, 12_810, "classifier.1"),
    ("regnet_y_400mf", 224, 3_907_554, 4_410, "fc"),
    ("convnext_tiny", 224, 27_827_818, 7_690, "classifier.2"),
    ("vit_b_16", 224, 85_806_346, 7_690, "heads.head"),
    ("swin_t", 224, 27_527_044, 7_690, "head"),
])
def test_head_only_counts(arch, image_size, total, head, head_module):
    """``head`` trains the new 10-class head only, whatever its module is called; what stands before it stays."""
    config = fill_preprocessing(load_config(None, [f"model.arch={arch}", "model.weights=none",
                                                   "model.num_classes=10"]))
    assert config.freeze.trainable == ["head"] and config.data.image_size == image_size
    skeleton = get_arch(arch).skeleton(10, image_size)
    params = dict(skeleton.named_parameters())
    plan = plan_freeze(params, config.freeze, head=get_arch(arch).head)
    assert sum(p.numel() for p in params.values()) == total
    assert sum(params[n].numel() for n, d in plan.items() if d.trainable) == head
    assert {n for n, d in plan.items() if d.trainable} == {f"{head_module}.weight", f"{head_module}.bias"}
    assert plan[f"{head_module}.weight"].rule == "trainable: head"


@pytest.mark.parametrize("sets, resize", [
    (["model.weights=none", "data.augment=none"], 32),  # nothing to keep a margin for: the whole image
    (["model.weights=none", "data.augment=light"], 36),  # random resized crops in training: the weights' ratio
    (["model.weights=DEFAULT", "data.augment=none"], 36),  # pretrained: as the weights were evaluated
    (["model.weights=none", "data.augment=none", "data.resize_size=40"], 40),  # the config's own
])
def test_the_resize_margin_follows_the_weights_and_augmentation(sets, resize):
    """Random weights without augmentation see the whole image; otherwise the weights' 256/224 margin applies."""
    config = fill_preprocessing(load_config(None, ["data.image_size=32", *sets]))
    assert (config.data.image_size, config.data.resize_size) == (32, resize)


@pytest.fixture(scope="module")
def small(module_tmp, colour_data):
    """The smallest member of each family built as ``train`` builds it (random weights), head-only at 32 px."""
    folder = module_tmp("families")
    built = {}
    for name in SMALLEST:
        config = load_config(tiny_config(folder / name, colour_data, model={"arch": name},
                                         freeze={"trainable": ["head"]}))
        built[name] = (config, build(config, ["blue", "green", "red"], show_download=False))
    return built


@pytest.mark.parametrize("name", SMALLEST)
def test_chain_is_the_model_and_a_head_only_step_leaves_frozen_blocks_bit_identical(small, name):
    config, built = small[name]
    model, arch = built.model, built.arch
    chain = arch.stages(model)
    assert sorted(p for unit in chain for p in unit_parameters(*unit)) == sorted(n for n, _ in model.named_parameters())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    model.eval()
    with torch.no_grad():
        out = x
        for _, module in chain:
            out = module(out)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    # Head-only: everything before the head is a frozen prefix that runs deterministically (eval mode), so the
    # feature cache applies; a dropout right before the head stays in train mode, in the suffix.
    fast = FastModel(model, arch, built.plan, built.bn_modes, "fp32", image_size=32)
    assert fast.prefix_deterministic and fast.suffix[-1][0] == arch.head
    assert frozen_prefix_length(chain, built.plan) >= fast.split >= len(chain) - 3
    frozen = {n: t.clone() for n, t in frozen_tensors(model, built.plan, built.bn_modes).items()}
    set_train_mode(model, built.bn_modes)
    assert all(not m.training for n, m in model.named_modules() if built.bn_modes.get(n) == "eval")
    optimizer = build_optimizer(model, config.optim, arch)
    before = fast(x)
    torch.nn.functional.cross_entropy(before, y).backward()
    optimizer.step()
    assert all(torch.equal(t, frozen[n]) for n, t in frozen_tensors(model, built.plan, built.bn_modes).items())
    assert not torch.equal(model.get_submodule(arch.head).weight.grad, torch.zeros_like(before[:1, :1]))


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_b0", "swin_t"])
def test_stochastic_depth_is_off_in_frozen_blocks_only(name):
    arch = get_arch(name)
    skeleton = arch.skeleton(3, 32)
    names = [n for n, _ in skeleton.named_parameters()]

    def running(trainable: list[str]) -> set[str]:
        plan = plan_freeze(names, load_config(None, [f"freeze.trainable={trainable}"]).freeze, head=arch.head)
        modes = batchnorm_modes(skeleton, plan, "eval")
        return {n for n, mode in modes.items() if n.endswith("stochastic_depth") and mode == "train"}

    everywhere = {n for n, m in skeleton.named_modules() if n.endswith("stochastic_depth") and m.p > 0}
    assert everywhere and running(["head"]) == set()
    assert running(["features.7", "head"]) == {n for n in everywhere if n.startswith("features.7.")} != set()
    assert running(["*"]) == everywhere


def test_vit_position_embeddings_follow_the_image_size(small):
    arch = get_arch("vit_b_16")
    state = {"encoder.pos_embedding": torch.randn(1, 197, 768, generator=torch.Generator().manual_seed(0))}
    model = small["vit_b_16"][1].model
    fitted = arch.adapt_state(state, model)["encoder.pos_embedding"]
    assert fitted.shape == model.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(fitted[:, 0], state["encoder.pos_embedding"][:, 0])  # the class token's is kept


@pytest.fixture(scope="module")
def mobilenet_state(module_tmp) -> Path:
    torch.manual_seed(5)
    path = module_tmp("weights") / "mobilenet.pth"
    torch.save(get_arch("mobilenet_v3_small").build(1000).state_dict(), path)
    return path


def test_default_weights_load_offline_from_the_models_own_cache_file(offline, mobilenet_state):
    target = get_arch("mobilenet_v3_small").cache_file("DEFAULT")
    assert target.name == "mobilenet_v3_small-047dcff4.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(mobilenet_state.read_bytes())
    config = load_config(None, ["model.arch=mobilenet_v3_small", "model.num_classes=3", "data.image_size=32"])
    built = build(config, show_download=False)
    state = torch.load(mobilenet_state, weights_only=True)
    assert built.weights.source == "torchvision MobileNet_V3_Small_Weights.DEFAULT"
    assert torch.equal(built.model.classifier[0].weight, state["classifier.0.weight"])  # the hidden layer stays
    assert built.model.classifier[3].weight.shape == (3, 1024)  # only the final Linear is new


def test_a_state_dict_of_another_architecture_names_it(mobilenet_state):
    config = load_config(None, ["model.arch=efficientnet_b0", "model.num_classes=3", "data.image_size=32",
                                f"model.weights={mobilenet_state}"])
    with pytest.raises(FinetuneError) as info:
        build(config, show_download=False)
    assert "do not fit EfficientNet-B0" in str(info.value)
    assert "look like MobileNetV3-Small weights: set model.arch: mobilenet_v3_small" in str(info.value)


@pytest.mark.parametrize("sets, fragments", [
    (["model.arch=mobilenet_v3_smal"], ["model.arch: 'mobilenet_v3_smal' is not an architecture finetune knows; "
                                         "did you mean mobilenet_v3_small"]),
    (["model.arch=vit_b_16", "data.image_size=100"], ["data.image_size: is 100", "multiple of 16",
                                                       "e.g. 96 or 112"]),
    (["model.arch=swin_t", "model.weights=IMAGENET1K_V2"], ["no IMAGENET1K_V2 weights for swin_t",
                                                             "DEFAULT or IMAGENET1K_V1"]),
    (["model.arch=efficientnet_b0", "model.weights=IMAGENET1K_V3"], ["no IMAGENET1K_V3 weights"]),
    (["model.arch=mobilenet_v3_small", "model.num_classes=3", 'freeze.trainable=["layer4", "head"]'],
     ["freeze.trainable[0]: pattern 'layer4' matches no parameter", "MobileNetV3-Small has features.0",
      "features.12, classifier.0, classifier.3"]),
], ids=["unknown-arch", "vit-size", "weights-name", "unknown-weights-name", "pattern-of-another-family"])
def test_bad_model_input_is_a_clear_error(tmp_path, sets, fragments):
    result = run_cli("freeze-report", *[arg for item in sets for arg in ("--set", item)], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name, size, precision, trains_layers, kernels, channels_last", [
    ("resnet18", 32, "fp32", True, "AVX2", False),  # a full fine-tune of ResNet-18 on small images: slower so
    ("resnet18", 32, "fp32", False, "AVX2", True),  # ... but its frozen layers run faster so on an AVX2 CPU
    ("resnet18", 32, "fp32", False, "AVX512", False),  # ... and slower on an AVX-512 one
    ("resnet18", 32, "fp32", True, "AVX512", False),
    ("resnet18", 224, "fp32", True, "AVX2", True),
    ("resnet18", 224, "fp32", True, "AVX512", True),
    ("regnet_y_400mf", 32, "fp32", True, "AVX512", True),
    ("convnext_tiny", 224, "fp32", True, "AVX512", False),
    ("mobilenet_v3_large", 32, "fp32", True, "AVX2", True),
    ("convnext_tiny", 32, "bf16", True, "AVX2", True),
])
def test_the_memory_format_rule(name, size, precision, trains_layers, kernels, channels_last):
    layout = memory_layout(get_arch(name), size, precision, trains_layers, kernels)
    assert layout.channels_last == channels_last
    assert layout.why.startswith("channels-last" if channels_last else "default layout")
    assert precision == "bf16" or layout.why.endswith(f"on {kernels} CPUs)")


def test_the_memory_format_rule_follows_torchs_cpu_kernels(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (or a CPU without AVX-512) takes the AVX2 row."""
    for capability, row in (("AVX512", "AVX512"), ("AVX2", "AVX2"), ("DEFAULT", "AVX2")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert memory_layout(get_arch("resnet18"), 32, "fp32", False).why.endswith(f"on {row} CPUs)")


def test_models_lists_every_model_without_importing_torch():
    code = ("import sys\nsys.modules['torch'] = None  # any import of torch fails\n"
            "sys.argv = ['finetune', 'models', '--json']\nfrom finetune.cli.app import main\nmain()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert list(rows) == list(ARCHS)
    assert rows["efficientnet_b3"]["image_size"] == 300 and rows["resnet18"]["default"]
    assert rows["regnet_y_800mf"]["acc1"] == 78.828 and rows["mobilenet_v3_large"]["gflops"] == 0.217
    unknown = run_cli("models", "--only", "resnet18,swin")
    assert unknown.returncode == 2 and "Unknown model 'swin' in --only; closest: swin_t" in unknown.stderr


def test_mobilenet_end_to_end_with_adamw(tmp_path, colour_data):
    """Train (a dropout before the head in train mode, the frozen prefix cached), resume, predict, inspect-grads."""
    config = tiny_config(tmp_path, colour_data, model={"arch": "mobilenet_v3_small"},
                         freeze={"trainable": ["features.11", "head"]},
                         optim={"name": "adamw", "lr": 0.001, "weight_decay": 0.01, "no_decay_norm_bias": True},
                         train={"epochs": 1})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert ("frozen prefix: features.0 .. features.10 (no autograd, BatchNorm folded; not compiled, auto: 48 images at "
            "32 px would not win back torch.compile's 10 s") in result.stdout
    assert "memory format channels-last (MobileNetV3 at 32 px, training its layers" in result.stdout
    assert "feature cache on" in result.stdout
    run_dir = tmp_path / "run"
    resumed = run_cli("train", "--resume", str(run_dir), "--set", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frozen_unchanged"] and summary["epochs_done"] == 2 and summary["arch"] == "mobilenet_v3_small"
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["config"]["data"]["resize_size"] == 32 and saved["config"]["data"]["interpolation"] == "bilinear"
    assert isinstance(saved["optimizer"]["state"][0]["exp_avg"], torch.Tensor)  # AdamW's moments
    predicted = run_cli("predict", str(run_dir / "best.pt"), str(colour_data / "val" / "red"), "--json")
    assert predicted.returncode == 0 and len(json.loads(predicted.stdout)) == 4, predicted.stderr
    grads = run_cli("inspect-grads", "--config", str(config), "--json")
    report = json.loads(grads.stdout)
    assert grads.returncode == 0 and report["passed"], grads.stdout
    checks = {c["name"]: c["detail"] for c in report["checks"]}
    assert "gradcheck(classifier.3): ok" in checks["float64 finite differences agree with autograd"]
    assert "on 2 module group(s)" in checks["float64 finite differences agree with autograd"]


def test_models_bench_measures_and_marks_the_pareto_front():
    from finetune.analysis.model_bench import BenchRow, bench_models, mark_pareto

    bench = bench_models(["mobilenet_v3_small", "regnet_y_400mf"], image_size=32, freeze="head", batch=4, seconds=0)
    assert [row.image_size for row in bench.rows] == [32, 32] and bench.freeze == "head"
    assert all(row.features_per_s > 0 and row.train_per_s > 0 and row.inference_per_s > 0 for row in bench.rows)
    assert bench.rows[0].train_per_s >= bench.rows[1].train_per_s  # sorted by training speed
    rows = [BenchRow(name, acc, 1.0, 32, "default", 1.0, speed, 1.0)
            for name, acc, speed in (("fast", 70.0, 300.0), ("dominated", 69.0, 200.0), ("accurate", 80.0, 100.0))]
    mark_pareto(rows)
    assert [row.pareto for row in rows] == [True, False, True]
    with pytest.raises(FinetuneError, match="--image-size 40 does not fit every model:\n  vit_b_16: ViT-B/16 cuts"):
        bench_models(["resnet18", "vit_b_16"], image_size=40)


def test_no_decay_keeps_every_norm_layer_out_and_the_old_key_warns(tmp_path):
    """ConvNeXt's LayerNorm (not only BatchNorm) and every bias get no weight decay; optim.no_decay_bn_bias, the
    old name, still works and the config says where to rename it."""
    path = write_config(tmp_path / "config.yaml", "optim:\n  weight_decay: 0.05\n  no_decay_bn_bias: true\n")
    config = load_config(path, ["model.arch=convnext_tiny", "model.weights=none", "model.num_classes=3",
                                "data.image_size=32", 'freeze.trainable=["features.7", "head"]'])
    assert config.optim.no_decay_norm_bias
    assert config.warnings == [f"{path}:3  optim.no_decay_bn_bias is now optim.no_decay_norm_bias; the old name "
                               "still works, but rename it"]
    built = build(config, show_download=False)
    groups = build_optimizer(built.model, config.optim, built.arch).param_groups
    decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
    assert decay["features.7.0.block.0.weight"] == 0.05 and decay["classifier.2.weight"] == 0.05  # conv, head
    assert decay["features.7.0.block.2.weight"] == 0 and decay["features.7.0.block.2.bias"] == 0  # LayerNorm
    assert decay["features.7.0.block.0.bias"] == 0 and decay["classifier.2.bias"] == 0


@pytest.mark.parametrize("name, blocks", [("mobilenet_v3_small", 6), ("regnet_y_400mf", 16), ("convnext_tiny", 0)])
def test_random_init_starts_every_residual_branch_at_zero_without_changing_a_draw(name, blocks):
    """model.zero_init_residual: the BatchNorm ending each residual branch starts at weight 0, so each block starts
    as the identity; every other value is what the same seed gives without it (ConvNeXt has no such BatchNorm)."""
    from finetune.models.arch import residual_ends, zero_residual_branches

    arch = get_arch(name)
    torch.manual_seed(0)
    plain = arch.build(10, 32).state_dict()
    torch.manual_seed(0)
    zeroed = arch.build(10, 32)
    zero_residual_branches(zeroed)
    ends = {f"{block}.{end}.weight" for block, end in residual_ends(zeroed)}
    assert len(ends) == blocks and arch.residual_zero_init == (blocks > 0)
    assert len(arch.zero_branches(zeroed)) == blocks
    for key, value in zeroed.state_dict().items():
        assert torch.equal(value, torch.zeros_like(value) if key in ends else plain[key]), key


def small_vit(weights=None, image_size: int = 224, **options):
    """torchvision's VisionTransformer as vit_b_16 builds it, but 2 layers of width 32 instead of 12 of 768 (a
    vit_b_16 checkpoint and its exports are 330 MiB each)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, **options)


# The last block of each family trains with the head; ONNX export where the family's operators differ most from
# ResNet's (EfficientNet: SiLU, squeeze-excitation, depthwise; ConvNeXt: LayerNorm, GELU, layer scale; ViT: class
# token, position embeddings, attention; a ViT-B/16 built smaller: small_vit).
LAST_BLOCK = {"efficientnet_b0": ("features.8", True), "regnet_y_400mf": ("trunk_output.block4.block4-1", False),
              "convnext_tiny": ("features.7.2", True), "swin_t": ("features.7.1", False),
              "vit_b_16": ("encoder.layers.encoder_layer_1", True)}


@pytest.mark.parametrize("name", LAST_BLOCK)
def test_each_family_trains_exports_verified_and_passes_inspect_grads(tmp_path, colour_data, name, monkeypatch):
    import torchvision.models

    from finetune.analysis.gradcheck import inspect_grads
    from finetune.deploy.export import export_checkpoint
    from finetune.training.reporter import Reporter
    from finetune.training.run import train

    monkeypatch.setattr(torchvision.models, "vit_b_16", small_vit)
    block, onnx = LAST_BLOCK[name]
    config = load_config(tiny_config(tmp_path, colour_data, model={"arch": name}, train={"epochs": 1},
                                     freeze={"trainable": [block, "head"]}))
    summary = train(config, Reporter())
    assert summary["arch"] == name and summary["frozen_unchanged"]
    if name == "vit_b_16":  # a class token and 2x2 patches of 16 px
        assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]["encoder.pos_embedding"].shape \
            == (1, 5, 32)
    for fmt in ("torchscript", "onnx") if onnx else ("torchscript",):
        exported = export_checkpoint(tmp_path / "run" / "best.pt", fmt)
        assert exported["top1_agreement"] == 1.0 and exported["images"] > 0, exported  # verified before written
        assert Path(exported["path"]).is_file()
    report = inspect_grads(config)
    assert report.passed, [check for check in report.checks if not check.passed]


def test_bf16_runs_depthwise_convolutions_in_fp32_where_that_is_faster(tmp_path, colour_data):
    """MobileNetV3 and EfficientNet in bf16: each depthwise convolution computes in fp32 (the others in bf16); the
    state dict, and the convolution outside autocast, are what they were. ConvNeXt's stay bf16, fp32 runs alike."""
    from finetune.models.fastpath import _fp32_conv_forward
    from finetune.training.setup import prepare

    def setup(arch, precision, trainable="*"):
        config = load_config(tiny_config(tmp_path / f"{arch}-{precision}-{trainable}", colour_data,
                                         model={"arch": arch}, freeze={"trainable": [trainable]},
                                         train={"precision": precision}))
        return prepare(config)

    built = setup("mobilenet_v3_small", "bf16")
    model = built.model
    keys = list(model.state_dict())
    fast = built.fast_model(built.built.plan)
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert fast.fp32_depthwise == len(depthwise) == 11 and list(model.state_dict()) == keys
    dtypes = {}
    for conv in (depthwise[0], dense[1]):
        conv.register_forward_hook(lambda module, args, out: dtypes.update({id(module): out.dtype}))
    fast(torch.randn(4, 3, 32, 32))
    assert dtypes == {id(depthwise[0]): torch.float32, id(dense[1]): torch.bfloat16}
    x = torch.randn(2, depthwise[0].in_channels, 8, 8)
    assert torch.equal(depthwise[0](x), torch.nn.functional.conv2d(
        x, depthwise[0].weight, None, depthwise[0].stride, depthwise[0].padding, groups=depthwise[0].groups))
    phase = built.phase(built.built.plan, tmp_path / "phase")
    line = phase.describe(built.precision)
    assert "precision bf16 (train.precision: bf16" in line
    assert ", its 11 depthwise convolutions in fp32 (faster there)); memory format" in line
    head_only = setup("efficientnet_b0", "bf16", "head")  # the folded prefix's copies compute in fp32, counted once
    fast = head_only.fast_model(head_only.built.plan)
    copies = [m for stage in fast.prefix_run for m in stage.modules()
              if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert fast.folded and fast.fp32_depthwise == len(copies) == 16
    assert all(m.forward.__func__ is _fp32_conv_forward for m in copies)
    for arch, precision in (("convnext_tiny", "bf16"), ("mobilenet_v3_small", "fp32")):
        other = setup(arch, precision)
        assert other.fast_model(other.built.plan).fp32_depthwise == 0
