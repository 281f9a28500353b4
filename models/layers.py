"""Layers that carry their precision: the binary convolution and the real-valued helpers.

A layer's precision is read from its ``weight_bits`` and ``input_bits`` attributes
(see :mod:`models.precision`); plain ``nn.Conv2d``/``nn.Linear`` count as 32-bit.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops
from .quantizers import CONV_INPUT_CLIP, LINEAR_INPUT_CLIP, fake_quantize, prepared_binarization, progressive_binarize

#: Latent binary weights are kept inside ``±WEIGHT_CLIP`` (official value).
WEIGHT_CLIP = 1.5
#: Below this temperature the weights are exactly ``sign(W)`` (official ``bnext.py``).
SIGN_THRESHOLD = 1e-7


class BinaryConv2d(nn.Module):
    """Convolution with 1-bit weights and 1-bit inputs, progressively binarized.

    The latent weight ``W`` (init ``N(0, 1e-6)``, no bias, no scaling factor: the
    following batch norm absorbs the scale) is turned into ``clamp(W / T, -1, 1)``,
    or into exact ``sign(W)`` once the ``temperature`` buffer ``T`` is below
    ``sign_threshold``. The gradient reaches ``W`` unmasked. ``W`` is kept inside
    ``±clip`` by :meth:`apply_constraints_`, which the trainer calls after each
    optimizer step and :func:`models.load_checkpoint` calls at load; the official
    code clamps in every forward instead, which gives the same values.
    """

    weight_bits = 1
    input_bits = 1
    # Defaults on the class too, so that a layer pickled whole before these existed still works.
    _step_layout: bool | None = None
    _prepared: tuple[torch.Tensor, tuple] | None = None
    _constrained_by_update = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        sign_threshold: float = SIGN_THRESHOLD,
        clip: float = WEIGHT_CLIP,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.groups = groups
        self.sign_threshold = sign_threshold
        self.clip = clip
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.randn(shape) * 1e-3)
        self.register_buffer("temperature", torch.ones(1))
        # The layout of the last eager training step's binarized weight (None: no such step yet),
        # and the next step's binarized weight made by the constraint pass, with what it was made from.
        self._step_layout: bool | None = None
        self._prepared: tuple[torch.Tensor, tuple] | None = None
        # Whether update_and_constrain_ made the constraint's pass since the last apply_constraints_.
        self._constrained_by_update = False

    def binary_weight(self, tap_major: bool = False) -> torch.Tensor:
        """The weight the convolution uses at the current temperature.

        ``tap_major``: where a training step's kernel binarizes, write it channels-last,
        the layout of the tap products (the same values; see
        :func:`models.quantizers.progressive_binarize`). A training step takes the weight
        that :meth:`apply_constraints_` (or :meth:`update_and_constrain_`) binarized after
        the last optimizer step, where neither the weight nor the temperature changed since;
        so does a compiled one, through its graph's operator (:meth:`take_prepared_for_graph`).
        """
        # A training step: not an evaluation forward that records gradients (a loss landscape,
        # the benchmark's shape survey), whose layout would make the constraint pass prepare
        # weights that no step takes. A compiled step records its layout in its graph's operator.
        eager_step = (
            self.training
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and not torch.compiler.is_compiling()
        )
        if eager_step and fused_ops.switched_on():
            prepared = self._step_prepared(tap_major)
            if prepared is not None:
                return prepared_binarization(self.weight, prepared)
        return progressive_binarize(self.weight, self.temperature, self.sign_threshold, tap_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # small planes by tap products on the CPU (evaluation keeps F.conv2d's bits)
            taps = fused_ops.takes_tap_products(x, self.weight, self.stride, self.padding, self.groups)
            weight = self.binary_weight(tap_major=taps)
            return fused_ops.training_conv2d(x, weight, self.stride, self.padding, self.groups, taps=taps)
        weight = self.binary_weight()
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding, groups=self.groups)

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """Clip the latent weights to ``±clip`` in place.

        In training mode, after an eager training step on the CPU, one kernel pass also binarizes the clipped
        weight for the next step, at the current temperature and in the layout of the last
        step (:func:`models.fused_ops.clamp_and_binarize_weight`): the clip writes only the
        values out of range, and the next step does not read the latent weight again. The
        prepared weight is used by the next training forward only, and only if the weight
        and the temperature are still the tensors it was made from, unchanged since (their
        version counters): torch's fused AdamW changes weights without counting a version,
        so a second forward after an optimizer step that skipped this call binarizes anew.
        Right after :meth:`update_and_constrain_` made the pass, nothing is left to do.
        In training mode the layer also registers itself for compiled steps
        (:func:`models.fused_ops.register_graph_step_layer`): their graph's binarization
        takes the prepared weight through :meth:`take_prepared_for_graph`.
        """
        if self.training:
            fused_ops.register_graph_step_layer(self)
        if self._constrained_by_update:
            self._constrained_by_update = False
            if self._take_prepared(self._step_layout, release=False) is not None:
                return  # update_and_constrain_ clamped and binarized the weight since it changed
        self._prepared = None  # freed before the next one is made
        # In training mode only: a model clamped for evaluation (or an EMA copy) holds no weight for a step.
        if self.training and self._step_layout is not None and fused_ops.switched_on():
            binarized = fused_ops.clamp_and_binarize_weight(
                self.weight, self.clip, self.temperature, self.sign_threshold, self._step_layout
            )
            if binarized is not None:
                self._prepared = (binarized, self._prepared_key(self._step_layout))
                return
        self.weight.clamp_(-self.clip, self.clip)

    def update_and_constrain_(self, update: fused_ops.AdamWUpdate) -> bool:
        """Apply an optimizer's AdamW ``update`` to the latent weight in the pass of :meth:`apply_constraints_`.

        Where that pass runs (see there) and the kernel takes the update
        (:func:`models.fused_ops.adamw_clamp_and_binarize_weight`): the weight and the
        update's moments are written, bit for bit as torch's fused AdamW and the clip
        would leave them, and the next step's binarized weight is prepared, so
        :meth:`apply_constraints_` has nothing left to do. Returns False, with nothing
        changed, elsewhere: the caller then applies the update itself.
        """
        if not (self.training and self._step_layout is not None and fused_ops.switched_on()):
            return False
        self._prepared = None  # stale once the weight changes: freed before the next one is made
        binarized = fused_ops.adamw_clamp_and_binarize_weight(
            self.weight, update, self.clip, self.temperature, self.sign_threshold, self._step_layout
        )
        if binarized is None:
            return False
        self._prepared = (binarized, self._prepared_key(self._step_layout))
        self._constrained_by_update = True
        return True

    def take_prepared_for_graph(
        self, weight: torch.Tensor, temperature: torch.Tensor, threshold: float, tap_major: bool
    ) -> torch.Tensor | None:
        """The prepared binarized weight for a compiled training step's ``bnext::binarize_weight``; None
        where there is none to take.

        The operator runs with the layer's own tensors (the same data) while the layer
        trains: as in an eager training forward, the step's layout is recorded, and the
        weight that the last constraint pass (or :meth:`update_and_constrain_`) prepared is
        handed over once, where the weight and the temperature did not change since.
        """
        if not (self.training and fused_ops.switched_on()):
            return None  # an evaluation graph that records gradients: nothing for a step (see binary_weight)
        mine = self.weight
        if not (
            weight.data_ptr() == mine.data_ptr()
            and weight.shape == mine.shape
            and temperature.data_ptr() == self.temperature.data_ptr()
            and threshold == self.sign_threshold
        ):
            return None
        return self._step_prepared(tap_major)

    def _step_prepared(self, tap_major: bool) -> torch.Tensor | None:
        # A training step's: record its layout for the next constraint pass, take the prepared weight.
        if self._step_layout != tap_major:  # nn.Module.__setattr__ costs more than the comparison
            self._step_layout = tap_major
        return self._take_prepared(tap_major)

    def _prepared_key(self, tap_major: bool) -> tuple:
        # What a prepared binarization was made from: the tensors, their in-place versions, the clip.
        weight, temperature = self.weight, self.temperature
        return (weight.data_ptr(), weight._version, temperature.data_ptr(), temperature._version, tap_major, self.clip)

    def _take_prepared(self, tap_major: bool, release: bool = True) -> torch.Tensor | None:
        # The prepared weight where it is still current; released (used once) unless told not to.
        if self._prepared is None:
            return None
        binarized, key = self._prepared
        if release:
            self._prepared = None
        return binarized if key == self._prepared_key(tap_major) else None

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickling) start without the step's state: the prepared weight is a
        # cache of the original's step, and a copy prepares one only once it trains itself.
        state = self.__dict__.copy()
        state["_prepared"] = state["_step_layout"] = None
        state["_constrained_by_update"] = False
        return state

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, bits=1"
        )


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights (per output channel) and inputs (per sample).

    The 8-bit variant of a real-valued convolution (official ``bnext_quant.py``).
    Parameters and state-dict keys are those of ``nn.Conv2d``, so a float checkpoint
    loads unchanged. ``quantize_input=False`` is for the stem: its input is the
    normalized image, which already holds 256 levels per channel, so it is tagged
    8-bit without being re-quantized (as in the official code). The official code
    quantizes conv inputs per (sample, channel); on the 1x1 inputs of the
    squeeze-excitation that leaves a single value per slice, so here a slice is a
    whole sample.
    """

    def __init__(self, *args, bits: int = 8, quantize_input: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_bits = bits
        self.input_bits = bits
        self.quantize_input = quantize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = fake_quantize(x, self.input_bits, CONV_INPUT_CLIP)
        return self._conv_forward(x, fake_quantize(self.weight, self.weight_bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.weight_bits}, quantize_input={self.quantize_input}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized weights (per row) and inputs (per sample), official clip ``±25``."""

    def __init__(self, *args, bits: int = 8, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_bits = bits
        self.input_bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize(x, self.input_bits, LINEAR_INPUT_CLIP)
        return F.linear(x, fake_quantize(self.weight, self.weight_bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.weight_bits}"


def quantized_copy(layer: nn.Module, bits: int, quantize_input: bool = True) -> nn.Module:
    """A :class:`QuantConv2d`/:class:`QuantLinear` sharing ``layer``'s parameters (same keys, same tensors)."""
    if type(layer) is nn.Conv2d:
        copy: nn.Module = QuantConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            bits=bits,
            quantize_input=quantize_input,
            device="meta",
        )
    elif type(layer) is nn.Linear:
        copy = QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, bits=bits, device="meta")
    else:
        raise TypeError(f"only plain nn.Conv2d and nn.Linear layers can be quantized, got {type(layer).__name__}")
    copy.weight = layer.weight
    copy.bias = layer.bias
    copy.train(layer.training)
    return copy


