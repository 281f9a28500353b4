"""Layers: the faster pooling and PReLU give the same values as the torch modules they replace; the binary
conv's constraint pass prepares the next step's weight only where that gives the same step."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import fused_ops
from models.layers import AvgPool2x2, BinaryConv2d, PReLU, avg_pool_2x2


@pytest.mark.parametrize("upstream_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("path", ["kernel", "slices"])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (2, 3), (32, 32), (4, 4), (6, 4), (10, 8), (6, 48), (8, 24)])
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


# --------------------------------------------------------------------------- the binary conv's constraint pass

_needs_kernels = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def _binary_layer(kernel_size: int) -> BinaryConv2d:
    torch.manual_seed(0)
    layer = BinaryConv2d(16, 32, kernel_size).train()
    with torch.no_grad():
        layer.weight.normal_(0, 1.0)  # values beyond the clip of 1.5 too
        layer.temperature.fill_(0.3)
    return layer


def _train_step(layer: BinaryConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.weight.grad = None
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), layer.weight.grad.clone()


@_needs_kernels
@pytest.mark.parametrize("size", [2, 8], ids=["taps", "oneDNN"])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_the_constraint_pass_prepares_the_next_steps_weight_with_the_same_bits(
    extension_calls: list[str], kernel_size: int, size: int
) -> None:
    prepared, plain = _binary_layer(kernel_size), _binary_layer(kernel_size)
    x = torch.randn(4, 16, size, size)
    for layer in (prepared, plain):
        _train_step(layer, x)  # a step: the layer now knows its layout
    prepared.apply_constraints_()
    with fused_ops.disabled():
        plain.apply_constraints_()  # clamp_, nothing prepared
    assert torch.equal(prepared.weight, plain.weight) and prepared.weight.abs().max() == 1.5
    extension_calls.clear()
    got = _train_step(prepared, x)
    assert "divide_clamp" not in extension_calls  # the step took the prepared weight
    expected = _train_step(plain, x)
    assert "divide_clamp" in extension_calls  # the plain layer binarized in its step
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@_needs_kernels
@pytest.mark.parametrize("change", ["weight", "temperature", "state_dict", "layout"])
def test_a_prepared_weight_is_not_used_once_what_it_was_made_from_changed(change: str) -> None:
    layer, reference = _binary_layer(3), _binary_layer(3)
    x = torch.randn(4, 16, 2, 2)
    _train_step(layer, x)
    layer.apply_constraints_()
    with torch.no_grad():
        if change == "weight":
            layer.weight.mul_(0.5)
        elif change == "temperature":
            models.set_temperature(layer, 0.05)
        elif change == "state_dict":
            layer.load_state_dict({"weight": torch.randn(32, 16, 3, 3), "temperature": torch.tensor([0.7])})
    if change == "layout":
        x = torch.randn(4, 16, 8, 8)  # oneDNN's convolution, plain layout, instead of the taps'
    reference.load_state_dict(layer.state_dict())
    with fused_ops.disabled():
        expected = _train_step(reference, x)
    got = _train_step(layer, x)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-5)


@_needs_kernels
def test_copies_and_evaluation_hold_no_prepared_weight() -> None:
    layer = _binary_layer(3)
    _train_step(layer, torch.randn(4, 16, 2, 2))
    layer.apply_constraints_()
    assert layer._prepared is not None
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):  # e.g. an EMA model
        copied.apply_constraints_()
        assert copied._prepared is None and copied.weight.abs().max() <= 1.5
    layer.eval().apply_constraints_()  # clamped for evaluation: nothing held for a step
    assert layer._prepared is None


def test_a_layer_pickled_before_the_constraint_pass_existed_still_trains() -> None:
    layer = _binary_layer(3)
    state = layer.__getstate__()
    del state["_step_layout"], state["_prepared"]  # as an older pickle of the layer holds it
    old = BinaryConv2d.__new__(BinaryConv2d)
    old.__setstate__(state)
    _train_step(old, torch.randn(4, 16, 2, 2))
    old.apply_constraints_()
    assert old.weight.abs().max() <= 1.5


def _adamw_update(layer: BinaryConv2d, moments: tuple[torch.Tensor, torch.Tensor], step: int) -> models.AdamWUpdate:
    return models.AdamWUpdate(layer.weight.grad, *moments, float(step), 0.05, 0.9, 0.999, 1e-3, 1e-8)


@_needs_kernels
@pytest.mark.parametrize("size", [2, 8], ids=["taps", "oneDNN"])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_an_adamw_update_in_the_constraint_pass_gives_torchs_bits(
    extension_calls: list[str], kernel_size: int, size: int
) -> None:
    fused, reference = _binary_layer(kernel_size), _binary_layer(kernel_size)
    optimizer = torch.optim.AdamW([reference.weight], lr=0.05, betas=(0.9, 0.999), weight_decay=1e-3, fused=True)
    moments = (torch.zeros_like(fused.weight), torch.zeros_like(fused.weight))
    x = torch.randn(4, 16, size, size)
    assert fused_ops.adamw_kernel_matches_torch()  # checked once per process, with calls of its own
    for step in (1, 2, 3):
        got, expected = _train_step(fused, x), _train_step(reference, x)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        extension_calls.clear()
        assert fused.update_and_constrain_(_adamw_update(fused, moments, step))
        fused.apply_constraints_()
        assert extension_calls == ["adamw_clamp_and_divide_clamp"]  # one pass: nothing left for the constraint
        optimizer.step()
        reference.apply_constraints_()
        state = optimizer.state[reference.weight]
        assert torch.equal(fused.weight, reference.weight) and fused.weight.abs().max() == 1.5
        assert torch.equal(moments[0], state["exp_avg"]) and torch.equal(moments[1], state["exp_avg_sq"])
    extension_calls.clear()
    got, expected = _train_step(fused, x), _train_step(reference, x)
    assert "divide_clamp" not in extension_calls  # both steps took the weight their constraint pass prepared
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@_needs_kernels
@pytest.mark.parametrize("case", ["no step yet", "evaluation", "disabled", "size", "beta1", "strided moment"])
def test_an_adamw_update_is_declined_with_nothing_changed_where_the_pass_does_not_take_it(case: str) -> None:
    layer = BinaryConv2d(3, 5, 1).train() if case == "size" else _binary_layer(3)  # 15 values: not a multiple of 16
    if case != "no step yet":
        _train_step(layer, torch.randn(4, layer.in_channels, 2, 2))
    else:
        layer.weight.grad = torch.randn_like(layer.weight)
    moments = (torch.zeros_like(layer.weight), torch.ones_like(layer.weight))
    update = _adamw_update(layer, moments, 1)
    if case == "evaluation":
        layer.eval()
    elif case == "beta1":
        update = update._replace(beta1=0.4)  # torch's lerp takes its other form there
    elif case == "strided moment":
        update = update._replace(exp_avg=torch.zeros(layer.weight.shape[::-1]).permute(3, 2, 1, 0))
    before = (layer.weight.detach().clone(), moments[0].clone(), moments[1].clone(), layer.weight._version)
    context = fused_ops.disabled() if case == "disabled" else contextlib.nullcontext()
    with context:
        assert not layer.update_and_constrain_(update)
    after = (layer.weight.detach(), *moments)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after)) and layer.weight._version == before[3]


@_needs_kernels
def test_a_prepared_weight_serves_one_forward_even_after_an_update_that_counts_no_version() -> None:
    layer, reference = _binary_layer(3), _binary_layer(3)
    x = torch.randn(4, 16, 2, 2)
    _train_step(layer, x)
    layer.apply_constraints_()
    _train_step(layer, x)  # takes the prepared weight
    version = layer.weight._version
    torch.optim.AdamW([layer.weight], lr=0.05, fused=True).step()  # no apply_constraints_ after it
    assert layer.weight._version == version  # torch 2.14's fused AdamW counts no version: the key cannot tell
    reference.load_state_dict(layer.state_dict())
    expected = _train_step(reference, x)  # binarizes in its step: it holds no prepared weight
    got = _train_step(layer, x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@_needs_kernels
def test_an_evaluation_forward_with_gradients_prepares_nothing_for_a_step(extension_calls: list[str]) -> None:
    layer = _binary_layer(3).eval()
    with torch.enable_grad():
        layer(torch.randn(4, 16, 2, 2)).sum().backward()  # e.g. a loss landscape, or a survey of shapes
    layer.train()
    layer.weight.grad = torch.randn_like(layer.weight)
    moments = (torch.zeros_like(layer.weight), torch.zeros_like(layer.weight))
    assert not layer.update_and_constrain_(_adamw_update(layer, moments, 1))
    extension_calls.clear()
    layer.apply_constraints_()  # a plain clamp: no step told the layer the layout to prepare
    assert extension_calls == [] and layer._prepared is None and layer.weight.abs().max() == 1.5


def _graph_binarization(layer: BinaryConv2d, weight: torch.Tensor | None = None, tap_major: bool = True):
    # bnext::binarize_weight as a compiled training step's graph calls it (no autograd inside a graph).
    with torch.no_grad():
        weight = layer.weight if weight is None else weight
        return torch.ops.bnext.binarize_weight(weight, layer.temperature, layer.sign_threshold, tap_major)


@_needs_kernels
@pytest.mark.parametrize("tap_major", [True, False])
def test_a_compiled_steps_operator_takes_the_prepared_weight_once_and_only_for_its_own_tensors(
    tap_major: bool,
) -> None:
    layer = _binary_layer(3)
    layer.apply_constraints_()  # a plain clamp (no layout yet) that registers the layer for graphs
    first = _graph_binarization(layer, tap_major=tap_major)  # nothing prepared: it binarizes
    assert layer._step_layout is tap_major and layer._prepared is None
    layer.apply_constraints_()  # now in the layout the graph asked for
    prepared = layer._prepared[0]
    assert prepared.is_contiguous(memory_format=torch.channels_last if tap_major else torch.contiguous_format)
    # Another tensor with the same values is not the layer's weight: binarized anew, nothing taken.
    other = _graph_binarization(layer, layer.weight.detach().clone(), tap_major)
    assert other.data_ptr() != prepared.data_ptr() and layer._prepared is not None
    taken = _graph_binarization(layer, tap_major=tap_major)
    assert taken.data_ptr() == prepared.data_ptr() and layer._prepared is None  # handed over once
    again = _graph_binarization(layer, tap_major=tap_major)
    assert again.data_ptr() != prepared.data_ptr()
    for result in (other, taken, again):
        assert torch.equal(result, first) and result.stride() == first.stride()


@_needs_kernels
def test_an_evaluation_graph_takes_no_prepared_weight_and_records_no_layout() -> None:
    layer = _binary_layer(3)
    _train_step(layer, torch.randn(4, 16, 2, 2))  # an eager step: tap-major
    layer.apply_constraints_()
    assert layer._prepared is not None
    layer.eval()  # e.g. a compiled loss landscape, which records gradients in evaluation mode
    _graph_binarization(layer, tap_major=False)
    assert layer._step_layout is True and layer._prepared is not None
