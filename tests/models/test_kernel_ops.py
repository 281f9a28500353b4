"""The fused kernels as torch.library operators (checked by opcheck) and their eager twins compute the same."""

from __future__ import annotations

import os

import pytest
import torch

from models import fused_ops, kernel_ops, quantizers

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


@pytest.mark.parametrize("gated", [False, True], ids=["batch_norm_prelu", "gated_batch_norm"])
@pytest.mark.parametrize("eager", [False, True], ids=["operator", "eager"])
def test_batch_norms_update_the_running_statistics(eager: bool, gated: bool) -> None:
    """The operators return updated copies and leave their inputs alone (an operator with a backward
    may not mutate them); the eager functions update the tensors passed in and return them."""
    x = _x().detach()
    mean, var = torch.zeros(C), torch.ones(C)
    if gated:
        args = (x, torch.ones(N, C), x, False, torch.ones(C), torch.zeros(C), mean, var, 0.1, 1e-5)
        outputs = kernel_ops.gated_batch_norm(*args) if eager else kernel_ops.gated_batch_norm_op(*args)
        new_mean, new_var = outputs[1:] if eager else outputs[3:]
    else:
        args = (x, torch.ones(C), torch.zeros(C), torch.empty(0), mean, var, 0.1, 1e-5, False)
        outputs = kernel_ops.batch_norm_prelu(*args) if eager else kernel_ops.batch_norm_prelu_op(*args)
        new_mean, new_var = outputs[2:] if eager else outputs[4:]
    assert (new_mean is mean and new_var is var) == eager
    if not eager:
        assert torch.equal(mean, torch.zeros(C)) and torch.equal(var, torch.ones(C))
    expected = torch.nn.BatchNorm2d(C, momentum=0.1, eps=1e-5)
    expected(x)  # the gated kernel's statistics are those of gate * b = x
    torch.testing.assert_close(new_mean, expected.running_mean)
    torch.testing.assert_close(new_var, expected.running_var)


