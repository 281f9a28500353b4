"""Layers: the faster pooling and PReLU give the same values as the torch modules they replace."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import fused_ops
from models.layers import AvgPool2x2, PReLU, avg_pool_2x2


@pytest.mark.parametrize("upstream_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("path", ["kernel", "slices"])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (2, 3), (32, 32)])
def test_avg_pool_2x2_equals_avg_pool2d_forward_and_backward(
    monkeypatch, size: tuple[int, int], path: str, upstream_layout: str
) -> None:
    if path == "slices":
        monkeypatch.setattr(fused_ops, "load_extension", lambda: None)
    elif fused_ops.load_extension() is None and os.environ.get("CI") != "true":
        pytest.skip("the fused C++ extension could not be built here (see the warning)")
    x = torch.randn(3, 5, *size, requires_grad=True)
    ours = avg_pool_2x2(x)
    reference = F.avg_pool2d(x, 2, 2)
    assert torch.equal(ours, reference)
    upstream = torch.randn_like(ours)
    if upstream_layout == "strided":  # the kernel takes contiguous gradients only: this one falls back
        upstream = upstream.transpose(0, 1).contiguous().transpose(0, 1)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    assert torch.equal(grad_ours, grad_reference)


def test_avg_pool_2x2_refuses_a_map_too_small_to_pool() -> None:
    with pytest.raises(ValueError, match="too small"):
        avg_pool_2x2(torch.randn(1, 4, 1, 6))


@pytest.mark.parametrize("channels", [1, 6])
def test_prelu_matches_torch_in_value_and_gradient(channels: int) -> None:
    torch.manual_seed(0)
    ours, reference = PReLU(channels), nn.PReLU(channels)
    with torch.no_grad():
        ours.weight.uniform_(-0.5, 0.5)
        reference.weight.copy_(ours.weight)
    x = torch.randn(4, 6, 5, 5)
    x[0, 0, 0, :3] = 0.0  # the kink: x == 0 takes the negative side in both
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    assert torch.equal(y_ours, y_ref)
    upstream = torch.randn_like(y_ref)
    y_ours.backward(upstream)
    y_ref.backward(upstream)
    assert torch.equal(x_ours.grad, x_ref.grad)
    # The slope gradient is the same sum in another order.
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-6)


def test_prelu_frozen_slope_gets_no_gradient_and_no_grad_mode_builds_no_graph() -> None:
    prelu = PReLU(3)
    prelu.weight.requires_grad_(False)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    prelu(x).sum().backward()
    assert prelu.weight.grad is None and x.grad is not None
    with torch.no_grad():
        assert prelu(x).grad_fn is None


def test_avg_pool_2x2_traces_without_a_tracer_warning() -> None:
    # Its input check runs on traced sizes; a warning per pooling flooded the graph exports' output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's own deprecation notice
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(AvgPool2x2(), torch.randn(1, 2, 4, 6))
    x = torch.randn(3, 2, 4, 6)
    assert torch.equal(traced(x), F.avg_pool2d(x, 2, 2))