class _AvgPool2x2(torch.autograd.Function):
    """``avg_pool2d(x, 2, 2)`` with the same bits, faster on the CPU in both directions.

    See :func:`models.fused_ops.window_mean_2x2` and :func:`models.fused_ops.spread_2x2`.
    """

    # forward(ctx, ...): a separate setup_context makes apply() bind the arguments with inspect on every call.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.input_shape = x.shape
        # The gradient keeps the input's layout: no kernel (NCHW only) for a channels_last input.
        ctx.input_is_nchw = x.is_contiguous()
        return fused_ops.window_mean_2x2(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return fused_ops.spread_2x2(grad_output, ctx.input_shape, kernel=ctx.input_is_nchw)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2)`` bit for bit on 4-D inputs, faster on the CPU (see :class:`_AvgPool2x2`)."""
    if torch.jit.is_tracing():  # (catch_warnings would break torch.compile's graph: tracing only)
        with warnings.catch_warnings():
            # While tracing, the sizes are traced values and the trace keeps this check's outcome
            # as a constant, which is right for a validation; the TracerWarning says just that.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            too_small = bool(x.dim() != 4 or x.shape[-2] < 2 or x.shape[-1] < 2)
    else:
        too_small = x.dim() != 4 or x.shape[-2] < 2 or x.shape[-1] < 2
    if too_small:
        raise ValueError(
            f"avg_pool_2x2 expects an N x C x H x W tensor with H, W >= 2, got shape {tuple(x.shape)}; "
            "the input image is too small for this network's strides"
        )
    return _AvgPool2x2.apply(x)


class AvgPool2x2(nn.Module):
    """Module form of :func:`avg_pool_2x2` (``nn.AvgPool2d(2, 2)`` with the same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_2x2(x)


class _PReLUFunction(torch.autograd.Function):
    """``F.prelu`` forward with a faster backward of the same values.

    The backward splits the incoming gradient by the sign of the input with one
    ``threshold_backward`` (the ReLU backward): ``g_pos`` where ``x > 0``, and
    ``g_neg = g - g_pos``; then ``grad_x = g_pos + w * g_neg`` (the same bits as the
    native kernel: one of the two terms is zero) and ``grad_w = sum(g_neg * x)``.
    On the CPU this is two to three times faster than ``_prelu_kernel_backward`` on
    BNext's activation shapes; ``grad_w`` is the same sum in another order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # ctx first: see _AvgPool2x2
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        slope = weight.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 1 else weight
        positive = torch.ops.aten.threshold_backward(grad_output, x, 0)
        negative = grad_output - positive
        grad_x = torch.addcmul(positive, negative, slope) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            per_element = negative * x
            if weight.numel() == 1:
                grad_weight = per_element.sum().reshape(weight.shape)
            else:
                grad_weight = per_element.sum([d for d in range(x.dim()) if d != 1])
        return grad_x, grad_weight


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameter, same outputs) with the faster backward of :class:`_PReLUFunction`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always the Function (not only when a gradient is needed), so that traced graphs
        # do not depend on the grad mode; without autograd it costs only the saved references.
        return _PReLUFunction.apply(x, self.weight)


class SqueezeExcite(nn.Module):
    """Channel gate ``sigmoid(W2 relu(W1 GAP(x) + b1) + b2)`` with reduction ``ratio``.

    Real-valued. The ``se`` Sequential keeps the official state-dict names
    (``se.1`` and ``se.3`` are the two 1x1 convolutions).
    """

    def __init__(self, channels: int, out_channels: int | None = None, ratio: int = 8) -> None:
        super().__init__()
        hidden = channels // ratio
        if hidden < 1:
            raise ValueError(f"squeeze-excitation needs at least {ratio} channels, got {channels}")
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels or channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.se(x))

    def gate_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The gate from an already averaged ``N x C x 1 x 1`` input (skips ``se[0]``, the pooling).

        In a training step (training mode, gradient recorded) the two 1x1 convolutions of these
        1x1 planes are matrix products (:func:`models.fused_ops.conv2d_of_points`), where they are
        plain, hook-free ``nn.Conv2d``.
        """
        # The layers one by one: slicing the Sequential (se[1:]) would build a new module per call.
        _, reduce, relu, expand = self.se
        return torch.sigmoid(_pointwise(expand, relu(_pointwise(reduce, pooled))))


def _pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Not for subclasses (QuantConv2d quantizes in its forward) or modules with hooks (they would be
    # skipped); in training mode only: evaluation keeps the convolution's bits, with or without grad.
    if conv.training and type(conv) is nn.Conv2d and fused_ops.hook_free(conv) and conv.padding_mode == "zeros":
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        return fused_ops.conv2d_of_points(x, conv.weight, conv.bias, *geometry)
    return conv(x)


def frozen_prelu(channels: int) -> PReLU:
    """A PReLU kept only so that official checkpoints load: the official forward never calls it.

    It is frozen (``requires_grad=False``): it would get no gradient anyway, and a
    frozen parameter lets DDP run without ``find_unused_parameters=True``.
    """
    prelu = PReLU(channels)
    prelu.weight.requires_grad_(False)
    return prelu
