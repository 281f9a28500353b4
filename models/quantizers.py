"""Quantizers: the sign of activations, the progressive binarization of weights, and
the 8-bit (or other low-bit) fake quantizer of the real-valued parts.

All three are straight-through estimators written as ``torch.autograd.Function`` so
that the forward value is exactly ``±1`` (or the progressive ``clamp(W/T, -1, 1)``, or
the quantized level) and the backward is a single (masked) copy, with no host
synchronisation. The official code builds the same estimators from
``(b - x).detach() + x``, which agrees with these to float32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Activations outside this range get no gradient through the sign (clipped STE).
ACTIVATION_CLIP = 1.5
#: Smallest temperature used as a divisor, as in the official code.
MIN_TEMPERATURE = 1e-8
#: Official activation clips of the low-bit real layers (``bnext_quant.py``): convolutions, linear.
CONV_INPUT_CLIP = 1000.0
LINEAR_INPUT_CLIP = 25.0


class _SignSTE(torch.autograd.Function):
    """``sign(x)`` forward; gradient passed where ``|x| <= clip``, zero elsewhere.

    The forward is one ``sign``; nothing is computed for the backward unless a
    gradient is needed. The backward is one fused ``hardtanh_backward`` on the saved
    input, which passes the gradient where ``lo < x < hi`` (strictly); with ``hi`` the
    next representable number above ``clip`` that is exactly ``|x| <= clip``, the
    inclusive clip of the official ``clamp`` STE. Building a boolean mask in the
    forward instead costs about four times a ``sign`` on the CPU (``abs``, ``le``),
    at a quarter of the memory of the saved input.
    """

    @staticmethod
    def forward(x: torch.Tensor, clip: float) -> torch.Tensor:
        return torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, clip = inputs
        ctx.clip = clip
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        bound = _just_above(ctx.clip, x.dtype)
        return torch.ops.aten.hardtanh_backward(grad_output, x, -bound, bound), None


def _just_above(value: float, dtype: torch.dtype) -> float:
    """The next number above the positive ``value`` in ``dtype``'s precision, as a Python float.

    ``hardtanh_backward`` compares in the tensor's precision (float32 for the
    reduced-precision types). Written with ``math.frexp``/``ldexp`` on constants so
    that ``torch.compile`` folds it instead of breaking the graph.
    """
    mantissa_bits = 52 if dtype == torch.float64 else 23
    _, exponent = math.frexp(value)
    return value + math.ldexp(1.0, exponent - 1 - mantissa_bits)


class _ProgressiveBinarizeSTE(torch.autograd.Function):
    """Progressive weight binarization with an identity straight-through gradient.

    ``clamp(W / T, -1, 1)`` while ``T >= threshold``, exact ``sign(W)`` below it.
    Both regimes are one division chain, ``clamp(W / d1 / d2, -1, 1)``, whose divisors
    are picked on the device from the temperature tensor (no host synchronisation,
    and no second branch computed and thrown away as a ``torch.where`` would):
    ``d1 = max(T, 1e-8)``, ``d2 = 1`` gives the official soft weights bit for bit;
    ``d1 = d2 = tiny`` (the smallest normal number of the dtype) sends every nonzero
    weight, subnormal ones included, beyond ``±1`` and keeps zeros at zero, which is
    ``sign(W)`` exactly. A CPU training step takes the one-pass kernel of
    :func:`models.fused_ops.binarize_weight` instead, which reads the temperature on the
    host (a CPU tensor: no synchronisation to wait for) and gives the same bits.
    """

    # forward(ctx, ...) rather than a separate setup_context: apply() would otherwise bind the
    # arguments through inspect.signature on every call, about as long as the small weights' kernel.
    @staticmethod
    def forward(
        ctx, weight: torch.Tensor, temperature: torch.Tensor, threshold: float, training: bool, tap_major: bool
    ) -> torch.Tensor:
        from . import fused_ops  # here, not at the top: fused_ops imports this module

        # A training step on the CPU: one C++ pass, divisors picked on the host (the same bits),
        # written in the layout of the tap products when the convolution takes them.
        binarized = fused_ops.binarize_weight(weight, temperature, threshold, tap_major) if training else None
        if binarized is not None:
            return binarized
        # The divisors in the dtype of the division (a float32 temperature promotes bf16 weights).
        dtype = torch.promote_types(weight.dtype, temperature.dtype)
        tiny = torch.finfo(dtype).tiny
        hard = temperature < threshold
        first = temperature.clamp(min=MIN_TEMPERATURE).to(dtype).masked_fill(hard, tiny)
        second = torch.ones_like(first).masked_fill(hard, tiny)
        return torch.div(weight, first).div_(second).clamp_(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None, None, None


class _MinMaxQuantizeSTE(torch.autograd.Function):
    """Asymmetric min-max fake quantization to ``2**bits`` levels per slice along dim 0.

    Each slice (an output channel of a weight, a sample of an activation) is clipped
    to ``±clip``, then rounded onto ``2**bits - 1`` equal steps between its own minimum
    and maximum. The gradient passes straight through inside the clip range.
    """

    @staticmethod
    def forward(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
        clipped = x.clamp(-clip, clip)
        flat = clipped.reshape(clipped.shape[0], -1)
        low = flat.amin(dim=1, keepdim=True)
        high = flat.amax(dim=1, keepdim=True)
        # A constant slice has no range: a tiny step rounds it onto itself.
        step = ((high - low) / (2**bits - 1)).clamp(min=torch.finfo(x.dtype).tiny)
        return (torch.round((flat - low) / step) * step + low).reshape(x.shape)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, clip = inputs
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x.abs() <= clip)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None


def fake_quantize(x: torch.Tensor, bits: int, clip: float = float("inf")) -> torch.Tensor:
    """Round ``x`` to ``2**bits`` levels per slice along dim 0 (min-max, asymmetric), STE gradient.

    Used per output channel for weights and per sample for activations, as the
    official ``bnext_quant.py`` does. Its weight quantizer first divides a row by
    ``2 * mean|W|`` and multiplies back afterwards; a min-max quantizer is invariant
    to that positive scale, so it is left out here.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"fake quantization needs 2 to 16 bits, got {bits}")
    return _MinMaxQuantizeSTE.apply(x, bits, clip)


