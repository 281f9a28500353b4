"""Building the project's C++ CPU kernels on first use, with a pure-PyTorch fallback.

Each extension is compiled by ``torch.utils.cpp_extension.load`` (needs a C++ compiler
and the ``ninja`` package) for the CPU it runs on (``-march=native``) with OpenMP
(``torch.set_num_threads`` decides the threads). The build is cached in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name that
includes a hash of the CPU's feature flags, so a cache shared between machines never
hands a binary to a CPU that lacks its instructions.

An environment variable per extension picks the backend: ``auto`` (default: build,
and fall back with one warning if that fails), ``torch`` (never build; tests use it)
or ``cpp`` (a failed build is an error).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).with_name("csrc")
_log = logging.getLogger(__name__)


def cpu_tag() -> str:
    """Short hash of the CPU's identity and feature flags (part of an extension's cache name)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "model name", "Features")):
                    flags += line
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def compile_source(name: str, path: Path) -> ModuleType:
    """Compile (or load from the cache) the C++ file ``path`` as the extension ``name``, with the project's flags.

    Raises what ``torch.utils.cpp_extension.load`` raises when the build fails.
    """
    from torch.utils import cpp_extension

    # -ffp-contract=off: float arithmetic must round exactly like PyTorch's kernels
    # (explicit fma where they use one, nothing fused behind our back).
    # -fno-math-errno: sqrt need not set errno, so that loops taking square roots vectorize
    # (the results are the same IEEE square roots).
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        # -march=native turns on AVX2/AVX-512 (and VPOPCNTDQ) where the CPU has them.
        flags.append("-march=native")
    return cpp_extension.load(
        name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False
    )


def build_cpu_extension(name: str, source: str, env_var: str, fallback: str) -> ModuleType | None:
    """Compile (or load from the cache) ``csrc/<source>`` as ``<name>_<cpu tag>``; None for the fallback.

    ``env_var`` selects the backend (see the module docstring); ``fallback`` says, in
    the warning of a failed build, what runs instead.
    """
    choice = os.environ.get(env_var, "auto").lower()
    if choice not in ("auto", "torch", "cpp"):
        raise ValueError(f"{env_var} must be 'auto', 'torch' or 'cpp', got {choice!r}")
    if choice == "torch":
        return None
    # The first build takes about a minute (later runs load the cached library): say so.
    _log.info("loading the C++ extension %s (compiled on first use, which takes about a minute)", source)
    try:
        return compile_source(f"{name}_{cpu_tag()}", CSRC / source)
    except Exception as error:  # compiler, ninja or headers missing: every failure means "fall back"
        if choice == "cpp":
            raise RuntimeError(f"{env_var}=cpp but the C++ extension {source} could not be built: {error}") from error
        warnings.warn(
            f"the C++ extension {source} could not be built ({error.__class__.__name__}: {error}); {fallback} "
            "Install a C++ compiler and the 'ninja' package to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
