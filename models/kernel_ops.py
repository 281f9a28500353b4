"""The fused processor kernels as ``torch.library`` operators (``torch.ops.bnext.*``).

As custom operators the kernels of ``models/csrc/fused_train.cpp`` are opaque calls
that ``torch.compile`` keeps in its graph (with shape functions for tracing and a
registered backward), so a compiled training step runs the same kernels as the eager
one instead of inductor's fusion of the unfused form, which is slower on the CPU.

Custom operators that carry a backward must not mutate their inputs, so the batch-norm
operators return the updated running statistics (computed by the kernel on copies of
the old ones) and the caller writes them into the module's buffers. The operators are
the building blocks of :mod:`models.fused_ops`, which decides where they apply; they
expect what it checks: CPU float32 contiguous NCHW tensors, one value per channel. The
last, :data:`processor_tail_op`, is a recoupled processor's whole tail (its two batch
norms and gate), which eager steps run as one autograd node of :mod:`models.fused_ops`.

A custom operator costs tens of microseconds of Python dispatch per call in eager mode,
about as much as the kernel itself on the small late-stage activations, so the public
functions (:func:`batch_norm_prelu`, :func:`gated_batch_norm`) call the operators only
while ``torch.compile`` traces, and otherwise an eager twin: a plain
``torch.autograd.Function`` with the same kernels and gradient formula. The twins do less
around the kernels than an operator may: the batch-norm twins let the kernel update the
running statistics in place and return only the differentiable outputs.
:func:`processor_inputs` is one ``autograd.Function`` for both: it can return ``x`` itself
for a residual, whose gradient its backward kernel adds, which an operator cannot; traced
by ``torch.compile``, its forward and backward call the operators (see
:class:`_ProcessorInputs`).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import Tensor


def _fused_ops():
    # fused_ops holds the one extension loader (cached; fused_ops calls these operators only after
    # it loaded) and the tail's kernel sequence. Imported here, not at the top: fused_ops imports
    # this module.
    from . import fused_ops

    return fused_ops


def _kernels():
    return _fused_ops().load_extension()


def extension() -> types.ModuleType | None:
    """The fused-training C++ extension (:func:`models.fused_ops.load_extension`), or None where it is not built."""
    return _kernels()


def no_values(like: Tensor) -> Tensor:
    """The kernels' stand-in for an output or input that is not wanted: an empty tensor."""
    return like.new_empty(0)


def _by_samples(grad: Tensor) -> Tensor:
    # A gradient the kernels read as it is where each sample is one contiguous C x H x W block
    # (the channel slices of a concatenation's gradient are); else a contiguous copy.
    return grad if grad.shape[0] > 0 and grad[0].is_contiguous() else grad.contiguous()


def _dense(grad: Tensor | None, wanted: bool, like: Tensor) -> Tensor:
    # Autograd hands None (or zeros) for outputs that took no part in the loss.
    return grad.contiguous() if wanted and grad is not None else no_values(like)


def eager_twin(
    op: torch.library.CustomOpDef,
    implementation: Callable[..., tuple[Tensor, ...]],
    setup: Callable[..., None],
    gradient: Callable[..., tuple[Tensor | None, ...]],
    backward_implementation: Callable[..., tuple[Tensor, ...]],
) -> type[torch.autograd.Function]:
    """Register ``op``'s backward (``setup`` and ``gradient``) and return its eager twin.

    The twin is an ``autograd.Function`` with the same implementation, context and
    gradient, without the operator's dispatch. Its ``forward(ctx, ...)`` does the setup
    itself: with a separate ``setup_context``, ``apply()`` binds the arguments through
    ``inspect.signature`` on every call (tens of microseconds).
    """
    op.register_autograd(gradient, setup_context=setup)

    def forward(ctx, *args):
        output = implementation(*args)
        setup(ctx, args, output)
        return output

    def backward(ctx, *grads):
        return gradient(ctx, *grads, backward=backward_implementation)

    members = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return types.new_class(
        f"Eager_{op._name}", (torch.autograd.Function,), exec_body=lambda namespace: namespace.update(members)
    )


def run(op: torch.library.CustomOpDef, twin: type[torch.autograd.Function], args: tuple) -> tuple[Tensor, ...]:
    """``op(*args)`` while ``torch.compile`` traces, else its eager twin (the operator's dispatch is slower)."""
    return op(*args) if torch.compiler.is_compiling() else twin.apply(*args)


