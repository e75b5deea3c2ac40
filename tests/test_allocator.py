"""The CLI sets glibc's malloc to keep the memory a step frees for the next step: no page faults after the first."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from helpers import REPO

from finetune.errors import FinetuneError
from finetune.utils.allocator import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# In a fresh process: apply the setting (or let the CLI apply it), then allocate 64 MiB, write every page and free
# it, 8 times, as a training step does with an activation; print the page faults that took.
FAULTS = """
import ctypes, os, resource, sys
{setup}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
BY_FUNCTION = "from finetune.utils.allocator import keep_freed_memory; print(keep_freed_memory({setting!r}))"
BY_CLI = """
from typer.testing import CliRunner
from finetune.cli.app import app
result = CliRunner().invoke(app, ["freeze-report", "--config", "missing.yaml"])
print(result.exit_code)
"""


def faults(setup: str, env: dict | None = None) -> tuple[list[str], int]:
    """What ``setup`` printed, and the page faults of the 8 allocations after it."""
    result = subprocess.run([sys.executable, "-c", FAULTS.format(setup=setup)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    *printed, count = result.stdout.split()
    return printed, int(count)


@glibc_only
def test_reused_memory_is_not_faulted_in_again():
    """glibc's default maps each 64 MiB block afresh (16,384 faults each time); kept, only the first faults."""
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    printed, glibc_faults = faults(BY_FUNCTION.format(setting="default"))
    assert printed == ["default"]
    assert glibc_faults >= 7 * pages
    printed, kept_faults = faults(BY_FUNCTION.format(setting="reuse"))
    assert printed == ["reuse"]
    assert kept_faults < 2 * pages


@glibc_only
@pytest.mark.parametrize("setting", ["", "default"], ids=["unset", "FINETUNE_MALLOC=default"])
def test_the_cli_keeps_freed_memory_unless_told_not_to(setting):
    """Every command applies it before it allocates (here one that stops at a missing config, exit 2)."""
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    printed, count = faults(BY_CLI, {"FINETUNE_MALLOC": setting})
    assert printed == ["2"]
    if setting == "default":
        assert count >= 7 * pages
    else:
        assert count < 2 * pages


def test_an_unknown_setting_is_a_clear_error():
    with pytest.raises(FinetuneError, match=r"FINETUNE_MALLOC='mmap': use reuse .* or default"):
        keep_freed_memory("mmap")
    result = subprocess.run([sys.executable, "-m", "finetune", "models"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "FINETUNE_MALLOC": "mmap"}, timeout=60)
    assert result.returncode == 2
    assert "FINETUNE_MALLOC='mmap': use reuse" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
