"""Turn a float BNext model into its binary inference form.

Each binary "processor" input chain ``BinaryConv2d(HardSign(x + beta))`` becomes one
:class:`PackedBinaryConv2d`: a per-channel threshold compare that packs the signs into
64-bit words, and an XNOR/popcount convolution (:mod:`models.binary_kernels`) with
1-bit packed weights. Everything else stays ordinary PyTorch, in NCHW, so with
``fold=False`` the real-valued arithmetic is the float model's own, operation for
operation, and the logits are bit-identical to it.

Folds applied with ``fold=True`` (all algebraically exact; see :data:`FOLDS`):

1. ``sign(x + beta)`` -> ``compare(x, -beta)``: exact in IEEE float32 even after
   rounding, because ``fl(x + beta)`` is 0 only when ``x == -beta`` and has the sign
   of the exact sum otherwise (sums of floats never underflow to 0; this assumes
   denormals are not flushed, PyTorch's default). ``-beta`` is an exact negation.
2. Weights: ``sign(W)`` stored at 1 bit. ``sign(0) == 0`` weights, if any, are listed
   (``weight_zero_index``) and corrected exactly.
3. Every eval-mode batch norm -> ``x * a + c`` with ``a = gamma / sqrt(var + eps)``,
   ``c = beta - mean * a`` (computed in float64, stored in float32): 2 vectors instead
   of 4. Exact algebra; the result differs from PyTorch's own batch-norm kernel by
   float32 rounding only.
4. Binarizer temperatures are dropped (in hard-sign mode they no longer change any
   value), and so are modules the float forward never calls (the stem's PReLU, the
   1x1/3x3 FFNs' ``activation1``, and ``norm2`` of FFNs without info-recoupling).
5. The folded batch norm and the PReLU right after each binary conv are applied by
   the convolution as it stores its integers: ``prelu(fma(y, a, c))``, the operations
   (and so the rounding) of the two PyTorch modules, in one pass instead of three.
6. The real-valued tail of every info-recoupling module, ``norm2(SE(m) * b [* r]) + r``
   with ``m = g * x_mix + (1 - g) * b``, runs in two passes: the mean of ``m`` (never
   stored), then one fused pass; each element sees the same float operations as in
   :mod:`models.blocks`, only the order of the pooling sum differs (and the SE's 1x1
   convs on the pooled vector run as ``F.linear``, another summation order). A stride-2
   ELM module pools ``x`` and ``PReLU(x)`` in one pass, with ``F.avg_pool2d``'s order.

Not folded, on purpose: the batch norm after a binary conv cannot enter the integer
convolution (a PReLU and the real-valued SE gate follow it), and the stem's batch norm
is kept as an affine step after the stem conv rather than folded into its weights,
because that would change the rounding of the values that feed the first sign.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn

from . import binary_kernels, bitpack
from .blocks import BinaryFFN, BNext18Attention, ELMAttention, Processor, avg_pool_if_strided
from .bnext import Stem
from .layers import BinaryConv2d, SqueezeExcite
from .precision import layer_precision
from .quantizers import HardSign, LearnableBias

FOLDS = (
    "sign(x + beta) -> compare(x, -beta) inside the packing step (exact in IEEE float32)",
    "binary weights sign(W) -> 1 bit, 64 input channels per word (exact; sign(0) = 0 weights corrected)",
    "eval batch norm -> per-channel x * a + c (exact algebra, float32 rounding)",
    "temperature buffers and never-called modules dropped (no effect on any output)",
    "the batch norm and PReLU after each binary conv run in the conv's store (same operations and rounding)",
    "info-recoupling tail in two passes: mean of the mix, then norm2(SE * b [* r]) + r (pooling sum order differs)",
)


class ChannelAffine(nn.Module):
    """Per-channel ``x * scale + shift`` on NCHW tensors: a folded eval-mode batch norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> ChannelAffine:
        """Fold an eval-mode batch norm (running statistics) into one scale and one shift per channel."""
        affine = cls(bn.num_features)
        var = bn.running_var.double()
        mean = bn.running_mean.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        affine.scale.copy_(scale.float())
        affine.shift.copy_((beta - mean * scale).float())
        return affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * scale + shift`` per channel."""
        # PyTorch's eval batch-norm kernel with mean 0, variance 1 and eps 0 computes
        # exactly x * scale + shift (1 / sqrt(1) is exact), and is faster on the CPU
        # than a broadcast multiply-add.
        return F.batch_norm(x, self._zeros(), self._ones(), self.scale, self.shift, False, 0.0, 0.0)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.scale)

    def _ones(self) -> torch.Tensor:
        return torch.ones_like(self.scale)


class PackedBinaryConv2d(nn.Module):
    """``conv(sign(x - threshold), sign(W))`` with XNOR/popcount on 64-bit packed words.

    Buffers (what an export file stores):

    * ``threshold`` float32 ``[C]``: the sign threshold, ``-beta`` of the learnable bias;
    * ``packed_weight`` int64 ``[O, K, K, ceil(C / 64)]``: ``sign(W)`` at 1 bit
      (layout in :mod:`models.bitpack`);
    * ``weight_zero_index`` int64 ``[Z, 4]``: ``(o, c, kh, kw)`` of weights whose
      sign is 0 (almost always empty).

    The output holds the exact integers of the float model's zero-padded
    convolution, as float32 NCHW. Inputs equal to their threshold (sign 0) are packed
    as ``+1`` and their contribution removed again, as is that of zero weights; both
    corrections are ordinary convolutions of sparse integer tensors and run only when
    such values occur.
    """

    weight_bits = 1
    input_bits = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        words = bitpack.words_for(in_channels)
        self.register_buffer("threshold", torch.zeros(in_channels))
        self.register_buffer(
            "packed_weight", torch.zeros(out_channels, kernel_size, kernel_size, words, dtype=torch.int64)
        )
        self.register_buffer("weight_zero_index", torch.zeros(0, 4, dtype=torch.int64))
        # Optional fused epilogue prelu(y * scale + shift, slope): empty until fuse_epilogue().
        self.register_buffer("post_scale", torch.zeros(0))
        self.register_buffer("post_shift", torch.zeros(0))
        self.register_buffer("post_slope", torch.zeros(0))
        self._derived: tuple | None = None

    @property
    def has_epilogue(self) -> bool:
        """True when the following batch norm and PReLU run inside the convolution."""
        return self.post_scale.numel() > 0

    @torch.no_grad()
    def fuse_epilogue(self, norm: nn.Module, prelu: nn.PReLU) -> None:
        """Take over ``prelu(norm(y))``: ``norm`` a :class:`ChannelAffine` or eval batch norm."""
        affine = norm if isinstance(norm, ChannelAffine) else ChannelAffine.from_batch_norm(norm)
        slope = prelu.weight.detach().float().reshape(-1).expand(self.out_channels)
        self.post_scale = affine.scale.detach().clone()
        self.post_shift = affine.shift.detach().clone()
        self.post_slope = slope.clone()

    def _epilogue(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        # Unpadded; binary_kernels pads to 16-channel blocks where needed (a no-op for
        # the usual multiples of 16).
        return (self.post_scale, self.post_shift, self.post_slope) if self.has_epilogue else None

    @classmethod
    def from_float(cls, move: LearnableBias, conv: BinaryConv2d, pack: bool = True) -> PackedBinaryConv2d:
        """Build from a processor's learnable bias and binary conv (hard-sign mode required)."""
        if conv.groups != 1:
            raise ValueError(f"grouped binary convolutions are not supported (groups={conv.groups})")
        packed = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        if pack:
            with torch.no_grad():
                packed.threshold.copy_(-move.bias.detach().reshape(-1).float())
                weight = conv.weight.detach().float()
                packed.packed_weight.copy_(bitpack.pack_weights(torch.sign(weight)))
                packed.weight_zero_index = torch.nonzero(weight == 0)
        return packed

    def _derived_weights(self) -> tuple:
        # Kernel layout, tap sums and the dense +-1 weights are derived from the packed
        # buffer; recompute them whenever that buffer changed (load_state_dict, .to()).
        key = (self.packed_weight.data_ptr(), self.packed_weight._version, binary_kernels.backend())
        if self._derived is None or self._derived[0] != key:
            sums = bitpack.tap_sums(self.packed_weight, self.in_channels)
            self._derived = (key, binary_kernels.prepare_weights(self.packed_weight), sums)
        return self._derived[1], self._derived[2]

    def integer_output(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's exact integers (float32 NCHW) for a real input ``x``, before any epilogue."""
        return self._run(x, fused=False)

    def _run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        epilogue = self._epilogue() if fused else None
        x = x.float().contiguous()
        height, width = x.shape[-2:]
        kernel_weights, sums = self._derived_weights()
        packed, zeros = binary_kernels.pack_activations(x, self.threshold, self.padding)
        corrections = bool(zeros or self.weight_zero_index.numel())
        y = binary_kernels.xnor_conv2d(
            packed,
            self.packed_weight,
            kernel_weights,
            sums,
            self.in_channels,
            self.stride,
            self.padding,
            height,
            width,
            None if corrections else epilogue,
        )
        if corrections:
            # Rare: correct the integers first, then apply the epilogue with PyTorch ops.
            y = binary_kernels.apply_epilogue(y - self._zero_corrections(x, zeros), epilogue)
        return y

    def _zero_corrections(self, x: torch.Tensor, zeros: int) -> torch.Tensor:
        """What packing 0 as +1 added: ``conv(z, w') + conv(a, zw)`` (see the class docstring).

        With ``a`` the true ternary input, ``z = [a == 0]``, ``w'`` the packed +-1 weights
        and ``zw = [sign(W) == 0]``: ``(a + z)(w + zw) - z*w' - a*zw = a*w``.
        """
        signs = torch.sign(x - self.threshold.view(1, -1, 1, 1))
        correction = torch.zeros(())
        conv = dict(stride=self.stride, padding=self.padding)
        if zeros:
            stored = bitpack.unpack_weights(self.packed_weight, self.in_channels)
            correction = correction + F.conv2d((signs == 0).float(), stored, **conv)
        if self.weight_zero_index.numel():
            zero_weights = torch.zeros(
                self.out_channels, self.in_channels, self.kernel_size, self.kernel_size, device=x.device
            )
            zero_weights[tuple(self.weight_zero_index.t())] = 1.0
            correction = correction + F.conv2d(signs, zero_weights, **conv)
        return correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's integers, through the fused batch norm and PReLU when there is one."""
        return self._run(x, fused=True)

    def extra_repr(self) -> str:
        """Shape and packing, for ``print(model)``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bits=1, packed{', fused batch norm + PReLU' if self.has_epilogue else ''}"
        )


def _check_hard_sign(name: str, conv: BinaryConv2d) -> None:
    temperature = float(conv.temperature.max())
    if not temperature < conv.sign_threshold:
        raise ValueError(
            f"{name}: temperature {temperature:g} is not below the sign threshold {conv.sign_threshold:g}, so its "
            "weights are not yet binary (progressive binarization is still running). Export a checkpoint from the "
            "end of training, or call models.set_temperature(model, 1e-9) to evaluate with hard signs."
        )


def _parents(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    parents: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = (module, child_name)
    return parents


def convert_to_binary(model: nn.Module, fold: bool = True, pack: bool = True) -> nn.Module:
    """A copy of ``model`` (eval mode) whose binary convolutions run on packed bits.

    Binary layers are found by their precision tags (:func:`models.layer_precision`);
    each must sit in a :class:`~models.blocks.Processor` whose input chain is
    ``move`` (learnable bias) -> ``binary_activation`` (sign) -> ``binary_conv``.
    ``fold`` also folds batch norms into per-channel affines and drops the modules
    the float forward never calls (module docstring). ``pack=False`` skips packing the
    weights (for a skeleton that a state dict will fill) and the temperature check.
    """
    model = copy.deepcopy(model).eval()
    parents = _parents(model)
    binary = [(name, module) for name, module in model.named_modules() if _is_binary(module)]
    if not binary:
        raise ValueError("the model has no binary layer (no module tagged weight_bits=1, input_bits=1)")
    for name, conv in binary:
        parent, attr = parents[name]
        if not (isinstance(parent, Processor) and attr == "binary_conv" and isinstance(conv, BinaryConv2d)):
            raise ValueError(
                f"{name}: a binary layer outside a BNext processor; only the move -> sign -> binary_conv chain of "
                "models.blocks.Processor can be converted"
            )
        if not (isinstance(parent.move, LearnableBias) and isinstance(parent.binary_activation, HardSign)):
            raise ValueError(f"{name}: its processor's input chain is not learnable bias -> sign")
        if pack:
            _check_hard_sign(name, conv)
        parent.binary_conv = PackedBinaryConv2d.from_float(parent.move, conv, pack=pack)
        # The threshold now lives in the packed conv (fold 1); the sign is the packing.
        parent.move = nn.Identity()
        parent.binary_activation = nn.Identity()
    if fold:
        _drop_unused(model)
        _fold_batch_norms(model)
        _fuse_epilogues(model)
        _fuse_tails(model)
    return model


def _fuse_epilogues(model: nn.Module) -> None:
    # b = activation2(norm1(binary_conv(.))) in every processor: the folded norm and the
    # PReLU run inside the convolution's store (fold 5), saving two passes over b.
    for module in model.modules():
        if (
            isinstance(module, Processor)
            and isinstance(module.binary_conv, PackedBinaryConv2d)
            and isinstance(module.norm1, ChannelAffine)
            and isinstance(module.activation2, nn.PReLU)
        ):
            module.binary_conv.fuse_epilogue(module.norm1, module.activation2)
            module.norm1 = nn.Identity()
            module.activation2 = nn.Identity()


def _fuse_tails(model: nn.Module) -> None:
    # Fold 6: the real-valued tail of each info-recoupling module in two passes
    # (see _recoupled_tail); modules in another configuration keep their forward.
    for module in model.modules():
        if not (
            isinstance(module, (ELMAttention, BinaryFFN, BNext18Attention))
            and module.info_recoupling
            and isinstance(module.binary_conv, PackedBinaryConv2d)
            and module.binary_conv.has_epilogue
            and isinstance(module.norm2, ChannelAffine)
            and isinstance(module.move, nn.Identity)
            and isinstance(module.binary_activation, nn.Identity)
            and isinstance(module.se, SqueezeExcite)
            and isinstance(module.se.se[0], nn.AdaptiveAvgPool2d)
            and isinstance(module.se.se[2], nn.ReLU)
            and module.stride in (1, 2)
        ):
            continue
        fused = {ELMAttention: _elm_forward, BinaryFFN: _ffn_forward, BNext18Attention: _bnext18_attention_forward}
        module.forward = types.MethodType(fused[type(module)], module)


def _recoupled_tail(module: Processor, x: torch.Tensor, x_mix: torch.Tensor, residual: torch.Tensor, elm: bool):
    """``norm2(SE(g*x_mix + (1-g)*b) * b [* residual]) + residual`` with ``b`` from the binary conv.

    Same per-element operations as blocks.py; the mixed tensor is never stored (its
    mean is taken on the fly) and the rest is a single pass.
    """
    b = module.binary_conv(x)  # folded: sign threshold, batch norm and PReLU inside
    mean = binary_kernels.mix_mean(b, x_mix, module.scale)
    squeeze, expand = module.se.se[1], module.se.se[3]
    if type(squeeze) is nn.Conv2d and type(expand) is nn.Conv2d:
        # Plain 1x1 convolutions of a 1x1 map are matrix products: F.linear is the faster call.
        hidden = F.relu(F.linear(mean, squeeze.weight.flatten(1), squeeze.bias))
        gate = torch.sigmoid(F.linear(hidden, expand.weight.flatten(1), expand.bias))
    else:
        # Other layers (the 8-bit variant's fake-quantized convs) run as they are.
        gate = torch.sigmoid(module.se.se[1:](mean.view(*mean.shape, 1, 1))).view(mean.shape)
    return binary_kernels.gate_affine_residual(b, gate, residual, module.norm2.scale, module.norm2.shift, elm)


def _elm_forward(self: ELMAttention, x: torch.Tensor) -> torch.Tensor:
    if self.stride == 2 and isinstance(self.activation1, nn.PReLU):
        x_mix, residual = binary_kernels.pool2x2_prelu(x, self.activation1.weight)
    else:
        x_mix = avg_pool_if_strided(x, self.stride)
        residual = avg_pool_if_strided(self.activation1(x), self.stride)
    return _recoupled_tail(self, x, x_mix, residual, elm=True)


def _ffn_forward(self: BinaryFFN, x: torch.Tensor) -> torch.Tensor:
    shortcut = avg_pool_if_strided(x, self.stride)
    return _recoupled_tail(self, x, shortcut, shortcut, elm=False)


def _bnext18_attention_forward(self: BNext18Attention, x: torch.Tensor) -> torch.Tensor:
    residual = self.activation1(x)
    if self.downsample is not None:
        residual = self.downsample(residual)
    return _recoupled_tail(self, x, residual, residual, elm=True)


def _is_binary(module: nn.Module) -> bool:
    precision = layer_precision(module)
    return precision is not None and precision.is_binary and not isinstance(module, PackedBinaryConv2d)


def _drop_unused(model: nn.Module) -> None:
    # Modules that exist only so that official checkpoints load; the float forward
    # never calls them (models/blocks.py, models/bnext.py).
    for module in model.modules():
        if isinstance(module, Stem):
            module.prelu = nn.Identity()
        if isinstance(module, BinaryFFN):
            module.activation1 = nn.Identity()
            if not module.info_recoupling:
                module.norm2 = nn.Identity()


def _fold_batch_norms(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, ChannelAffine.from_batch_norm(child))
        del name


def binary_layers(model: nn.Module) -> list[tuple[str, PackedBinaryConv2d]]:
    """The packed binary convolutions of a converted model, by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedBinaryConv2d)]


@torch.no_grad()
def randomize_for_inference(model: nn.Module, inputs: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give a randomly initialized model trained-like statistics, in place, for tests and benchmarks.

    A fresh model has all thresholds at 0, unit batch-norm affines and running
    statistics of (0, 1), so its activations grow without bound and many values sit
    exactly on a threshold. This draws thresholds, batch-norm affines (including
    negative scales) and then sets the running statistics to the exact statistics of
    one forward pass on ``inputs``. The binarizers are put in hard-sign mode.
    """
    from .precision import set_temperature

    generator = torch.Generator().manual_seed(seed)
    set_temperature(model, 1e-12)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in model.modules():
        if isinstance(module, LearnableBias):
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    for norm in norms:
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator) * 0.5 + 1.0)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.3)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass gives that batch's statistics
    model.train()
    model(inputs)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()
