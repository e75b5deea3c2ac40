"""glibc's malloc set for training: the memory a step frees is kept for the next step, not given back to the system.

glibc serves every allocation over its mmap threshold (128 KiB, raised on the fly up to 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A training step allocates and frees the same activations
every step, so every step faults each of their pages in again and the kernel zeroes them: a ConvNeXt-T forward pass
on 32 images at 224 px took 610,000-710,000 page faults (2.3-2.7 GiB zeroed) and ran at 10.5-12.1 img/s, against
16.7-17.1 img/s with none (2-core AMD EPYC Zen 4, torch 2.14.1). ``keep_freed_memory`` turns ``mmap`` off for
allocations (``M_MMAP_MAX=0``: every block comes from the heap) and never trims the heap (``M_TRIM_THRESHOLD=-1``):
after the first step the same memory is reused. What tcmalloc or jemalloc (which PyTorch's CPU tuning guides
preload) do, without preloading anything.

The cost: the process keeps its peak memory until it exits (the peak itself barely changes: freed blocks are reused),
which suits a command that trains, evaluates or predicts and then ends. ``FINETUNE_MALLOC=default`` leaves glibc's
own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from finetune.errors import FinetuneError

SETTINGS = ("reuse", "default")
# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory(setting: str | None = None) -> str:
    """Apply ``FINETUNE_MALLOC``'s ``setting`` (None: ``reuse``) to this process; say what was done.

    ``reuse``: the heap is kept and reused (no page faults after the first step); ``default``: glibc's settings.
    Returns "reuse", "default" or, where the C library is not glibc (macOS, musl), "not glibc" (nothing to do).
    """
    setting = "reuse" if setting in (None, "") else setting
    if setting not in SETTINGS:
        raise FinetuneError(f"FINETUNE_MALLOC={setting!r}: use reuse (keep freed memory for the next step, the "
                            "default) or default (glibc's own malloc settings), or unset it.")
    if setting == "default":
        return "default"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return "default"  # refused (not a glibc malloc after all): glibc's own settings stay
    return "reuse"
