"""Helpers shared by the tests that run the training scripts as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "dog", "emu")
# A BNext-T layout small enough for seconds per epoch: stem 8, then 16, 16, 32.
TINY_MODEL = ["--model", "bnext_tiny", "--stem", "cifar", "--stage-channels", "8", "16", "16", "32"]
FAST = ["--img-size", "32", "--workers", "0", "--aa", "none", "--warmup-epochs", "0", "--log-interval", "1"]


def make_image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """Random-pixel PNG and JPEG files of several sizes in ``train/<class>/`` and ``val/<class>/``."""
    seed = 0
    for split, count in per_class.items():
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seed += 1
                rng = np.random.default_rng(seed)
                width, height = 24 + 8 * (index % 4), 20 + 6 * (index % 3)
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}{'.png' if index % 2 else '.JPEG'}")
    return root


def script_command(args: list[str], *, nproc: int = 1, script: str = "ImageNet/train.py") -> list[str]:
    """The command line of a script (or ``-m module``), under torchrun when ``nproc > 1``."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, *script.split(), *args]


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the scripts: one OpenMP thread (the test machine is shared), plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def run_script(
    args: list[str],
    *,
    nproc: int = 1,
    script: str = "ImageNet/train.py",
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a script (or ``-m module``) from the repository root, under torchrun when ``nproc > 1``."""
    return subprocess.run(
        script_command(args, nproc=nproc, script=script),
        cwd=REPO,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def common_args(data: Path, output: Path, epochs: int = 1, batch: int = 6) -> list[str]:
    """Training flags for a tiny, fast run of ``ImageNet/train.py`` on ``data``."""
    return [
        *("--data-dir", str(data), "--output", str(output), "--epochs", str(epochs), "--batch-size", str(batch)),
        *TINY_MODEL,
        *FAST,
    ]
