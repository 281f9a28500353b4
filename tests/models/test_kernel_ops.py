"""The fused kernels as torch.library operators (checked by opcheck) and their eager twins compute the same."""

from __future__ import annotations

import os

import pytest
import torch

from models import fused_ops, kernel_ops

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)

N, C, H, W = 3, 4, 5, 6


def _x() -> torch.Tensor:
    return torch.randn(N, C, H, W, requires_grad=True)


def _per_channel(low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    return torch.empty(C).uniform_(low, high).requires_grad_(True)


def _statistics() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(C), torch.rand(C) + 0.5


@pytest.mark.parametrize("want_mean", [False, True])
@pytest.mark.parametrize("with_slope", [False, True])
def test_processor_inputs_operator(want_mean: bool, with_slope: bool) -> None:
    slope = _per_channel(0.0, 0.5) if with_slope else torch.empty(0)
    torch.library.opcheck(kernel_ops.processor_inputs_op, (_x(), _per_channel(), slope, 1.5, want_mean))


@pytest.mark.parametrize("want_pooled", [False, True])
@pytest.mark.parametrize("with_slope", [False, True])
def test_batch_norm_prelu_operator(want_pooled: bool, with_slope: bool) -> None:
    slope = _per_channel(0.0, 0.5) if with_slope else torch.empty(0)
    args = (_x(), _per_channel(0.5, 1.5), _per_channel(), slope, *_statistics(), 0.1, 1e-5, want_pooled)
    torch.library.opcheck(kernel_ops.batch_norm_prelu_op, args)


@pytest.mark.parametrize("multiply_residual", [False, True])
def test_gated_batch_norm_operator(multiply_residual: bool) -> None:
    gate = torch.rand(N, C, requires_grad=True)
    args = (_x(), gate, _x(), multiply_residual, _per_channel(0.5, 1.5), _per_channel(), *_statistics(), 0.1, 1e-5)
    torch.library.opcheck(kernel_ops.gated_batch_norm_op, args)


def test_batch_norm_operators_return_the_running_statistics_instead_of_changing_them() -> None:
    x = _x().detach()
    mean, var = _statistics()
    before = (mean.clone(), var.clone())
    reference = torch.nn.BatchNorm2d(C, momentum=0.1, eps=1e-5)
    reference.running_mean.copy_(mean)
    reference.running_var.copy_(var)
    reference(x)
    outputs = kernel_ops.batch_norm_prelu(x, torch.ones(C), torch.zeros(C), torch.empty(0), mean, var, 0.1, 1e-5, False)
    gated = kernel_ops.gated_batch_norm(
        x, torch.ones(N, C), x, False, torch.ones(C), torch.zeros(C), mean, var, 0.1, 1e-5
    )
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
    for new_mean, new_var in (outputs[4:], gated[3:]):
        torch.testing.assert_close(new_mean, reference.running_mean)
        torch.testing.assert_close(new_var, reference.running_var)


def _outputs_and_gradients(fn, *args):
    outputs = fn(*args)
    differentiable = [t for t in outputs if t.requires_grad]
    torch.autograd.backward(differentiable, [torch.linspace(-1, 1, t.numel()).view_as(t) for t in differentiable])
    grads = [a.grad.clone() for a in args if isinstance(a, torch.Tensor) and a.grad is not None]
    for a in args:
        if isinstance(a, torch.Tensor):
            a.grad = None
    return [t.detach() for t in outputs], grads


@pytest.mark.parametrize("kernel", ["processor_inputs", "batch_norm_prelu", "gated_batch_norm"])
def test_eager_function_and_operator_give_the_same_bits(kernel: str) -> None:
    torch.manual_seed(0)
    x, slope = _x(), _per_channel(0.0, 0.5)
    args = {
        "processor_inputs": (x, _per_channel(), slope, 1.5, True),
        "batch_norm_prelu": (x, _per_channel(0.5, 1.5), _per_channel(), slope, *_statistics(), 0.1, 1e-5, True),
        "gated_batch_norm": (
            x,
            torch.rand(N, C, requires_grad=True),
            _x(),
            True,
            _per_channel(0.5, 1.5),
            _per_channel(),
            *_statistics(),
            0.1,
            1e-5,
        ),
    }[kernel]
    eager = _outputs_and_gradients(getattr(kernel_ops, kernel), *args)
    operator = _outputs_and_gradients(getattr(kernel_ops, f"{kernel}_op"), *args)
    assert len(eager[1]) == len(operator[1]) >= 2
    for expected, actual in zip(eager[0] + eager[1], operator[0] + operator[1]):
        assert torch.equal(expected, actual)
