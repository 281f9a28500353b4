"""Basic blocks of the binary designs BNext is compared with, for graph visualization.

Each block is written in this project from its paper's description (no code was
taken from the authors' repositories) and follows the block's published order of
operations; training-only devices (distillation losses, two-step schedules, the
papers' own weight estimators) are left out because they do not change the graph.

The binary convolutions are :class:`models.layers.BinaryConv2d` (or
:class:`ScaledBinaryConv2d`, which adds the per-output-channel scaling factor of
XNOR-Net, Bi-Real Net and ReActNet), so every block carries the project's
precision tags and :mod:`models.summary` counts its BOPs. Unlike BNext, which
binarizes its weights progressively, these designs use exact ``sign(W)`` from the
start: their convolutions are built with a zero temperature (see
:func:`exact_sign`).

:data:`DESIGNS` maps a design name to a constructor ``(in_planes, out_planes, stride)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import BasicBlock
from models.layers import BinaryConv2d, SqueezeExcite
from models.quantizers import HardSign, LearnableBias

#: The strides a basic block may have: the 2x2 pooled shortcuts only fit these.
STRIDES = (1, 2)


def _check_shape(design: str, in_planes: int, out_planes: int, stride: int, keep_or_double: bool = False) -> None:
    """Refuse channel counts and strides the design cannot build."""
    if in_planes < 1 or out_planes < 1:
        raise ValueError(f"{design}: channel counts must be positive, got {in_planes}->{out_planes}")
    if stride not in STRIDES:
        raise ValueError(f"{design}: stride must be 1 or 2, got {stride}")
    if keep_or_double and out_planes not in (in_planes, 2 * in_planes):
        raise ValueError(
            f"{design} blocks only keep or double the channels (out == in or out == 2*in), "
            f"got {in_planes}->{out_planes}"
        )


def exact_sign(conv: BinaryConv2d) -> BinaryConv2d:
    """Set a binary conv's temperature to zero, so that its weights are exact ``sign(W)`` from the start.

    The peer designs binarize their weights at once; BNext's progressive
    binarization is its own device. The gradient still reaches the latent weights
    through the project's identity straight-through estimator.
    """
    with torch.no_grad():
        conv.temperature.zero_()
    return conv


class _ApproxSignFunction(torch.autograd.Function):
    """``sign(x)`` forward; Bi-Real Net's piecewise-polynomial derivative backward.

    The surrogate is ``F(x) = 2x + x^2`` on ``[-1, 0)``, ``2x - x^2`` on ``[0, 1)``
    and ``±1`` outside, whose derivative is ``2 - 2|x|`` inside ``[-1, 1]`` and 0
    outside: a tighter fit to the sign than the clipped identity.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (2.0 - 2.0 * x.abs()).clamp(min=0.0)


