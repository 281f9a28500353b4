"""Command-line flags of the training script, with YAML files that set their defaults.

Precedence: built-in defaults < the YAML file given with ``-c/--config`` < the command
line. The resolved configuration is saved as ``config.yaml`` beside each run.
Flag names follow timm's ``train.py`` where timm has the flag.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import models

from .host_memory import add_huge_pages_flag, add_keep_freed_memory_flag


class ConfigError(ValueError):
    """A configuration file or flag value that cannot be used; the message names the key."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _real_bits(text: str) -> int:
    value = int(text)
    if value != 32 and not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be 32 (float) or 2 to 16 bits, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The training script's parser; every flag is documented in ``--help``."""
    parser = argparse.ArgumentParser(
        description="Train a BNext binary network (DDP through torchrun; CPU or GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-c", "--config", default=None, help="YAML file whose keys set the defaults of these flags")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None, help="dataset root: train/<class>/*, val/<class>/* (or CIFAR root)")
    data.add_argument("--dataset", default="folder", choices=["folder", "cifar10", "cifar100"], help="dataset kind")
    data.add_argument("--download", action="store_true", help="download CIFAR into --data-dir if it is missing")
    data.add_argument("--num-classes", type=_positive_int, default=None, help="classes (default: from the data)")
    data.add_argument("--img-size", type=_positive_int, default=224, help="training and evaluation resolution")
    data.add_argument("--crop-pct", type=float, default=0.95, help="evaluation center-crop fraction (official 0.95)")
    data.add_argument("--interpolation", default="bicubic", help="resize interpolation")
    data.add_argument("--aa", default="rand-m7-mstd0.5-inc1", help="timm RandAugment policy; 'none' disables it")
    data.add_argument("--reprob", type=_non_negative_float, default=0.0, help="random erasing probability")
    data.add_argument(
        "--scale", type=float, nargs=2, default=[0.08, 1.0], help="RandomResizedCrop area range (official 0.08 1.0)"
    )
    data.add_argument("--hflip", type=_non_negative_float, default=0.5, help="horizontal flip probability")
    data.add_argument("--mixup", type=_non_negative_float, default=0.0, help="mixup alpha (0 disables)")
    data.add_argument("--cutmix", type=_non_negative_float, default=0.0, help="cutmix alpha (0 disables)")
    data.add_argument("--mixup-prob", type=_non_negative_float, default=1.0, help="probability of mixup or cutmix")
    data.add_argument("--mixup-switch-prob", type=_non_negative_float, default=0.5, help="chance of cutmix over mixup")
    data.add_argument("--smoothing", type=_non_negative_float, default=0.0, help="label smoothing")
    data.add_argument("--aug-repeats", type=_positive_int, default=1, help="repeated augmentation count (1 = off)")
    data.add_argument("--workers", type=int, default=4, help="data-loading processes per training process")
    data.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True, help="pin memory on CUDA")
    data.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip undecodable images (using the next good one) and count them per epoch, instead of stopping",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="bnext_tiny",
        help=f"network: {', '.join(models.list_models())}, or any timm model (e.g. a full-precision teacher)",
    )
    model.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"], help="stride-2 or stride-1 stem")
    model.add_argument("--width-mult", type=float, default=1.0, help="width multiplier (multiples of 8)")
    model.add_argument("--stage-channels", type=int, nargs="+", default=None, help="replacement width list")
    model.add_argument(
        "--elm-attention", action=argparse.BooleanOptionalAction, default=True, help="ELM-attention blocks"
    )
    model.add_argument(
        "--info-recoupling", action=argparse.BooleanOptionalAction, default=True, help="mix-to-binary attention"
    )
    model.add_argument(
        "--real-bits",
        type=_real_bits,
        default=32,
        help="bits of the real-valued convolutions and classifier: 32 (float) or 2-16 (fake-quantized; 8 is the "
        "8-bit variant); BNext models only",
    )
    model.add_argument("--initial-checkpoint", default=None, help="weights to start from (not a resume)")

    kd = parser.add_argument_group("distillation (off unless --teacher is given)")
    kd.add_argument("--teacher", default=None, help="main teacher: a timm model name (e.g. efficientnet_b2)")
    kd.add_argument("--assistant-teachers", nargs="*", default=[], help="one assistant teacher per CKD round, in order")
    kd.add_argument(
        "--round-starts", type=int, nargs="*", default=None, help="first epoch of each round (default: equal splits)"
    )
    kd.add_argument(
        "--teacher-weights",
        nargs="*",
        default=[],
        help="NAME=PATH local weights (safetensors or state dict) per teacher; others use timm pretrained=True",
    )
    kd.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature (official 1)")
    kd.add_argument("--kd-label-weight", type=float, default=0.0, help="weight of a label loss term (official 0)")
    kd.add_argument(
        "--kd-weighting",
        default="sample",
        choices=["sample", "batch", "uniform"],
        help="per-sample teacher weights; 'batch' is what the official code computes",
    )
    kd.add_argument(
        "--kd-sign",
        default="hard",
        choices=["hard", "easy"],
        help="hard: weight the teacher the student matches worse (official); easy: the closer one",
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=_positive_int, default=512, help="training epochs")
    optim.add_argument("--batch-size", type=_positive_int, default=512, help="GLOBAL batch, split over processes")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (not scaled by batch)")
    optim.add_argument("--weight-decay", type=float, default=1e-3, help="weight decay of real-valued parameters")
    optim.add_argument("--binary-weight-decay", type=float, default=1e-8, help="weight decay of latent binary weights")
    optim.add_argument("--opt-betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    optim.add_argument("--opt-eps", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--clip-grad", type=float, default=5.0, help="gradient-norm clip (0 disables)")
    optim.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs before the cosine")
    optim.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of warm-up")
    optim.add_argument("--min-lr", type=float, default=1e-7, help="cosine floor")
    optim.add_argument(
        "--sched-on-updates", action="store_true", help="step the learning rate every iteration (official: per epoch)"
    )
    optim.add_argument("--temperature-start", type=float, default=1.0, help="binarization temperature at epoch 0")
    optim.add_argument("--temperature-decay", type=float, default=0.9, help="temperature factor per epoch")

    run = parser.add_argument_group("run")
    run.add_argument("--output", default="output/train", help="run directory: checkpoints, logs, TensorBoard")
    run.add_argument("--resume", default=None, help="checkpoint to resume from (default: OUTPUT/last.pth if any)")
    run.add_argument(
        "--auto-resume", action=argparse.BooleanOptionalAction, default=True, help="resume from OUTPUT/last.pth"
    )
    run.add_argument("--seed", type=int, default=42, help="random seed")
    run.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision for the student")
    run.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    run.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model, with models.compile_options (on the CPU: the fused kernels' NCHW layout kept)",
    )
    run.add_argument(
        "--sync-bn",
        action="store_true",
        help="batch-norm statistics over the global batch (all processes); torch's SyncBatchNorm on CUDA, "
        "ImageNet/sync_batchnorm.py on the CPU (gloo)",
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels and per-sample augmentation seeds: the same command gives bit-identical "
        "weights, also across a kill and resume, and whatever the --workers count",
    )
    run.add_argument(
        "--cpu-threads",
        type=_positive_int,
        default=None,
        help="torch threads per process on the CPU; unset: the cores divided among the processes of the node",
    )
    add_keep_freed_memory_flag(run)
    add_huge_pages_flag(run)
    run.add_argument("--model-ema", action="store_true", help="keep and evaluate an EMA of the weights")
    run.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per step")
    run.add_argument(
        "--checkpoint-minutes",
        type=_non_negative_float,
        default=30.0,
        help="also save last.pth inside an epoch when this many minutes passed since the last save",
    )
    run.add_argument(
        "--checkpoint-steps",
        type=_non_negative_int,
        default=0,
        help="also save last.pth inside an epoch every this many steps (0: only by --checkpoint-minutes)",
    )
    run.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip a step whose loss or gradient is NaN/inf (no update, on every process) and count it, "
        "instead of stopping the run",
    )
    run.add_argument("--log-interval", type=_positive_int, default=50, help="iterations between log lines")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument(
        "--debug-nan-at-step",
        type=int,
        default=None,
        help="test hook: make the loss NaN at this global step (on rank 0 only, so that a multi-process run "
        "shows that every process stops or skips together)",
    )
    return parser