def sign_ste(x: torch.Tensor, clip: float = ACTIVATION_CLIP) -> torch.Tensor:
    """Binarize ``x`` to ``sign(x)`` with the clipped straight-through gradient.

    ``sign(0) == 0``, as in torch and in the official implementation.
    """
    return _SignSTE.apply(x, clip)


class _PreparedBinarization(torch.autograd.Function):
    """A binarized weight made before the step (see :meth:`models.layers.BinaryConv2d.apply_constraints_`)
    entered into the step's graph, with the identity straight-through gradient of
    :class:`_ProgressiveBinarizeSTE`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, binarized: torch.Tensor) -> torch.Tensor:
        return binarized.view_as(binarized)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def prepared_binarization(weight: torch.Tensor, binarized: torch.Tensor) -> torch.Tensor:
    """``binarized`` (computed from ``weight`` earlier) as if binarized now: the gradient reaches ``weight``."""
    return _PreparedBinarization.apply(weight, binarized)


def progressive_binarize(
    weight: torch.Tensor, temperature: torch.Tensor, threshold: float, tap_major: bool = False
) -> torch.Tensor:
    """Binarize latent weights at a temperature; the gradient reaches ``weight`` unchanged.

    ``tap_major`` asks for the result in the channels-last layout of the tap products
    (:mod:`models.tap_conv`) where the one-pass training kernel writes it; the values
    are the same either way, and elsewhere the layout is the weight's own. While
    ``torch.compile`` traces a CPU training step the kernel is an operator of the graph
    (:func:`models.fused_ops.binarize_weight_in_graph`).
    """
    # Inside the autograd function grad mode is off: whether this is a training step is decided here.
    # A trace would record the flag as a constant of its graph, so traces always say False.
    training = torch.is_grad_enabled() and weight.requires_grad and not torch.jit.is_tracing()
    if training and torch.compiler.is_compiling():
        from . import fused_ops  # here, not at the top: fused_ops imports this module

        binarized = fused_ops.binarize_weight_in_graph(weight, temperature, threshold, tap_major)
        if binarized is not None:
            return binarized
    return _ProgressiveBinarizeSTE.apply(weight, temperature, threshold, training, tap_major)


class LearnableBias(nn.Module):
    """Per-channel learnable threshold added before the sign (RSign-style ``x + beta``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class HardSign(nn.Module):
    """1-bit activation quantizer: ``sign(x)`` with the STE clipped at ``±clip``.

    It owns a ``temperature`` buffer because the official models do (released
    checkpoints carry it, and the temperature schedule scales it), but, as in the
    official code (``progressive=False``), the temperature does not change the
    output: ``sign(clamp(x / T, -1, 1)) == sign(x)`` for every ``T > 0``.
    """

    output_bits = 1

    def __init__(self, clip: float = ACTIVATION_CLIP) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, self.clip)

    def extra_repr(self) -> str:
        return f"bits=1, clip={self.clip}"
