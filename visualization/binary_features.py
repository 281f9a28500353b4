"""Binary activation maps: the ±1 outputs of the activation binarizers for one image.

``python -m visualization.binary_features --model bnext_tiny --checkpoint FILE --image IMG
--out maps.png`` runs one image through the network and draws, for each chosen
:class:`~models.quantizers.HardSign` module, the first ``--channels`` channels of its
output as black (-1) / white (+1) maps; a value of exactly 0 (``sign(0) == 0``, only
where the binarizer's input is exactly 0) is drawn grey. Rows are layers, columns
channels. ``--list-layers`` prints the names of all HardSign modules.

The image is loaded with PIL and given the evaluation transform (resize the short side
to ``img_size / crop_pct``, center-crop, ImageNet mean and standard deviation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

import models
from ImageNet.data import DataError, build_transform, load_rgb

#: How many HardSign modules the default ``--layers`` picks, spread over the depth.
DEFAULT_LAYER_COUNT = 4


def hardsign_layers(model: nn.Module) -> list[str]:
    """Names of the model's :class:`~models.quantizers.HardSign` modules, in forward-definition order."""
    return [name for name, module in model.named_modules() if isinstance(module, models.HardSign)]


def default_layers(model: nn.Module, count: int = DEFAULT_LAYER_COUNT) -> list[str]:
    """``count`` HardSign modules evenly spaced from the first to the last."""
    names = hardsign_layers(model)
    if len(names) <= count:
        return names
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)] if count > 1 else names[:1]


@torch.no_grad()
def capture_binary_maps(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``images`` through ``model`` in eval mode and return each named HardSign's output.

    Returns:
        ``name -> tensor (N, C, H, W)`` of the binarizer outputs (values in ``{-1, 0, +1}``),
        in the order of ``layers``. The model's train/eval flags are restored.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"no module named {unknown[0]!r}; list the HardSign modules with --list-layers")
    not_binarizers = [name for name in layers if not isinstance(modules[name], models.HardSign)]
    if not_binarizers:
        raise ValueError(f"{not_binarizers[0]!r} is a {type(modules[not_binarizers[0]]).__name__}, not a HardSign")
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def store(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured[name] = output.detach().cpu()

        return store

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return {name: captured[name] for name in layers}


def load_image(path: str | Path, img_size: int, crop_pct: float = 0.95) -> torch.Tensor:
    """An image file as a ``(1, 3, img_size, img_size)`` tensor with the evaluation transform."""
    transform = build_transform(img_size=img_size, is_training=False, crop_pct=crop_pct)
    return transform(load_rgb(str(path))).unsqueeze(0)


def plot_maps(maps: dict[str, torch.Tensor], path: str | Path, channels: int = 16, title: str | None = None) -> None:
    """Draw the first ``channels`` maps of every layer (sample 0): rows layers, columns channels."""
    from matplotlib.colors import ListedColormap

    # Three exact colours: black for -1, grey for 0 (sign(0)), white for +1.
    colours = ListedColormap(["black", "0.55", "white"])
    shown = min(channels, max(tensor.shape[1] for tensor in maps.values()))
    rows = len(maps)
    fig = Figure(figsize=(1.0 * shown + 2.4, 1.05 * rows + 1.0), layout="constrained")
    grid = fig.add_gridspec(rows, shown)
    for row, (name, tensor) in enumerate(maps.items()):
        sample = tensor[0]
        for column in range(shown):
            ax = fig.add_subplot(grid[row, column])
            ax.set_xticks([])
            ax.set_yticks([])
            if column < sample.shape[0]:
                ax.imshow(sample[column].numpy(), cmap=colours, vmin=-1.5, vmax=1.5, interpolation="nearest")
            else:
                ax.axis("off")
            if row == 0:
                ax.set_title(f"ch {column}", fontsize=7)
            if column == 0:
                height, width = sample.shape[-2:]
                ax.set_ylabel(
                    f"{_short(name)}\n{sample.shape[0]}ch {height}x{width}",
                    fontsize=6,
                    rotation=0,
                    ha="right",
                    va="center",
                )
    fig.suptitle(title or "Binary activations (black -1, white +1, grey 0)", fontsize=9)
    fig.savefig(path, dpi=100)


def _short(name: str) -> str:
    # "feature.3.FFN_1.binary_activation" -> "feature.3.FFN_1": every row is a binarizer anyway.
    return name.removesuffix(".binary_activation")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m visualization.binary_features",
        description="Draw the ±1 activation maps of a BNext network's sign binarizers for one image.",
    )
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(models.list_models())}")
    parser.add_argument("--checkpoint", help="weights (state dict, official release or training checkpoint)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier size (must match the checkpoint)")
    parser.add_argument("--stem", choices=("imagenet", "cifar"), default="imagenet")
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--stage-channels", type=int, nargs="+")
    parser.add_argument("--elm-attention", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--info-recoupling", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image", help="image file (any format PIL reads)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--crop-pct", type=float, default=0.95)
    parser.add_argument("--layers", nargs="+", help="HardSign module names (default: a few spread over the depth)")
    parser.add_argument("--channels", type=int, default=16, help="channels per layer (the first N)")
    parser.add_argument("--out", help="PNG file to write")
    parser.add_argument("--list-layers", action="store_true", help="print the HardSign module names and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 2 for a bad model, checkpoint, image or layer name."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        model = models.create_model(
            args.model,
            num_classes=args.num_classes,
            stem=args.stem,
            elm_attention=args.elm_attention,
            info_recoupling=args.info_recoupling,
            stage_channels=args.stage_channels,
            width_mult=args.width_mult,
        )
        if args.list_layers:
            print("\n".join(hardsign_layers(model)))
            return 0
        if not args.image or not args.out:
            parser.error("--image and --out are required unless --list-layers is given")
        if args.checkpoint:
            models.load_checkpoint(model, args.checkpoint)
        layers = args.layers or default_layers(model)
        maps = capture_binary_maps(model, load_image(args.image, args.img_size, args.crop_pct), layers)
    except (DataError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{args.model}: binary activations of {Path(args.image).name} (black -1, white +1, grey 0)"
    plot_maps(maps, out, args.channels, title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