# --------------------------------------------------------------------------- sign(x + bias), mean(x), prelu(x)


def _processor_inputs(
    x: Tensor, bias: Tensor, slope: Tensor, clip: float, want_mean: bool
) -> tuple[Tensor, Tensor, Tensor]:
    signs, mean, activated = _kernels().biased_sign_forward(x, bias, want_mean, slope)
    return signs, mean, activated


processor_inputs_op = torch.library.custom_op("bnext::processor_inputs", _processor_inputs, mutates_args=())


@processor_inputs_op.register_fake
def _(x, bias, slope, clip, want_mean):
    n, c = x.shape[:2]
    mean = x.new_empty((n, c, 1, 1)) if want_mean else no_values(x)
    activated = torch.empty_like(x) if slope.numel() else no_values(x)
    return torch.empty_like(x), mean, activated


def _processor_inputs_backward(
    grad_signs: Tensor,
    grad_mean: Tensor,
    grad_activated: Tensor,
    x: Tensor,
    bias: Tensor,
    slope: Tensor,
    clip: float,
    grad_shortcut: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    # The layout check happens here, on the real gradient at run time: traced by torch.compile
    # it would be decided once for the trace's stand-in tensors.
    grad_shortcut = _by_samples(grad_shortcut) if grad_shortcut.numel() else grad_shortcut
    grad_x, grad_bias, grad_slope = _kernels().biased_sign_backward(
        grad_signs, grad_mean, grad_activated, x, bias, slope, clip, grad_shortcut
    )
    return grad_x, grad_bias, grad_slope


processor_inputs_backward_op = torch.library.custom_op(
    "bnext::processor_inputs_backward", _processor_inputs_backward, mutates_args=()
)


@processor_inputs_backward_op.register_fake
def _(grad_signs, grad_mean, grad_activated, x, bias, slope, clip, grad_shortcut):
    grad_slope = slope.new_empty(slope.shape) if slope.numel() else no_values(x)
    return torch.empty_like(x), bias.new_empty(bias.shape), grad_slope


def _processor_inputs_setup(ctx, inputs, output) -> None:
    x, bias, slope, clip, want_mean = inputs
    ctx.save_for_backward(x, bias, slope)
    ctx.clip, ctx.want_mean = clip, want_mean


def _processor_inputs_grad(
    ctx, grad_signs, grad_mean, grad_activated, grad_shortcut=None, backward=processor_inputs_backward_op
):
    x, bias, slope = ctx.saved_tensors
    grad_x, grad_bias, grad_slope = backward(
        grad_signs.contiguous() if grad_signs is not None else torch.zeros_like(x),
        _dense(grad_mean, ctx.want_mean, x),
        _dense(grad_activated, slope.numel() > 0, x),
        x,
        bias,
        slope,
        ctx.clip,
        grad_shortcut if grad_shortcut is not None else no_values(x),
    )
    return grad_x, grad_bias, (grad_slope if slope.numel() else None), None, None


processor_inputs_op.register_autograd(_processor_inputs_grad, setup_context=_processor_inputs_setup)


class _ProcessorInputs(torch.autograd.Function):
    """:data:`processor_inputs_op` with a fourth output where ``want_shortcut``: ``x`` itself (a view
    of it), whose gradient the backward kernel adds to ``x``'s own.

    A binary FFN takes that view as its residual. Autograd would otherwise add the
    residual's gradient to the kernel's gradient of ``x`` in a pass of its own; the kernel
    adds it while it writes (the same additions in the same order, the same bits). An
    operator may not return a view of its input, so this Function returns it, in eager
    steps and compiled ones alike: torch.compile traces the Function, whose forward and
    backward call the operators there.
    """

    @staticmethod
    def forward(ctx, x, bias, slope, clip, want_mean, want_shortcut):
        # Unused outputs get no gradient instead of zeros in eager steps; a compiled backward hands
        # zeros of x's size for an unused view, which is why it is returned only where wanted.
        ctx.set_materialize_grads(False)
        inputs = (x, bias, slope, clip, want_mean)
        output = processor_inputs_op(*inputs) if torch.compiler.is_compiling() else _processor_inputs(*inputs)
        _processor_inputs_setup(ctx, inputs, output)
        return (*output, x.view_as(x) if want_shortcut else None)

    @staticmethod
    def backward(ctx, grad_signs, grad_mean, grad_activated, grad_shortcut):
        backward = processor_inputs_backward_op if torch.compiler.is_compiling() else _processor_inputs_backward
        grads = _processor_inputs_grad(ctx, grad_signs, grad_mean, grad_activated, grad_shortcut, backward=backward)
        return *grads, None


def processor_inputs(
    x: Tensor, bias: Tensor, slope: Tensor, clip: float, want_mean: bool, want_shortcut: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``sign(x + bias)`` (straight-through gradient where ``|x + bias| <= clip``), ``x``'s spatial mean
    ``N x C x 1 x 1`` (when ``want_mean``, else empty), ``prelu(x)`` (when ``slope`` is not empty, else
    empty) and, when ``want_shortcut``, ``x`` for a residual: a view whose gradient the backward kernel
    adds in its pass (else None)."""
    return _ProcessorInputs.apply(x, bias, slope, clip, want_mean, want_shortcut)


# --------------------------------------------------------------------------- prelu(batch_norm(x)) and its mean


def _batch_norm_prelu(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    slope: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    want_pooled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd, pooled = _kernels().bn_prelu_forward(
        x, gamma, beta, new_mean, new_var, momentum, eps, slope, want_pooled
    )
    return y, mean, invstd, pooled, new_mean, new_var


batch_norm_prelu_op = torch.library.custom_op("bnext::batch_norm_prelu", _batch_norm_prelu, mutates_args=())


@batch_norm_prelu_op.register_fake
def _(x, gamma, beta, slope, running_mean, running_var, momentum, eps, want_pooled):
    n, c = x.shape[:2]
    pooled = x.new_empty((n, c, 1, 1)) if want_pooled else no_values(x)
    stats = [gamma.new_empty(c) for _ in range(4)]
    return torch.empty_like(x), stats[0], stats[1], pooled, stats[2], stats[3]


def _batch_norm_prelu_backward(
    grad_y: Tensor,
    grad_pooled: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    slope: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_x, grad_gamma, grad_beta, grad_slope = _kernels().bn_prelu_backward(
        grad_y, grad_pooled, x, gamma, beta, slope, mean, invstd
    )
    return grad_x, grad_gamma, grad_beta, grad_slope


batch_norm_prelu_backward_op = torch.library.custom_op(
    "bnext::batch_norm_prelu_backward", _batch_norm_prelu_backward, mutates_args=()
)


@batch_norm_prelu_backward_op.register_fake
def _(grad_y, grad_pooled, x, gamma, beta, slope, mean, invstd):
    grad_slope = slope.new_empty(slope.shape) if slope.numel() else no_values(x)
    return torch.empty_like(x), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape), grad_slope


def _batch_norm_prelu_setup(ctx, inputs, output) -> None:
    x, gamma, beta, slope, *_, want_pooled = inputs
    _, mean, invstd, _, new_mean, new_var = output
    ctx.save_for_backward(x, gamma, beta, slope, mean, invstd)
    ctx.want_pooled = want_pooled
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _batch_norm_prelu_gradients(ctx, grad_y, grad_pooled, backward) -> tuple[Tensor | None, ...]:
    # The gradients of the nine inputs, from those of y and pooled.
    x, gamma, beta, slope, mean, invstd = ctx.saved_tensors
    grad_y = grad_y.contiguous() if grad_y is not None else torch.zeros_like(x)
    grad_x, grad_gamma, grad_beta, grad_slope = backward(
        grad_y, _dense(grad_pooled, ctx.want_pooled, x), x, gamma, beta, slope, mean, invstd
    )
    return grad_x, grad_gamma, grad_beta, (grad_slope if slope.numel() else None), None, None, None, None, None


def _batch_norm_prelu_grad(ctx, grad_y, _mean, _invstd, grad_pooled, _new_mean, _new_var):
    return _batch_norm_prelu_gradients(ctx, grad_y, grad_pooled, batch_norm_prelu_backward_op)


batch_norm_prelu_op.register_autograd(_batch_norm_prelu_grad, setup_context=_batch_norm_prelu_setup)


class _BatchNormPReLU(torch.autograd.Function):
    """The eager twin of :data:`batch_norm_prelu_op`: the kernel updates the running statistics
    passed in, and only ``y`` and ``pooled`` are outputs (fewer tensors made and tracked per call)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, slope, running_mean, running_var, momentum, eps, want_pooled):
        ctx.set_materialize_grads(False)
        y, mean, invstd, pooled = _kernels().bn_prelu_forward(
            x, gamma, beta, running_mean, running_var, momentum, eps, slope, want_pooled
        )
        ctx.save_for_backward(x, gamma, beta, slope, mean, invstd)
        ctx.want_pooled = want_pooled
        return y, pooled

    @staticmethod
    def backward(ctx, grad_y, grad_pooled):
        return _batch_norm_prelu_gradients(ctx, grad_y, grad_pooled, _batch_norm_prelu_backward)


def batch_norm_prelu(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    slope: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    want_pooled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training batch norm, PReLU (when ``slope`` is not empty), and the spatial mean ``N x C x 1 x 1``
    (when ``want_pooled``).

    Returns ``(y, pooled, new running mean, new running var)``. In eager mode the kernel
    updates ``running_mean`` and ``running_var`` in place and returns them; while
    ``torch.compile`` traces, the operator leaves them unchanged and returns updated
    copies, which the caller writes back.
    """
    args = (x, gamma, beta, slope, running_mean, running_var, momentum, eps, want_pooled)
    if torch.compiler.is_compiling():
        y, _, _, pooled, new_mean, new_var = batch_norm_prelu_op(*args)
        return y, pooled, new_mean, new_var
    y, pooled = _BatchNormPReLU.apply(*args)
    return y, pooled, running_mean, running_var


# --------------------------------------------------------------------------- batch_norm(gate * b [* r]) + r


def _gated_batch_norm(
    b: Tensor,
    gate: Tensor,
    residual: Tensor,
    multiply_residual: bool,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = _kernels().gated_bn_forward(
        b, gate, residual, multiply_residual, gamma, beta, new_mean, new_var, momentum, eps
    )
    return y, mean, invstd, new_mean, new_var


gated_batch_norm_op = torch.library.custom_op("bnext::gated_batch_norm", _gated_batch_norm, mutates_args=())


@gated_batch_norm_op.register_fake
def _(b, gate, residual, multiply_residual, gamma, beta, running_mean, running_var, momentum, eps):
    c = b.shape[1]
    stats = [gamma.new_empty(c) for _ in range(4)]
    return torch.empty_like(b), *stats


def _gated_batch_norm_backward(
    grad_y: Tensor,
    b: Tensor,
    gate: Tensor,
    residual: Tensor,
    multiply_residual: bool,
    gamma: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_b, grad_gate, grad_r, grad_gamma, grad_beta = _kernels().gated_bn_backward(
        grad_y, b, gate, residual, multiply_residual, gamma, mean, invstd
    )
    return grad_b, grad_gate, grad_r, grad_gamma, grad_beta


gated_batch_norm_backward_op = torch.library.custom_op(
    "bnext::gated_batch_norm_backward", _gated_batch_norm_backward, mutates_args=()
)


@gated_batch_norm_backward_op.register_fake
def _(grad_y, b, gate, residual, multiply_residual, gamma, mean, invstd):
    grad_r = torch.empty_like(residual) if multiply_residual else no_values(b)
    per_channel = [gamma.new_empty(gamma.shape) for _ in range(2)]
    return torch.empty_like(b), gate.new_empty(gate.shape), grad_r, *per_channel


def _gated_batch_norm_setup(ctx, inputs, output) -> None:
    b, gate, residual, multiply_residual, gamma, *_ = inputs
    _, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(b, gate, residual, gamma, mean, invstd)
    ctx.multiply_residual = multiply_residual
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _gated_batch_norm_gradients(ctx, grad_y, backward) -> tuple[Tensor | None, ...]:
    # The gradients of the ten inputs, from that of y.
    b, gate, residual, gamma, mean, invstd = ctx.saved_tensors
    grad_y = _by_samples(grad_y)
    grad_b, grad_gate, grad_r, grad_gamma, grad_beta = backward(
        grad_y, b, gate, residual, ctx.multiply_residual, gamma, mean, invstd
    )
    if not ctx.multiply_residual:
        grad_r = grad_y  # y = BN(gate * b) + r: the residual's gradient is grad_y itself
    return grad_b, grad_gate, grad_r, None, grad_gamma, grad_beta, None, None, None, None


def _gated_batch_norm_grad(ctx, grad_y, _mean, _invstd, _new_mean, _new_var):
    return _gated_batch_norm_gradients(ctx, grad_y, gated_batch_norm_backward_op)


gated_batch_norm_op.register_autograd(_gated_batch_norm_grad, setup_context=_gated_batch_norm_setup)


class _GatedBatchNorm(torch.autograd.Function):
    """The eager twin of :data:`gated_batch_norm_op`: the kernel updates the running statistics
    passed in, and ``y`` is the only output."""

    @staticmethod
    def forward(ctx, b, gate, residual, multiply_residual, gamma, beta, running_mean, running_var, momentum, eps):
        y, mean, invstd = _kernels().gated_bn_forward(
            b, gate, residual, multiply_residual, gamma, beta, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(b, gate, residual, gamma, mean, invstd)
        ctx.multiply_residual = multiply_residual
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _gated_batch_norm_gradients(ctx, grad_y, _gated_batch_norm_backward)


def gated_batch_norm(
    b: Tensor,
    gate: Tensor,
    residual: Tensor,
    multiply_residual: bool,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_norm(gate * b [* residual]) + residual`` with ``gate`` of ``N x C`` values (``N x C [x 1 x 1]``).

    Returns ``(y, new running mean, new running var)``, as :func:`batch_norm_prelu`:
    updated in place in eager mode, updated copies while ``torch.compile`` traces.
    """
    args = (b, gate, residual, multiply_residual, gamma, beta, running_mean, running_var, momentum, eps)
    if torch.compiler.is_compiling():
        y, _, _, new_mean, new_var = gated_batch_norm_op(*args)
        return y, new_mean, new_var
    return _GatedBatchNorm.apply(*args), running_mean, running_var


# --------------------------------------------------------------------------- the progressive weight binarization


def _binarize_weight(weight: Tensor, temperature: Tensor, threshold: float, tap_major: bool) -> Tensor:
    # The temperature is read here, when the graph runs (a CPU tensor: nothing to wait for), not
    # while torch.compile traces, where .item() would break the graph.
    from . import fused_ops

    # The binarization the layer's constraint pass made after the last optimizer step, where it is current.
    prepared = fused_ops.prepared_in_graph(weight, temperature, threshold, tap_major)
    if prepared is not None:
        return prepared
    divisors = fused_ops._divisors(temperature, threshold)
    if divisors is None:
        raise ValueError("bnext::binarize_weight takes a one-value float32 CPU temperature")
    return _kernels().divide_clamp(weight, *divisors, tap_major)


binarize_weight_op = torch.library.custom_op("bnext::binarize_weight", _binarize_weight, mutates_args=())


@binarize_weight_op.register_fake
def _(weight, temperature, threshold, tap_major):
    return torch.empty_like(weight, memory_format=torch.channels_last if tap_major else torch.contiguous_format)


def _binarize_weight_grad(ctx, grad):
    # The straight-through gradient of models.quantizers.progressive_binarize: the identity.
    return grad, None, None, None


binarize_weight_op.register_autograd(_binarize_weight_grad)


# --------------------------------------------------------------------------- a recoupled processor's tail


# The operators' outputs, spelled out for their schema: the output, four running statistics and ten
# tensors for the backward; the gradients of the thirteen tensor inputs.
_TailOutputs = tuple[(Tensor,) * 15]
_TailGradients = tuple[(Tensor,) * 13]


def _processor_tail(
    y: Tensor, residual: Tensor, mix_mean: Tensor, scale: Tensor, gamma1: Tensor, beta1: Tensor, slope: Tensor,
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma2: Tensor, beta2: Tensor,
    running_mean1: Tensor, running_var1: Tensor, momentum1: float, eps1: float,
    running_mean2: Tensor, running_var2: Tensor, momentum2: float, eps2: float, multiply_residual: bool,
) -> _TailOutputs:  # fmt: skip
    fused_ops = _fused_ops()
    statistics = [running_mean1.clone(), running_var1.clone(), running_mean2.clone(), running_var2.clone()]
    norm1 = fused_ops.TailStatistics(statistics[0], statistics[1], momentum1, eps1)
    norm2 = fused_ops.TailStatistics(statistics[2], statistics[3], momentum2, eps2)
    out, saved = fused_ops.tail_forward(
        y, residual, mix_mean, scale, gamma1, beta1, slope, w1, b1, w2, b2, gamma2, beta2, norm1, norm2,
        multiply_residual,
    )  # fmt: skip
    return out, *statistics, *saved


processor_tail_op = torch.library.custom_op("bnext::processor_tail", _processor_tail, mutates_args=())


@processor_tail_op.register_fake
def _(y, residual, mix_mean, scale, gamma1, beta1, slope, w1, b1, w2, b2, gamma2, *_):
    n, c = y.shape[:2]
    per_channel = [gamma1.new_empty(c) for _ in range(6)]  # 4 running statistics, mean1, invstd1
    gate_saved = (scale.new_empty(scale.shape), y.new_empty(n, c), y.new_empty(n, w1.shape[0]))  # keep, pooled, hidden
    saved = (y.new_empty(n, c, 1, 1), y.new_empty(3, c), y.new_empty(n, c), *gate_saved)  # b_mean, b_affine, gate
    return torch.empty_like(y), *per_channel, *saved, gamma2.new_empty(c), gamma2.new_empty(c)


def _processor_tail_backward(
    grad_out: Tensor, y: Tensor, residual: Tensor, mix_mean: Tensor, scale: Tensor, gamma1: Tensor, beta1: Tensor,
    slope: Tensor, w1: Tensor, w2: Tensor, gamma2: Tensor, saved: list[Tensor], multiply_residual: bool,
) -> _TailGradients:  # fmt: skip
    grads = _fused_ops().tail_backward(
        grad_out, y, residual, mix_mean, scale, gamma1, beta1, slope, w1, w2, gamma2, saved, multiply_residual,
        (True,) * 7,
    )  # fmt: skip
    # An operator's output may not alias its input: without multiply_residual the residual's
    # gradient is grad_out itself, which the autograd formula passes on.
    return tuple(no_values(y) if i == 1 and not multiply_residual else grad for i, grad in enumerate(grads))


processor_tail_backward_op = torch.library.custom_op(
    "bnext::processor_tail_backward", _processor_tail_backward, mutates_args=()
)


@processor_tail_backward_op.register_fake
def _(grad_out, y, residual, mix_mean, scale, gamma1, beta1, slope, w1, w2, gamma2, saved, multiply_residual):
    grad_r = torch.empty_like(residual) if multiply_residual else no_values(y)
    like = (y, grad_r, mix_mean, scale, gamma1, beta1, slope, w1, w1[:, 0, 0, 0], w2, w2[:, 0, 0, 0], gamma2, gamma2)
    return tuple(torch.empty_like(t) if i != 1 else t for i, t in enumerate(like))


def _processor_tail_setup(ctx, inputs, output) -> None:
    y, residual, mix_mean, scale, gamma1, beta1, slope, w1, _, w2, _, gamma2, *_, multiply_residual = inputs
    saved = output[5:]
    ctx.save_for_backward(y, residual, mix_mean, scale, gamma1, beta1, slope, w1, w2, gamma2, *saved)
    ctx.multiply_residual = multiply_residual
    ctx.mark_non_differentiable(*output[1:])


def _processor_tail_grad(ctx, grad_out, *_unused) -> tuple[Tensor | None, ...]:
    # The gradients of the 22 inputs, from that of the output.
    tensors = ctx.saved_tensors  # unpacked on every access: once
    inputs, saved = tensors[:10], list(tensors[10:])
    grads = processor_tail_backward_op(grad_out, *inputs, saved, ctx.multiply_residual)
    if not ctx.multiply_residual:
        grads = (grads[0], grad_out, *grads[2:])
    return (*grads, *(None,) * 9)


processor_tail_op.register_autograd(_processor_tail_grad, setup_context=_processor_tail_setup)


def processor_tail(
    y: Tensor, residual: Tensor, mix_mean: Tensor, scale: Tensor, gamma1: Tensor, beta1: Tensor, slope: Tensor,
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma2: Tensor, beta2: Tensor,
    norm1: tuple[Tensor, Tensor, float, float], norm2: tuple[Tensor, Tensor, float, float], multiply_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """A recoupled processor's tail (:func:`models.fused_ops.tail_forward`) as one operator, for a
    compiled graph: ``(out, new running mean1, var1, mean2, var2)``, the running statistics
    ``norm1``/``norm2`` (mean, var, momentum, eps) left unchanged (the caller writes the new ones)."""
    out = processor_tail_op(
        y, residual, mix_mean, scale, gamma1, beta1, slope, w1, b1, w2, b2, gamma2, beta2, *norm1, *norm2,
        multiply_residual,
    )  # fmt: skip
    return out[0], out[1], out[2], out[3], out[4]
