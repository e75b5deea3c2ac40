"""What this machine runs fast: the CPU's model and instruction flags, and what ``train.precision: auto`` becomes.

bf16 autocast pays only where the hardware multiplies bf16 natively: a CUDA GPU of
compute capability 8.0 or later, or an x86 CPU with AVX512-BF16 or AMX-BF16. Anywhere
else oneDNN emulates bf16 and a run gets slower, not faster: on an AVX2-only Zen 3,
bf16 made a full fine-tune 12x and head-only training 8x slower than fp32.

``resolve_precision`` is the decision alone, on given flags, so tests can pose any
CPU; ``read_cpu`` and ``precision_for`` read this machine. Torch is imported only
inside the functions that ask it, so benchmarks and logs can describe the CPU cheaply.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from finetune.errors import FinetuneError, Problem

# x86 instructions that compute in bf16 natively (dot products), not just convert to and from it.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# What decides the speed of oneDNN's convolutions: shown in benchmark headers and logs.
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# What decides the speed of int8 inference (ONNX Runtime's MLAS kernels): 8-bit dot products in one instruction with
# VNNI (AVX-512 or AVX) or AMX; with AVX2 alone they take three.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit dot products in one instruction
INT8_FLAGS = ("avx2", "avx512f") + VNNI_FLAGS
# scripts/bench.py at 224 px, torch 2.14.1, bf16 against fp32: on a 2-core AVX2-only Zen 3 (issue #12) 7.9x head-only
# and 12.2x full; on an AVX-512 EPYC with the kernels capped to AVX2, 4.6x and 11.7x.
EMULATED_SLOWDOWN = "measured with AVX2 kernels: 5-8x for head-only training, 12x for a full fine-tune"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int

    @property
    def native_bf16(self) -> list[str]:
        return [flag for flag in NATIVE_BF16_FLAGS if flag in self.flags]

    def describe(self, shown: tuple[str, ...] = SHOWN_FLAGS) -> str:
        """One line for headers and logs: ``AMD EPYC, 2 cores; avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 no``
        (the ``shown`` flags)."""
        if not self.flags:
            return f"{self.model}, {self.cores} cores; instruction flags unknown"
        return f"{self.model}, {self.cores} cores; " + ", ".join(
            f"{flag} {'yes' if flag in self.flags else 'no'}" for flag in shown)


class PrecisionChoice(NamedTuple):
    precision: str  # fp32 | bf16: what runs
    reason: str  # for the start line and summary.json, e.g. "auto: CPU has avx512_bf16"
    warning: Optional[str]  # set when an explicit bf16 will be slow here


def resolve_precision(setting: str, device_type: str, cpu_flags: frozenset[str] | set[str], cuda_bf16: bool,
                      onednn_bf16: bool = True) -> PrecisionChoice:
    """What ``train.precision`` (``auto``, ``fp32`` or ``bf16``) runs as on this device, and why.

    ``auto`` becomes bf16 only where bf16 autocast is fast: CUDA with native bf16
    (``cuda_bf16``), or a CPU whose ``cpu_flags`` hold AVX512-BF16 or AMX-BF16 and
    whose oneDNN runs bf16 kernels (``onednn_bf16``; ``ONEDNN_MAX_CPU_ISA`` can turn
    them off). An explicit ``bf16`` always runs as asked, with a warning when it will be slow.
    """
    if device_type == "cuda":
        fast = cuda_bf16
        has, why_slow = "CUDA GPU has native bf16", "CUDA GPU lacks native bf16: compute capability below 8.0"
        expected = "expected to be slower than fp32"
    else:
        native = [flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags]
        fast = bool(native) and onednn_bf16
        has = f"CPU has {' and '.join(native)}"
        why_slow = (f"CPU lacks {' and '.join(NATIVE_BF16_FLAGS)}" if not native else
                    f"oneDNN does not use the CPU's {' and '.join(native)}, e.g. capped by ONEDNN_MAX_CPU_ISA")
        expected = f"expected to be several times slower than fp32 ({EMULATED_SLOWDOWN})"
    if setting == "auto":
        return PrecisionChoice("bf16" if fast else "fp32", f"auto: {has if fast else why_slow}", None)
    if setting == "bf16" and not fast:
        warning = (f"train.precision is bf16, but bf16 is not native here: {why_slow}. bf16 autocast is emulated "
                   f"and {expected}. Training goes on in bf16 as asked; set train.precision: auto or fp32 for speed.")
        return PrecisionChoice("bf16", f"train.precision: bf16, not native here: {why_slow}", warning)
    return PrecisionChoice(setting, f"train.precision: {setting}", None)


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's CPU model and instruction flags (from /proc/cpuinfo on Linux; no flags elsewhere)."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor is enough: all cores match
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())  # x86 | arm
    return CpuInfo(model, flags, os.cpu_count() or 1)


def precision_for(setting: str, device_type: str) -> PrecisionChoice:
    """Resolve ``train.precision`` for this machine's CPU, or its CUDA GPU when ``device_type`` is cuda."""
    import torch

    # By default is_bf16_supported() also says True for GPUs that only emulate bf16.
    cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return resolve_precision(setting, device_type, read_cpu().flags, cuda_bf16, _onednn_bf16())


def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 kernels at all: a veto, never a sign of speed.

    torch.ops.mkldnn._is_mkldnn_bf16_supported() is ideep::has_bf16_type_support():
    True on any CPU with avx512bw, avx512vl and avx512dq, or AVX-NE-CONVERT, where bf16
    is emulated and slower than fp32; False on AVX2-only CPUs, and when
    ONEDNN_MAX_CPU_ISA caps oneDNN below AVX-512. So the CPU flags decide what is
    native, and this can only turn bf16 off.
    """
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_for_config(config, resumed: Optional[str] = None) -> PrecisionChoice:
    """``precision_for`` on the device ``train.device`` selects (raises FinetuneError for cuda without a GPU).

    ``resumed``: the precision a run being resumed trained in. ``auto`` keeps it, so the resumed run computes as
    the interrupted one did even on a CPU where auto picks otherwise (with the warning when bf16 is slow here).
    """
    import torch

    device = select_device(config.train.device, torch.cuda.is_available())
    choice = precision_for(config.train.precision, device)
    if config.train.precision != "auto" or resumed in (None, choice.precision):
        return choice
    why = choice.reason.removeprefix("auto: ")
    warning = None
    if resumed == "bf16":  # auto picked fp32 here, so bf16 is not fast here
        warning = (f"The run being resumed trained in {resumed} (train.precision: auto chose it where it started) "
                   f"and goes on in {resumed} so that it continues exactly, but {resumed} is not native here: {why}. "
                   f"It is emulated and expected to be several times slower than fp32 ({EMULATED_SLOWDOWN}). For "
                   "fp32 speed on this machine, start a new run.")
    return PrecisionChoice(resumed, f"auto, kept from the run being resumed; here auto alone would pick "
                                    f"{choice.precision} ({why})", warning)


def select_device(setting: str, cuda_available: bool) -> str:
    """``train.device``: auto means cuda when a GPU is there, else cpu; cuda without one is an error."""
    for key, message in problems(setting, cuda_available):
        raise FinetuneError(f"{key} {message}.")
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    return setting


def problems(device: str, cuda_available: bool) -> list[Problem]:
    """``train.device`` (``device``) set to cuda where there is no GPU."""
    if device == "cuda" and not cuda_available:
        return [Problem("train.device", "is 'cuda' but no CUDA GPU is available; use train.device: auto or cpu")]
    return []
