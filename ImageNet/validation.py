"""Evaluate a checkpoint (ours or an official release file) with the training script's protocol.

``ImageNet/validate.py`` is a thin wrapper around :func:`main`. Works as one process
or under torchrun (the validation set is sharded and the counts reduced exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import models

from . import checkpointing
from .config import ConfigError
from .data import DataError, build_datasets, build_loaders
from .distributed import cleanup, init_distributed
from .engine import evaluate
from .training import AMP_DTYPES

# Model flags that a checkpoint written by ImageNet/train.py records in its config.
MODEL_KEYS = ("model", "stem", "width_mult", "stage_channels", "elm_attention", "info_recoupling", "real_bits")


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``validate.py``; model flags default to the checkpoint's recorded config."""
    parser = argparse.ArgumentParser(
        description="Evaluate a BNext checkpoint: top-1/top-5 on the validation split (last line is JSON).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="ours (last.pth/best.pth), official .pth.tar, safetensors")
    parser.add_argument("--data-dir", required=True, help="dataset root with val/<class>/ (or CIFAR root)")
    parser.add_argument("--dataset", default="folder", choices=["folder", "cifar10", "cifar100"])
    parser.add_argument("--model", default=None, choices=models.list_models(), help="default: from the checkpoint")
    parser.add_argument("--stem", default=None, choices=["imagenet", "cifar"], help="default: checkpoint or imagenet")
    parser.add_argument("--width-mult", type=float, default=None, help="default: checkpoint or 1.0")
    parser.add_argument("--stage-channels", type=int, nargs="+", default=None, help="default: checkpoint or none")
    parser.add_argument("--elm-attention", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--info-recoupling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--real-bits", type=int, default=None, help="32 or 2-16 (the 8-bit variant: 8); default: checkpoint or 32"
    )
    parser.add_argument("--img-size", type=int, default=224, help="evaluation resolution")
    parser.add_argument("--crop-pct", type=float, default=0.95, help="center-crop fraction (official 0.95)")
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch, split over processes")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser


def _model_settings(args: argparse.Namespace, recorded: dict) -> dict:
    defaults = {"stem": "imagenet", "width_mult": 1.0, "elm_attention": True, "info_recoupling": True, "real_bits": 32}
    settings = {}
    for key in MODEL_KEYS:
        value = getattr(args, key)
        settings[key] = value if value is not None else recorded.get(key, defaults.get(key))
    if settings["model"] is None:
        raise ConfigError("--model is required for checkpoints that do not record their configuration")
    return settings


def _load_weights(model: torch.nn.Module, path: Path, use_ema: bool) -> None:
    if use_ema:
        state = checkpointing.load(path).get("ema")
        if not state:
            raise ConfigError(f"{str(path)!r} holds no EMA weights (train with --model-ema)")
        models.check_state_dict(model, state)
        model.load_state_dict(state)
        models.apply_constraints(model)
    else:
        models.load_checkpoint(model, path)


def validate(args: argparse.Namespace) -> dict[str, float]:
    """Build the model from the checkpoint, evaluate it, and return top-1/top-5/loss."""
    info = init_distributed(args.device)
    path = Path(args.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    recorded = {}
    if not path.name.endswith(".safetensors"):
        raw = checkpointing.load(path)
        recorded = raw.get("config", {}) if isinstance(raw, dict) else {}
    settings = _model_settings(args, recorded)
    _, val_set, classes = build_datasets(
        dataset=args.dataset,
        data_dir=args.data_dir,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
    )
    model = models.create_model(settings.pop("model"), num_classes=len(classes), **settings)
    _load_weights(model, path, args.ema)
    model = model.to(info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, val_loader, _ = build_loaders(
        val_set,
        val_set,
        batch_size=max(1, args.batch_size // info.world_size),
        workers=args.workers,
        world_size=info.world_size,
        rank=info.rank,
        seed=0,
    )
    result = evaluate(model, val_loader, info.device, amp_dtype=AMP_DTYPES[args.amp], channels_last=args.channels_last)
    result["temperature"] = models.get_temperature(model)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: prints top-1/top-5, then the result as one JSON line."""
    args = build_parser().parse_args(argv)
    try:
        result = validate(args)
    except (ConfigError, DataError, models.CheckpointMismatchError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"top-1 {result['top1']:.3f}  top-5 {result['top5']:.3f}  ({int(result['count'])} images)")
        print(json.dumps({"checkpoint": args.checkpoint, **result}))
    return 0
