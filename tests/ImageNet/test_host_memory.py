"""--keep-freed-memory: glibc keeps freed memory for reuse, so large allocations stop page-faulting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ImageNet import host_memory, training
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


#: Prints its process id and GLIBC_TUNABLES on every start, applies the benchmarks' host-memory
#: flags from its command line, then prints the huge-page status after filling 64 MiB.
_RESTARTING = """
import argparse, os, sys
import torch
from ImageNet.host_memory import add_huge_pages_flag, add_keep_freed_memory_flag, apply_host_memory_flags
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
parser = argparse.ArgumentParser()
add_keep_freed_memory_flag(parser)
add_huge_pages_flag(parser)
args = parser.parse_args()
lines = apply_host_memory_flags(args, from_command_line=True)
torch.empty(2**24).fill_(1.0)
print(lines[1])
print([line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")][0].split()[1])
"""


def _run_restarting(*flags: str, tunables: str = "") -> list[str]:
    environment = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    if tunables:
        environment["GLIBC_TUNABLES"] = tunables
    result = subprocess.run(
        [sys.executable, "-c", _RESTARTING, *flags], cwd=ROOT, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_the_huge_pages_flag_defaults_off_and_changes_nothing() -> None:
    assert parse_args([]).huge_pages is False
    first, status, _ = _run_restarting()
    assert first.split()[0] == "start" and len(first.split()) == 2  # started once, no tunables
    assert status == "huge pages: malloc's default pages (no --huge-pages)"


@pytest.mark.skipif(host_memory.huge_pages_unavailable() is not None, reason="no glibc 2.35+ with huge pages here")
def test_huge_pages_restart_the_process_with_the_tunable_and_back_its_heap() -> None:
    first, second, status, huge_kib = _run_restarting("--huge-pages", tunables="glibc.malloc.arena_max=2")
    _, pid, tunables = first.split()
    _, pid_again, tunables_again = second.split()
    assert pid_again == pid  # the same process, started again (so torchrun sees nothing)
    assert tunables == "glibc.malloc.arena_max=2"
    assert tunables_again == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"  # the user's tunables kept
    assert status.startswith("huge pages: malloc's heap on transparent huge pages")
    assert int(huge_kib) >= 32 * 1024  # most of the 64 MiB just filled


def test_huge_pages_are_refused_where_they_cannot_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 31))
    assert host_memory.huge_pages_unavailable() == "it needs glibc 2.35 or later (this is 2.31)"
    with pytest.raises(RuntimeError, match="cannot apply here: it needs glibc 2.35"):
        host_memory.restart_with_huge_pages()
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: None)
    assert host_memory.huge_pages_unavailable() == "it needs Linux with glibc"


def test_huge_pages_handed_to_a_function_are_refused_not_dropped(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # A restart would run the process's own command line (here pytest's), not these arguments.
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with pytest.raises(RuntimeError, match="give it on the command line"):
        host_memory.restart_with_huge_pages(from_command_line=False)
    assert training.main(["--huge-pages", "--epochs", "1"]) == 2
    assert "--huge-pages needs a restart of the process" in capsys.readouterr().err
