"""Convolution by tap products (models.tap_conv) computes F.conv2d, and the layers use it where it applies."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models import fused_ops, tap_conv

# (batch, in, out, height, width, kernel, stride, padding): BNext's small planes, odd and
# uneven planes, a 1x1 plane that only the centre tap reaches, a 5x5 kernel.
SHAPES = [
    (3, 8, 6, 2, 2, 3, 1, 1),
    (3, 8, 8, 4, 4, 3, 2, 1),
    (2, 5, 7, 3, 2, 3, 1, 1),
    (2, 4, 4, 1, 1, 3, 1, 1),
    (2, 6, 4, 2, 2, 1, 1, 0),
    (2, 4, 3, 3, 3, 5, 1, 2),
    (2, 4, 4, 4, 3, 3, 2, 1),
]


def _conv_and_grads(conv, x, weight, stride, padding, grad):
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    out = conv(x, weight, stride, padding)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad)
    return out.detach(), grad_x, grad_w


def _reference(x, weight, stride, padding):
    return F.conv2d(x, weight, stride=stride, padding=padding)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_equal_conv2d(shape) -> None:
    n, cin, cout, height, width, kernel, stride, padding = shape
    torch.manual_seed(0)
    x, weight = torch.randn(n, cin, height, width), torch.randn(cout, cin, kernel, kernel)
    out_shape = _reference(x, weight, stride, padding).shape
    grad = torch.randn(out_shape)
    expected = _conv_and_grads(_reference, x, weight, stride, padding, grad)
    actual = _conv_and_grads(tap_conv.conv2d, x, weight, stride, padding, grad)
    for name, a, e in zip(("output", "input gradient", "weight gradient"), actual, expected):
        assert a.shape == e.shape and a.is_contiguous()
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_signs_give_exactly_the_convolution_of_signs() -> None:
    # ±1 inputs and weights make every partial sum an integer: any order gives the same bits.
    torch.manual_seed(1)
    x = torch.randn(4, 64, 2, 2).sign()
    weight = torch.randn(32, 64, 3, 3).sign()
    grad = torch.randn(4, 32, 2, 2).sign()
    expected = _conv_and_grads(_reference, x, weight, 1, 1, grad)
    actual = _conv_and_grads(tap_conv.conv2d, x, weight, 1, 1, grad)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_only_the_asked_gradient_is_computed() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3)
    tap_conv.conv2d(x, weight, 1, 1).sum().backward()
    assert x.grad is not None and weight.grad is None
    torch.testing.assert_close(x.grad, torch.autograd.grad(_reference(x, weight, 1, 1).sum(), x)[0])


def test_operators_pass_opcheck() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, requires_grad=True)
    torch.library.opcheck(tap_conv.tap_conv2d_op, (x, weight, 1, 1))
    torch.library.opcheck(tap_conv.tap_conv2d_op, (torch.randn(2, 4, 4, 4), torch.randn(5, 4, 3, 3), 2, 1))
    # 1x1 kernels and 1x1 planes: the tap matrices and rows must still be new tensors (an
    # operator's output may not alias an input).
    torch.library.opcheck(tap_conv.tap_conv2d_op, (x, torch.randn(5, 4, 1, 1, requires_grad=True), 1, 0))
    torch.library.opcheck(tap_conv.tap_conv2d_op, (torch.randn(2, 4, 1, 1, requires_grad=True), weight, 1, 1))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_tap_major_weight_is_read_in_place_with_the_same_results(shape, monkeypatch) -> None:
    n, cin, cout, height, width, kernel, stride, padding = shape
    torch.manual_seed(5)
    x, weight = torch.randn(n, cin, height, width), torch.randn(cout, cin, kernel, kernel)
    tap_major = weight.contiguous(memory_format=torch.channels_last)
    assert tap_conv.is_tap_major(tap_major) and tap_conv.is_tap_major(weight) == (kernel == 1)
    grad = torch.randn(_reference(x, weight, stride, padding).shape)
    expected = _conv_and_grads(tap_conv.conv2d, x, weight, stride, padding, grad)
    copies = []
    original = tap_conv.tap_matrices
    monkeypatch.setattr(tap_conv, "tap_matrices", lambda w: copies.append(w.shape) or original(w))
    actual = _conv_and_grads(tap_conv.conv2d, x, tap_major, stride, padding, grad)
    assert copies == []  # no transposing copy of the weight, forward or backward
    for a, e in zip(actual, expected):
        assert a.is_contiguous() and torch.equal(a, e)  # the same tap matrices: the same bits


def test_operators_pass_opcheck_with_a_tap_major_weight() -> None:
    torch.manual_seed(6)
    weight = torch.randn(5, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(tap_conv.tap_conv2d_op, (torch.randn(2, 4, 2, 2, requires_grad=True), weight, 1, 1))
    torch.library.opcheck(tap_conv.tap_conv2d_op, (torch.randn(2, 4, 4, 4), weight, 2, 1))


def test_a_binary_layer_binarizes_into_the_taps_layout_where_they_run(monkeypatch) -> None:
    torch.manual_seed(7)
    layer = models.BinaryConv2d(16, 16, 3).train()
    copies = []
    original = tap_conv.tap_matrices
    monkeypatch.setattr(tap_conv, "tap_matrices", lambda w: copies.append(w.shape) or original(w))
    x = torch.randn(2, 16, 2, 2, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert copies == ([] if fused_ops.backend() == "cpp" else [(16, 16, 3, 3)])
    torch.testing.assert_close(out, F.conv2d(x, layer.binary_weight(), padding=1), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad.is_contiguous()  # the latent weight's gradient keeps its layout
    big = torch.randn(2, 16, 8, 8, requires_grad=True)  # F.conv2d's plane: the weight stays NCHW
    assert fused_ops.takes_tap_products(x, layer.weight, 1, 1, 1)
    assert not fused_ops.takes_tap_products(big, layer.weight, 1, 1, 1)


def test_taps_pair_every_valid_position_once() -> None:
    # 3x3 kernel on a 2x2 plane: all nine taps reach the plane; 16 output/input pairs in all.
    found = tap_conv.taps(2, 2, 3, 1, 1)
    assert sorted(t.index for t in found) == list(range(9))
    centre = next(t for t in found if t.index == 4)
    assert centre.outputs is None and centre.inputs is None  # identity: no gather
    pairs = sum(4 if t.outputs is None else len(t.outputs) for t in found)
    assert pairs == 16
    # On a 1x1 plane only the centre tap is left.
    assert [t.index for t in tap_conv.taps(1, 1, 3, 1, 1)] == [4]


@pytest.mark.parametrize(("size", "stride"), [((4, 4), 1), ((4, 4), 2), ((2, 2), 1), ((3, 2), 1), ((1, 5), 1)])
def test_runs_cover_each_taps_pairs_in_order(size: tuple[int, int], stride: int) -> None:
    for tap in tap_conv.taps(*size, 3, stride, 1):
        if tap.outputs is None:
            assert tap.runs == ()
            continue
        outputs = [first + i for first, _, count in tap.runs for i in range(count)]
        inputs = [first + i for _, first, count in tap.runs for i in range(count)]
        assert outputs == tap.outputs.tolist() and inputs == tap.inputs.tolist()
        # Maximal runs: the next run does not continue the last one on both sides.
        for (o, i, count), (next_o, next_i, _) in zip(tap.runs, tap.runs[1:]):
            assert (next_o, next_i) != (o + count, i + count)
    # 3x3 on a 4x4 plane, stride 1: the taps of the centre column pair whole rows (one run each),
    # the others one run per row they reach.
    runs = {tap.index: len(tap.runs) for tap in tap_conv.taps(4, 4, 3, 1, 1) if tap.outputs is not None}
    assert runs == {1: 1, 7: 1, 0: 3, 2: 3, 6: 3, 8: 3, 3: 4, 5: 4}


def test_taps_read_and_add_to_the_rows_in_place() -> None:
    # No gathered or scattered copies of the rows: every tap's products take slices of them.
    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(6)
    x, weight = torch.randn(3, 8, 4, 4, requires_grad=True), torch.randn(6, 8, 3, 3, requires_grad=True)
    with Record():
        out = tap_conv.conv2d(x, weight, 1, 1)
        out.backward(torch.randn_like(out))
    assert "addmm_" in seen and not {"index_select", "index_add", "index_add_", "index_put_"} & set(seen)
    torch.testing.assert_close(out, _reference(x, weight, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("x_shape", "weight_shape", "stride", "groups", "dtype", "expected"),
    [
        ((2, 8, 2, 2), (8, 8, 3, 3), 1, 1, torch.float32, True),
        ((2, 8, 4, 4), (8, 8, 3, 3), 2, 1, torch.float32, True),
        ((2, 8, 2, 2), (8, 8, 1, 1), 1, 1, torch.float32, True),
        ((2, 8, 4, 4), (8, 8, 1, 1), 1, 1, torch.float32, False),  # 1x1 kernels only on planes <= 4
        ((2, 8, 8, 8), (8, 8, 3, 3), 1, 1, torch.float32, False),  # large planes: oneDNN
        ((2, 8, 2, 2), (8, 4, 3, 3), 1, 2, torch.float32, False),  # groups
        ((2, 8, 2, 2), (8, 8, 3, 3), 1, 1, torch.float64, False),
    ],
)
def test_applies_to_small_float32_planes_only(x_shape, weight_shape, stride, groups, dtype, expected) -> None:
    x, weight = torch.randn(x_shape, dtype=dtype), torch.randn(weight_shape, dtype=dtype)
    assert tap_conv.applies(x, weight, stride, 1, groups) is expected


def test_not_for_channels_last_inputs_nor_under_autocast_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight = torch.randn(2, 8, 2, 2), torch.randn(8, 8, 3, 3)
    assert tap_conv.applies(x, weight, 1, 1, 1)
    assert not tap_conv.applies(x.contiguous(memory_format=torch.channels_last), weight, 1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tap_conv.applies(x, weight, 1, 1, 1)  # an eager step: the tap products, on bf16 (conv2d)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not tap_conv.applies(x, weight, 1, 1, 1)  # a compiled one: autocast applies as usual


def test_under_cpu_bf16_autocast_the_products_run_on_bf16_and_sum_in_float32() -> None:
    torch.manual_seed(0)
    signs = torch.randn(4, 64, 4, 4).sign().requires_grad_(True)  # a binary convolution's input: exact in bf16
    weight = torch.randn(32, 64, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tap_conv.conv2d(signs, weight, 1, 1)
    assert out.dtype == torch.float32
    # The exact sums of the bf16-rounded weights; each tap's product is rounded to bf16 (8 bits) once.
    exact = F.conv2d(signs.double(), weight.bfloat16().double(), padding=1)
    float32 = tap_conv.conv2d(signs, weight, 1, 1)
    error, float32_error = (out.double() - exact).abs().max(), (float32.double() - exact).abs().max()
    assert error <= 9 * 2**-8 * exact.abs().max() and error > float32_error  # bf16's rounding, not float32's
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (signs, weight), grad)
    exact_out = F.conv2d(signs.double(), weight.double(), padding=1)
    reference = torch.autograd.grad(exact_out, (signs, weight), grad.double())  # in float64, cast to the leaves'
    for got, expected in zip(grads, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=2**-6 * float(expected.abs().max()))
        assert not torch.equal(got, expected)  # bf16 products, not float32 ones


def _count_tap_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = tap_conv.conv2d

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tap_conv, "conv2d", counting)
    return calls


def test_binary_conv_trains_by_taps_and_evaluates_with_conv2d(monkeypatch) -> None:
    torch.manual_seed(4)
    layer = models.BinaryConv2d(16, 16, 3)
    x = torch.randn(2, 16, 2, 2, requires_grad=True)
    calls = _count_tap_calls(monkeypatch)
    trained = layer.train()(x)
    assert len(calls) == 1
    reference = F.conv2d(x, layer.binary_weight(), padding=1)
    torch.testing.assert_close(trained, reference, rtol=1e-5, atol=1e-5)
    evaluated = layer.eval()(x)
    assert len(calls) == 1 and torch.equal(evaluated, reference)  # evaluation keeps F.conv2d's bits
    with fused_ops.disabled():
        assert torch.equal(layer.train()(x), reference)
    with tap_conv.disabled():
        assert torch.equal(layer.train()(x), reference)
    assert len(calls) == 1 and tap_conv.enabled()


def test_training_conv2d_needs_a_recorded_gradient(monkeypatch) -> None:
    x, weight = torch.randn(2, 8, 2, 2), torch.randn(8, 8, 3, 3)
    calls = _count_tap_calls(monkeypatch)
    fused_ops.training_conv2d(x, weight, 1, 1, 1)  # nothing requires grad
    assert not calls
    fused_ops.training_conv2d(x, weight.requires_grad_(True), 1, 1, 1)
    assert len(calls) == 1
    with torch.no_grad():
        fused_ops.training_conv2d(x, weight, 1, 1, 1)
    assert len(calls) == 1


def test_compiled_taps_match_eager() -> None:
    # aot_eager runs the operators' shape functions and registered backward as a compiled
    # graph does (the full inductor path is covered by test_compile_equivalence).
    torch._dynamo.reset()
    torch.manual_seed(5)
    x = torch.randn(2, 8, 2, 2, requires_grad=True)
    weight = torch.randn(6, 8, 3, 3, requires_grad=True)

    def conv(x, weight):
        return fused_ops.training_conv2d(x, weight, 1, 1, 1)

    results = []
    for forward in (conv, torch.compile(conv, fullgraph=True, backend="aot_eager")):
        out = forward(x, weight)
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), (x, weight))))
    for actual, expected in zip(results[1], results[0]):
        torch.testing.assert_close(actual, expected)
    torch._dynamo.reset()


def test_disabled_blocks_nest() -> None:
    assert tap_conv.enabled()
    with tap_conv.disabled():
        with tap_conv.disabled():
            assert not tap_conv.enabled()
        assert not tap_conv.enabled()
    assert tap_conv.enabled()


def test_backward_builds_no_zero_gradient_for_the_saved_outputs() -> None:
    # The operator's second and third outputs (the tap matrices and the input's rows, saved for
    # the backward) take no part in the loss; autograd would otherwise fill zero tensors of
    # their sizes for the backward on every step.
    x = torch.randn(2, 8, 2, 2, requires_grad=True)
    weight = torch.randn(6, 8, 3, 3, requires_grad=True)
    out = tap_conv.conv2d(x, weight, 1, 1)
    with torch.profiler.profile(record_shapes=True) as prof:
        out.sum().backward()
    filled = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes]
    assert [6, 9, 8] not in filled and [4, 2, 8] not in filled, filled
    assert x.grad is not None and weight.grad is not None


# The integer products need the C++ extension's conversion; never skipped in CI, where it must build.
needs_extension = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def _count_integer_products(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(tuple(a.shape)) or real(a, b))
    return calls


@needs_extension
def test_under_cpu_autocast_signs_keep_the_exact_integer_products(monkeypatch) -> None:
    signs, weight_signs = torch.randn(4, 16, 4, 4).sign(), torch.randn(8, 16, 3, 3).sign()
    calls = _count_integer_products(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tap_conv.conv2d(signs.requires_grad_(True), weight_signs, 1, 1)
    assert calls  # int8 products before bf16 ones
    assert torch.equal(out, F.conv2d(signs.detach(), weight_signs, padding=1))


@needs_extension
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ternary_operands_take_integer_products_with_the_same_bits(shape, monkeypatch) -> None:
    n, cin, cout, height, width, kernel, stride, padding = shape
    torch.manual_seed(2)
    x = torch.randint(-1, 2, (n, cin, height, width)).float()
    weight = torch.randint(-1, 2, (cout, cin, kernel, kernel)).float()
    weight[0, 0, 0, 0] = -0.0  # a negative zero is a zero
    grad = torch.randn(_reference(x, weight, stride, padding).shape)
    with tap_conv.integer_products_disabled():
        floats = _conv_and_grads(tap_conv.conv2d, x, weight, stride, padding, grad)
    calls = _count_integer_products(monkeypatch)
    integers = _conv_and_grads(tap_conv.conv2d, x, weight, stride, padding, grad)
    assert calls  # the forward's products ran on int8
    for a, f in zip(integers, floats):
        assert torch.equal(a, f) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(integers[0], _reference(x, weight, stride, padding))


@needs_extension
@pytest.mark.parametrize("odd_one", [0.5, 2.0, float("nan"), float("inf"), 1e-45], ids=str)
@pytest.mark.parametrize("where", ["input", "weight"])
def test_any_other_value_keeps_float_products(odd_one: float, where: str, monkeypatch) -> None:
    torch.manual_seed(3)
    x = torch.randint(-1, 2, (3, 40, 2, 2)).float()
    weight = torch.randint(-1, 2, (24, 40, 3, 3)).float()
    target = x if where == "input" else weight
    target.view(-1)[-1] = odd_one  # the last value: after the vectorized blocks of the check
    calls = _count_integer_products(monkeypatch)
    out = tap_conv.conv2d(x, weight, 1, 1)
    assert calls == []
    with tap_conv.integer_products_disabled():
        expected = tap_conv.conv2d(x, weight, 1, 1)
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


@needs_extension
def test_the_ternary_conversion_checks_every_value() -> None:
    convert = fused_ops.load_extension().to_ternary_int8
    values = torch.tensor([1.0, -1.0, 0.0, -0.0] * 9)  # 36 values: two vector blocks and a tail
    assert convert(values).tolist() == [1, -1, 0, 0] * 9 and convert(values).dtype == torch.int8
    for position in (0, 17, 35):
        odd = values.clone()
        odd[position] = -3.0
        assert convert(odd).numel() == 0
    assert convert(torch.empty(0)).numel() == 0
    with pytest.raises(RuntimeError, match="contiguous float32"):
        convert(values.double())


@needs_extension
def test_integer_products_disabled_blocks_nest(monkeypatch) -> None:
    x, weight = torch.ones(2, 8, 2, 2), -torch.ones(4, 8, 3, 3)
    calls = _count_integer_products(monkeypatch)
    with tap_conv.integer_products_disabled():
        with tap_conv.integer_products_disabled():
            tap_conv.conv2d(x, weight, 1, 1)
        tap_conv.conv2d(x, weight, 1, 1)
    assert calls == []
    tap_conv.conv2d(x, weight, 1, 1)
    assert calls


@needs_extension
def test_a_binary_network_below_the_sign_threshold_trains_the_same_on_integers(monkeypatch) -> None:
    torch.manual_seed(4)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125).train()
    models.set_temperature(model, 1e-8)  # the weights are exact signs, as the inputs always are
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def loss_and_grads() -> tuple[torch.Tensor, ...]:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        return (loss.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with tap_conv.integer_products_disabled():
        floats = loss_and_grads()
    model.load_state_dict(state)  # the batch-norm statistics as before
    calls = _count_integer_products(monkeypatch)
    integers = loss_and_grads()
    assert calls
    assert all(torch.equal(a, b) for a, b in zip(integers, floats, strict=True))


@needs_extension
def test_operators_pass_opcheck_on_integer_products() -> None:
    torch.manual_seed(6)
    x = torch.randint(-1, 2, (2, 4, 2, 2)).float().requires_grad_(True)
    weight = torch.randint(-1, 2, (5, 4, 3, 3)).float().requires_grad_(True)
    torch.library.opcheck(tap_conv.tap_conv2d_op, (x, weight, 1, 1))
    torch.library.opcheck(tap_conv.tap_conv2d_op, (x, weight[:, :, :1, :1].contiguous(), 1, 0))


@needs_extension
def test_compiled_taps_take_integer_products_on_signs(monkeypatch) -> None:
    # The operator's implementation decides, so a compiled graph runs the integers as eager does.
    torch._dynamo.reset()
    torch.manual_seed(7)
    x = torch.randint(-1, 2, (2, 8, 2, 2)).float().requires_grad_(True)
    weight = torch.randint(-1, 2, (6, 8, 3, 3)).float().requires_grad_(True)

    def conv(x, weight):
        return fused_ops.training_conv2d(x, weight, 1, 1, 1)

    with tap_conv.integer_products_disabled():
        expected = conv(x, weight)
    calls = _count_integer_products(monkeypatch)
    actual = torch.compile(conv, fullgraph=True, backend="aot_eager")(x, weight)
    assert calls and torch.equal(actual, expected)
    torch._dynamo.reset()


@needs_extension
@pytest.mark.parametrize(
    ("cout", "taps", "cin"),
    [(3, 9, 16), (5, 9, 1024), (4, 9, 37), (2, 9, 5), (3, 4, 20), (2, 25, 33)],
    ids=lambda v: str(v),
)
def test_the_weight_gradient_transposition_moves_every_value(cout: int, taps: int, cin: int) -> None:
    tap_major = torch.randn(cout, taps, cin)
    plain = fused_ops.load_extension().from_tap_major(tap_major)
    assert plain.is_contiguous() and plain.shape == (cout, cin, taps)
    assert torch.equal(plain, tap_major.transpose(1, 2))


@needs_extension
def test_the_weight_gradient_transposition_refuses_what_it_cannot_read() -> None:
    transpose = fused_ops.load_extension().from_tap_major
    for wrong in (torch.ones(2, 9, 16).double(), torch.ones(2, 16, 9).transpose(1, 2), torch.ones(2, 9)):
        with pytest.raises(RuntimeError, match="contiguous float32 CPU tensor of Cout x taps x Cin"):
            transpose(wrong)


@needs_extension
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_layout_kernels_give_the_strided_copies_bits(shape, monkeypatch) -> None:
    n, cin, cout, height, width, kernel, stride, padding = shape
    torch.manual_seed(5)
    x, weight = torch.randn(n, cin, height, width), torch.randn(cout, cin, kernel, kernel)
    grad = torch.randn(_reference(x, weight, stride, padding).shape)
    calls: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(tap_conv.kernel_ops, "extension", lambda: _Counting(fused_ops.load_extension(), calls))
    by_kernel = _conv_and_grads(tap_conv.conv2d, x, weight, stride, padding, grad)
    transposed = [shape for name, shape in calls if name == "from_tap_major"]
    assert transposed == ([] if kernel == 1 else [(cout, kernel * kernel, cin)])
    # The rows' layouts by the kernels too: the input and the output gradient into rows, the output and the
    # input gradient back (not on a 1x1 plane, whose rows are its planes already).
    out_positions = tap_conv.output_size(height, kernel, stride, padding) * tap_conv.output_size(
        width, kernel, stride, padding
    )
    back = (out_positions > 1) + (height * width > 1)
    assert sorted(name for name, _ in calls if name != "from_tap_major") == ["from_rows"] * back + ["to_rows"] * 2
    monkeypatch.setattr(tap_conv.kernel_ops, "extension", lambda: None)
    by_copy = _conv_and_grads(tap_conv.conv2d, x, weight, stride, padding, grad)
    for a, b in zip(by_kernel, by_copy):
        assert a.is_contiguous() and torch.equal(a, b)


class _Counting:
    """The extension, recording the name and first argument's shape of its layout kernels' calls."""

    def __init__(self, real, calls: list[tuple[str, tuple[int, ...]]]) -> None:
        self._real, self._calls = real, calls

    def __getattr__(self, name: str):
        function = getattr(self._real, name)
        if name not in ("from_tap_major", "to_rows", "from_rows"):
            return function

        def counting(t: torch.Tensor, *args):
            self._calls.append((name, tuple(t.shape)))
            return function(t, *args)

        return counting


@needs_extension
@pytest.mark.parametrize(
    "shape", [(3, 37, 4, 4), (2, 32, 4, 4), (3, 5, 2, 2), (2, 7, 3, 2), (2, 9, 1, 1), (1, 16, 1, 16)], ids=str
)
def test_the_rows_layout_kernels_move_every_value(shape: tuple[int, int, int, int]) -> None:
    kernels = fused_ops.load_extension()
    x = torch.randn(shape)
    n, c, h, w = shape
    rows = kernels.to_rows(x)
    assert rows.is_contiguous() and torch.equal(rows, x.permute(2, 3, 0, 1).reshape(h * w, n, c))
    planes = kernels.from_rows(rows, h, w)
    assert planes.is_contiguous() and torch.equal(planes, x)
    with pytest.raises(RuntimeError, match="are not"):
        kernels.from_rows(rows, h + 1, w)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.from_rows(rows.double(), h, w)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.to_rows(torch.randn(n, 2 * c, h, w)[:, ::2])
