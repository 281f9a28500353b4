"""Experiment: would ``torch.compile`` beat eager if the compiled graph called the fused kernels?

Under ``torch.compile`` the model gives inductor the plain operators
(:mod:`models.fused_ops` steps aside), and inductor's fusion of them is slower on the CPU
than the hand-written kernels of the eager step. This script answers whether
registering the kernels as ``torch.library`` custom operators would change that: it
wraps the three kernels as custom operators with their backward, makes
:mod:`models.fused_ops` use them also while compiling, and times the eager and the
compiled training step of BNext-T side by side, alternating, against the same
convolution floor (:func:`benchmarks.train_step.measure`).

**For timing only.** A custom operator that mutates an input cannot carry an autograd
formula, so here the kernels update throw-away running statistics: the model's own
batch-norm statistics are not updated. The project's models do not use this code.

Usage::

    python benchmarks/compile_custom_ops_experiment.py [--iters 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks.train_step import collect_conv_shapes, make_floor, make_step, measure  # noqa: E402
from models import fused_ops  # noqa: E402


def _ext():
    return fused_ops.load_extension()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---------------------------------------------------------------- sign(x + beta), mean, PReLU(x)


@torch.library.custom_op("bnext_experiment::inputs", mutates_args=())
def inputs_op(x: Tensor, bias: Tensor, slope: Tensor, want_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    signs, mean, activated = _ext().biased_sign_forward(x, bias, want_mean, slope)
    return signs, mean, activated


@inputs_op.register_fake
def _(x, bias, slope, want_mean):
    n, c = x.shape[:2]
    mean = x.new_empty((n, c) if want_mean else (0,))
    return torch.empty_like(x), mean, torch.empty_like(x) if slope.numel() else _empty(x)


@torch.library.custom_op("bnext_experiment::inputs_backward", mutates_args=())
def inputs_backward_op(
    grad_signs: Tensor, grad_mean: Tensor, grad_activated: Tensor, x: Tensor, bias: Tensor, slope: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_bias, grad_slope = _ext().biased_sign_backward(
        grad_signs, grad_mean, grad_activated, x, bias, slope, clip
    )
    return grad_x, grad_bias, grad_slope


@inputs_backward_op.register_fake
def _(grad_signs, grad_mean, grad_activated, x, bias, slope, clip):
    grad_slope = slope.new_empty(slope.shape) if grad_activated.numel() else _empty(x)
    return torch.empty_like(x), bias.new_empty(bias.shape), grad_slope


def _inputs_setup(ctx, inputs, output) -> None:
    x, bias, slope, want_mean = inputs
    ctx.save_for_backward(x, bias, slope)
    ctx.want_mean = want_mean


def _inputs_backward(ctx, grad_signs, grad_mean, grad_activated):
    x, bias, slope = ctx.saved_tensors
    grad_mean = grad_mean.contiguous() if ctx.want_mean else _empty(x)
    grad_activated = grad_activated.contiguous() if slope.numel() else _empty(x)
    grad_x, grad_bias, grad_slope = inputs_backward_op(
        grad_signs.contiguous(), grad_mean, grad_activated, x, bias, slope, 1.5
    )
    return grad_x, grad_bias, grad_slope if slope.numel() else None, None


torch.library.register_autograd("bnext_experiment::inputs", _inputs_backward, setup_context=_inputs_setup)


# ---------------------------------------------------------------- PReLU(BN(x)) and its mean


@torch.library.custom_op("bnext_experiment::bn_prelu", mutates_args=())
def bn_prelu_op(
    x: Tensor, gamma: Tensor, beta: Tensor, slope: Tensor, want_pooled: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = x.shape[1]
    y, mean, invstd, pooled = _ext().bn_prelu_forward(
        x, gamma, beta, torch.zeros(c), torch.ones(c), 0.1, 1e-5, slope, want_pooled
    )
    return y, mean, invstd, pooled


@bn_prelu_op.register_fake
def _(x, gamma, beta, slope, want_pooled):
    n, c = x.shape[:2]
    return torch.empty_like(x), gamma.new_empty(c), gamma.new_empty(c), x.new_empty((n, c) if want_pooled else (0,))


@torch.library.custom_op("bnext_experiment::bn_prelu_backward", mutates_args=())
def bn_prelu_backward_op(
    grad_y: Tensor,
    grad_pooled: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    slope: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_x, grad_gamma, grad_beta, grad_slope = _ext().bn_prelu_backward(
        grad_y, grad_pooled, x, gamma, beta, slope, mean, invstd
    )
    return grad_x, grad_gamma, grad_beta, grad_slope


@bn_prelu_backward_op.register_fake
def _(grad_y, grad_pooled, x, gamma, beta, slope, mean, invstd):
    grad_slope = slope.new_empty(slope.shape) if slope.numel() else _empty(x)
    return torch.empty_like(x), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape), grad_slope


def _bn_prelu_setup(ctx, inputs, output) -> None:
    x, gamma, beta, slope, want_pooled = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, gamma, beta, slope, mean, invstd)
    ctx.want_pooled = want_pooled


def _bn_prelu_backward(ctx, grad_y, _grad_mean, _grad_invstd, grad_pooled):
    x, gamma, beta, slope, mean, invstd = ctx.saved_tensors
    grad_pooled = grad_pooled.contiguous() if ctx.want_pooled else _empty(x)
    grad_x, grad_gamma, grad_beta, grad_slope = bn_prelu_backward_op(
        grad_y.contiguous(), grad_pooled, x, gamma, beta, slope, mean, invstd
    )
    return grad_x, grad_gamma, grad_beta, grad_slope if slope.numel() else None, None


torch.library.register_autograd("bnext_experiment::bn_prelu", _bn_prelu_backward, setup_context=_bn_prelu_setup)


# ---------------------------------------------------------------- BN(gate * b [* r]) + r


@torch.library.custom_op("bnext_experiment::gated_bn", mutates_args=())
def gated_bn_op(
    b: Tensor, gate: Tensor, residual: Tensor, multiply: bool, gamma: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    c = b.shape[1]
    y, mean, invstd = _ext().gated_bn_forward(
        b, gate, residual, multiply, gamma, beta, torch.zeros(c), torch.ones(c), 0.1, 1e-5
    )
    return y, mean, invstd


@gated_bn_op.register_fake
def _(b, gate, residual, multiply, gamma, beta):
    c = b.shape[1]
    return torch.empty_like(b), gamma.new_empty(c), gamma.new_empty(c)


@torch.library.custom_op("bnext_experiment::gated_bn_backward", mutates_args=())
def gated_bn_backward_op(
    grad_y: Tensor,
    b: Tensor,
    gate: Tensor,
    residual: Tensor,
    multiply: bool,
    gamma: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_b, grad_gate, grad_r, grad_gamma, grad_beta = _ext().gated_bn_backward(
        grad_y, b, gate, residual, multiply, gamma, mean, invstd
    )
    return grad_b, grad_gate, grad_r, grad_gamma, grad_beta


@gated_bn_backward_op.register_fake
def _(grad_y, b, gate, residual, multiply, gamma, mean, invstd):
    grad_r = torch.empty_like(residual) if multiply else _empty(b)
    return (
        torch.empty_like(b),
        gate.new_empty(gate.shape),
        grad_r,
        gamma.new_empty(gamma.shape),
        gamma.new_empty(gamma.shape),
    )


def _gated_setup(ctx, inputs, output) -> None:
    b, gate, residual, multiply, gamma, _ = inputs
    _, mean, invstd = output
    ctx.save_for_backward(b, gate, residual, gamma, mean, invstd)
    ctx.multiply = multiply


def _gated_backward(ctx, grad_y, _grad_mean, _grad_invstd):
    b, gate, residual, gamma, mean, invstd = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_b, grad_gate, grad_r, grad_gamma, grad_beta = gated_bn_backward_op(
        grad_y, b, gate, residual, ctx.multiply, gamma, mean, invstd
    )
    return grad_b, grad_gate, grad_r if ctx.multiply else grad_y, None, grad_gamma, grad_beta


torch.library.register_autograd("bnext_experiment::gated_bn", _gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------- wiring into models.fused_ops


class _InputsViaOp:
    @staticmethod
    def apply(x, bias, slope, clip, want_mean):
        return inputs_op(x, bias, slope, want_mean)


class _BatchNormPReLUViaOp:
    @staticmethod
    def apply(x, gamma, beta, slope, running_mean, running_var, momentum, eps, want_pooled):
        y, _, _, pooled = bn_prelu_op(x, gamma, beta, slope, want_pooled)
        return y, pooled


class _GatedViaOp:
    @staticmethod
    def apply(b, gate, residual, multiply, gamma, beta, running_mean, running_var, momentum, eps):
        return gated_bn_op(b, gate, residual, multiply, gamma, beta)[0]


@torch.compiler.assume_constant_result
def _extension_ready() -> bool:
    return fused_ops.load_extension() is not None


def _fusable_also_when_compiling(*tensors: Tensor) -> bool:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 or not t.is_contiguous():
            return False
    return _extension_ready()


#: The names of models.fused_ops that use_custom_ops() replaces, and their replacements.
REPLACEMENTS = {
    "_ProcessorInputs": _InputsViaOp,
    "_BatchNormPReLU": _BatchNormPReLUViaOp,
    "_GatedBatchNorm": _GatedViaOp,
    "_fusable": _fusable_also_when_compiling,
}


def use_custom_ops() -> None:
    """Route models.fused_ops through the custom operators, in eager and compiled code alike."""
    for name, replacement in REPLACEMENTS.items():
        setattr(fused_ops, name, replacement)


def main(argv: list[str] | None = None) -> None:
    """Time eager and compiled BNext-T steps (both through the custom operators), alternating."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=6, help="timed step+floor pairs per round (default: 6)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    args = parser.parse_args(argv)
    if fused_ops.load_extension() is None:
        raise SystemExit("the fused C++ extension could not be built: nothing to measure")
    torch.set_num_threads(args.threads)
    use_custom_ops()
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar")
    models.set_temperature(model, 1.0)
    images, targets = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    floor = make_floor(collect_conv_shapes(model, images), torch.device("cpu"), torch.float32, False)
    eager_model = copy.deepcopy(model)
    steps = {
        "eager": make_step(eager_model, (images, targets)),
        "compile": make_step(model, (images, targets), forward=torch.compile(model)),
    }
    start = time.perf_counter()
    steps["compile"]()
    print(f"compilation and first step: {time.perf_counter() - start:.0f} s")
    print(f"graph breaks: {dict(torch._dynamo.utils.counters['graph_break']) or 'none'}")
    print(f"{'mode':<8} {'step ms':>9} {'floor ms':>9} {'step/floor':>10}")
    for name in ("eager", "compile", "eager", "compile"):
        timing = measure(steps[name], floor, 2, args.iters, None)
        print(f"{name:<8} {timing['step_ms_median']:>9.1f} {timing['floor_ms_median']:>9.1f} {timing['ratio']:>10.3f}")


if __name__ == "__main__":
    main()
