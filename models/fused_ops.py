"""Fused training kernels of the processor's per-element chain (CPU), with exact unfused fallbacks.

Around each binary convolution the processor runs ``sign(x + beta)``, batch norm,
PReLU, the spatial mean for the recoupling gate, ``gate * b [* residual]``, a second
batch norm and ``+ residual``. One PyTorch kernel per step reads and writes the whole
activation each time, forward and backward; on the CPU that costs more than the
convolutions' own overhead. The first three functions here run each chain in two or three
passes (``models/csrc/fused_train.cpp``, built on first use by
:func:`models.extensions.build_cpu_extension`):

* :func:`processor_inputs`: ``sign(x + beta)`` with the clipped straight-through
  gradient, the spatial mean of ``x`` (the recoupling mix's input when it is ``x``
  itself) and ``prelu(x)`` (ELM attention's real shortcut), from one read of ``x``; its
  backward also adds the gradient of a binary FFN's residual ``x`` in the same pass;
* :func:`batch_norm_prelu`: training batch norm, PReLU and the per-sample spatial mean;
* :func:`gated_batch_norm_residual`: ``BN(gate * b [* r]) + r``;
* :func:`window_mean_2x2` and :func:`spread_2x2`: 2x2 average pooling and its gradient
  (the downsampling blocks' shortcut), the same bits as ``F.avg_pool2d``;
* :func:`binarize_weight`: the progressive weight binarization in one pass, the same bits;
  :func:`clamp_and_binarize_weight`: the latent weight's constraint and the next step's
  binarization in one pass; :func:`adamw_clamp_and_binarize_weight`: the optimizer's AdamW
  update too;
* :func:`training_conv2d`: the binary convolutions of a training step, by one matrix
  product per kernel tap on small planes (:mod:`models.tap_conv`, plain PyTorch, no
  extension), where that is faster than oneDNN.
* :func:`conv2d_of_points`: the squeeze-excitation gates' 1x1 convolutions of 1x1 planes
  in a training step, as matrix products (plain PyTorch);
* :func:`recoupling_gate`: the info-recoupling mix of the means and the squeeze-excitation
  gate as one autograd node in a training step (one C++ call each way for CPU float32
  tensors, PyTorch's operators elsewhere);
* :func:`processor_tail`: a recoupled processor after its convolution (``batch_norm_prelu``,
  the gate and ``gated_batch_norm_residual``) as one autograd node in a training step.

The first three, the tail and the weight binarization are ``torch.library`` operators
(:mod:`models.kernel_ops`), so ``torch.compile`` calls them from its graph as eager does
(the binarization through :func:`binarize_weight_in_graph`, which takes the weight that the
constraint's fused pass prepared, see :func:`prepared_in_graph`); the pooling kernels are
eager only (inductor compiles their unfused form). On the CPU, compile with
:func:`compile_options` so that inductor keeps the convolutions' NCHW layout, which
the kernels read. The fused path is taken only in training mode (evaluation and the
exports run the modules one by one, bit for bit as before), and only where it computes
the same function: not under tracing, CPU float32 contiguous NCHW tensors, plain
``nn.BatchNorm2d`` modules with running statistics and a momentum, and modules without
forward hooks (the fused path does not call them). Everywhere else, inside
:func:`disabled` and with ``BNEXT_FUSED_BACKEND=torch``, the modules run one by one.
Sums are accumulated in another order than PyTorch's kernels (float over blocks of 128
values, double beyond), so results agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
import weakref
from collections.abc import Iterator
from functools import lru_cache
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel_ops, tap_conv
from .extensions import build_cpu_extension
from .quantizers import MIN_TEMPERATURE, HardSign, LearnableBias

BACKEND_ENV = "BNEXT_FUSED_BACKEND"
_enabled = True


@lru_cache(maxsize=1)
def load_extension() -> ModuleType | None:
    """The compiled fused-training extension, or None (with a warning) when it cannot be built or is disabled."""
    return build_cpu_extension(
        "bnext_fused_train",
        "fused_train.cpp",
        BACKEND_ENV,
        "training runs the unfused PyTorch operators, which give the same results more slowly.",
    )


def backend() -> str:
    """``"cpp"`` when the fused kernels are in use (where applicable), ``"torch"`` otherwise."""
    return "cpp" if load_extension() is not None else "torch"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside this block the modules run one by one (for side-by-side timings and debugging)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def compile_options(device: torch.device | str) -> dict[str, Any]:
    """``torch.compile(model, options=...)`` for a model on ``device`` that suits the fused kernels.

    On the CPU inductor stores every convolution's tensors channels-last by default
    ("layout optimization"); the kernels read NCHW, so each of their calls would add two
    layout copies, and on the development machine the channels-last convolutions of
    BNext-T at 32x32 were slower too (``benchmarks/RESULTS.md``). Elsewhere: no options.
    """
    if torch.device(device).type == "cpu" and load_extension() is not None:
        return {"layout_optimization": False}
    return {}


# --------------------------------------------------------------------------- eligibility


def hook_free(*modules: nn.Module | None) -> bool:
    """Whether no forward hook (of these modules or global) would run: a faster path that skips
    the modules' ``__call__`` would silently skip their hooks."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def _tensors_fit(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: CPU, float32, contiguous N x C x H x W."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 and t.is_contiguous() for t in tensors
    )


@torch.compiler.assume_constant_result
def _kernels_loaded() -> bool:
    # A constant to torch.compile: the build (or its failure) happens once, before tracing reads it.
    return load_extension() is not None


def switched_on() -> bool:
    """Whether the faster paths may run: not inside :func:`disabled`, not under TorchScript tracing or scripting."""
    return _enabled and not (torch.jit.is_tracing() or torch.jit.is_scripting())


