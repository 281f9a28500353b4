"""Write a synthetic ImageNet-layout folder of JPEG files (for speed checks; the pixels are noise).

``python benchmarks/synthetic_imagefolder.py --output DIR [--classes 10] [--train 64] [--val 16] [--size 375 500]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(root: Path, classes: int, per_class: dict[str, int], size: tuple[int, int], seed: int = 0) -> Path:
    """``root/{train,val}/class_k/i.JPEG``: smooth random images of ``size`` (height, width), ImageNet-like JPEGs."""
    rng = np.random.default_rng(seed)
    height, width = size
    for split, count in per_class.items():
        for label in range(classes):
            folder = root / split / f"class_{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                # Low-resolution noise upsampled: compresses and decodes like a photo, not like static.
                small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
                image.save(folder / f"{index:05d}.JPEG", quality=90)
    return root


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="the folder to write (train/ and val/ inside)")
    parser.add_argument("--classes", type=int, default=10, help="class folders per split (default: %(default)s)")
    parser.add_argument("--train", type=int, default=64, help="images per class in train/ (default: %(default)s)")
    parser.add_argument("--val", type=int, default=16, help="images per class in val/ (default: %(default)s)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=[375, 500], help="height width (default: %(default)s, ImageNet's typical)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    args = build_parser().parse_args(argv)
    write_folder(Path(args.output), args.classes, {"train": args.train, "val": args.val}, tuple(args.size))
    print(args.output)


if __name__ == "__main__":
    main()
