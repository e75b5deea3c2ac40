"""train.precision: auto picks bf16 only where it is native; the CPU is read from its flags, mocked both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, run_cli, tiny_config

from finetune.utils import hardware
from finetune.utils.hardware import CpuInfo, precision_for, read_cpu, resolve_precision

# The first processor of /proc/cpuinfo, trimmed, on the two CPUs issue #12 is about.
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU @ 2.00GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512dq
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
"""
AVX2_ONLY = frozenset({"sse2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}


@pytest.mark.parametrize("flags, onednn, precision, reason", [
    (AVX2_ONLY, False, "fp32", "auto: CPU lacks avx512_bf16 and amx_bf16"),
    (AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, True, "fp32",  # oneDNN says yes: emulated
     "auto: CPU lacks avx512_bf16 and amx_bf16"),
    (AVX512_BF16, True, "bf16", "auto: CPU has avx512_bf16"),
    (AVX2_ONLY | {"amx_bf16", "avx512_bf16"}, True, "bf16", "auto: CPU has avx512_bf16 and amx_bf16"),
    (AVX512_BF16, False, "fp32", "auto: oneDNN does not use the CPU's avx512_bf16, e.g. capped by ONEDNN_MAX_CPU_ISA"),
], ids=["avx2-only", "avx512-without-bf16", "avx512-bf16", "amx", "onednn-capped"])
def test_auto_on_cpu(flags, onednn, precision, reason):
    assert resolve_precision("auto", "cpu", flags, cuda_bf16=False, onednn_bf16=onednn) == (precision, reason, None)


@pytest.mark.parametrize("cuda_bf16, precision, reason", [
    (True, "bf16", "auto: CUDA GPU has native bf16"),
    (False, "fp32", "auto: CUDA GPU lacks native bf16: compute capability below 8.0"),
])
def test_auto_on_cuda_ignores_the_cpu(cuda_bf16, precision, reason):
    assert resolve_precision("auto", "cuda", AVX512_BF16, cuda_bf16) == (precision, reason, None)


@pytest.mark.parametrize("flags", [AVX2_ONLY, AVX512_BF16], ids=["avx2-only", "avx512-bf16"])
def test_explicit_fp32_is_kept_quietly(flags):
    assert resolve_precision("fp32", "cpu", flags, False) == ("fp32", "train.precision: fp32", None)


def test_explicit_bf16_without_native_support_trains_bf16_with_a_warning():
    precision, reason, warning = resolve_precision("bf16", "cpu", AVX2_ONLY, False, onednn_bf16=False)
    assert precision == "bf16"
    assert reason == "train.precision: bf16, not native here: CPU lacks avx512_bf16 and amx_bf16"
    for text in ("avx512_bf16", "amx_bf16", "slower than fp32", "8x", "12x", "train.precision: auto or fp32"):
        assert text in warning


def test_explicit_bf16_on_a_native_cpu_or_gpu_is_quiet():
    assert resolve_precision("bf16", "cpu", AVX512_BF16, False) == ("bf16", "train.precision: bf16", None)
    assert resolve_precision("bf16", "cuda", AVX2_ONLY, True) == ("bf16", "train.precision: bf16", None)
    assert "CUDA GPU lacks native bf16" in resolve_precision("bf16", "cuda", AVX512_BF16, False).warning


@pytest.mark.parametrize("text, model, native, described", [
    (ZEN3, "AMD EPYC 7B13", [], "AMD EPYC 7B13, 2 cores; avx2 yes, avx512f no, avx512_bf16 no, amx_bf16 no"),
    (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", ["avx512_bf16", "amx_bf16"],
     "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 cores; avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 yes"),
    (SKYLAKE, "Intel(R) Xeon(R) CPU @ 2.00GHz", [],
     "Intel(R) Xeon(R) CPU @ 2.00GHz, 2 cores; avx2 yes, avx512f yes, avx512_bf16 no, amx_bf16 no"),
], ids=["zen3", "sapphire-rapids", "skylake"])
def test_read_cpu_from_proc_cpuinfo(tmp_path, monkeypatch, text, model, native, described):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    cpu = read_cpu(path)
    assert (cpu.model, cpu.native_bf16, cpu.cores) == (model, native, 2)
    assert cpu.describe() == described


def test_read_cpu_on_arm_and_without_proc_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(GRAVITON3)
    assert {"bf16", "asimd"} <= read_cpu(path).flags and read_cpu(path).native_bf16 == []  # unmeasured: fp32
    missing = read_cpu(tmp_path / "absent")
    assert missing.flags == frozenset() and missing.model
    assert missing.describe().endswith("instruction flags unknown")


@pytest.mark.parametrize("cpu, onednn, expected", [
    (CpuInfo("AMD EPYC 7B13", AVX2_ONLY, 2), False, "fp32"),
    (CpuInfo("AMD EPYC 9B14", AVX512_BF16, 2), True, "bf16"),
], ids=["avx2-only", "avx512-bf16"])
def test_precision_for_reads_the_cpu(monkeypatch, cpu, onednn, expected):
    monkeypatch.setattr(hardware, "read_cpu", lambda: cpu)
    monkeypatch.setattr(hardware, "_onednn_bf16", lambda: onednn)
    assert precision_for("auto", "cpu").precision == expected


def test_this_cpu_decision_matches_its_flags():
    """On this machine auto picks bf16 exactly when /proc/cpuinfo names native bf16 (avx512_bf16 or amx_bf16), and
    says so; without it, fp32 whatever oneDNN could emulate. (A cap on oneDNN vetoes native bf16: tested below.)"""
    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        pytest.skip("oneDNN is capped here: auto picks fp32 on any CPU (test_onednn_capped_to_avx2_...)")
    choice = precision_for("auto", "cpu")
    native = read_cpu().native_bf16
    if native:
        assert (choice.precision, choice.reason) == ("bf16", f"auto: CPU has {' and '.join(native)}"), choice
    else:
        assert (choice.precision, choice.reason) == ("fp32", "auto: CPU lacks avx512_bf16 and amx_bf16"), choice
    assert choice.warning is None


def test_onednn_capped_to_avx2_resolves_fp32_on_any_cpu():
    code = "from finetune.utils.hardware import precision_for; print(precision_for('auto', 'cpu').precision)"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}  # a new process: oneDNN reads the cap once, on first use
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "fp32", result.stderr


def test_auto_precision_trains_on_this_cpu():
    """A few real SGD steps under the precision auto picks here: finite, and the loss goes down."""
    import contextlib

    import torch
    from torchvision.models import resnet18

    precision = precision_for("auto", "cpu").precision
    torch.manual_seed(0)
    model = resnet18(num_classes=2).to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    images[4:] += 1.0  # two separable classes
    targets = torch.tensor([0] * 4 + [1] * 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    losses = []
    for _ in range(3):
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], (precision, losses)


def test_training_says_which_precision_ran_and_why(tmp_path, colour_data):
    """A real short run on whatever CPU runs the tests, at the precision auto picks here."""
    choice = precision_for("auto", "cpu")
    config = tiny_config(tmp_path, colour_data, freeze={"trainable": ["layer4", "fc"]},
                         train={"epochs": 1, "precision": "auto"})
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"precision {choice.precision} ({choice.reason})" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["precision"], summary["precision_reason"]) == choice[:2]