def _fusable(*tensors: torch.Tensor) -> bool:
    # The processor kernels are custom operators (models.kernel_ops): torch.compile keeps them in its graph.
    if not switched_on():
        return False
    return _tensors_fit(*tensors) and _kernels_loaded()


def _fusable_in_eager(*tensors: torch.Tensor) -> bool:
    # The pooling kernels and the eager weight kernels are plain extension calls, which would
    # break a compiled graph: inductor compiles the pooling's unfused form, and a compiled step
    # binarizes through its operator (binarize_weight_in_graph).
    return not torch.compiler.is_compiling() and _fusable(*tensors)


def autocast_allows_float32(device_type: str) -> bool:
    """Whether the float32 fast paths may run under the current autocast state.

    They may with autocast off, and in an eager CPU training step under autocast
    (``--amp bf16``). There the binary convolutions compute in autocast's dtype (their
    inputs are exact signs; the weights, during progressive binarization, and the sums
    are rounded: oneDNN's convolutions round each output once, the tap products each
    tap's product, :func:`models.tap_conv.forward`) and hand their output on in float32
    (:func:`training_conv2d`); the fused kernels around the convolutions and the
    recoupling gates compute in float32, as without autocast; the stem, the other
    real-valued layers and the classifier follow autocast. PyTorch's operators one by one
    in bfloat16 were slower than a float32 step on the CPU. Under ``torch.compile`` and on
    other devices autocast applies as usual.
    """
    if not torch.is_autocast_enabled(device_type):
        return True
    return device_type == "cpu" and not torch.compiler.is_compiling()


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), by torch's CPUID helpers
    (private, present in the pinned torch; where they are missing: False). Without them
    oneDNN emulates bf16, and autocast on the CPU is unlikely to pay."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _fusable_norm(bn: nn.Module) -> bool:
    return (
        type(bn) is nn.BatchNorm2d  # not SyncBatchNorm: its statistics span processes
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.momentum is not None
    )


def _update_statistics(bn: nn.BatchNorm2d, new_mean: torch.Tensor, new_var: torch.Tensor) -> None:
    # What nn.BatchNorm2d.forward does besides the kernel call. Eagerly the kernel updated the
    # buffers themselves; a compiled graph's operator computed the new statistics on copies
    # (custom operators with a backward may not mutate their inputs), written back here.
    if new_mean is not bn.running_mean:
        with torch.no_grad():
            bn.running_mean.copy_(new_mean)
            bn.running_var.copy_(new_var)
    _count_batch(bn)


def _count_batch(bn: nn.BatchNorm2d) -> None:
    # nn.BatchNorm2d.forward's count of training batches. An integer buffer: nothing for autograd to
    # record, so no no_grad() (whose entry and exit cost more than the addition on small tensors).
    counter = bn.num_batches_tracked
    if counter is not None:
        counter.add_(1)


def _slope(prelu: nn.PReLU, channels: int) -> torch.Tensor:
    # The kernels read one slope per channel; a one-value PReLU's is spread (autograd sums it back).
    weight = prelu.weight
    return weight if weight.numel() == channels and weight.dim() == 1 else weight.expand(channels).contiguous()


# --------------------------------------------------------------------------- public functions


class ProcessorInputs(NamedTuple):
    """What a processor reads from its input ``x`` (see :func:`processor_inputs`)."""

    signs: torch.Tensor
    mean: torch.Tensor | None
    activated: torch.Tensor | None
    shortcut: torch.Tensor | None


def processor_inputs(
    x: torch.Tensor,
    move: LearnableBias,
    binarizer: HardSign,
    mean: bool = False,
    prelu: nn.PReLU | None = None,
    shortcut: bool = False,
) -> ProcessorInputs:
    """``binarizer(move(x))`` (``sign(x + beta)``, STE clipped at ``binarizer.clip``), and in the same pass
    ``x``'s spatial mean ``N x C x 1 x 1`` when ``mean`` and ``prelu(x)`` when a PReLU is given.

    ``shortcut`` asks for ``x`` for a residual connection: in a fused training step a view of
    ``x`` whose gradient the sign's backward kernel adds to ``x``'s in the same pass
    (:func:`models.kernel_ops.processor_inputs`), elsewhere ``x`` itself; None when not asked.
    """
    # Training only (evaluation keeps PyTorch's mean bit for bit), and not once an export replaced the modules.
    modules_ok = isinstance(move, LearnableBias) and isinstance(binarizer, HardSign) and binarizer.training
    if modules_ok and _fusable(x) and hook_free(move, binarizer, prelu):
        slope = _slope(prelu, x.shape[1]) if prelu is not None else kernel_ops.no_values(x)
        signs, x_mean, activated, view = kernel_ops.processor_inputs(
            x, move.bias.reshape(-1), slope, binarizer.clip, mean, shortcut
        )
        return ProcessorInputs(signs, x_mean if mean else None, activated if prelu is not None else None, view)
    return ProcessorInputs(
        binarizer(move(x)),
        x.mean((2, 3), keepdim=True) if mean else None,
        prelu(x) if prelu is not None else None,
        x if shortcut else None,
    )


