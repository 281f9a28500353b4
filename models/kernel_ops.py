"""The fused processor kernels as ``torch.library`` operators (``torch.ops.bnext.*``).

As custom operators the kernels of ``models/csrc/fused_train.cpp`` are opaque calls
that ``torch.compile`` keeps in its graph (with shape functions for tracing and a
registered backward), so a compiled training step runs the same kernels as the eager
one instead of inductor's fusion of the unfused form, which is slower on the CPU.

Custom operators that carry a backward must not mutate their inputs, so the batch-norm
operators return the updated running statistics (computed by the kernel on copies of
the old ones) and the caller writes them into the module's buffers. The operators are
the building blocks of :mod:`models.fused_ops`, which decides where they apply; they
expect what it checks: CPU float32 contiguous NCHW tensors, one value per channel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernels():
    # fused_ops holds the one loader (cached; fused_ops calls these operators only after
    # it loaded). Imported here, not at the top: fused_ops imports this module.
    from . import fused_ops

    return fused_ops.load_extension()


def _nothing(like: Tensor) -> Tensor:
    """The kernels' stand-in for an output or input that is not wanted: an empty tensor."""
    return like.new_empty(0)


def _dense(grad: Tensor | None, wanted: bool, like: Tensor) -> Tensor:
    # Autograd hands None (or zeros) for outputs that took no part in the loss.
    return grad.contiguous() if wanted and grad is not None else _nothing(like)


# --------------------------------------------------------------------------- sign(x + bias), mean(x), prelu(x)


