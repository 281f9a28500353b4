"""Build BNext networks by name, and register the same names with timm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .bnext import STEMS, BNext, BNext18
from .precision import FULL_PRECISION, quantize_real_layers

#: Official channel lists; index 0 is the stem (``src/bnext.py``).
BNEXT_CHANNELS: dict[str, list[int]] = {
    "bnext_tiny": [32] + [64] + [128] * 2 + [256] * 2 + [512] * 6 + [1024] * 2,
    "bnext_small": [48] + [96] + [192] * 2 + [384] * 2 + [768] * 6 + [1536] * 2,
    "bnext_middle": [48] + [96] + [192] * 4 + [384] * 4 + [768] * 8 + [1536] * 4,
    "bnext_large": [64] + [128] + [256] * 4 + [512] * 4 + [1024] * 16 + [2048] * 4,
}
#: Official BNext-18 stage widths (``src/birealnet.py``).
BNEXT18_CHANNELS = [64, 128, 256, 512]

MODEL_NAMES = (*BNEXT_CHANNELS, "bnext18")
#: Narrowest layer: the squeeze-excitation gates reduce channels by 8.
MIN_CHANNELS = 8


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(MODEL_NAMES)


def _round8(value: float) -> int:
    return max(MIN_CHANNELS, int(round(value / 8)) * 8)


def _scale_bnext_channels(channels: Sequence[int], width_mult: float) -> list[int]:
    # Scale the stem, then replay keep/double from the original list, so that
    # rounding can never break a block's "same or twice the input" rule.
    scaled = [_round8(channels[0] * width_mult)]
    for previous, current in zip(channels, channels[1:]):
        scaled.append(scaled[-1] * (2 if current != previous else 1))
    return scaled


def _check_channels(name: str, channels: Sequence[int]) -> list[int]:
    channels = list(channels)
    if not all(isinstance(c, int) and c >= MIN_CHANNELS for c in channels):
        raise ValueError(f"stage_channels must be integers >= {MIN_CHANNELS}, got {channels}")
    if name == "bnext18":
        if len(channels) != 4:
            raise ValueError(f"bnext18 takes 4 stage widths (official {BNEXT18_CHANNELS}), got {channels}")
        return channels
    if len(channels) < 2:
        raise ValueError(f"stage_channels needs the stem width and at least one block width, got {channels}")
    for previous, current in zip(channels, channels[1:]):
        if current not in (previous, 2 * previous):
            raise ValueError(
                f"each BNext block keeps or doubles its input width; {previous} -> {current} in {channels} does neither"
            )
    return channels


def create_model(
    name: str,
    num_classes: int = 1000,
    stem: str = "imagenet",
    elm_attention: bool = True,
    info_recoupling: bool = True,
    stage_channels: Sequence[int] | None = None,
    width_mult: float = 1.0,
    real_bits: int = FULL_PRECISION,
) -> nn.Module:
    """Build a BNext network.

    Args:
        name: one of ``bnext_tiny``, ``bnext_small``, ``bnext_middle``, ``bnext_large``, ``bnext18``.
        num_classes: size of the classifier.
        stem: ``"imagenet"`` (stride-2 stem; 7x7 conv and max-pool for BNext-18) or
            ``"cifar"`` (stride-1 3x3 stem, no max-pool). Independent of ``num_classes``.
        elm_attention: ELM-attention in the even-indexed blocks (ablation switch).
        info_recoupling: mix-to-binary attention in every module (ablation switch).
        stage_channels: replaces the channel list with the same block layout rule
            (stem width first for BNext-T/S/M/L; the four stage widths for BNext-18).
        width_mult: scales the channel list, rounded to multiples of 8.
        real_bits: 32 keeps the real-valued convolutions and the classifier in float;
            2 to 16 (usually 8) fake-quantizes them (stem, squeeze-excitation, BNext-18's
            shortcuts, classifier; see :func:`models.precision.quantize_real_layers`).
            The state-dict keys are the same either way.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if real_bits != FULL_PRECISION and not (isinstance(real_bits, int) and 2 <= real_bits <= 16):
        raise ValueError(f"real_bits must be {FULL_PRECISION} (float) or an integer from 2 to 16, got {real_bits!r}")
    for flag, value in (("elm_attention", elm_attention), ("info_recoupling", info_recoupling)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")

    channels = _check_channels(name, stage_channels if stage_channels is not None else _default_channels(name))
    model = _build(name, channels, num_classes, stem, elm_attention, info_recoupling, width_mult)
    return quantize_real_layers(model, real_bits) if real_bits != FULL_PRECISION else model


def _build(
    name: str,
    channels: list[int],
    num_classes: int,
    stem: str,
    elm_attention: bool,
    info_recoupling: bool,
    width_mult: float,
) -> nn.Module:
    if name == "bnext18":
        if not (elm_attention and info_recoupling):
            raise ValueError(
                "bnext18 has no ablation variants in the official code; keep elm_attention and info_recoupling"
            )
        if width_mult != 1.0:
            channels = [_round8(c * width_mult) for c in channels]
        return BNext18(channels, num_classes, stem)
    if width_mult != 1.0:
        channels = _scale_bnext_channels(channels, width_mult)
    return BNext(channels, num_classes, stem, elm_attention, info_recoupling)


def _default_channels(name: str) -> list[int]:
    return BNEXT18_CHANNELS if name == "bnext18" else BNEXT_CHANNELS[name]


def _timm_entry(name: str):
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # timm passes its own bookkeeping arguments; a local weights file may come as
        # pretrained_cfg_overlay=dict(file=PATH), timm's way of naming a checkpoint on disk.
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        for key in ("pretrained_cfg", "cache_dir"):
            kwargs.pop(key, None)
        model = create_model(name, **kwargs)
        if pretrained:
            weights = overlay.get("file")
            if not weights:
                raise ValueError(
                    f"{name}: the official weights are published as Google-Drive files, which timm cannot fetch; "
                    "download one and pass pretrained_cfg_overlay=dict(file=PATH), or build the model and call "
                    "models.load_checkpoint(model, PATH)"
                )
            from .checkpoint import load_checkpoint

            load_checkpoint(model, weights)
        return model

    build.__name__ = name
    build.__qualname__ = name
    build.__doc__ = f"{name} (see models.create_model for the keyword arguments)."
    return build


def register_with_timm() -> None:
    """Register every model name with timm so that ``timm.create_model(name, ...)`` works."""
    from timm.models import is_model, register_model

    for name in MODEL_NAMES:
        if not is_model(name):
            register_model(_timm_entry(name))