def batch_norm_prelu(
    x: torch.Tensor, norm: nn.BatchNorm2d, prelu: nn.PReLU | None, pooled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = prelu(norm(x))`` (no PReLU for None) and, when ``pooled``, ``y``'s spatial mean ``N x C x 1 x 1``."""
    if _fusable(x) and _fusable_norm(norm) and hook_free(norm, prelu):
        slope = _slope(prelu, x.shape[1]) if prelu is not None else kernel_ops.no_values(x)
        y, mean_hw, new_mean, new_var = kernel_ops.batch_norm_prelu(
            x, norm.weight, norm.bias, slope, norm.running_mean, norm.running_var, norm.momentum, norm.eps, pooled
        )
        _update_statistics(norm, new_mean, new_var)
        return y, (mean_hw if pooled else None)
    y = norm(x)
    if prelu is not None:
        y = prelu(y)
    return y, (y.mean((2, 3), keepdim=True) if pooled else None)


def gated_batch_norm_residual(
    b: torch.Tensor,
    gate: torch.Tensor | None,
    residual: torch.Tensor,
    norm: nn.BatchNorm2d,
    multiply_residual: bool,
) -> torch.Tensor:
    """``norm(gate * b * residual) + residual`` (or ``norm(gate * b) + residual``); ``gate`` is ``N x C x 1 x 1``."""
    gate_ok = gate is None or gate.dtype == torch.float32
    if gate_ok and _fusable(b, residual) and _fusable_norm(norm) and hook_free(norm) and b.shape == residual.shape:
        n, channels = b.shape[:2]
        # N x C x 1 x 1 as it comes: the kernels read N x C values (a reshape would add an autograd node).
        gate_values = b.new_ones(n, channels, 1, 1) if gate is None else gate.contiguous()
        y, new_mean, new_var = kernel_ops.gated_batch_norm(
            b, gate_values, residual, multiply_residual, norm.weight, norm.bias,
            norm.running_mean, norm.running_var, norm.momentum, norm.eps,
        )  # fmt: skip
        _update_statistics(norm, new_mean, new_var)
        return y
    v = gate * b if gate is not None else b
    if multiply_residual:
        v = v * residual
    return norm(v) + residual


def window_mean_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2)`` bit for bit: ``((a + b) + c) + d`` per window in the kernel's order, times 0.25.

    The C++ kernel runs where ``x`` takes part in a training step (requires grad);
    elsewhere four strided slices compute the same bits, at about a third of
    ``avg_pool2d``'s CPU time in the NCHW layout.
    """
    if x.requires_grad and _fusable_in_eager(x):
        return load_extension().pool_2x2_forward(x)
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) * 0.25


def spread_2x2(grad: torch.Tensor, input_shape: torch.Size, kernel: bool = True) -> torch.Tensor:
    """The gradient of :func:`window_mean_2x2` for an input of ``input_shape``: ``grad / 4`` on each window.

    Odd trailing rows and columns get zero, as with ``avg_pool2d``'s floor. The kernel
    (where ``kernel`` and the gradient fits it) writes contiguous NCHW; otherwise one
    expand-and-copy (faster than the pooling backward kernel, slower than ours).
    """
    height, width = input_shape[-2:]
    if kernel and _fusable_in_eager(grad):
        return load_extension().pool_2x2_backward(grad, height, width)
    *lead, h, w = grad.shape
    spread = (grad * 0.25)[..., :, None, :, None].expand(*lead, h, 2, w, 2).reshape(*lead, 2 * h, 2 * w)
    if (height, width) != (2 * h, 2 * w):
        spread = torch.nn.functional.pad(spread, (0, width - 2 * w, 0, height - 2 * h))
    return spread


def _float32(value: float) -> float:
    """``value`` rounded to float32 (as a float32 tensor would hold it), as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


_MIN_TEMPERATURE_32 = _float32(MIN_TEMPERATURE)
_TINY_32 = torch.finfo(torch.float32).tiny


def _host_temperature(temperature: torch.Tensor) -> bool:
    # A temperature the kernels' divisors are picked from on the host: one float32 value on the CPU.
    return temperature.device.type == "cpu" and temperature.dtype == torch.float32 and temperature.numel() == 1


def _divisors(temperature: torch.Tensor, threshold: float) -> tuple[float, float] | None:
    # The divisors d1, d2 of the binarization at a one-value float32 CPU temperature, picked on
    # the host in float32 as the tensor formula picks them; None for other temperatures.
    if not _host_temperature(temperature):
        return None
    t = temperature.item()  # a float32 value, exact as a Python float
    if t < _float32(threshold):
        return _TINY_32, _TINY_32
    # clamp(min=1e-8); a NaN temperature stays NaN, as with torch.clamp
    return (_MIN_TEMPERATURE_32 if t < _MIN_TEMPERATURE_32 else t), 1.0


def binarize_weight(
    weight: torch.Tensor, temperature: torch.Tensor, threshold: float, tap_major: bool = False
) -> torch.Tensor | None:
    """``clamp(weight / d1 / d2, -1, 1)`` in one pass, with the divisors of
    :class:`models.quantizers._ProgressiveBinarizeSTE` (the same bits); None where the kernel does not apply.

    For the caller's training step: a CPU float32 contiguous 4-D weight and a float32
    one-value CPU temperature, outside ``torch.compile``. The divisors are picked on the
    host, in float32 as the tensor formula picks them: ``d1 = max(T, 1e-8)`` and
    ``d2 = 1``, or both the smallest normal float32 when ``T < threshold``. Reading a CPU
    tensor waits for nothing, and it saves the six small tensor operations per weight
    that the device-side choice takes. With ``tap_major`` the result is channels-last
    (the same values): the layout of :func:`models.tap_conv.tap_matrices`, which the
    tap products then read in place instead of copying the weight into it.
    """
    divisors = _divisors(temperature, threshold) if _fusable_in_eager(weight) else None  # no .item() when compiling
    if divisors is None:
        return None
    return load_extension().divide_clamp(weight, *divisors, tap_major)


