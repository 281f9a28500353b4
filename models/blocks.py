"""BNext building blocks: the processor, info-recoupling, and the three module types.

Attribute names follow the official ``bnext.py`` so that released checkpoints load
unchanged (``move``, ``binary_activation``, ``binary_conv``, ``norm1``, ``norm2``,
``activation1``, ``activation2``, ``scale``, ``se``).
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_ops import (
    ProcessorInputs,
    batch_norm_prelu,
    gated_batch_norm_residual,
    processor_inputs,
    processor_tail,
)
from .layers import SIGN_THRESHOLD, AvgPool2x2, BinaryConv2d, PReLU, SqueezeExcite, avg_pool_2x2, frozen_prelu
from .quantizers import HardSign, LearnableBias

#: BNext-18's binary convs switch to exact signs below this temperature (official ``birealnet.py``).
BNEXT18_SIGN_THRESHOLD = 1e-5


class Processor(nn.Module):
    """The binary "processor" with optional mix-to-binary attention (info-recoupling).

    ``b = PReLU(BN(BinaryConv(sign(x + beta))))``. With info-recoupling, the real
    input ``x_mix`` and the binary branch are mixed, ``m = g*x_mix + (1-g)*b`` with a
    per-channel ``g`` kept in ``[0, 1]``, and ``m`` drives a squeeze-excitation gate
    that rescales ``b``: ``b <- SE(m) * b``.

    Subclasses decide how ``b`` becomes the module's output and what ``x_mix`` is.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        info_recoupling: bool = True,
        sign_threshold: float = SIGN_THRESHOLD,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.info_recoupling = info_recoupling
        if info_recoupling:
            self.scale = nn.Parameter(torch.full((1, out_channels, 1, 1), 0.5))
        self.move = LearnableBias(in_channels)
        self.binary_activation = HardSign()
        self.binary_conv = BinaryConv2d(in_channels, out_channels, kernel_size, stride, sign_threshold=sign_threshold)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.activation1 = PReLU(in_channels)
        self.activation2 = PReLU(out_channels)
        if info_recoupling:
            self.se = SqueezeExcite(out_channels)

    def read_input(
        self, x: torch.Tensor, mix_is_x: bool, prelu: nn.PReLU | None = None, shortcut: bool = False
    ) -> ProcessorInputs:
        """The signs of ``x + beta``; ``x``'s spatial mean when it is the recoupling mix; ``prelu(x)`` and
        ``x`` for a residual (:func:`models.fused_ops.processor_inputs`) if asked."""
        mean = self.info_recoupling and mix_is_x
        return processor_inputs(x, self.move, self.binary_activation, mean=mean, prelu=prelu, shortcut=shortcut)

    def binary_branch(self, signs: torch.Tensor) -> torch.Tensor:
        """The binary branch ``b = PReLU(BN(BinaryConv(signs)))`` (without info-recoupling's gate)."""
        return batch_norm_prelu(self.binary_conv(signs), self.norm1, self.activation2, pooled=False)[0]

    def output(
        self, signs: torch.Tensor, mix_mean: torch.Tensor | None, residual: torch.Tensor, multiply_residual: bool
    ) -> torch.Tensor:
        """``norm2(gate * b [* residual]) + residual`` from the signs, ``gate`` = 1 without info-recoupling.

        ``mix_mean`` is the spatial mean of the recoupling mix's real input ``x_mix``.
        The gate only sees the spatial mean of the mix, and the mean is linear:
        ``GAP(g*x_mix + (1-g)*b) = g*GAP(x_mix) + (1-g)*GAP(b)``. Mixing the means
        instead of the maps skips three full-size passes forward and five backward;
        the gate changes only by float rounding (:func:`models.fused_ops.processor_tail`).
        """
        if not self.info_recoupling:
            return gated_batch_norm_residual(self.binary_branch(signs), None, residual, self.norm2, multiply_residual)
        return processor_tail(
            self.binary_conv(signs), self.norm1, self.activation2, self.scale, mix_mean, self.se,
            residual, self.norm2, multiply_residual,
        )  # fmt: skip

    def mix_mean(self, x_mix: torch.Tensor) -> torch.Tensor | None:
        """The spatial mean of the recoupling mix's real input (None without info-recoupling)."""
        return x_mix.mean((2, 3), keepdim=True) if self.info_recoupling else None

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """Keep the recoupling mix ``g`` inside ``[0, 1]``."""
        if self.info_recoupling:
            self.scale.clamp_(0.0, 1.0)


