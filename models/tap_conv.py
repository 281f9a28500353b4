"""Convolution on small planes as one matrix product per kernel tap (CPU training).

A ``k x k`` convolution is a sum over its ``k*k`` taps: tap ``(ky, kx)`` multiplies
every input position by the ``Cout x Cin`` matrix ``W[:, :, ky, kx]`` and adds the
result to the output position it shifts to. With the positions as the outer dimension
(``positions x N x C``), each tap is a matrix product of ``(valid positions * N) x Cin``
by ``Cin x Cout``, where the valid positions are those whose shifted source lies inside
the plane: the zero padding is skipped, not multiplied. The product is taken per run of
positions that are consecutive on both sides (a row of the plane, or whole rows:
:class:`Tap`), on slices of the rows, and added to the output's slice in place: nothing
is gathered or scattered.

Where both operands hold only -1, 0 and +1 (a binary layer's signs and, below the sign
threshold, its weight), the forward's products run on int8 (``torch._int_mm``, int32
sums): each sum of such products is an integer far below 2^24, which float32 holds
exactly, so the result is the float32 path's bit for bit, several times faster
(:func:`integer_operands`; off inside :func:`integer_products_disabled`). The backward
multiplies real-valued gradients and stays float32.

On small planes this beats oneDNN's direct convolution on the CPU, most of all in the
backward: BNext's last stage at CIFAR size runs 3x3 convolutions on 2x2 planes, where 5
of the 9 taps of every output see only padding and oneDNN's weight gradient is slow
(``benchmarks/RESULTS.md``). The sums are taken in another order than oneDNN's, so the
results agree to float32 rounding (exactly, for the ``±1`` values of a binarized
network, whose sums are integers). :func:`applies` says where the layers use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

import torch
from torch import Tensor

from . import kernel_ops

#: The largest input planes (height * width) that take the tap products, for kernels
#: larger than 1x1 and for 1x1 kernels. Chosen by ``benchmarks/tap_conv.py`` on the
#: development machine (forward plus backward, BNext-T's shapes at batch 64): 3x3
#: convolutions on 4x4 planes 1.06 to 1.20 times as fast as oneDNN's at stride 1 and 2.1
#: to 2.3 times at stride 2, on 2x2 planes 2.6 to 2.9 times, on 8x8 planes slower or about
#: even (0.7 to 1.03); 1x1 convolutions 1.15 to 1.64 times on 2x2 planes, slower or even
#: on 4x4 (0.87 to 0.98).
MAX_POSITIONS = 16
MAX_POSITIONS_1X1 = 4

_disabled_blocks = 0  # how many disabled() blocks are open (they may nest)
_integer_disabled_blocks = 0  # the same for integer_products_disabled()


def enabled() -> bool:
    """False inside :func:`disabled`."""
    return _disabled_blocks == 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside this block the layers run ``F.conv2d`` everywhere (for side-by-side timings and debugging).

    :func:`models.fused_ops.disabled` turns the tap products off too, with the fused kernels.
    """
    global _disabled_blocks
    _disabled_blocks += 1
    try:
        yield
    finally:
        _disabled_blocks -= 1


@contextlib.contextmanager
def integer_products_disabled() -> Iterator[None]:
    """Inside this block the tap products stay float32 even on ternary operands (side-by-side timings)."""
    global _integer_disabled_blocks
    _integer_disabled_blocks += 1
    try:
        yield
    finally:
        _integer_disabled_blocks -= 1