def _flag_types(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}


def _check_yaml_value(key: str, value: Any, action: argparse.Action) -> Any:
    """Validate one YAML value against its flag: type, choices, list-ness."""
    is_switch = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
    if is_switch:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if many else [value]
    if many and not isinstance(value, list):
        raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
    converted = []
    for item in items:
        if isinstance(item, (list, dict)) or isinstance(item, bool):
            raise ConfigError(f"config key {key!r} has a value of the wrong type: {item!r}")
        try:
            converted.append(action.type(str(item)) if action.type else str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ConfigError(f"config key {key!r}: {item!r} is not valid ({error})") from error
        if action.choices is not None and converted[-1] not in action.choices:
            raise ConfigError(f"config key {key!r} must be one of {list(action.choices)}, got {item!r}")
    return converted if many else converted[0]


def load_yaml_defaults(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config into flag defaults; unknown keys and wrong types raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of flag names to values")
    actions = _flag_types(parser)
    defaults = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in config file {str(path)!r}{hint}")
        defaults[dest] = _check_yaml_value(str(key), value, actions[dest])
    return defaults


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags with the YAML defaults of ``-c/--config`` applied first."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default=None)
    pre, _ = config_parser.parse_known_args(argv)
    if pre.config:
        try:
            parser.set_defaults(**load_yaml_defaults(pre.config, parser))
        except ConfigError as error:
            parser.error(str(error))
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration as plain data (YAML/JSON-safe), for ``config.yaml`` and checkpoints."""
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in sorted(vars(args).items())}