def binarize_weight_in_graph(
    weight: torch.Tensor, temperature: torch.Tensor, threshold: float, tap_major: bool
) -> torch.Tensor | None:
    """While ``torch.compile`` traces a training step: :func:`binarize_weight` as an operator of the graph
    (``bnext::binarize_weight``, the straight-through identity gradient); None where it does not apply.
    When the graph runs, the operator takes the binarized weight that the layer's constraint
    pass prepared after the last optimizer step, where it is current (:func:`prepared_in_graph`).

    The same bits and layouts as eagerly: with ``tap_major`` the tap products read the result
    in place. Inductor's own code for the unfused form writes the plain layout, which the
    tap products then copy (and transpose) on every step.
    """
    if not (torch.compiler.is_compiling() and _fusable(weight) and _host_temperature(temperature)):
        return None
    return kernel_ops.binarize_weight_op(weight, temperature, threshold, tap_major)


#: Binary layers by their latent weight's data pointer, the one thing of a layer that a
#: compiled graph's binarization operator sees: where it finds the weight's layer there, it
#: takes the binarized weight that the layer's constraint pass prepared (:func:`prepared_in_graph`).
_graph_step_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def register_graph_step_layer(layer: nn.Module) -> None:
    """Let compiled training steps find ``layer`` (a binary layer) from its latent weight ``layer.weight``.

    A binary layer registers itself in its constraint pass, so that the graph's
    ``bnext::binarize_weight`` can take the binarized weight the pass prepared for the next
    step instead of binarizing again. The entry lives as long as the layer.
    """
    key = layer.weight.data_ptr()
    if _graph_step_layers.get(key) is not layer:
        _graph_step_layers[key] = layer


def prepared_in_graph(
    weight: torch.Tensor, temperature: torch.Tensor, threshold: float, tap_major: bool
) -> torch.Tensor | None:
    """The binarized ``weight`` that its layer's constraint pass prepared, as ``bnext::binarize_weight``
    asks for it while a compiled training step runs; None where there is none to take.

    The layer (see :func:`register_graph_step_layer`) checks that the tensors are its own
    and that its prepared weight is current, as an eager training forward does, and hands
    the weight over once: the graph owns it from then on. It also records the step's
    layout, so that the optimizer's one-pass update and the constraint pass prepare the next one.
    """
    layer = _graph_step_layers.get(weight.data_ptr())
    if layer is None:
        return None
    return layer.take_prepared_for_graph(weight, temperature, threshold, tap_major)


def clamp_and_binarize_weight(
    weight: torch.Tensor, clip: float, temperature: torch.Tensor, threshold: float, tap_major: bool
) -> torch.Tensor | None:
    """``weight.clamp_(-clip, clip)``, then :func:`binarize_weight` of the clamped weight, in one pass.

    A binary layer's constraint after an optimizer step, which also prepares the next
    step's binarized weight while it reads the latent one: the constraint writes only
    the values out of range, and the step does not read the weight again. The same bits
    as the clamp and the binarization one after the other. None, with ``weight``
    untouched, where the kernel does not apply (see :func:`binarize_weight`).
    """
    divisors = _divisors(temperature, threshold) if _fusable_in_eager(weight) else None
    if divisors is None:
        return None
    binarized = load_extension().clamp_and_divide_clamp(weight.detach(), clip, *divisors, tap_major)
    # An in-place change, as clamp_ would record it: autograd refuses a backward through a graph
    # that saved the weight before, and a binarization prepared earlier no longer matches.
    torch.autograd.graph.increment_version(weight)
    return binarized


class AdamWUpdate(NamedTuple):
    """One AdamW step of a tensor, as ``torch.optim.AdamW(fused=True)`` makes it (no amsgrad, not maximizing).

    ``exp_avg`` and ``exp_avg_sq`` are the optimizer's moments, updated in place;
    ``step`` is the step count after this update.
    """

    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: float
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    eps: float


def adamw_clamp_and_binarize_weight(
    weight: torch.Tensor,
    update: AdamWUpdate,
    clip: float,
    temperature: torch.Tensor,
    threshold: float,
    tap_major: bool,
) -> torch.Tensor | None:
    """``update`` applied to ``weight``, then :func:`clamp_and_binarize_weight`, in one pass.

    The weight and the moments come out bit for bit as torch's fused AdamW kernel and
    the clamp leave them (checked against torch once per process, see
    :func:`adamw_kernel_matches_torch`), and the result is the next step's binarized
    weight: the optimizer and the constraint do not each read the weight. None, with
    nothing touched, where the kernel does not apply: where :func:`clamp_and_binarize_weight`
    does not, where the gradient or a moment is not a contiguous CPU float32 tensor of
    the weight's shape, for a weight whose size is not a multiple of 16 values (torch
    takes a tensor's last values in other roundings), for ``beta1`` outside ``(0.5, 1.5)``
    (torch's lerp takes another form there), and on a machine where the check failed.
    """
    divisors = _divisors(temperature, threshold) if _fusable_in_eager(weight) else None
    if (
        divisors is None
        or weight.numel() % 16
        or not 0.5 < update.beta1 < 1.5
        or not _tensors_fit(*update[:3])
        or any(t.shape != weight.shape for t in update[:3])
    ):
        return None
    kernel = _adamw_kernel()
    if kernel is None:
        return None
    binarized = kernel(weight.detach(), *update[:3], *(float(v) for v in update[3:]), clip, *divisors, tap_major)
    torch.autograd.graph.increment_version(weight)  # as the optimizer's in-place update would
    return binarized


