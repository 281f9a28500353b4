"""--keep-freed-memory: glibc keeps freed memory for reuse, so large allocations stop page-faulting."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ImageNet import host_memory
from ImageNet.config import parse_args
from ImageNet.host_memory import apply_keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]

#: Allocates, fills and frees 64 MiB tensors (above glibc's largest mmap threshold, 32 MiB)
#: and prints the median page faults of a cycle once the heap has had time to settle (a
#: freed block can at first be a little too small for the next aligned request, so the
#: heap still grows in some early cycles).
_FAULTS_PER_CYCLE = """
import resource, statistics, sys
import torch
from ImageNet.host_memory import apply_keep_freed_memory
print(apply_keep_freed_memory(sys.argv[1] == "keep"))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    torch.empty(2**24).fill_(1.0)
per_cycle = []
for _ in range(11):
    before = faults()
    torch.empty(2**24).fill_(1.0)
    per_cycle.append(faults() - before)
print(statistics.median(per_cycle))
"""


def _pages_per_cycle() -> int:
    """Pages of one 64 MiB cycle: 4 KiB pages, or 2 MiB ones where transparent huge pages are always on."""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        thp = ""
    return 2**26 // (2**21 if "[always]" in thp else 4096)


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's (Linux) only"
)


def _median_faults_per_cycle(choice: str) -> tuple[str, float]:
    # A fresh process: the setting holds for the rest of a process's life.
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CYCLE, choice], cwd=ROOT, capture_output=True, text=True, check=True
    )
    message, faults = result.stdout.strip().splitlines()[-2:]
    return message, float(faults)


@glibc_only
def test_kept_memory_is_reused_without_page_faults() -> None:
    message, faults = _median_faults_per_cycle("keep")
    assert "freed memory kept for reuse" in message
    assert faults < 0.01 * (2**26 // 4096)  # under 1 % of the cycle's 4 KiB pages


@glibc_only
def test_without_the_flag_every_large_allocation_faults_its_pages_in_again() -> None:
    # The cost that the flag removes: malloc's defaults unmap a 64 MiB block on free.
    message, faults = _median_faults_per_cycle("default")
    assert "malloc's defaults" in message
    assert faults > 0.9 * _pages_per_cycle()


def test_the_training_flag_defaults_off_and_can_be_turned_on() -> None:
    assert parse_args([]).keep_freed_memory is False
    assert parse_args(["--keep-freed-memory"]).keep_freed_memory is True


def test_off_changes_nothing_and_says_so() -> None:
    assert apply_keep_freed_memory(False) == "host memory: malloc's defaults (no --keep-freed-memory)"


def test_a_setting_that_cannot_be_applied_is_reported_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert "not applied, the C library is not glibc" in apply_keep_freed_memory(True)
    monkeypatch.setattr(host_memory, "_glibc", lambda: object())
    assert apply_keep_freed_memory(True) == (
        "host memory: --keep-freed-memory not applied, glibc's mallopt refused the settings"
    )