def avg_pool_if_strided(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The parameter-free shortcut of a binary conv: 2x2 average pooling at stride 2 (official ``AvgPool2d(2, 2)``)."""
    return avg_pool_2x2(x) if stride == 2 else x


class ELMAttention(Processor):
    """Element attention: ``y = BN(b * r) + r`` with the real shortcut ``r = PReLU(x)``.

    The binary branch multiplies the real-valued shortcut element-wise; on stride 2
    the shortcut is average-pooled.
    """

    def __init__(self, channels: int, stride: int = 1, info_recoupling: bool = True) -> None:
        super().__init__(channels, channels, 3, stride, info_recoupling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At stride 2 the mix is x's 2x2 pooling, whose spatial mean is x's own (H and W are
        # even: the branch's output would not match the pooled shortcut otherwise). Training
        # takes it from the pass that reads x for the signs (the same value to float rounding,
        # and no pooling of x to run and differentiate); evaluation keeps the official bits.
        mean_of_x = self.stride == 1 or self.training
        # The signs, PReLU(x) and the mix's mean from one read of x.
        inputs = self.read_input(x, mix_is_x=mean_of_x, prelu=self.activation1)
        residual = inputs.activated if self.stride == 1 else avg_pool_2x2(inputs.activated)
        if mean_of_x or not self.info_recoupling:
            mix_mean = inputs.mean
        else:
            mix_mean = self.mix_mean(avg_pool_2x2(x))
        return self.output(inputs.signs, mix_mean, residual, multiply_residual=True)


class BinaryFFN(Processor):
    """Binary feed-forward module (3x3 or 1x1): ``y = BN(b) + r`` with ``r = x``.

    Without info-recoupling the official code skips ``norm2``: ``y = b + r``.
    ``activation1`` (and ``norm2`` when unused) exist only for checkpoint
    compatibility and are frozen.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int = 1,
        info_recoupling: bool = True,
        sign_threshold: float = SIGN_THRESHOLD,
    ) -> None:
        if kernel_size == 1 and stride != 1:
            raise ValueError("the 1x1 binary FFN has stride 1")
        super().__init__(channels, channels, kernel_size, stride, info_recoupling, sign_threshold)
        self.activation1 = frozen_prelu(channels)
        if not info_recoupling:
            # Without recoupling the official forward skips norm2: freeze its affine
            # parameters too, so that every trainable parameter gets a gradient.
            self.norm2.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At stride 1 the residual is x, taken from the inputs: in a fused training step the
        # sign's backward kernel then adds the residual's gradient to x's in its own pass.
        inputs = self.read_input(x, mix_is_x=self.stride == 1, shortcut=self.stride == 1)
        shortcut = inputs.shortcut if self.stride == 1 else avg_pool_2x2(x)
        if not self.info_recoupling:
            return self.binary_branch(inputs.signs) + shortcut
        mix_mean = inputs.mean if self.stride == 1 else self.mix_mean(shortcut)
        return self.output(inputs.signs, mix_mean, shortcut, multiply_residual=False)


class BasicBlock(nn.Module):
    """BNext basic block: a 3x3 spatial module followed by the 1x1 binary FFN.

    The spatial module is ELM-attention (``mode="scale"``) or the 3x3 binary FFN
    (``mode="bias"``), carrying the stride. When the block doubles its channels, two
    parallel 1x1 FFNs read the same input and their outputs are concatenated.

    State-dict names follow the official classes: the spatial module is
    ``Attention`` (or ``FFN_3x3`` in the no-ELM ablation, where every block uses the
    3x3 FFN); the 1x1 FFN is ``FFN``, or ``FFN_1``/``FFN_2`` when doubling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        mode: str,
        elm_attention: bool = True,
        info_recoupling: bool = True,
    ) -> None:
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"a BNext block keeps or doubles its channels, got {in_channels}->{out_channels}")
        if mode not in ("scale", "bias"):
            raise ValueError(f"mode must be 'scale' (ELM-attention) or 'bias' (3x3 FFN), got {mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        if elm_attention and mode == "scale":
            spatial: nn.Module = ELMAttention(in_channels, stride, info_recoupling)
        else:
            spatial = BinaryFFN(in_channels, 3, stride, info_recoupling)
        self.spatial_name = "Attention" if elm_attention else "FFN_3x3"
        self.add_module(self.spatial_name, spatial)
        self.doubles = out_channels != in_channels
        if self.doubles:
            self.FFN_1 = BinaryFFN(in_channels, 1, info_recoupling=info_recoupling)
            self.FFN_2 = BinaryFFN(in_channels, 1, info_recoupling=info_recoupling)
        else:
            self.FFN = BinaryFFN(in_channels, 1, info_recoupling=info_recoupling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = getattr(self, self.spatial_name)(x)
        if self.doubles:
            return torch.cat((self.FFN_1(z), self.FFN_2(z)), dim=1)
        return self.FFN(z)


class BNext18Attention(Processor):
    """ELM-attention of BNext-18 (official ``birealnet.py``).

    Differs from :class:`ELMAttention`: it may change the channel count inside the
    binary 3x3 conv, its shortcut ``r = PReLU(x)`` goes through a real-valued
    ``downsample`` (AvgPool, 1x1 conv, BN) when the shape changes, and
    info-recoupling mixes that shortcut instead of the raw input. Weights become
    exact signs below ``T = 1e-5``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, 3, stride, sign_threshold=BNEXT18_SIGN_THRESHOLD)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                AvgPool2x2() if stride == 2 else nn.AvgPool2d(kernel_size=2, stride=stride),
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            inputs = self.read_input(x, mix_is_x=False, prelu=self.activation1)
            residual = inputs.activated
        else:
            inputs = self.read_input(x, mix_is_x=False)
            residual = self.downsample(self.activation1(x))
        return self.output(inputs.signs, self.mix_mean(residual), residual, multiply_residual=True)


class BNext18Block(nn.Module):
    """BNext-18 block: :class:`BNext18Attention` then a stride-1 3x3 binary FFN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.Attention = BNext18Attention(in_channels, out_channels, stride)
        self.FFN = BinaryFFN(out_channels, 3, sign_threshold=BNEXT18_SIGN_THRESHOLD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.FFN(self.Attention(x))