def integer_operands(rows: Tensor, weights: Tensor) -> tuple[Tensor, Tensor] | None:
    """``rows`` and ``weights`` as int8 where every value of both is -1, 0 or +1; else None.

    None also inside :func:`integer_products_disabled`, without the C++ extension (its
    one-pass conversion and check), for tensors it does not take (CPU float32,
    contiguous) and for sums of more than 2^24 products, which float32 would round. The
    weights are checked first: during progressive binarization the first block of
    values the check reads (4096 per thread) holds fractions, and the check stops there.
    """
    if _integer_disabled_blocks or not (rows.is_contiguous() and weights.is_contiguous()):
        return None
    if weights.shape[1] * weights.shape[2] > 2**24:  # sums past 2^24 would round in float32, not in int32
        return None
    if rows.dtype != torch.float32 or weights.dtype != torch.float32 or rows.device.type != "cpu":
        return None
    kernels = kernel_ops.extension()
    if kernels is None:
        return None
    weights8 = kernels.to_ternary_int8(weights)
    if weights8.numel() == 0 and weights.numel():
        return None
    rows8 = kernels.to_ternary_int8(rows)
    if rows8.numel() == 0 and rows.numel():
        return None
    return rows8, weights8


class Tap:
    """One kernel tap: its index ``ky * k + kx`` and the output/input positions it pairs.

    ``outputs`` and ``inputs`` are flat position indices (``row * width + column``),
    or None where the tap pairs every output position with the same input position
    (the centre tap at stride 1). ``runs`` cuts the pairs into ``(first output, first
    input, count)``: runs of consecutive positions on both sides (a row of the plane, or
    several whole rows), each of them a slice of the positions-first rows, so that the
    products read and add to the rows in place instead of gathering and scattering them
    (empty for the identity tap).
    """

    __slots__ = ("index", "outputs", "inputs", "runs")

    def __init__(self, index: int, outputs: Tensor | None, inputs: Tensor | None) -> None:
        self.index = index
        self.outputs = outputs
        self.inputs = inputs
        self.runs = () if outputs is None else _runs(outputs.tolist(), inputs.tolist())


