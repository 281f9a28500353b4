"""Host memory: let glibc's malloc keep freed memory for reuse instead of unmapping it.

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
"""

from __future__ import annotations

import argparse
import ctypes
import platform
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