def adamw_update_many(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> list[int] | None:
    """One AdamW step of many parameters, as ``torch.optim.AdamW(fused=True)`` makes it, in one kernel call;
    returns the indices of the parameters it left to the caller, or None where it took none.

    The lists are those torch's AdamW hands its kernel (no amsgrad, not maximizing): each
    parameter, its gradient and moments, and its float32 step count, which is incremented
    first, as torch does. Parameters of a multiple of 16 values whose tensors are
    contiguous float32 CPU tensors of one shape get torch's bits (the arithmetic of
    :func:`adamw_clamp_and_binarize_weight`, checked against torch once per process,
    see :func:`adamw_kernel_matches_torch`); the others are returned, untouched, steps
    included. torch's kernel runs one parallel region per tensor; this one runs one for all
    (BNext-T has 379 real-valued tensors, most of them a few hundred values).
    None for ``beta1`` outside ``(0.5, 1.5)``, without the extension, with a build from
    before the kernel, and on a machine where the check failed.
    """
    kernel = getattr(load_extension(), "adamw_many", None)
    if kernel is None or not 0.5 < beta1 < 1.5 or _adamw_kernel() is None:
        return None
    return kernel(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps)


#: Whether the one-pass AdamW kernel gave torch's bits (None: not checked yet in this process).
_adamw_matches: bool | None = None


def adamw_kernel_matches_torch() -> bool:
    """Whether the C++ AdamW kernels give torch's fused AdamW bits on this machine (checked once).

    torch picks its kernel by the CPU's vector instructions, and its compiler chose which
    multiply-adds to fuse; the one-pass kernel and the many-tensor one (the same arithmetic)
    follow torch 2.14.1's AVX-512 kernel (the one the development machine runs). Three steps
    of 4096 values with weight decay, and three of three tensors of 16 to 40000 values
    (where the build has the many-tensor kernel), are compared bit for bit; on a mismatch a
    warning says so and :func:`adamw_clamp_and_binarize_weight` and
    :func:`adamw_update_many` are off.
    False also without the extension, or with a build from before the one-pass kernel.
    """
    return _adamw_kernel() is not None


def _adamw_kernel() -> Any:
    # The extension's one-pass AdamW function where it exists and passed the check, else None.
    global _adamw_matches
    kernel = getattr(load_extension(), "adamw_clamp_and_divide_clamp", None)  # a baseline build may predate it
    if kernel is None:
        return None
    if _adamw_matches is None:
        _adamw_matches = _gives_torchs_bits(kernel)
    return kernel if _adamw_matches else None


def _gives_torchs_bits(kernel: Any) -> bool:
    generator = torch.Generator().manual_seed(0)  # leaves the global random state alone
    start = torch.randn(4096, generator=generator)
    reference = nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
    weight, exp_avg, exp_avg_sq = start.clone(), torch.zeros(4096), torch.zeros(4096)
    for step in (1, 2, 3):
        grad = torch.randn(4096, generator=generator) * 1e-2
        reference.grad = grad.clone()
        optimizer.step()
        kernel(
            weight, grad, exp_avg, exp_avg_sq, float(step), 1e-2, 0.9, 0.999, 0.1, 1e-8, float("inf"), 1.0, 1.0, False
        )
    state = optimizer.state[reference]
    matches = all(
        torch.equal(a, b)
        for a, b in ((reference.detach(), weight), (state["exp_avg"], exp_avg), (state["exp_avg_sq"], exp_avg_sq))
    )
    many = getattr(load_extension(), "adamw_many", None)
    if matches and many is not None:  # the many-tensor kernel's arithmetic is the same; checked all the same
        matches = _many_gives_torchs_bits(many, generator)
    if not matches:
        warnings.warn(
            f"the C++ AdamW kernels do not reproduce torch's fused AdamW on this CPU (torch's kernel: "
            f"{torch.backends.cpu.get_cpu_capability()}); all parameters are updated by torch's kernel and the "
            "binary weights then constrained in a pass of their own, the same results a little slower",
            stacklevel=3,
        )
    return matches


def _many_gives_torchs_bits(kernel: Any, generator: torch.Generator) -> bool:
    # Three steps of three tensors (sizes that split between threads and tensors) against torch's fused AdamW.
    starts = [torch.randn(size, generator=generator) for size in (16, 2032, 40000)]
    references = [nn.Parameter(start.clone()) for start in starts]
    optimizer = torch.optim.AdamW(references, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
    weights = [start.clone() for start in starts]
    moments = [(torch.zeros_like(start), torch.zeros_like(start)) for start in starts]
    steps = [torch.tensor(0.0) for _ in starts]
    for _ in range(3):
        grads = [torch.randn(start.shape, generator=generator) * 1e-2 for start in starts]
        for reference, grad in zip(references, grads, strict=True):
            reference.grad = grad.clone()
        optimizer.step()
        exp_avgs, exp_avg_sqs = (list(m) for m in zip(*moments, strict=True))
        kernel(weights, grads, exp_avgs, exp_avg_sqs, steps, 1e-2, 0.9, 0.999, 0.1, 1e-8)
    return all(
        torch.equal(reference.detach(), weight)
        and torch.equal(optimizer.state[reference]["exp_avg"], exp_avg)
        and torch.equal(optimizer.state[reference]["exp_avg_sq"], exp_avg_sq)
        and torch.equal(optimizer.state[reference]["step"], step)
        for reference, weight, (exp_avg, exp_avg_sq), step in zip(references, weights, moments, steps, strict=True)
    )


def takes_tap_products(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int) -> bool:
    """Whether :func:`training_conv2d` runs this convolution by tap products (``weight`` may be the latent one).

    Where :func:`models.tap_conv.applies` (CPU float32, small planes) and a gradient is
    being recorded; not inside :func:`disabled` or :func:`models.tap_conv.disabled`, nor
    under tracing. A binary layer asks before it binarizes, to have its weight written
    in the taps' layout (:func:`binarize_weight`).
    """
    return (
        switched_on()
        and tap_conv.enabled()
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and tap_conv.applies(x, weight, stride, padding, groups)
    )


def conv2d_of_points(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; in a training step, a 1x1
    convolution of ``N x C x 1 x 1`` inputs (the squeeze-excitation gates') as one matrix product.

    oneDNN's convolutions took 2.1 to 2.3 times as long as these products forward and
    backward for BNext-T's gates at batch 64 (``benchmarks/fused_kernels.py --gates``,
    AMD EPYC development machine); the values agree to float32 rounding. Only where a
    gradient is recorded (evaluation keeps ``F.conv2d``'s bits), without padding or
    groups, and not inside :func:`disabled` or under tracing.
    """
    if (
        switched_on()
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.dim() == 4
        and x.shape[-2:] == (1, 1)
        and weight.shape[-2:] == (1, 1)
        and groups == 1
        and tuple(padding) == (0, 0)
    ):
        return F.linear(x.flatten(1), weight.flatten(1), bias).view(x.shape[0], -1, 1, 1)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _gate_kernels(*tensors: torch.Tensor) -> ModuleType | None:
    # The C++ gate for CPU float32 contiguous tensors (the extension built); else None: PyTorch's operators.
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return load_extension()
    return None


def _gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    # The gate N x C from the means N x C x 1 x 1, by the module path's operators in its order
    # (the same bits; in C++ where it applies, which calls ATen's products and sigmoid), and what
    # its gradient needs besides the inputs: (1 - g, the mixed means, hidden).
    if torch.is_autocast_enabled("cpu"):  # an eager CPU step under autocast: the gate stays float32
        with torch.autocast("cpu", enabled=False):
            return _float32_gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2)
    return _float32_gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2)


def _float32_gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    kernels = _gate_kernels(scale, mix_mean, b_mean, w1, b1, w2, b2)
    if kernels is not None:
        gate, *saved = kernels.recoupling_gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2)
        return gate, tuple(saved)
    n, channels = b_mean.shape[:2]
    keep = 1 - scale
    pooled = (scale * mix_mean + keep * b_mean).view(n, channels)
    hidden = F.linear(pooled, w1.view(w1.shape[0], channels), b1).relu_()
    gate = torch.sigmoid(F.linear(hidden, w2.view(channels, -1), b2))
    return gate, (keep, pooled, hidden)


def _gate_backward(grad_gate, gate, scale, mix_mean, b_mean, w1, w2, keep, pooled, hidden, wants):
    # Autograd's formulas of _gate_forward, written out: the gradients of its seven inputs
    # (None where ``wants``, the inputs' needs_input_grad, says no).
    kernels = _gate_kernels(grad_gate, gate, scale, mix_mean, b_mean, w1, w2, keep, pooled, hidden)
    if kernels is not None:
        grads = kernels.recoupling_gate_backward(grad_gate, gate, scale, mix_mean, b_mean, w1, w2, keep, pooled, hidden)
        return tuple(grad if wanted else None for grad, wanted in zip(grads, wants))
    n, channels = gate.shape
    grad_z = torch.ops.aten.sigmoid_backward(grad_gate.reshape(n, channels), gate)
    grad_w2 = grad_z.t().mm(hidden).view_as(w2) if wants[5] else None
    grad_b2 = grad_z.sum(0) if wants[6] else None
    grad_hidden = torch.ops.aten.threshold_backward(grad_z.mm(w2.view(channels, -1)), hidden, 0)
    grad_w1 = grad_hidden.t().mm(pooled).view_as(w1) if wants[3] else None
    grad_b1 = grad_hidden.sum(0) if wants[4] else None
    grad_pooled = grad_hidden.mm(w1.view(w1.shape[0], channels)).view_as(b_mean)
    grad_scale = None
    if wants[0]:  # d/dg of g * mix + (1 - g) * b_mean, summed over the samples
        grad_scale = (grad_pooled * mix_mean).sum(0, keepdim=True) - (grad_pooled * b_mean).sum(0, keepdim=True)
    grad_mix = grad_pooled * scale if wants[1] else None
    grad_b_mean = grad_pooled * keep if wants[2] else None
    return grad_scale, grad_mix, grad_b_mean, grad_w1, grad_b1, grad_w2, grad_b2


class _RecouplingGate(torch.autograd.Function):
    """The info-recoupling gate as one autograd node: ``sigmoid(W2 relu(W1 p + b1) + b2)`` on the
    mixed means ``p = g * mix + (1 - g) * b_mean``, with its gradient written out.

    The forward runs the operators of the module path in its order (the same bits); the
    backward computes autograd's formulas of them, with matrix products that may round
    differently. One node and one Python call instead of a dozen each: on BNext-T's 31
    processors the module path's small operators cost more than their arithmetic.
    """

    @staticmethod
    def forward(ctx, scale, mix_mean, b_mean, w1, b1, w2, b2):
        gate, saved = _gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2)
        ctx.save_for_backward(gate, scale, mix_mean, b_mean, w1, w2, *saved)
        return gate.view(*gate.shape, 1, 1)

    @staticmethod
    def backward(ctx, grad_gate):
        return _gate_backward(grad_gate, *ctx.saved_tensors, ctx.needs_input_grad)


def _plain_points_conv(conv: nn.Module) -> bool:
    # A 1x1 nn.Conv2d (not a subclass such as the 8-bit QuantConv2d) with a bias, as the gates build them.
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is not None
    )


def _gate_node_layers(
    se: nn.Module, mix_mean: torch.Tensor, means_shape: tuple, in_graph: bool = False
) -> tuple[nn.Conv2d, nn.Conv2d] | None:
    # The gate's two 1x1 convolutions where its gradient may be written out (see recoupling_gate): a
    # training step (training mode, gradient recorded, eager unless in_graph, autocast only as
    # autocast_allows_float32 says) and the plain, hook-free layers SqueezeExcite builds, on means of
    # the shape N x C x 1 x 1. None elsewhere.
    layers = getattr(se, "se", None)
    if not (
        switched_on()
        and se.training
        and torch.is_grad_enabled()
        and (in_graph or not torch.compiler.is_compiling())
        and autocast_allows_float32(mix_mean.device.type)
        and isinstance(layers, nn.Sequential)
        and len(layers) == 4
        and len(means_shape) == 4
        and tuple(means_shape[-2:]) == (1, 1)
        and mix_mean.shape == means_shape
    ):
        return None
    # Unpacked: indexing a Sequential walks its modules on every call.
    _, reduce, relu, expand = layers
    if type(relu) is nn.ReLU and _plain_points_conv(reduce) and _plain_points_conv(expand) and hook_free(*layers):
        return reduce, expand
    return None


def recoupling_gate(scale: torch.Tensor, mix_mean: torch.Tensor, b_mean: torch.Tensor, se: nn.Module) -> torch.Tensor:
    """``se.gate_from_pooled(scale * mix_mean + (1 - scale) * b_mean)``: the info-recoupling gate ``N x C x 1 x 1``.

    In a training step (training mode, gradient recorded, eager; under CPU autocast in
    float32, see :func:`autocast_allows_float32`) one autograd
    node (:class:`_RecouplingGate`) where ``se``'s layers are the plain ones it builds
    (``nn.Conv2d`` 1x1 with bias, ``nn.ReLU``) without hooks; the same forward bits, the
    gradients to float32 rounding. Elsewhere the modules one by one.
    """
    layers = _gate_node_layers(se, mix_mean, b_mean.shape)
    if layers is not None:
        reduce, expand = layers
        return _RecouplingGate.apply(scale, mix_mean, b_mean, reduce.weight, reduce.bias, expand.weight, expand.bias)
    return se.gate_from_pooled(scale * mix_mean + (1 - scale) * b_mean)


class TailStatistics(NamedTuple):
    """A batch norm's running statistics and constants as the tail's kernels take them."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    momentum: float
    eps: float


def tail_forward(
    y, residual, mix_mean, scale, gamma1, beta1, slope, w1, b1, w2, b2, gamma2, beta2,
    norm1: TailStatistics, norm2: TailStatistics, multiply: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # fmt: skip
    """A recoupled processor's output from its convolution's output ``y`` by the kernels, and what
    its backward needs besides the inputs: ``(mean1, invstd1, b_mean, b_affine, gate, keep, pooled,
    hidden, mean2, invstd2)``. The running statistics passed in are updated in place.

    ``b = prelu(norm1(y))`` is never stored: the gated kernels recompute it from ``y`` (which
    norm1's backward keeps anyway) with norm1's coefficients ``b_affine``, the same bits, which
    saves writing it here and holding it until the backward.
    """
    kernels = load_extension()
    mean1, invstd1, b_mean, b_affine = kernels.bn_prelu_statistics(y, gamma1, beta1, *norm1, slope)
    gate, gate_saved = _gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2)
    out, mean2, invstd2 = kernels.gated_bn_forward(y, gate, residual, multiply, gamma2, beta2, *norm2, b_affine)
    return out, (mean1, invstd1, b_mean, b_affine, gate, *gate_saved, mean2, invstd2)


def tail_backward(
    grad_out, y, residual, mix_mean, scale, gamma1, beta1, slope, w1, w2, gamma2, saved, multiply: bool, wants
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of :func:`tail_forward`'s tensor inputs ``(y, residual, mix_mean, scale, gamma1,
    beta1, slope, w1, b1, w2, b2, gamma2, beta2)`` from its output's, ``saved`` its second result;
    ``wants`` says which of the gate's seven inputs need one (the others' are None). Without
    ``multiply`` the residual's gradient is ``grad_out`` itself."""
    mean1, invstd1, b_mean, b_affine, gate, keep, pooled, hidden, mean2, invstd2 = saved
    kernels = load_extension()
    grad_out = kernel_ops._by_samples(grad_out)
    grad_b, grad_gate, grad_r, grad_gamma2, grad_beta2 = kernels.gated_bn_backward(
        grad_out, y, gate, residual, multiply, gamma2, mean2, invstd2, b_affine
    )
    if not multiply:
        grad_r = grad_out  # out = norm2(gate * b) + r: the residual's gradient is grad_out itself
    grad_scale, grad_mix, grad_b_mean, grad_w1, grad_b1, grad_w2, grad_b2 = _gate_backward(
        grad_gate, gate, scale, mix_mean, b_mean, w1, w2, keep, pooled, hidden, wants
    )
    grad_y, grad_gamma1, grad_beta1, grad_slope = kernels.bn_prelu_backward(
        grad_b, grad_b_mean, y, gamma1, beta1, slope, mean1, invstd1
    )
    return (
        grad_y, grad_r, grad_mix, grad_scale, grad_gamma1, grad_beta1, grad_slope,
        grad_w1, grad_b1, grad_w2, grad_b2, grad_gamma2, grad_beta2,
    )  # fmt: skip


class _ProcessorTail(torch.autograd.Function):
    """A recoupled processor after its binary convolution, as one autograd node (eager):
    ``b = prelu(norm1(y))``, the gate from ``mean(b)`` and the mix, ``norm2(gate * b [* r]) + r``.

    The batch-norm kernels and the gate's operators of :func:`batch_norm_prelu`,
    :func:`recoupling_gate` and :func:`gated_batch_norm_residual` in the same order, on the
    same values: the same bits, forward and backward (:func:`tail_forward`,
    :func:`tail_backward`). One node and one Python call instead of three of each per
    processor. A compiled graph calls the same functions through an operator
    (:data:`models.kernel_ops.processor_tail_op`).
    """

    @staticmethod
    def forward(
        ctx, y, residual, mix_mean, scale, gamma1, beta1, slope, w1, b1, w2, b2, gamma2, beta2, norms, multiply
    ):
        out, saved = tail_forward(
            y, residual, mix_mean, scale, gamma1, beta1, slope, w1, b1, w2, b2, gamma2, beta2, *norms, multiply
        )
        ctx.save_for_backward(y, residual, mix_mean, scale, gamma1, beta1, slope, w1, w2, gamma2, *saved)
        ctx.multiply = multiply
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors  # unpacked (and version-checked) on every access: once
        inputs, saved = tensors[:10], tensors[10:]
        wants = ctx.needs_input_grad
        gate_wants = (wants[3], wants[2], True, *wants[7:11])
        return (*tail_backward(grad_out, *inputs, saved, ctx.multiply, gate_wants), None, None)


def _tail_statistics(norm: nn.BatchNorm2d) -> TailStatistics:
    return TailStatistics(norm.running_mean, norm.running_var, norm.momentum, norm.eps)


def processor_tail(
    y: torch.Tensor,
    norm1: nn.BatchNorm2d,
    prelu: nn.PReLU,
    scale: torch.Tensor,
    mix_mean: torch.Tensor,
    se: nn.Module,
    residual: torch.Tensor,
    norm2: nn.BatchNorm2d,
    multiply_residual: bool,
) -> torch.Tensor:
    """A recoupled processor's output from its binary convolution's output ``y``.

    ``b, b_mean = batch_norm_prelu(y, norm1, prelu, pooled=True)``, then
    ``gated_batch_norm_residual(b, recoupling_gate(scale, mix_mean, b_mean, se), residual, norm2,
    multiply_residual)``. In a training step where all three take their fast path, one
    autograd node (:class:`_ProcessorTail`) with the same kernels and the same bits, and in a
    compiled one the same kernels as one operator (:func:`models.kernel_ops.processor_tail`),
    which returns the running statistics for this function to write; elsewhere the three
    functions.
    """
    layers = _gate_node_layers(se, mix_mean, (*y.shape[:2], 1, 1), in_graph=True) if y.dim() == 4 else None
    if (
        layers is not None
        and isinstance(prelu, nn.PReLU)
        and _fusable(y, residual)
        and y.shape == residual.shape
        and mix_mean.dtype == torch.float32
        and _fusable_norm(norm1)
        and _fusable_norm(norm2)
        and hook_free(norm1, prelu, norm2)
    ):
        (reduce, expand), channels = layers, y.shape[1]
        args = (
            y, residual, mix_mean, scale, norm1.weight, norm1.bias, _slope(prelu, channels),
            reduce.weight, reduce.bias, expand.weight, expand.bias, norm2.weight, norm2.bias,
        )  # fmt: skip
        statistics = (_tail_statistics(norm1), _tail_statistics(norm2))
        if torch.compiler.is_compiling():
            out, *new_statistics = kernel_ops.processor_tail(*args, *statistics, multiply_residual)
            _update_statistics(norm1, *new_statistics[:2])
            _update_statistics(norm2, *new_statistics[2:])
            return out
        out = _ProcessorTail.apply(*args, statistics, multiply_residual)
        # The kernels updated the running statistics in place.
        _count_batch(norm1)
        _count_batch(norm2)
        return out
    b, b_mean = batch_norm_prelu(y, norm1, prelu, pooled=True)
    gate = recoupling_gate(scale, mix_mean, b_mean, se)
    return gated_batch_norm_residual(b, gate, residual, norm2, multiply_residual)


def hands_tap_major_weight(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int) -> bool:
    """Whether a binary layer's training step hands this convolution its weight tap-major (channels-last).

    It does where the convolution takes the tap products (:func:`takes_tap_products`) and
    the one-pass binarization (:func:`binarize_weight`) runs: the C++ kernels built,
    outside ``torch.compile``. The benchmarks ask, to give the taps what a step gives them.
    """
    return takes_tap_products(x, weight, stride, padding, groups) and _fusable_in_eager(weight)


def training_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int, taps: bool | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)`` for a training step.

    Where :func:`takes_tap_products`, by :func:`models.tap_conv.conv2d`: on the
    development machines two to four times as fast as oneDNN on BNext's 2x2 planes, the
    same values to float32 rounding. Elsewhere ``F.conv2d``, whose output an eager CPU step under
    autocast turns back into float32 (:func:`autocast_allows_float32`). ``taps`` is the caller's
    answer of :func:`takes_tap_products` where it asked already (a binary layer does,
    before it binarizes). The convolution floor of ``benchmarks/train_step.py`` calls
    this function too.
    """
    if taps is None:
        taps = takes_tap_products(x, weight, stride, padding, groups)
    if taps:
        return tap_conv.conv2d(x, weight, stride, padding)
    y = F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)
    if y.dtype != x.dtype and _fusable_in_eager(x):
        return y.float()  # computed in autocast's dtype, handed on in float32 (autocast_allows_float32)
    return y