def _tail_args(multiply_residual: bool) -> tuple:
    # A recoupled tail's inputs (a gate of C -> 2 -> C), the running statistics and constants.
    torch.manual_seed(0)
    hidden = 2

    def parameter(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return torch.empty(shape).uniform_(low, high).requires_grad_(True)

    return (
        _x(), _x(), torch.randn(N, C, 1, 1, requires_grad=True), parameter(1, C, 1, 1, low=0.0),
        parameter(C, low=0.5, high=1.5), parameter(C), parameter(C, low=0.0, high=0.5),
        parameter(hidden, C, 1, 1), parameter(hidden), parameter(C, hidden, 1, 1), parameter(C),
        parameter(C, low=0.5, high=1.5), parameter(C),
        *_statistics(), 0.1, 1e-5, *_statistics(), 0.2, 1e-3, multiply_residual,
    )  # fmt: skip


@pytest.mark.parametrize("multiply_residual", [False, True])
def test_processor_tail_operator(multiply_residual: bool) -> None:
    torch.library.opcheck(kernel_ops.processor_tail_op, _tail_args(multiply_residual))


@pytest.mark.parametrize("multiply_residual", [False, True])
def test_processor_tail_operator_computes_the_eager_node(multiply_residual: bool) -> None:
    """The compiled graph's tail and the eager step's node run the same kernels: the same output,
    running statistics and gradients, bit for bit; the operator leaves the statistics passed in alone."""
    args = _tail_args(multiply_residual)
    tensors, (mean1, var1, m1, e1, mean2, var2, m2, e2, _) = args[:13], args[13:]
    before = [t.clone() for t in (mean1, var1, mean2, var2)]
    eager_statistics = [t.clone() for t in before]  # the eager node updates these in place
    norms = (
        fused_ops.TailStatistics(*eager_statistics[:2], m1, e1),
        fused_ops.TailStatistics(*eager_statistics[2:], m2, e2),
    )
    upstream = torch.linspace(-1, 1, N * C * H * W).view(N, C, H, W)
    eager = fused_ops._ProcessorTail.apply(*tensors, norms, multiply_residual)
    eager_grads = torch.autograd.grad(eager, tensors, upstream)
    operator = kernel_ops.processor_tail(*tensors, (mean1, var1, m1, e1), (mean2, var2, m2, e2), multiply_residual)
    operator_grads = torch.autograd.grad(operator[0], tensors, upstream)
    assert torch.equal(operator[0], eager)
    assert all(torch.equal(a, e) for a, e in zip(operator[1:], eager_statistics))
    assert all(torch.equal(a, e) for a, e in zip(operator_grads, eager_grads))
    assert all(torch.equal(a, e) for a, e in zip((mean1, var1, mean2, var2), before))
    assert not torch.equal(eager_statistics[0], before[0])  # the eager node did update its copies


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
    # The outputs both give: the eager functions return fewer (and the running statistics in place).
    eager_function = getattr(kernel_ops, kernel)
    if kernel == "processor_inputs":  # without a residual view, the Function's fourth output (None here)

        def eager_function(*args):
            outputs = kernel_ops.processor_inputs(*args, False)
            assert outputs[3] is None
            return outputs[:3]

    shared = {"processor_inputs": (0, 1, 2), "batch_norm_prelu": (0, 3, 4, 5), "gated_batch_norm": (0, 3, 4)}[kernel]

    def operator_function(*args):
        outputs = getattr(kernel_ops, f"{kernel}_op")(*args)
        return [outputs[i] for i in shared]

    def fresh(args: tuple) -> tuple:  # the running statistics are changed by the eager call
        return tuple(a.clone() if isinstance(a, torch.Tensor) and not a.requires_grad else a for a in args)

    eager = _outputs_and_gradients(eager_function, *fresh(args))
    operator = _outputs_and_gradients(operator_function, *fresh(args))
    assert len(eager[0]) == len(operator[0]) and len(eager[1]) == len(operator[1]) >= 2
    for expected, actual in zip(eager[0] + eager[1], operator[0] + operator[1]):
        assert torch.equal(expected, actual)


def test_the_residual_gradient_is_added_by_the_sign_kernel_with_autograds_bits() -> None:
    torch.manual_seed(0)
    x, bias, slope = _x(), _per_channel(), _per_channel(0.0, 0.5)
    upstream = [torch.randn(N, C, H, W), torch.randn(N, C, 1, 1), torch.randn(N, C, H, W), torch.randn(N, C, H, W)]
    signs, mean, activated, shortcut = kernel_ops.processor_inputs(x, bias, slope, 1.5, True, True)
    assert shortcut._base is x and torch.equal(shortcut, x)
    torch.autograd.backward([signs, mean, activated, shortcut], upstream)
    folded, x.grad = x.grad, None
    # The operator has no such output: autograd adds the residual's gradient itself.
    signs, mean, activated = kernel_ops.processor_inputs_op(x, bias, slope, 1.5, True)
    torch.autograd.backward([signs, mean, activated, x], upstream)
    assert torch.equal(folded, x.grad)


def test_an_unused_residual_output_costs_no_gradient_tensor(monkeypatch) -> None:
    seen = []
    backward = kernel_ops._processor_inputs_backward

    def spy(*args):
        seen.append(args[-1])
        return backward(*args)

    monkeypatch.setattr(kernel_ops, "_processor_inputs_backward", spy)
    monkeypatch.setattr(kernel_ops._ProcessorInputs, "backward", staticmethod(
        lambda ctx, *grads: (*kernel_ops._processor_inputs_grad(ctx, *grads, backward=spy), None)
    ))  # fmt: skip
    x = _x()
    # The residual view asked for and not used: its gradient is None, not zeros of x's size.
    signs, _, _, shortcut = kernel_ops.processor_inputs(x, _per_channel(), torch.empty(0), 1.5, False, True)
    assert shortcut is not None
    signs.sum().backward()
    assert len(seen) == 1 and seen[0].numel() == 0


def test_backward_operator_with_a_residual_gradient() -> None:
    x = _x().detach()
    args = (torch.randn(N, C, H, W), torch.randn(N, C), torch.randn(N, C, H, W), x, torch.randn(C), torch.rand(C))
    torch.library.opcheck(kernel_ops.processor_inputs_backward_op, (*args, 1.5, torch.randn(N, C, H, W)))


def test_the_kernels_read_a_concatenations_gradient_slices_in_place() -> None:
    # A doubling block concatenates two FFNs' outputs: each gets a channel slice of the gradient,
    # whose samples are contiguous blocks 2C*H*W apart. The kernels read it as it is (no copy).
    torch.manual_seed(0)
    kernels = fused_ops.load_extension()
    grad = torch.randn(N, 2 * C, H, W)[:, C:]
    assert not grad.is_contiguous() and kernel_ops._by_samples(grad) is grad
    b, r, x = (torch.randn(N, C, H, W) for _ in range(3))
    gate, gamma, mean, invstd = torch.rand(N, C), torch.rand(C) + 0.5, torch.randn(C), torch.rand(C) + 0.5
    for multiply_residual in (False, True):
        sliced = kernels.gated_bn_backward(grad, b, gate, r, multiply_residual, gamma, mean, invstd)
        copied = kernels.gated_bn_backward(grad.contiguous(), b, gate, r, multiply_residual, gamma, mean, invstd)
        assert all(torch.equal(s, c) for s, c in zip(sliced, copied))
    sign_args = (torch.randn(N, C, H, W), torch.empty(0), torch.empty(0), x, torch.randn(C), torch.empty(0), 1.5)
    sliced = kernels.biased_sign_backward(*sign_args, grad)
    copied = kernels.biased_sign_backward(*sign_args, grad.contiguous())
    assert all(torch.equal(s, c) for s, c in zip(sliced, copied))
    transposed = torch.randn(N, C, W, H).transpose(2, 3)  # not one block per sample: refused, not misread
    assert kernel_ops._by_samples(transposed).is_contiguous()
    with pytest.raises(RuntimeError, match="one contiguous C x H x W block"):
        kernels.gated_bn_backward(transposed, b, gate, r, False, gamma, mean, invstd)


@pytest.mark.parametrize("tap_major", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 1e-9], ids=["T=1", "soft", "below-threshold"])
def test_binarize_weight_operator(tap_major: bool, temperature: float) -> None:
    """The compiled step's binarization: opcheck, the bits of the tensor formula, the identity gradient."""
    weight = torch.randn(5, 4, 3, 3, requires_grad=True)
    t = torch.tensor([temperature])
    torch.library.opcheck(kernel_ops.binarize_weight_op, (weight, t, 1e-7, tap_major))

    out = kernel_ops.binarize_weight_op(weight, t, 1e-7, tap_major)
    with torch.no_grad():  # not a training step: the module path's tensor formula
        expected = quantizers.progressive_binarize(weight, t, 1e-7)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last if tap_major else torch.contiguous_format)
    grad = torch.randn_like(out)
    (weight_grad,) = torch.autograd.grad(out, weight, grad)
    assert torch.equal(weight_grad, grad)


def test_binarize_weight_operator_refuses_a_temperature_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="one-value float32 CPU temperature"):
        kernel_ops.binarize_weight_op(torch.randn(2, 2, 1, 1), torch.ones(2), 1e-7, False)
