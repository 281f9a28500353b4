"""Read the precision tags that layers carry, and act on the binarizers through them.

Nothing here looks at module or parameter names: a layer is binary because it says
``weight_bits = 1``, and a binarizer is one because it owns a ``temperature`` buffer
and is a :class:`~models.quantizers.HardSign` or :class:`~models.layers.BinaryConv2d`.
Layers without tags (``nn.Conv2d``, ``nn.Linear``, norms) are 32-bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .layers import BinaryConv2d, quantized_copy
from .quantizers import HardSign

FULL_PRECISION = 32


@dataclass(frozen=True)
class LayerPrecision:
    """Bits of a layer's weights and of the input it multiplies them with."""

    weight_bits: int
    input_bits: int

    @property
    def is_binary(self) -> bool:
        """True for 1-bit weights and 1-bit inputs (XNOR/popcount arithmetic)."""
        return self.weight_bits == 1 and self.input_bits == 1


def layer_precision(module: nn.Module) -> LayerPrecision | None:
    """The precision of a layer that multiplies by weights, or None for other modules."""
    if hasattr(module, "weight_bits"):
        return LayerPrecision(module.weight_bits, getattr(module, "input_bits", FULL_PRECISION))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return LayerPrecision(FULL_PRECISION, FULL_PRECISION)
    return None


def parameter_bits(model: nn.Module) -> dict[str, int]:
    """Bits each parameter is meant to be stored with, by its state-dict name.

    A tagged layer's ``weight`` has the layer's ``weight_bits``; every other
    parameter (biases, norms, PReLU slopes, thresholds, mixing scales) is 32-bit.
    """
    bits: dict[str, int] = {}
    for module_name, module in model.named_modules():
        tagged = getattr(module, "weight_bits", None)
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            bits[full] = tagged if (tagged is not None and param_name == "weight") else FULL_PRECISION
    return bits


def latent_binary_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Named latent weights of the 1-bit layers (what the optimizer treats apart)."""
    bits = parameter_bits(model)
    for name, param in model.named_parameters():
        if bits[name] == 1:
            yield name, param


def constrained_binary_weights(model: nn.Module) -> Iterator[tuple[nn.Parameter, BinaryConv2d]]:
    """The latent binary weights with the layer that constrains each one.

    The layer's ``update_and_constrain_`` takes an optimizer's AdamW update of that
    weight into its constraint pass (:meth:`~models.layers.BinaryConv2d.update_and_constrain_`).
    """
    for module in model.modules():
        if isinstance(module, BinaryConv2d) and module.weight_bits == 1:
            yield module.weight, module


def binarizers(model: nn.Module) -> Iterator[nn.Module]:
    """Every module whose output is binarized at a temperature (activation signs, binary convs)."""
    for module in model.modules():
        if isinstance(module, (HardSign, BinaryConv2d)):
            yield module


@torch.no_grad()
def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set the temperature of every binarizer; below the sign threshold weights are exact signs."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    for module in binarizers(model):
        module.temperature.fill_(temperature)


@torch.no_grad()
def get_temperature(model: nn.Module) -> float:
    """The weight-binarization temperature of the model (that of its first binary conv).

    Reads one scalar from the device: call it for logging, not inside a step.
    """
    for module in model.modules():
        if isinstance(module, BinaryConv2d):
            return float(module.temperature.item())
    raise ValueError("the model has no binary convolution")


@torch.no_grad()
def apply_constraints(model: nn.Module) -> None:
    """Project constrained parameters back into their range, in place.

    Latent binary weights to ``±1.5`` and info-recoupling mixes to ``[0, 1]``. The
    trainer calls this after every optimizer step; the official code does the same
    clamps at the start of every forward, which yields the same values.
    """
    for module in model.modules():
        # Looked up on the class: hasattr on a module that lacks it goes through nn.Module.__getattr__
        # and an exception, which costs more than the clamps of the small layers (BNext-T: 456 modules).
        if hasattr(type(module), "apply_constraints_"):
            module.apply_constraints_()


def quantize_real_layers(model: nn.Module, bits: int = 8) -> nn.Module:
    """Turn every full-precision conv/linear layer into its ``bits``-bit fake-quantized twin, in place.

    The layers keep their parameters (same tensors, same state-dict keys), so float
    checkpoints load into the quantized model and back. The first convolution in
    module order receives the image and is not given an input quantizer (see
    :class:`~models.layers.QuantConv2d`). Binary layers are left alone. Returns ``model``.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in (nn.Conv2d, nn.Linear)
        and layer_precision(module) == LayerPrecision(FULL_PRECISION, FULL_PRECISION)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no full-precision conv or linear layer to quantize")
    image_layer = next((module for _, module in targets if isinstance(module, nn.Conv2d)), None)
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, quantized_copy(module, bits, quantize_input=module is not image_layer))
    return model
