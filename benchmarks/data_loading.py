"""Images per second of one data-loading worker: JPEG decoding and the training and evaluation transforms.

Sizes ``--workers`` for a training run: a worker turns files into tensors at the rate
printed here, so a GPU step that consumes ``B`` images every ``t`` seconds needs about
``B / t / rate`` workers. The benchmark writes its own ImageNet-sized JPEGs (smooth
noise at 375x500, quality 90, like :mod:`benchmarks.synthetic_imagefolder`) into a
temporary folder, then times, in this one process, with one torch thread (a
DataLoader worker runs single-threaded):

* ``decode``: ``PIL.Image.open(...).convert("RGB")``,
* ``train``: decode plus the recipe's training transform (random resized crop, flip,
  RandAugment, normalisation: :func:`ImageNet.data.build_transform`),
* ``eval``: decode plus the evaluation transform (resize, center crop, normalisation).

The transform settings come from a recipe YAML (``--config``, default the BNext-T recipe).

Usage::

    python benchmarks/data_loading.py [--images 96] [--config configs/bnext_tiny.yaml] [--target 1000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic_imagefolder import write_folder  # noqa: E402
from ImageNet.data import build_transform  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def recipe_transforms(config: dict[str, Any]) -> dict[str, Callable[[Image.Image], torch.Tensor]]:
    """The training and evaluation transforms of a recipe (YAML keys as in ``configs/*.yaml``)."""
    img_size = int(config.get("img_size", 224))
    common = {"img_size": img_size, "crop_pct": float(config.get("crop_pct", 0.95))}
    interpolation = config.get("interpolation", "bicubic")
    train = build_transform(
        is_training=True,
        auto_augment=config.get("aa", "rand-m7-mstd0.5-inc1"),
        interpolation=interpolation,
        re_prob=float(config.get("reprob", 0.0)),
        hflip=float(config.get("hflip", 0.5)),
        scale=tuple(config.get("scale", (0.08, 1.0))),
        **common,
    )
    evaluation = build_transform(is_training=False, interpolation=interpolation, **common)
    return {"train": train, "eval": evaluation}


def time_per_image(files: Sequence[Path], work: Callable[[Path], Any], rounds: int) -> float:
    """Median over ``rounds`` passes of the seconds per image that ``work`` takes on ``files``."""
    work(files[0])  # warm-up: first-call imports and allocations
    per_image = []
    for _ in range(rounds):
        start = time.perf_counter()
        for path in files:
            work(path)
        per_image.append((time.perf_counter() - start) / len(files))
    return statistics.median(per_image)


def measure(files: Sequence[Path], config: dict[str, Any], rounds: int = 3) -> dict[str, float]:
    """Images per second for ``decode``, ``train`` and ``eval`` on ``files`` (one thread)."""

    def decode(path: Path) -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")

    transforms = recipe_transforms(config)
    work = {
        "decode": decode,
        "train": lambda path: transforms["train"](decode(path)),
        "eval": lambda path: transforms["eval"](decode(path)),
    }
    return {name: 1.0 / time_per_image(files, fn, rounds) for name, fn in work.items()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_report(rates: dict[str, float], batch: int, target: float | None) -> str:
    """The table of images per second per worker, and the workers a target rate needs."""
    lines = [f"{'pipeline':<8} {'img/s per worker':>17} {'ms per image':>13} {'workers for target':>19}"]
    for name, rate in rates.items():
        workers = f"{target / rate:.1f}" if target else "-"
        lines.append(f"{name:<8} {rate:>17.1f} {1000.0 / rate:>13.2f} {workers:>19}")
    if target:
        lines.append(f"target: {target:.0f} img/s (e.g. a GPU step of {batch} images every {batch / target:.3f} s)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="JPEG files written and timed (default 96)")
    parser.add_argument("--size", type=int, nargs=2, default=[375, 500], help="file height width (default 375 500)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "bnext_tiny.yaml", help="recipe YAML")
    parser.add_argument("--img-size", type=int, default=None, help="overrides the recipe's img_size")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the files; the median counts")
    parser.add_argument("--target", type=float, default=None, help="img/s the trainer consumes: prints workers needed")
    parser.add_argument("--batch", type=int, default=256, help="batch size used to phrase --target (default 256)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.rounds < 1 or min(args.size) < 8:
        raise SystemExit("--images and --rounds must be >= 1 and --size at least 8 8")
    if not args.config.is_file():
        raise SystemExit(f"--config {args.config}: no such file; pass a recipe from configs/")
    config = yaml.safe_load(args.config.read_text()) or {}
    if args.img_size is not None:
        config["img_size"] = args.img_size
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), classes=1, per_class={"train": args.images}, size=tuple(args.size))
        files = sorted((root / "train").rglob("*.JPEG"))
        rates = measure(files, config, args.rounds)
    print(
        f"machine: {cpu_model()} | torch {torch.__version__} | 1 thread | {args.images} JPEGs of "
        f"{args.size[0]}x{args.size[1]} | recipe {args.config.name}, img_size {config.get('img_size', 224)}"
    )
    print(format_report(rates, args.batch, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