class ApproxSign(HardSign):
    """Bi-Real Net's ApproxSign: exact ``sign(x)`` with the piecewise-polynomial STE.

    A :class:`~models.quantizers.HardSign` subclass so that it carries the same
    1-bit tag and temperature buffer; the temperature has no effect on the output.
    """

    def __init__(self) -> None:
        # The surrogate's derivative vanishes outside [-1, 1], the analogue of HardSign's clip.
        super().__init__(clip=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ApproxSignFunction.apply(x)

    def extra_repr(self) -> str:
        return "bits=1, ste=approx_sign"


class ScaledBinaryConv2d(BinaryConv2d):
    """Binary conv whose weight is ``alpha * sign(W)``, ``alpha = mean|W|`` per output channel.

    This is XNOR-Net's weight approximation (the l1-optimal scale for a binary
    filter), which Bi-Real Net ("magnitude-aware" binarization) and ReActNet keep.
    ``alpha`` is computed from the latent weights in the forward pass, so it also
    receives a gradient. The convolution itself is still 1-bit times 1-bit; the
    scale is a per-channel real multiplication of its output.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride)
        exact_sign(self)

    def scaling_factor(self) -> torch.Tensor:
        """``alpha``, shaped ``(out_channels, 1, 1, 1)``."""
        return self.weight.abs().mean(dim=(1, 2, 3), keepdim=True)

    def binary_weight(self, tap_major: bool = False) -> torch.Tensor:
        """``alpha * sign(W)`` (or the progressive weight times ``alpha`` at a positive temperature)."""
        return self.scaling_factor() * super().binary_weight(tap_major)


class XNORBlock(nn.Module):
    """XNOR-Net block (Rastegari et al., ECCV 2016, "XNOR-Net: ImageNet Classification Using Binary CNNs").

    The paper's binary block is ``BatchNorm -> BinActiv -> BinConv -> Pool``:

    * ``BatchNorm`` normalizes the real input before it is binarized;
    * ``BinActiv`` computes ``sign(I)`` and the activation scaling map
      ``K = A * k``: ``A`` is the mean of ``|I|`` over the channels and ``k`` a
      ``kxk`` box filter, so ``K`` holds the mean magnitude of every receptive field;
    * ``BinConv`` is ``(sign(I) conv sign(W)) * K * alpha``, with
      ``alpha = mean|W|`` per output filter (:class:`ScaledBinaryConv2d`);
    * ``Pool``: a 2x2 max-pool carries the stride when the block downsamples.

    There is no ReLU: the sign is the block's non-linearity. The activation
    scaling ``K`` is implemented (``activation_scaling=True``); any channel change
    happens in the binary conv.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int = 1, kernel_size: int = 3, activation_scaling: bool = True
    ) -> None:
        super().__init__()
        _check_shape("XNOR", in_planes, out_planes, stride)
        self.kernel_size = kernel_size
        self.activation_scaling = activation_scaling
        self.norm = nn.BatchNorm2d(in_planes)
        self.binary_activation = HardSign()
        self.binary_conv = ScaledBinaryConv2d(in_planes, out_planes, kernel_size)
        self.pool: nn.Module = nn.MaxPool2d(2, 2) if stride == 2 else nn.Identity()

    def activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``K``: the channel-mean of ``|x|`` box-filtered over each ``kxk`` receptive field."""
        mean_magnitude = x.abs().mean(dim=1, keepdim=True)
        # count_include_pad=True matches a box filter k = 1/(k*k) applied to the zero-padded map.
        return F.avg_pool2d(mean_magnitude, self.kernel_size, stride=1, padding=self.kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        y = self.binary_conv(self.binary_activation(x))
        if self.activation_scaling:
            y = y * self.activation_scale(x)
        return self.pool(y)


class _BiRealShortcut(nn.Module):
    """Bi-Real Net's real-valued downsampling shortcut: ``AvgPool 2x2 -> 1x1 conv -> BN``.

    The pool appears only on stride 2 and the 1x1 conv + BN only when the channels
    change; with neither it is the identity.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if stride == 2:
            layers.append(nn.AvgPool2d(2, 2))
        if in_planes != out_planes:
            layers += [nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False), nn.BatchNorm2d(out_planes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _BiRealUnit(nn.Module):
    """One Bi-Real unit: ``BN(BinConv3x3(ApproxSign(x))) + shortcut(x)``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.binary_activation = ApproxSign()
        self.binary_conv = ScaledBinaryConv2d(in_planes, out_planes, 3, stride)
        self.norm = nn.BatchNorm2d(out_planes)
        self.shortcut = _BiRealShortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.binary_conv(self.binary_activation(x))) + self.shortcut(x)


class BiRealBlock(nn.Module):
    """Bi-Real Net basic block (Liu et al., ECCV 2018, "Bi-Real Net: Enhancing the Performance of 1-bit CNNs").

    A ResNet basic block whose two 3x3 convolutions are each wrapped in their own
    real-valued identity shortcut ("one shortcut per binary conv"), so the
    real-valued activations bypass every 1-bit conv:
    ``y = BN(BinConv3x3(ApproxSign(x))) + shortcut(x)``, twice.

    * ``ApproxSign``: sign forward, piecewise-polynomial derivative backward.
    * ``BinConv``: magnitude-aware weights ``mean|W| * sign(W)``.
    * The first unit carries the stride and the channel change (usually a
      doubling); its shortcut is ``AvgPool 2x2 -> real 1x1 conv -> BN``.

    No other activation: as in the paper, the sign is the only non-linearity.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        _check_shape("BiReal", in_planes, out_planes, stride)
        self.unit1 = _BiRealUnit(in_planes, out_planes, stride)
        self.unit2 = _BiRealUnit(out_planes, out_planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit2(self.unit1(x))


class _Real2BinaryUnit(nn.Module):
    """One Real-to-Binary unit: ``PReLU(BinConv(sign(BN(x))) * G(BN(x))) + shortcut(x)``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, gate_ratio: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_planes)
        self.binary_activation = HardSign()
        self.binary_conv = exact_sign(BinaryConv2d(in_planes, out_planes, 3, stride))
        self.gate = SqueezeExcite(in_planes, out_planes, ratio=gate_ratio)
        self.activation = nn.PReLU(out_planes)
        self.shortcut = _BiRealShortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = self.norm(x)
        # The gate reads the real-valued activations the sign is about to discard.
        y = self.binary_conv(self.binary_activation(real)) * self.gate(real)
        return self.activation(y) + self.shortcut(x)


class Real2BinaryBlock(nn.Module):
    """Real-to-Binary Net block (Martinez et al., ICLR 2020, "Training Binary Neural Networks with
    Real-to-Binary Convolutions").

    A Bi-Real-style basic block (two 3x3 binary units, a real shortcut around each,
    real ``AvgPool 2x2 -> 1x1 conv -> BN`` downsampling shortcut) in which each
    unit is ``BN -> sign -> BinConv -> x G(BN output) -> PReLU -> + shortcut``.
    ``G`` is the paper's data-driven channel re-scaling: a squeeze-excitation-like
    gate ``sigmoid(W2 ReLU(W1 GAP(a)))`` computed from the real-valued activation
    ``a`` right before binarization and multiplied onto the binary conv output.

    Simplified here:

    * the gate is :class:`models.layers.SqueezeExcite` (1x1 convs with biases,
      reduction ratio ``gate_ratio``, default 8), where the paper uses fully
      connected layers with a tuned ratio ``r``;
    * the gate replaces XNOR-Net's analytic ``alpha`` (the weights are plain
      ``sign(W)``) and the sign uses the project's clipped STE;
    * the attention-matching distillation loss and the multi-stage training are
      training procedures, not block operations, and are omitted.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, gate_ratio: int = 8) -> None:
        super().__init__()
        _check_shape("Real2Binary", in_planes, out_planes, stride)
        self.unit1 = _Real2BinaryUnit(in_planes, out_planes, stride, gate_ratio)
        self.unit2 = _Real2BinaryUnit(out_planes, out_planes, 1, gate_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit2(self.unit1(x))


class RSign(nn.Module):
    """ReActNet's RSign: ``sign(x - alpha_c)`` with a learnable per-channel threshold."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # LearnableBias adds beta = -alpha, so the threshold is learned as in the paper.
        self.move = LearnableBias(channels)
        self.binary_activation = ApproxSign()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.binary_activation(self.move(x))


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``PReLU(x - gamma_c) + zeta_c``, shifting the input and output of a PReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels)
        self.shift_out = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift_out(self.prelu(self.shift_in(x)))


class _ReActUnit(nn.Module):
    """``RPReLU(BN(BinConv(RSign(x))) + shortcut)``: one binary conv with its parameter-free shortcut."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.rsign = RSign(in_planes)
        self.binary_conv = ScaledBinaryConv2d(in_planes, out_planes, kernel_size, stride)
        self.norm = nn.BatchNorm2d(out_planes)
        self.activation = RPReLU(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.avg_pool2d(x, 2, 2) if self.stride == 2 else x
        return self.activation(self.norm(self.binary_conv(self.rsign(x))) + shortcut)


class ReActBlock(nn.Module):
    """ReActNet-A basic block (Liu et al., ECCV 2020, "ReActNet: Towards Precise Binary Neural Network with
    Generalized Activation Functions").

    A binarized MobileNetV1 block in which every binary conv has a parameter-free
    real shortcut:

    1. ``RSign -> BinConv3x3 (stride) -> BN -> + shortcut -> RPReLU``, the shortcut
       being ``AvgPool 2x2`` when the block downsamples;
    2. ``RSign -> BinConv1x1 -> BN -> + x -> RPReLU``. To double the channels the
       1x1 unit is duplicated: two 1x1 binary convs read the same input, each
       with the input as its shortcut, and their outputs are concatenated.

    RSign is ``sign(x - alpha)`` with Bi-Real's ApproxSign STE; RPReLU is
    ``PReLU(x - gamma) + zeta``; weights are ``mean|W| * sign(W)``. Only
    ``out == in`` and ``out == 2*in`` are supported.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        _check_shape("ReActNet", in_planes, out_planes, stride, keep_or_double=True)
        self.spatial = _ReActUnit(in_planes, in_planes, 3, stride)
        self.doubles = out_planes != in_planes
        if self.doubles:
            self.pointwise_1 = _ReActUnit(in_planes, in_planes, 1, 1)
            self.pointwise_2 = _ReActUnit(in_planes, in_planes, 1, 1)
        else:
            self.pointwise = _ReActUnit(in_planes, in_planes, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.spatial(x)
        if self.doubles:
            return torch.cat((self.pointwise_1(z), self.pointwise_2(z)), dim=1)
        return self.pointwise(z)


def _bnext(
    in_planes: int, out_planes: int, stride: int, *, elm_attention: bool, info_recoupling: bool, name: str
) -> nn.Module:
    """The BNext basic block (``mode="scale"``) with the ablation switches of the official code."""
    _check_shape(name, in_planes, out_planes, stride, keep_or_double=True)
    # mode="scale" selects ELM-attention; with elm_attention=False the block uses the 3x3
    # binary FFN, which is also what mode="bias" builds, so that graph is BNext_noELM.
    return BasicBlock(
        in_planes, out_planes, stride, "scale", elm_attention=elm_attention, info_recoupling=info_recoupling
    )


#: Design name -> constructor ``(in_planes, out_planes, stride) -> nn.Module``.
DESIGNS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "BNext": partial(_bnext, elm_attention=True, info_recoupling=True, name="BNext"),
    "BNext_noELM": partial(_bnext, elm_attention=False, info_recoupling=True, name="BNext_noELM"),
    "BNext_noIR": partial(_bnext, elm_attention=True, info_recoupling=False, name="BNext_noIR"),
    "BNext_noELM_noIR": partial(_bnext, elm_attention=False, info_recoupling=False, name="BNext_noELM_noIR"),
    "XNOR": XNORBlock,
    "BiReal": BiRealBlock,
    "Real2Binary": Real2BinaryBlock,
    "ReActNet": ReActBlock,
}


def build_block(design: str, in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Build the basic block of ``design``; raises ``KeyError`` naming the valid designs."""
    if design not in DESIGNS:
        raise KeyError(f"unknown design {design!r}; valid names: {', '.join(DESIGNS)}")
    return DESIGNS[design](in_planes, out_planes, stride)