def test_explicit_bf16_where_it_is_not_native_warns_up_front_and_trains(tmp_path, colour_data, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN's bf16 kernels off, as on an AVX2-only CPU
    config = tiny_config(tmp_path, colour_data, train={"epochs": 1, "precision": "bf16"})
    result = run_cli("train", "--config", str(config), isolated=True)  # oneDNN reads the cap when it starts
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "WARNING: train.precision is bf16, but bf16 is not native here" in out
    assert out.index("WARNING: train.precision") < out.index("epoch 1/1")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == "bf16"


@pytest.mark.parametrize("user_value, expected", [(None, "10000"), ("300000", "300000")], ids=["default", "user's"])
def test_the_cli_shortens_openmp_spinning_unless_the_user_chose(user_value, expected):
    """Decode threads need the cores that torch's idle OpenMP threads would spin on; set before torch loads."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if user_value:
        env["GOMP_SPINCOUNT"] = user_value
    code = "import os, sys, finetune.cli; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.stdout.split() == [expected, "False"], result.stderr


def test_a_resumed_auto_run_keeps_the_precision_it_started_in(tmp_path, colour_data, monkeypatch):
    """Started where auto picks bf16, resumed on an AVX2-only CPU: still bf16 (the same numbers as an
    uninterrupted run would compute), said on the start line, with the slow-bf16 warning."""
    import torch
    from helpers import Messages, interrupt

    from finetune.config.loading import load_config
    from finetune.training.run import train

    config = load_config(tiny_config(tmp_path, colour_data, train={"epochs": 2, "precision": "auto"}))
    monkeypatch.setattr(hardware, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(hardware, "read_cpu", lambda: CpuInfo("AMD EPYC 9B14", AVX512_BF16, 2))
    interrupt(train, config, epoch=1, step=1)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["precision"] == "bf16"

    monkeypatch.setattr(hardware, "read_cpu", lambda: CpuInfo("AMD EPYC 7B13", AVX2_ONLY, 2))
    assert precision_for("auto", "cpu").precision == "fp32"
    messages = Messages()
    summary = train(config, messages, resume=tmp_path / "run")
    assert summary["precision"] == "bf16"
    assert summary["precision_reason"].startswith("auto, kept from the run being resumed; here auto alone would "
                                                  "pick fp32 (CPU lacks avx512_bf16")
    assert any(line.startswith("WARNING: The run being resumed trained in bf16") and "CPU lacks avx512_bf16" in line
               and "start a new run" in line for line in messages.lines)
