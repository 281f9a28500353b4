"""Host memory: glibc's malloc keeps freed memory for reuse (and may use huge pages).

glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit
Linux) with a fresh ``mmap`` and returns it to the kernel on ``free``. A training step
allocates and frees tensors of that size every step: the gradients and binarized
weights of the widest convolutions (BNext-T's 1024x1024x3x3 binary weight is 36 MiB),
large activations at ImageNet resolution, batches in the data-loading workers. The
kernel then hands out zeroed pages one page fault at a time, each costing more than
copying 4 KiB into memory that is already mapped (``benchmarks/train_step.py`` counts the
faults of a step).

:func:`keep_freed_memory` turns that off for the whole process (``mallopt``): no
allocation is served by ``mmap``, and the heap is not trimmed, so memory freed in one
step is reused by the next without page faults. The process keeps its peak memory
until it exits, which a training process reaches in every step anyway.

It is off by default (``--keep-freed-memory`` turns it on): on the development
machine it made BNext-T's CIFAR-sized CPU step faster in most runs, but the 224 px
step not, although its page faults were gone (README, Training speed).

``--huge-pages`` backs malloc's heap with transparent huge pages (2 MiB) where the
kernel hands them out on request (``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``madvise`` or ``always``): glibc 2.35 and later advise the kernel so for the memory they
take when the tunable ``glibc.malloc.hugetlb=1`` is set. A step streams hundreds of
megabytes of activations through kernels that each read a few tensors, and with 4 KiB
pages every 4 KiB of a stream costs an address-translation miss. glibc reads its tunables
when a process starts, so :func:`restart_with_huge_pages` starts the process again, the
same command with ``GLIBC_TUNABLES`` extended (``os.execve``: the same process id, so
``torchrun`` and job schedulers see nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any

#: The help of ``--keep-freed-memory`` (the training script and the benchmarks).
FLAG_HELP = (
    "keep freed host memory in glibc's heap for reuse (no mmap, no trim) instead of returning it to the "
    "kernel: saves the page faults of every step's large tensors, and the process keeps its peak memory. "
    "Off by default: on the development machine it was faster in most runs of a small CPU configuration, "
    "not at 224 px (README, Training speed). Linux with glibc only; elsewhere a log line says it is not applied"
)

#: ``mallopt`` parameters, from glibc's ``malloc.h``.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: ``mallopt`` takes an ``int``: the largest trim threshold it can set (2 GiB).
_LARGEST_INT = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (which has ``mallopt``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    library = ctypes.CDLL(None)  # the symbols already loaded into this process, libc among them
    return library if hasattr(library, "mallopt") else None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process; False where that is not possible.

    Sets ``M_MMAP_MAX = 0`` (no allocation is served by ``mmap``) and the largest
    ``M_TRIM_THRESHOLD`` (the heap is not shrunk unless 2 GiB lie free at its top).
    Call it early: child processes forked afterwards (data-loading workers) inherit it.
    Returns False on other C libraries and systems, where nothing is changed.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success and 0 for a refused value.
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_INT) == 1


def add_keep_freed_memory_flag(parser: Any) -> None:
    """Add ``--keep-freed-memory`` / ``--no-keep-freed-memory`` (default off) to a parser or argument group."""
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=False, help=FLAG_HELP)


def apply_keep_freed_memory(keep: bool) -> str:
    """Apply ``--keep-freed-memory`` to this process; returns what holds now, for the log."""
    if not keep:
        return "host memory: malloc's defaults (no --keep-freed-memory)"
    if keep_freed_memory():
        return "host memory: freed memory kept for reuse (glibc mallopt: no mmap, no trim)"
    if _glibc() is None:
        library = platform.libc_ver()[0] or "unknown"
        return f"host memory: --keep-freed-memory not applied, the C library is not glibc ({library})"
    return "host memory: --keep-freed-memory not applied, glibc's mallopt refused the settings"


#: glibc's tunable (2.35 and later) for transparent huge pages under malloc's memory.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"

#: The help of ``--huge-pages`` (the training script and the benchmarks).
HUGE_PAGES_HELP = (
    "back malloc's heap with transparent huge pages (glibc 2.35+, Linux with transparent huge pages in madvise or "
    "always mode): the process starts again at once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc reads it only "
    "at start; setting it yourself before Python starts does the same without the restart). Fewer address-translation "
    "misses in the memory-bound kernels around the convolutions. Off by default; refused with a message where it "
    "cannot apply (README, Training speed)"
)

_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def add_huge_pages_flag(parser: Any) -> None:
    """Add ``--huge-pages`` / ``--no-huge-pages`` (default off) to a parser or argument group."""
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=False, help=HUGE_PAGES_HELP)


def _glibc_version() -> tuple[int, ...] | None:
    library, version = platform.libc_ver()
    if platform.system() != "Linux" or library != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def huge_pages_unavailable() -> str | None:
    """Why ``--huge-pages`` cannot work on this machine, or None when it can."""
    version = _glibc_version()
    if version is None:
        return "it needs Linux with glibc"
    if version < (2, 35):
        return f"it needs glibc 2.35 or later (this is {'.'.join(map(str, version))})"
    try:
        setting = _THP_ENABLED.read_text()
    except OSError:
        return f"the kernel has no transparent huge pages ({_THP_ENABLED} is missing)"
    if "[never]" in setting:
        return f"transparent huge pages are off ({_THP_ENABLED}: never)"
    return None


def huge_pages_requested() -> bool:
    """Whether this process started with glibc's huge-page tunable in ``GLIBC_TUNABLES``."""
    return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def restart_with_huge_pages(from_command_line: bool = True) -> None:
    """Start this process again with glibc's huge-page tunable set; return at once when it is set already.

    Runs the interpreter on the process's own command line (``sys.orig_argv``) with
    ``GLIBC_TUNABLES`` extended by :data:`HUGE_PAGES_TUNABLE` and the rest of the
    environment unchanged. Call it right after parsing the command line, before work
    that should not run twice. Raises RuntimeError where huge pages cannot apply
    (:func:`huge_pages_unavailable`), and when the flag did not come from the process's
    command line (``from_command_line=False``: arguments handed to a function), which a
    restart would not repeat.
    """
    if huge_pages_requested():
        return
    if not from_command_line:
        raise RuntimeError(
            f"--huge-pages needs a restart of the process, which would not repeat arguments handed to a function: "
            f"give it on the command line, or start Python with GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}"
        )
    reason = huge_pages_unavailable()
    if reason is not None:
        raise RuntimeError(f"--huge-pages cannot apply here: {reason}; run without it")
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t] + [HUGE_PAGES_TUNABLE]
    environment = dict(os.environ, GLIBC_TUNABLES=":".join(tunables))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def huge_pages_status() -> str:
    """The log line on huge pages: whether the tunable is set, and how much of the process they back now."""
    if not huge_pages_requested():
        return "huge pages: malloc's default pages (no --huge-pages)"
    backed = "unknown"
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                backed = f"{int(line.split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"huge pages: malloc's heap on transparent huge pages ({HUGE_PAGES_TUNABLE}; {backed} backed so far)"


def apply_host_memory_flags(args: argparse.Namespace, from_command_line: bool) -> list[str]:
    """Apply ``--keep-freed-memory`` and ``--huge-pages`` (a benchmark's flags); returns the log lines.

    With ``--huge-pages`` the process may start again here (:func:`restart_with_huge_pages`,
    whose RuntimeError passes through).
    """
    if args.huge_pages:
        restart_with_huge_pages(from_command_line)
    return [apply_keep_freed_memory(args.keep_freed_memory), huge_pages_status()]