def _runs(outputs: list[int], inputs: list[int]) -> tuple[tuple[int, int, int], ...]:
    # The pairs in order, merged while both sides continue where the run ends.
    runs: list[list[int]] = []
    for output, source in zip(outputs, inputs, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == output and runs[-1][1] + runs[-1][2] == source:
            runs[-1][2] += 1
        else:
            runs.append([output, source, 1])
    return tuple((first_output, first_input, count) for first_output, first_input, count in runs)


@lru_cache(maxsize=64)
def taps(height: int, width: int, kernel: int, stride: int, padding: int) -> tuple[Tap, ...]:
    """The taps with at least one valid position pair, for an input of ``height x width``; the identity tap first."""
    out_h, out_w = output_size(height, kernel, stride, padding), output_size(width, kernel, stride, padding)
    found = []
    for ky in range(kernel):
        for kx in range(kernel):
            outputs, inputs = [], []
            for i in range(out_h):
                for j in range(out_w):
                    y, x = i * stride + ky - padding, j * stride + kx - padding
                    if 0 <= y < height and 0 <= x < width:
                        outputs.append(i * out_w + j)
                        inputs.append(y * width + x)
            if not outputs:
                continue
            identity = out_h * out_w == height * width and outputs == inputs == list(range(height * width))
            if identity:
                found.append(Tap(ky * kernel + kx, None, None))
            else:
                found.append(Tap(ky * kernel + kx, torch.tensor(outputs), torch.tensor(inputs)))
    # The identity tap first: its product covers every position, so it writes the sums that
    # the other taps add to, and they need no zero-filled start.
    return tuple(sorted(found, key=lambda tap: tap.outputs is not None))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output side of a convolution over ``size`` input positions."""
    return (size + 2 * padding - kernel) // stride + 1


def applies(x: Tensor, weight: Tensor, stride: int, padding: int, groups: int) -> bool:
    """Whether :func:`conv2d` takes this convolution where ``F.conv2d`` would run.

    CPU float32 (under autocast only where :func:`models.fused_ops.autocast_allows_float32`;
    under bf16 autocast the products run on bf16, :func:`conv2d`), a contiguous NCHW input,
    no groups, a square kernel, and an input plane of at most :data:`MAX_POSITIONS`
    positions (:data:`MAX_POSITIONS_1X1` for 1x1 kernels).
    """
    from .fused_ops import autocast_allows_float32  # here: fused_ops imports this module

    if groups != 1 or x.dim() != 4 or weight.dim() != 4 or x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not autocast_allows_float32("cpu"):
        return False
    kernel = weight.shape[-1]
    if weight.shape[-2] != kernel or x.shape[1] != weight.shape[1] or not x.is_contiguous():
        return False
    height, width = x.shape[-2:]
    if output_size(height, kernel, stride, padding) < 1 or output_size(width, kernel, stride, padding) < 1:
        return False  # F.conv2d's own error says what is wrong
    return height * width <= (MAX_POSITIONS if kernel > 1 else MAX_POSITIONS_1X1)


def positions_first(t: Tensor) -> Tensor:
    """``N x C x H x W`` as a new contiguous ``(H*W) x N x C`` (the layout of the tap products' rows).

    By the C++ extension's copy where it is built (PyTorch's strided one took 2.8 to 4
    times as long on BNext-T's 4x4 and 2x2 planes on the Intel development machine).
    """
    kernels = kernel_ops.extension()
    if kernels is not None and t.dtype == torch.float32 and t.is_contiguous():
        return kernels.to_rows(t)
    n, c, h, w = t.shape
    # clone, not contiguous(): on a 1x1 plane the permuted view is contiguous already, and the
    # operator returns these rows, which may not alias its input.
    return t.permute(2, 3, 0, 1).reshape(h * w, n, c).clone(memory_format=torch.contiguous_format)


def _planes(t: Tensor, height: int, width: int) -> Tensor:
    """``(H*W) x N x C`` back to a contiguous float32 ``N x C x H x W`` (int32 sums converted in the same copy).

    Float32 rows by the C++ extension's copy where it is built (PyTorch's strided one took
    2.5 to 3.5 times as long on BNext-T's 4x4 and 2x2 planes on the Intel development machine).
    """
    _, n, c = t.shape
    if t.dtype == torch.float32 and height * width > 1:  # a 1x1 plane's rows are its planes already: a view
        kernels = kernel_ops.extension()
        if kernels is not None and t.is_contiguous():
            return kernels.from_rows(t, height, width)
    planes = t.permute(1, 2, 0).reshape(n, c, height, width)
    return (
        planes.to(torch.float32, memory_format=torch.contiguous_format)
        if t.dtype == torch.int32
        else planes.contiguous()
    )


def is_tap_major(weight: Tensor) -> bool:
    """Whether the ``Cout x Cin x k x k`` weight lies in memory as ``Cout x (k*k) x Cin`` (channels-last).

    So does every contiguous 1x1 weight. A binary layer's training step hands such a
    weight (:func:`models.fused_ops.binarize_weight` writes it), and the tap products
    read it in place (:func:`tap_view`).
    """
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)


def tap_view(weight: Tensor) -> Tensor:
    """The ``Cout x (k*k) x Cin`` tap matrices of a tap-major weight (:func:`is_tap_major`), as a view."""
    cout, cin, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).view(cout, kh * kw, cin)


def tap_matrices(weight: Tensor) -> Tensor:
    """``Cout x Cin x k x k`` as a new contiguous ``Cout x (k*k) x Cin``.

    Tap ``t``'s matrix ``[:, t]`` is then a ``Cout x Cin`` view with unit column stride,
    which BLAS reads in place. (This transpose is about twice as fast on the CPU as
    the one to ``(k*k) x Cout x Cin``.) A tap-major weight needs no copy: :func:`tap_view`.
    """
    cout, cin, kh, kw = weight.shape
    # Always a new tensor (for 1x1 kernels the transposed view is contiguous already): the
    # operator returns it, and an operator's output may not alias its input.
    return weight.reshape(cout, cin, kh * kw).transpose(1, 2).clone(memory_format=torch.contiguous_format)


def forward(
    rows: Tensor,
    weights: Tensor,
    height: int,
    width: int,
    kernel: int,
    stride: int,
    padding: int,
    bf16_products: bool = False,
) -> Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=padding)`` by tap products (no bias, no groups).

    ``rows`` is :func:`positions_first` of the ``height x width`` input ``x``, ``weights``
    :func:`tap_matrices` of the ``kernel x kernel`` weight. Where both hold only -1, 0 and
    +1, the products run on int8 (:func:`integer_operands`), with the same result. Else,
    with ``bf16_products`` (a step under CPU bf16 autocast), each tap's product runs on
    bfloat16 operands and is rounded to bfloat16, and the taps are summed in float32.
    """
    out_h, out_w = output_size(height, kernel, stride, padding), output_size(width, kernel, stride, padding)
    # int32 sums where both are signs, converted once by _planes: the same values as the float32 products.
    operands = integer_operands(rows, weights)
    if operands is None:
        operands = _product_operands(rows, weights) if bf16_products else (rows, weights)
    return _planes(_tap_sums(*operands, height, width, kernel, stride, padding), out_h, out_w)


def _product_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    # bfloat16 copies: on the Intel development machine (AMX) bfloat16 products of BNext-T's tap
    # matrices took a sixth of the float32 ones' time (benchmarks/RESULTS.md, twenty-third session).
    return tuple(t.to(torch.bfloat16) for t in tensors)


def _product(a: Tensor, b: Tensor) -> Tensor:
    # a @ b in the operands' arithmetic: int8 summed in int32, float32, or bfloat16 rounded to bfloat16.
    return torch._int_mm(a, b) if a.dtype == torch.int8 else torch.mm(a, b)


def _add_product(target: Tensor, a: Tensor, b: Tensor) -> None:
    # target += a @ b: in place where the operands have the target's dtype, else the product added.
    if a.dtype == target.dtype:
        target.addmm_(a, b)
    else:
        target += _product(a, b)


def _tap_sums(rows: Tensor, weights: Tensor, height: int, width: int, kernel: int, stride: int, padding: int) -> Tensor:
    # The forward's sums, positions x N x Cout: float32 products, int8 products summed in int32, or
    # bfloat16 products summed in float32.
    sums_dtype = torch.int32 if rows.dtype == torch.int8 else torch.float32
    _, n, cin = rows.shape
    cout = weights.shape[0]
    out_h, out_w = output_size(height, kernel, stride, padding), output_size(width, kernel, stride, padding)
    out = None
    for tap in taps(height, width, kernel, stride, padding):
        matrix = weights[:, tap.index].t()
        if tap.outputs is None:  # the identity tap, first: it writes every output
            out = _product(rows.view(-1, cin), matrix).view(-1, n, cout).to(sums_dtype)
            continue
        if out is None:
            out = torch.zeros(out_h * out_w, n, cout, dtype=sums_dtype)
        for first_output, first_input, count in tap.runs:
            source = rows[first_input : first_input + count].view(-1, cin)
            _add_product(out[first_output : first_output + count].view(-1, cout), source, matrix)
    return out


def backward(
    grad: Tensor,
    rows: Tensor,
    weights: Tensor,
    height: int,
    width: int,
    kernel: int,
    stride: int,
    padding: int,
    input_grad: bool,
    weight_grad: bool,
    bf16_products: bool = False,
) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`forward` for ``x`` and the ``Cout x Cin x k x k`` weight, in float32.

    A gradient that is not asked for is returned empty (:func:`models.kernel_ops.no_values`).
    With ``bf16_products`` the products run on bfloat16 operands, as in :func:`forward`, and
    are summed in float32.
    """
    _, n, cin = rows.shape
    cout = weights.shape[0]
    grads = positions_first(grad)  # outputs x N x Cout
    if bf16_products:
        grads, rows, weights = _product_operands(grads, rows, weights)
    flat_grads = grads.view(-1, cout)
    grad_x = None
    grad_w = None
    used = taps(height, width, kernel, stride, padding)
    if weight_grad:  # every tap's matrix is written below; only unused taps need zeros
        # Cout x (k*k) x Cin, the tap matrices' layout: the transposition to Cout x Cin x k x k
        # below then works on one output channel's k*k*Cin values at a time. From (k*k) x Cout x Cin
        # it gathered from k*k rows a whole Cout*Cin apart (4 MB for 1024 channels), which map to
        # the same cache sets; on the AMD EPYC machine that copy was up to three times as slow.
        sums = dict(dtype=torch.float32, device=rows.device)
        grad_w = (
            torch.empty(cout, kernel * kernel, cin, **sums)
            if len(used) == kernel * kernel
            else torch.zeros(cout, kernel * kernel, cin, **sums)
        )
    for tap in used:
        matrix = weights[:, tap.index]
        target = grad_w[:, tap.index] if grad_w is not None else None  # BLAS writes its strided rows in place
        if tap.inputs is None:  # the identity tap, first: it writes every input's gradient
            if input_grad:
                grad_x = torch.mm(flat_grads, matrix).view(-1, n, cin).float()
            if target is not None:
                _write_product(target, flat_grads.t(), rows.view(-1, cin))
            continue
        if input_grad and grad_x is None:
            grad_x = torch.zeros(height * width, n, cin, dtype=torch.float32, device=rows.device)
        # Each run's slices of the rows, read and added to in place (see Tap).
        for run, (first_output, first_input, count) in enumerate(tap.runs):
            selected = grads[first_output : first_output + count].view(-1, cout)
            if input_grad:
                _add_product(grad_x[first_input : first_input + count].view(-1, cin), selected, matrix)
            if target is not None:
                source = rows[first_input : first_input + count].view(-1, cin)
                if run == 0:
                    _write_product(target, selected.t(), source)
                else:
                    _add_product(target, selected.t(), source)
    grad_x = _planes(grad_x, height, width) if grad_x is not None else kernel_ops.no_values(rows)
    if grad_w is not None:
        grad_w = weight_layout(grad_w).view(cout, cin, kernel, kernel)
    return grad_x, grad_w if grad_w is not None else kernel_ops.no_values(rows)


def _write_product(target: Tensor, a: Tensor, b: Tensor) -> None:
    # target = a @ b: by BLAS into the (strided) target where the dtypes agree, else copied in.
    if a.dtype == target.dtype:
        torch.mm(a, b, out=target)
    else:
        target.copy_(torch.mm(a, b))


def weight_layout(tap_major: Tensor) -> Tensor:
    """A ``Cout x (k*k) x Cin`` weight gradient as a new contiguous ``Cout x Cin x (k*k)`` tensor.

    The same values as ``tap_major.transpose(1, 2).contiguous()``, by the C++ extension's
    transposition where it is built: PyTorch's strided copy took 2.5 times as long on the
    Intel development machine (`benchmarks/TRAINING_SPEED.md`, *The weight's layout*). A 1x1
    kernel's gradient needs no transposition: returned as it is.
    """
    if tap_major.shape[1] == 1:
        return tap_major
    kernels = kernel_ops.extension()
    if kernels is not None and tap_major.dtype == torch.float32 and tap_major.is_contiguous():
        return kernels.from_tap_major(tap_major)
    return tap_major.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- operators
# torch.library operators, so that torch.compile calls the same code from its graph;
# eager mode calls their autograd twin (see models.kernel_ops).


def _tap_conv2d(
    x: Tensor, weight: Tensor, stride: int, padding: int, bf16_products: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    # Returns the rows and tap matrices too: the backward reads them, so they are made once.
    # A tap-major weight is read in place, and its matrices are not returned (an operator's
    # output may not alias its input): the backward takes its view of the saved weight.
    rows = positions_first(x)
    in_place = is_tap_major(weight)
    weights = tap_view(weight) if in_place else tap_matrices(weight)
    height, width = x.shape[-2:]
    out = forward(rows, weights, height, width, weight.shape[-1], stride, padding, bf16_products)
    return out, (kernel_ops.no_values(weight) if in_place else weights), rows


tap_conv2d_op = torch.library.custom_op("bnext::tap_conv2d", _tap_conv2d, mutates_args=())


@tap_conv2d_op.register_fake
def _(x, weight, stride, padding, bf16_products=False):
    n, cin, height, width = x.shape
    cout, _, kernel, _ = weight.shape
    out = x.new_empty(
        n, cout, output_size(height, kernel, stride, padding), output_size(width, kernel, stride, padding)
    )
    weights = kernel_ops.no_values(weight) if is_tap_major(weight) else weight.new_empty(cout, kernel * kernel, cin)
    return out, weights, x.new_empty(height * width, n, cin)


tap_conv2d_backward_op = torch.library.custom_op("bnext::tap_conv2d_backward", backward, mutates_args=())


@tap_conv2d_backward_op.register_fake
def _(grad, rows, weights, height, width, kernel, stride, padding, input_grad, weight_grad, bf16_products=False):
    _, n, cin = rows.shape
    cout = weights.shape[0]
    grad_x = rows.new_empty(n, cin, height, width) if input_grad else kernel_ops.no_values(rows)
    grad_w = weights.new_empty(cout, cin, kernel, kernel) if weight_grad else kernel_ops.no_values(rows)
    return grad_x, grad_w


def _tap_conv2d_setup(ctx, inputs, output) -> None:
    x, weight, stride, padding, *bf16_products = inputs
    _, weights, rows = output
    # The rows and tap matrices, not the input and the (copied) weight: the backward reads them,
    # and the binarized weight can go. A tap-major weight is its own tap matrices: saved as it is.
    ctx.save_for_backward(rows, weights if weights.numel() else weight)
    ctx.geometry = (*x.shape[-2:], weight.shape[-1], stride, padding)
    ctx.bf16_products = bool(bf16_products) and bf16_products[0]
    ctx.mark_non_differentiable(weights, rows)
    # Otherwise autograd hands the backward zero tensors of their sizes (38 MB for BNext-T's
    # widest layer) as their "gradients", written on every step.
    ctx.set_materialize_grads(False)


def _tap_conv2d_grad(ctx, grad, _weights, _rows, backward=tap_conv2d_backward_op):
    rows, weights = ctx.saved_tensors
    if weights.dim() == 4:  # the tap-major weight itself
        weights = tap_view(weights)
    input_grad, weight_grad = ctx.needs_input_grad[:2]
    if grad is None:  # the output took no part in the loss
        return None, None, None, None, None
    grad_x, grad_w = backward(
        grad.contiguous(), rows, weights, *ctx.geometry, input_grad, weight_grad, ctx.bf16_products
    )
    return (grad_x if input_grad else None), (grad_w if weight_grad else None), None, None, None


_TapConv2d = kernel_ops.eager_twin(tap_conv2d_op, _tap_conv2d, _tap_conv2d_setup, _tap_conv2d_grad, backward)


def conv2d(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=padding)`` by tap products, with autograd.

    For the inputs that :func:`applies` accepts; the result agrees to float32 rounding. Under
    CPU bf16 autocast (an eager step, :func:`models.fused_ops.autocast_allows_float32`) the
    products run on bfloat16 and are summed in float32 (:func:`forward`), as oneDNN's bf16
    convolutions run on bfloat16 and sum in float32; the output stays float32.
    """
    if torch.is_autocast_enabled("cpu"):
        bf16_products = torch.get_autocast_dtype("cpu") == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            return kernel_ops.run(tap_conv2d_op, _TapConv2d, (x, weight, stride, padding, bf16_products))[0]
    return kernel_ops.run(tap_conv2d_op, _TapConv2d, (x, weight, stride, padding, False))[0]