@torch.library.custom_op("bnext::processor_inputs", mutates_args=())
def processor_inputs(
    x: Tensor, bias: Tensor, slope: Tensor, clip: float, want_mean: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``sign(x + bias)``, ``x``'s spatial mean ``N x C`` (when ``want_mean``) and ``prelu(x)`` (when ``slope``)."""
    signs, mean, activated = _kernels().biased_sign_forward(x, bias, want_mean, slope)
    return signs, mean, activated


@processor_inputs.register_fake
def _(x, bias, slope, clip, want_mean):
    n, c = x.shape[:2]
    mean = x.new_empty((n, c)) if want_mean else _nothing(x)
    activated = torch.empty_like(x) if slope.numel() else _nothing(x)
    return torch.empty_like(x), mean, activated


@torch.library.custom_op("bnext::processor_inputs_backward", mutates_args=())
def processor_inputs_backward(
    grad_signs: Tensor, grad_mean: Tensor, grad_activated: Tensor, x: Tensor, bias: Tensor, slope: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`processor_inputs` for ``x``, ``bias`` and ``slope`` (empty without a slope)."""
    grad_x, grad_bias, grad_slope = _kernels().biased_sign_backward(
        grad_signs, grad_mean, grad_activated, x, bias, slope, clip
    )
    return grad_x, grad_bias, grad_slope


@processor_inputs_backward.register_fake
def _(grad_signs, grad_mean, grad_activated, x, bias, slope, clip):
    grad_slope = slope.new_empty(slope.shape) if slope.numel() else _nothing(x)
    return torch.empty_like(x), bias.new_empty(bias.shape), grad_slope


def _processor_inputs_setup(ctx, inputs, output) -> None:
    x, bias, slope, clip, want_mean = inputs
    ctx.save_for_backward(x, bias, slope)
    ctx.clip, ctx.want_mean = clip, want_mean


def _processor_inputs_grad(ctx, grad_signs, grad_mean, grad_activated):
    x, bias, slope = ctx.saved_tensors
    grad_x, grad_bias, grad_slope = processor_inputs_backward(
        grad_signs.contiguous(),
        _dense(grad_mean, ctx.want_mean, x),
        _dense(grad_activated, slope.numel() > 0, x),
        x,
        bias,
        slope,
        ctx.clip,
    )
    return grad_x, grad_bias, (grad_slope if slope.numel() else None), None, None


processor_inputs.register_autograd(_processor_inputs_grad, setup_context=_processor_inputs_setup)


# --------------------------------------------------------------------------- prelu(batch_norm(x)) and its mean


@torch.library.custom_op("bnext::batch_norm_prelu", mutates_args=())
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training batch norm, PReLU (when ``slope``) and the spatial mean ``N x C`` (when ``want_pooled``).

    Returns ``(y, batch mean, batch invstd, pooled, new running mean, new running var)``.
    """
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd, pooled = _kernels().bn_prelu_forward(
        x, gamma, beta, new_mean, new_var, momentum, eps, slope, want_pooled
    )
    return y, mean, invstd, pooled, new_mean, new_var


@batch_norm_prelu.register_fake
def _(x, gamma, beta, slope, running_mean, running_var, momentum, eps, want_pooled):
    n, c = x.shape[:2]
    pooled = x.new_empty((n, c)) if want_pooled else _nothing(x)
    stats = [gamma.new_empty(c) for _ in range(4)]
    return torch.empty_like(x), stats[0], stats[1], pooled, stats[2], stats[3]


@torch.library.custom_op("bnext::batch_norm_prelu_backward", mutates_args=())
def batch_norm_prelu_backward(
    grad_y: Tensor,
    grad_pooled: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    slope: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`batch_norm_prelu` for ``x``, ``gamma``, ``beta`` and ``slope`` (empty without one)."""
    grad_x, grad_gamma, grad_beta, grad_slope = _kernels().bn_prelu_backward(
        grad_y, grad_pooled, x, gamma, beta, slope, mean, invstd
    )
    return grad_x, grad_gamma, grad_beta, grad_slope


@batch_norm_prelu_backward.register_fake
def _(grad_y, grad_pooled, x, gamma, beta, slope, mean, invstd):
    grad_slope = slope.new_empty(slope.shape) if slope.numel() else _nothing(x)
    return torch.empty_like(x), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape), grad_slope


def _batch_norm_prelu_setup(ctx, inputs, output) -> None:
    x, gamma, beta, slope, *_, want_pooled = inputs
    _, mean, invstd, _, new_mean, new_var = output
    ctx.save_for_backward(x, gamma, beta, slope, mean, invstd)
    ctx.want_pooled = want_pooled
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _batch_norm_prelu_grad(ctx, grad_y, _mean, _invstd, grad_pooled, _new_mean, _new_var):
    x, gamma, beta, slope, mean, invstd = ctx.saved_tensors
    grad_x, grad_gamma, grad_beta, grad_slope = batch_norm_prelu_backward(
        grad_y.contiguous(), _dense(grad_pooled, ctx.want_pooled, x), x, gamma, beta, slope, mean, invstd
    )
    return grad_x, grad_gamma, grad_beta, (grad_slope if slope.numel() else None), None, None, None, None, None


batch_norm_prelu.register_autograd(_batch_norm_prelu_grad, setup_context=_batch_norm_prelu_setup)


# --------------------------------------------------------------------------- batch_norm(gate * b [* r]) + r


@torch.library.custom_op("bnext::gated_batch_norm", mutates_args=())
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``batch_norm(gate * b [* residual]) + residual`` with ``gate`` of ``N x C``.

    Returns ``(y, batch mean, batch invstd, new running mean, new running var)``.
    """
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = _kernels().gated_bn_forward(
        b, gate, residual, multiply_residual, gamma, beta, new_mean, new_var, momentum, eps
    )
    return y, mean, invstd, new_mean, new_var


@gated_batch_norm.register_fake
def _(b, gate, residual, multiply_residual, gamma, beta, running_mean, running_var, momentum, eps):
    c = b.shape[1]
    stats = [gamma.new_empty(c) for _ in range(4)]
    return torch.empty_like(b), *stats


@torch.library.custom_op("bnext::gated_batch_norm_backward", mutates_args=())
def gated_batch_norm_backward(
    grad_y: Tensor,
    b: Tensor,
    gate: Tensor,
    residual: Tensor,
    multiply_residual: bool,
    gamma: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`gated_batch_norm`: b, gate, residual (empty unless multiplied), gamma, beta."""
    grad_b, grad_gate, grad_r, grad_gamma, grad_beta = _kernels().gated_bn_backward(
        grad_y, b, gate, residual, multiply_residual, gamma, mean, invstd
    )
    return grad_b, grad_gate, grad_r, grad_gamma, grad_beta


@gated_batch_norm_backward.register_fake
def _(grad_y, b, gate, residual, multiply_residual, gamma, mean, invstd):
    grad_r = torch.empty_like(residual) if multiply_residual else _nothing(b)
    per_channel = [gamma.new_empty(gamma.shape) for _ in range(2)]
    return torch.empty_like(b), gate.new_empty(gate.shape), grad_r, *per_channel


def _gated_batch_norm_setup(ctx, inputs, output) -> None:
    b, gate, residual, multiply_residual, gamma, *_ = inputs
    _, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(b, gate, residual, gamma, mean, invstd)
    ctx.multiply_residual = multiply_residual
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _gated_batch_norm_grad(ctx, grad_y, _mean, _invstd, _new_mean, _new_var):
    b, gate, residual, gamma, mean, invstd = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_b, grad_gate, grad_r, grad_gamma, grad_beta = gated_batch_norm_backward(
        grad_y, b, gate, residual, ctx.multiply_residual, gamma, mean, invstd
    )
    if not ctx.multiply_residual:
        grad_r = grad_y  # y = BN(gate * b) + r: the residual's gradient is grad_y itself
    return grad_b, grad_gate, grad_r, None, grad_gamma, grad_beta, None, None, None, None


gated_batch_norm.register_autograd(_gated_batch_norm_grad, setup_context=_gated_batch_norm_setup)
