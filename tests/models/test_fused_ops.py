"""The fused training kernels compute what the unfused modules compute, and are used only where they may be.

Every comparison runs the same function twice: through the C++ kernels and through
the modules one by one (the fallback, selected by replacing the extension with
None). Values, every gradient, the running statistics and the batch counter must
agree to float32 rounding; the sign's forward and input gradient bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import fused_ops
from models.quantizers import HardSign, LearnableBias

# Skipped only where the extension cannot be built (no compiler); never in CI, where it must build.
pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


@pytest.fixture
def unfused(monkeypatch):
    """Run the block under it without the extension (the module-by-module fallback)."""

    def use_fallback():
        monkeypatch.setattr(fused_ops, "load_extension", lambda: None)

    return use_fallback


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _random_norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-0.1, 0.1)
        norm.running_var.uniform_(0.5, 2.0)
    return norm


def _run_twice(fn, inputs, modules, unfused):
    """(outputs, input grads, module param grads, module buffers) fused, then the same unfused."""
    results = []
    for use_fallback in (False, True):
        if use_fallback:
            unfused()
        mods = [copy.deepcopy(m) for m in modules]
        leaves = _leaves(*inputs)
        out = fn(*leaves, *mods)
        outs = out if isinstance(out, tuple) else (out,)
        outs = [o for o in outs if o is not None]
        torch.manual_seed(1)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        loss.backward()
        grads = [leaf.grad for leaf in leaves]
        params = [p.grad for m in mods for p in m.parameters() if p.requires_grad]
        buffers = [b.clone() for m in mods for b in m.buffers()]
        results.append(([o.detach() for o in outs], grads, params, buffers))
    return results


def _compare(fused, reference) -> None:
    for kind, got, want in zip(("output", "input grad", "param grad", "buffer"), fused, reference):
        assert len(got) == len(want), kind
        for i, (a, b) in enumerate(zip(got, want)):
            assert a is not None and b is not None, f"{kind} {i} missing"
            _assert_close(a, b, f"{kind} {i}")


#: H x W of the kernel tests: the unrolled plane sizes of the late stages (1, 4 and 16
#: values), an odd one, one of two summation blocks and three accumulator lanes (192
#: values), and one whose lanes do not divide it (99 values: 64 + 35).
PLANE_SIZES = [(1, 1), (2, 2), (4, 4), (5, 7), (12, 16), (9, 11)]


@pytest.mark.parametrize("size", PLANE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("prelu", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_processor_inputs_match_the_modules(unfused, mean: bool, prelu: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, *size) * 2
    move, sign, activation = LearnableBias(8), HardSign(), models.layers.PReLU(8)
    with torch.no_grad():
        move.bias.uniform_(-0.5, 0.5)
        activation.weight.uniform_(-0.5, 0.5)
        x[0, :, 0, 0] = -move.bias.reshape(-1)  # exact zeros: sign 0
        x[1, :, 0, 0] = 1.5 - move.bias.reshape(-1)  # on the clip: gradient passes
        x[2, :, 0, 0] = 0.0  # PReLU's kink

    def fn(x, move, sign, activation):
        # The shortcut (x as a residual) takes part in the loss: its gradient joins x's.
        prelu_module = activation if prelu else None
        return tuple(fused_ops.processor_inputs(x, move, sign, mean=mean, prelu=prelu_module, shortcut=True))

    fused, reference = _run_twice(fn, [x], [move, sign, activation], unfused)
    assert len(fused[0]) == 2 + mean + prelu
    for got, want in zip(fused[0], reference[0]):
        assert torch.equal(got, want) or not got.shape == x.shape  # signs, prelu(x) and x bit for bit
    assert torch.equal(fused[0][-1], x)
    assert (fused[0][0][0, :, 0, 0] == 0).all()
    if not mean and not prelu:
        # The masked gradient plus the shortcut's: one addition, as autograd's, the same bits.
        assert torch.equal(fused[1][0], reference[1][0])
    fused_params = fused[2] if prelu else fused[2][:-1]
    reference_params = reference[2] if prelu else reference[2][:-1]
    _compare((fused[0], fused[1], fused_params, fused[3]), (reference[0], reference[1], reference_params, reference[3]))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_processor_inputs_give_a_shortcut_only_when_asked(fused: bool) -> None:
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    move, sign = LearnableBias(8), HardSign()
    with contextlib.nullcontext() if fused else fused_ops.disabled():
        without = fused_ops.processor_inputs(x, move, sign)
        with_shortcut = fused_ops.processor_inputs(x, move, sign, shortcut=True)
    assert without.shortcut is None
    assert torch.equal(with_shortcut.shortcut, x)
    assert (with_shortcut.shortcut._base is x) if fused else (with_shortcut.shortcut is x)


@pytest.mark.parametrize("size", PLANE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("slopes", [16, 1, None], ids=["prelu", "shared_slope_prelu", "no_prelu"])
@pytest.mark.parametrize("pooled", [True, False])
def test_batch_norm_prelu_matches_modules(unfused, slopes: int | None, pooled: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 16, *size) * 3 + 1
    norm = _random_norm(16)
    prelu = models.layers.PReLU(slopes) if slopes is not None else None
    if prelu is not None:
        with torch.no_grad():
            prelu.weight.uniform_(-0.5, 0.5)

    def fn(x, norm, *rest):
        return fused_ops.batch_norm_prelu(x, norm, rest[0] if rest else None, pooled)

    fused, reference = _run_twice(fn, [x], [norm] + ([prelu] if prelu is not None else []), unfused)
    _compare(fused, reference)


@pytest.mark.parametrize("size", PLANE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("multiply_residual", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_batch_norm_residual_matches_modules(
    unfused, multiply_residual: bool, gated: bool, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    b = torch.randn(6, 16, *size)
    residual = torch.randn(6, 16, *size)
    gate = torch.rand(6, 16, 1, 1)
    norm = _random_norm(16)
    inputs = [b, residual, gate] if gated else [b, residual]

    def fn(b, residual, *rest):
        gate = rest[0] if gated else None
        return fused_ops.gated_batch_norm_residual(b, gate, residual, rest[-1], multiply_residual)

    fused, reference = _run_twice(fn, inputs, [norm], unfused)
    _compare(fused, reference)


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    model.train()
    logits = model(x)
    nn.functional.cross_entropy(logits, target).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("bnext_tiny", dict(stage_channels=[8, 8, 16, 16])),
        ("bnext_tiny", dict(stage_channels=[8, 8, 16, 16], elm_attention=False, info_recoupling=False)),
        ("bnext18", dict(width_mult=0.125)),
    ],
)
def test_training_step_of_whole_models_matches_unfused(unfused, name: str, kwargs: dict) -> None:
    # The straight-through gradient is cut where |x + beta| > 1.5: a value that rounding puts on
    # the other side of that edge in one implementation changes gradients by about 1 % (seen with
    # this seed at one thread, where BLAS takes other paths). These seeds have no such value on
    # the thread counts the suite runs with (conftest restores it after each test).
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10, stem="cifar", **kwargs)
    models.set_temperature(model, 0.3)
    x, target = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    fused = _train_step(copy.deepcopy(model), x, target)
    unfused()
    reference = _train_step(model, x, target)
    _assert_close(fused[0], reference[0], "logits")
    assert fused[1].keys() == reference[1].keys()
    # Gradients are compared against the network's largest: rounding noise is relative to it.
    largest = max(float(g.abs().max()) for g in reference[1].values())
    for key, grad in reference[1].items():
        torch.testing.assert_close(
            fused[1][key], grad, rtol=1e-3, atol=1e-5 * largest, msg=lambda m, key=key: f"{key}: {m}"
        )
    for key, buffer in reference[2].items():
        _assert_close(fused[2][key].float(), buffer.float(), key)


def test_training_uses_the_kernels_and_evaluation_keeps_the_modules(extension_calls: list[str]) -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16, 16])
    calls = extension_calls
    model.train()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    expected = {"biased_sign_forward", "bn_prelu_forward", "gated_bn_forward", "divide_clamp", "pool_2x2_forward"}
    backward = {"biased_sign_backward", "bn_prelu_backward", "gated_bn_backward", "pool_2x2_backward"}
    assert expected | backward <= set(calls)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls == []


def test_an_eager_cpu_step_under_autocast_keeps_the_float32_kernels(extension_calls: list[str]) -> None:
    """``--amp bf16`` on the CPU: the binary convolutions in bf16, handed on in float32; the kernels and
    the gates in float32 (``fused_ops.autocast_allows_float32``)."""
    from models import tap_conv
    from models.layers import BinaryConv2d

    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125).train()
    models.set_temperature(model, 0.3)
    x = torch.randn(2, 3, 16, 16)  # planes down to 2x2: tap products on the last stages
    model(x).sum().backward()
    without_autocast = set(extension_calls)
    extension_calls.clear()
    seen: list[tuple[BinaryConv2d, torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, BinaryConv2d):
            module.register_forward_hook(lambda module, inputs, output: seen.append((module, inputs[0], output)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().sum().backward()
    assert set(extension_calls) == without_autocast  # every kernel of the float32 step ran
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads)
    small = large = 0
    for module, signs, output in seen:
        assert output.dtype == torch.float32
        with torch.no_grad():
            weight = module.binary_weight()
            geometry = dict(stride=module.stride, padding=module.padding, groups=module.groups)
            if tap_conv.applies(signs, weight, module.stride, module.padding, module.groups):
                small += 1  # tap products: each tap's bf16 product summed in float32
                exact = F.conv2d(signs.double(), weight.bfloat16().double(), **geometry)
                assert (output.double() - exact).abs().max() <= 9 * 2**-8 * exact.abs().max()
                assert not torch.equal(output, F.conv2d(signs, weight, **geometry))
            else:
                large += 1  # oneDNN in bf16 (exact signs in, the weight and the sums rounded), then float32
                expected = F.conv2d(signs.bfloat16(), weight.bfloat16(), **geometry).float()
                assert torch.equal(output, expected)
    assert small and large


@pytest.mark.parametrize("case", ["float64", "channels_last", "hook", "sync_bn_class"])
def test_falls_back_where_the_kernels_do_not_apply(extension_calls: list[str], case: str) -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16, 16]).train()
    x = torch.randn(2, 3, 16, 16)
    hooked: list[str] = []
    registered: set[str] = set()
    if case == "float64":
        model, x = model.double(), x.double()
    elif case == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    elif case == "hook":
        for name, module in model.named_modules():
            if isinstance(module, (nn.BatchNorm2d, HardSign)):
                module.register_forward_hook(lambda *args, name=name: hooked.append(name))
                registered.add(name)
    else:  # a BatchNorm2d subclass (such as a synchronised one) is not the plain module the kernel replaces
        other_norm = type("OtherNorm", (nn.BatchNorm2d,), {})
        for module in model.modules():
            if type(module) is nn.BatchNorm2d:
                module.__class__ = other_norm
    calls = extension_calls
    model(x).sum().backward()
    if case == "hook":
        # Only the batch norms and signs that carry hooks fall back; their hooks all ran.
        assert sorted(hooked) == sorted(registered)
        assert "bn_prelu_forward" not in calls and "biased_sign_forward" not in calls
    elif case == "sync_bn_class":
        assert "biased_sign_forward" in calls  # the sign has no batch norm: it stays fused
        assert not [call for call in calls if "bn" in call]
    elif case == "channels_last":
        # A 1x1 convolution's weight is contiguous in both layouts: its binarization may use the kernel.
        # So are the recoupling gate's N x C x 1 x 1 means and 1x1 weights: the gate's kernels may run.
        assert [call for call in calls if call != "divide_clamp" and not call.startswith("recoupling_gate")] == []
    else:
        assert calls == []


def test_compiled_training_graph_calls_the_processor_operators(extension_calls: list[str]) -> None:
    """torch.compile keeps the processor kernels and the weight binarization (custom operators) in one graph;
    the eager-only kernels stay out."""
    torch._dynamo.reset()
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16, 16]).train()
    calls = extension_calls
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    # The sign's operator sits in the subgraph of its autograd Function (which returns x's view for a residual).
    modules = [m for graph in explanation.graphs for m in graph.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = {str(node.target) for module in modules for node in module.graph.nodes}
    # The recoupled processors' tails are one operator each, as in eager mode one node; the stem's
    # batch norm is the batch-norm operator.
    operators = {"processor_inputs", "batch_norm_prelu", "processor_tail", "binarize_weight"}
    assert {f"bnext.{name}.default" for name in operators} <= targets
    assert "bnext.gated_batch_norm.default" not in targets
    # The graph ran them; the pooling kernel is eager only.
    kernels = {"biased_sign_forward", "bn_prelu_forward", "bn_prelu_statistics", "gated_bn_forward", "divide_clamp"}
    assert kernels <= set(calls)
    assert "pool_2x2_forward" not in calls
    torch._dynamo.reset()


def test_fused_training_step_binds_no_arguments_and_builds_no_modules(monkeypatch) -> None:
    """The per-call Python of a step stays small: autograd functions whose apply() binds its
    arguments with inspect (a separate setup_context) or a module built per call would each cost
    about as much as a late-stage kernel, 31 times per forward."""
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125).train()
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()  # a first step builds what is built once
    counts = {"bind": 0, "module": 0}
    real_bind, real_init = inspect.Signature.bind, nn.Module.__init__

    def counting_bind(self, *args, **kwargs):
        counts["bind"] += 1
        return real_bind(self, *args, **kwargs)

    def counting_init(self, *args, **kwargs):
        counts["module"] += 1
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(inspect.Signature, "bind", counting_bind)
    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    model(images).sum().backward()
    models.apply_constraints(model)
    assert counts == {"bind": 0, "module": 0}


def test_compile_options_keep_the_kernels_layout_on_the_cpu_only() -> None:
    assert fused_ops.compile_options("cpu") == {"layout_optimization": False}
    assert fused_ops.compile_options(torch.device("cuda")) == {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_ops, "load_extension", lambda: None)
        assert fused_ops.compile_options("cpu") == {}


def test_backend_variable_is_validated(monkeypatch) -> None:
    monkeypatch.setenv(fused_ops.BACKEND_ENV, "fast")
    fused_ops.load_extension.cache_clear()
    try:
        with pytest.raises(ValueError, match="must be 'auto', 'torch' or 'cpp'"):
            fused_ops.load_extension()
        monkeypatch.setenv(fused_ops.BACKEND_ENV, "torch")
        fused_ops.load_extension.cache_clear()
        assert fused_ops.backend() == "torch"
    finally:
        fused_ops.load_extension.cache_clear()


def _float64_error(fn_fused, fn_reference, *inputs: torch.Tensor) -> tuple[float, float]:
    exact = fn_reference(*(t.double() for t in inputs))
    fused = (fn_fused(*inputs).double() - exact).abs().max().item()
    pytorch = (fn_reference(*inputs).double() - exact).abs().max().item()
    return fused, pytorch


@pytest.mark.parametrize("offset", [0.0, 20.0])
def test_kernels_are_about_as_accurate_as_pytorchs_float32(offset: float) -> None:
    """Against float64: the kernels' statistics must not be the weak link (a binary network amplifies it).

    Plain float sums over whole planes were several times less accurate than PyTorch's
    double-accumulating batch norm and flipped signs downstream (a fixture's logits moved
    by 50 %); the blocked double sums are within a small factor of PyTorch.
    """
    ext = fused_ops.load_extension()
    torch.manual_seed(0)
    b, r = torch.randn(4, 16, 32, 32) * 3 + offset, torch.randn(4, 16, 32, 32) + offset
    gate, gamma, beta = torch.rand(4, 16), torch.rand(16) + 0.5, torch.randn(16) * 0.1
    slope = torch.full((16,), 0.25)

    def stats() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(16), torch.ones(16)

    def bn_prelu_reference(x, gamma, beta, slope):
        return F.prelu(F.batch_norm(x, None, None, gamma, beta, True, 0.1, 1e-5), slope)

    def gated_reference(b, gate, r, gamma, beta):
        return F.batch_norm(gate[:, :, None, None] * b * r, None, None, gamma, beta, True, 0.1, 1e-5) + r

    errors = {
        "bn_prelu": _float64_error(
            lambda *a: ext.bn_prelu_forward(a[0], a[1], a[2], *stats(), 0.1, 1e-5, a[3], False)[0],
            bn_prelu_reference, b, gamma, beta, slope,
        ),
        "gated": _float64_error(
            lambda *a: ext.gated_bn_forward(a[0], a[1], a[2], True, a[3], a[4], *stats(), 0.1, 1e-5)[0],
            gated_reference, b, gate, r, gamma, beta,
        ),
    }  # fmt: skip
    for name, (fused, pytorch) in errors.items():
        assert fused <= 3 * pytorch, f"{name}: max error {fused:.2e} against float64, PyTorch's {pytorch:.2e}"


def _kernel_chain_results(threads: int, shape: tuple[int, int, int, int]) -> list[torch.Tensor]:
    # All three kernels, forward and backward, on a layer big enough to be split over threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        x, residual = _leaves(torch.randn(shape) * 2 + 1, torch.randn(shape))
        C = shape[1]
        move, sign, prelu, norm1, norm2 = (
            LearnableBias(C),
            HardSign(),
            models.layers.PReLU(C),
            _random_norm(C),
            _random_norm(C),
        )
        signs, x_mean, activated, shortcut = fused_ops.processor_inputs(
            x, move, sign, mean=True, prelu=prelu, shortcut=True
        )
        y, pooled = fused_ops.batch_norm_prelu(signs * 0.5 + activated, norm1, prelu, pooled=True)
        gated = fused_ops.gated_batch_norm_residual(y, torch.sigmoid(pooled + x_mean), residual, norm2, True)
        out = gated + shortcut
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        modules = (move, prelu, norm1, norm2)
        return (
            [out, x.grad, residual.grad]
            + [t for m in modules for t in (*m.parameters(), *m.buffers())]
            + [p.grad for m in modules for p in m.parameters()]
        )
    finally:
        torch.set_num_threads(previous)


# 32x32 planes: one sample per float block of the sums; 4x4 planes: 16 samples per block and
# an unfinished last one (20 samples), and 96 channels split unevenly over three threads.
@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (20, 96, 4, 4)])
def test_kernels_give_the_same_bits_on_any_number_of_threads(shape: tuple[int, int, int, int]) -> None:
    # Channels are split over threads whole, so every sum adds the same values in the same order.
    one, three = _kernel_chain_results(1, shape), _kernel_chain_results(3, shape)
    assert len(one) == len(three) > 10
    for i, (a, b) in enumerate(zip(one, three)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 3 threads"


@pytest.fixture
def sample_split_values():
    """Sets the largest activation the two-pass kernels split by samples; restores the default after the test."""
    extension = fused_ops.load_extension()
    default = extension.set_sample_split_values(0)
    extension.set_sample_split_values(default)
    yield extension.set_sample_split_values
    extension.set_sample_split_values(default)


# The batch-norm kernels split their work by samples (activations up to the limit) or by chunks of
# channels (larger ones): either way each channel's sums add the same values in the same order.
@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (20, 96, 4, 4), (3, 5, 7, 9)])
def test_kernels_give_the_same_bits_split_by_samples_or_by_channels(sample_split_values, shape) -> None:
    sample_split_values(0)  # every activation by channel chunks
    by_channels = _kernel_chain_results(3, shape)
    sample_split_values(1 << 40)  # every activation by samples
    by_samples = _kernel_chain_results(3, shape)
    assert len(by_channels) == len(by_samples) > 10
    for i, (a, b) in enumerate(zip(by_channels, by_samples)):
        assert torch.equal(a, b), f"result {i} differs between the two splits"


def test_sample_split_limit_is_validated_and_returns_the_previous_one(sample_split_values) -> None:
    default = sample_split_values(5)
    assert default == 1 << 23  # 32 MiB of float32: the development machine's last-level cache
    assert sample_split_values(7) == 5
    with pytest.raises(RuntimeError, match="must be >= 0 values"):
        sample_split_values(-1)
    assert sample_split_values(default) == 7


def test_squeeze_excitation_gates_train_by_matrix_products(monkeypatch) -> None:
    torch.manual_seed(9)
    gate = models.SqueezeExcite(32)
    pooled = torch.randn(4, 32, 1, 1, requires_grad=True)
    upstream = torch.randn(4, 32, 1, 1)
    leaves = [pooled, *gate.parameters()]
    with fused_ops.disabled():  # oneDNN's 1x1 convolutions
        expected = gate.gate_from_pooled(pooled)
        expected_grads = torch.autograd.grad(expected, leaves, upstream)
    calls: list[int] = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or real_linear(*a))
    actual = gate.gate_from_pooled(pooled)
    assert len(calls) == 2
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for a, e in zip(torch.autograd.grad(actual, leaves, upstream), expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation keeps the convolutions' bits
        assert torch.equal(gate.gate_from_pooled(pooled), expected.detach())
    gate.eval()  # so does evaluation mode with a gradient recorded (as a compiled eval graph runs)
    assert torch.equal(gate.gate_from_pooled(pooled).detach(), expected.detach()) and len(calls) == 2
    gate.train()
    handle = gate.se[1].register_forward_hook(lambda *args: None)  # a hooked layer runs as a module
    gate.gate_from_pooled(pooled)
    handle.remove()
    assert len(calls) == 3
    gate.se[1] = models.layers.quantized_copy(gate.se[1], bits=8)  # the 8-bit layer keeps its own forward
    gate.gate_from_pooled(pooled)
    assert len(calls) == 4


@pytest.mark.parametrize("frozen_scale", [False, True])
def test_recoupling_gate_is_one_node_with_the_modules_values(frozen_scale: bool) -> None:
    torch.manual_seed(3)
    se = models.SqueezeExcite(32)
    scale = torch.rand(1, 32, 1, 1).requires_grad_(not frozen_scale)
    mix_mean, b_mean = (torch.randn(6, 32, 1, 1, requires_grad=True) for _ in range(2))
    upstream = torch.randn(6, 32, 1, 1)
    leaves = [t for t in (scale, mix_mean, b_mean, *se.parameters()) if t.requires_grad]
    # The modules one by one, as a training step ran them before (the gate's 1x1 convolutions as products).
    expected = se.gate_from_pooled(scale * mix_mean + (1 - scale) * b_mean)
    expected_grads = torch.autograd.grad(expected, leaves, upstream)
    actual = fused_ops.recoupling_gate(scale, mix_mean, b_mean, se)
    assert type(actual.grad_fn).__name__ == "_RecouplingGateBackward"
    assert torch.equal(actual, expected)  # the same operators forward
    for a, e in zip(torch.autograd.grad(actual, leaves, upstream), expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_recoupling_gate_runs_the_modules_where_the_node_does_not_apply() -> None:
    torch.manual_seed(3)
    se = models.SqueezeExcite(32)
    scale, mix_mean, b_mean = torch.rand(1, 32, 1, 1), torch.randn(4, 32, 1, 1), torch.randn(4, 32, 1, 1)

    def node() -> str:
        return type(fused_ops.recoupling_gate(scale, mix_mean, b_mean, se).grad_fn).__name__

    assert node() == "_RecouplingGateBackward"
    se.eval()
    assert node() != "_RecouplingGateBackward"
    se.train()
    handle = se.se[3].register_forward_hook(lambda *args: None)  # hooks must run
    assert node() != "_RecouplingGateBackward"
    handle.remove()
    se.se[1] = models.layers.quantized_copy(se.se[1], bits=8)  # the 8-bit layer keeps its own forward
    assert node() != "_RecouplingGateBackward"


def _tail_case(channels: int = 32, batch: int = 4, plane: int = 3):
    torch.manual_seed(5)
    norm1, norm2 = _random_norm(channels), _random_norm(channels)
    prelu = models.layers.PReLU(channels)
    with torch.no_grad():
        prelu.weight.uniform_(0.1, 0.4)
    se = models.SqueezeExcite(channels)
    scale = nn.Parameter(torch.rand(1, channels, 1, 1))
    y, residual = (torch.randn(batch, channels, plane, plane, requires_grad=True) for _ in range(2))
    mix_mean = torch.randn(batch, channels, 1, 1, requires_grad=True)
    return (y, norm1, prelu, scale, mix_mean, se, residual, norm2)


def _three_functions(y, norm1, prelu, scale, mix_mean, se, residual, norm2, multiply_residual):
    # What processor_tail computes where its node does not apply (each function on its own fast path).
    b, b_mean = fused_ops.batch_norm_prelu(y, norm1, prelu, pooled=True)
    gate = fused_ops.recoupling_gate(scale, mix_mean, b_mean, se)
    return fused_ops.gated_batch_norm_residual(b, gate, residual, norm2, multiply_residual)


@pytest.mark.parametrize("plane", [1, 2, 3, 4, 9])  # the kernels' loops for 1, 4, 16 and other plane sizes
@pytest.mark.parametrize("multiply_residual", [True, False])
def test_processor_tail_is_one_node_with_the_bits_of_the_three_functions(multiply_residual: bool, plane: int) -> None:
    case = _tail_case(plane=plane)
    results = []
    for fn in (_three_functions, fused_ops.processor_tail):
        y, norm1, prelu, scale, mix_mean, se, residual, norm2 = copy.deepcopy(case)
        out = fn(y, norm1, prelu, scale, mix_mean, se, residual, norm2, multiply_residual)
        leaves = [y, residual, mix_mean, scale, *norm1.parameters(), *prelu.parameters(), *se.parameters()]
        leaves += list(norm2.parameters())
        grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        buffers = [*norm1.buffers(), *norm2.buffers()]
        results.append((out.grad_fn, out.detach(), grads, buffers))
    (three_node, *expected), (tail_node, *actual) = results
    assert type(tail_node).__name__ == "_ProcessorTailBackward"
    assert type(three_node).__name__ == "_GatedBatchNormBackward"
    for what, a, e in zip(("output", "gradients", "running statistics"), actual, expected):
        for a_t, e_t in zip(a, e) if isinstance(a, list | tuple) else [(a, e)]:
            assert torch.equal(a_t, e_t), what
    assert int(case[1].num_batches_tracked) == 0  # the copies counted their own batches


def test_processor_tail_runs_the_three_functions_where_its_node_does_not_apply() -> None:
    y, norm1, prelu, scale, mix_mean, se, residual, norm2 = _tail_case()

    def node() -> str:
        out = fused_ops.processor_tail(y, norm1, prelu, scale, mix_mean, se, residual, norm2, True)
        return type(out.grad_fn).__name__

    assert node() == "_ProcessorTailBackward"
    assert int(norm1.num_batches_tracked) == int(norm2.num_batches_tracked) == 1
    handle = norm2.register_forward_hook(lambda *args: None)  # hooks must run
    assert node() != "_ProcessorTailBackward"
    handle.remove()
    plain = se.se[1]
    se.se[1] = models.layers.quantized_copy(plain, bits=8)  # the 8-bit gate keeps its own forward
    assert node() != "_ProcessorTailBackward"
    se.se[1] = plain
    assert node() == "_ProcessorTailBackward"
    with fused_ops.disabled():
        assert node() != "_ProcessorTailBackward"
    norm1.eval()
    assert node() != "_ProcessorTailBackward"


def test_recoupling_gate_kernels_compute_what_the_pytorch_operators_compute(monkeypatch) -> None:
    torch.manual_seed(7)
    n, channels, hidden = 8, 64, 8
    scale, b1, b2 = torch.rand(1, channels, 1, 1), torch.randn(hidden), torch.randn(channels)
    mix_mean, b_mean = torch.randn(n, channels, 1, 1), torch.randn(n, channels, 1, 1)
    w1, w2 = torch.randn(hidden, channels, 1, 1), torch.randn(channels, hidden, 1, 1)
    grad_gate = torch.randn(n, channels)

    def gate_and_gradients():
        gate, saved = fused_ops._gate_forward(scale, mix_mean, b_mean, w1, b1, w2, b2)
        wants = (True,) * 7
        return gate, saved, fused_ops._gate_backward(grad_gate, gate, scale, mix_mean, b_mean, w1, w2, *saved, wants)

    calls = []
    extension = fused_ops.load_extension()
    monkeypatch.setattr(fused_ops, "load_extension", lambda: calls.append(1) or extension)
    gate, saved, grads = gate_and_gradients()
    assert len(calls) == 2  # the C++ forward and backward
    monkeypatch.setattr(fused_ops, "load_extension", lambda: None)
    expected_gate, expected_saved, expected_grads = gate_and_gradients()
    assert torch.equal(gate, expected_gate)  # the same operators forward: the same bits
    for actual, expected in zip(saved, expected_saved):
        assert torch.equal(actual.reshape(expected.shape), expected)
    for actual, expected, of in zip(grads, expected_grads, (scale, mix_mean, b_mean, w1, b1, w2, b2)):
        assert actual.shape == of.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_slope", [True, False], ids=["prelu", "no-prelu"])
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (4, 4), (3, 5), (9, 9)])
def test_gated_kernels_recompute_b_with_the_bits_of_the_stored_one(with_slope: bool, size: tuple[int, int]) -> None:
    """With bn_prelu_statistics' coefficients the gated kernels read bn_prelu_forward's input in
    place of its output and recompute the output: the same statistics, outputs and gradients."""
    ext = fused_ops.load_extension()
    torch.manual_seed(3)
    n, c = 6, 40
    y, residual, grad = (torch.randn(n, c, *size) for _ in range(3))
    gamma1, beta1, gamma2, beta2 = torch.rand(c) + 0.5, torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)
    slope = torch.empty(c).uniform_(-0.3, 0.4) if with_slope else torch.empty(0)
    gate = torch.rand(n, c)

    def statistics():  # the same running statistics on every call (the kernels update them in place)
        generator = torch.Generator().manual_seed(0)
        return torch.randn(c, generator=generator), torch.rand(c, generator=generator) + 0.5

    rm, rv = statistics()
    b, mean1, invstd1, pooled = ext.bn_prelu_forward(y, gamma1, beta1, rm, rv, 0.1, 1e-5, slope, True)
    rm_r, rv_r = statistics()
    stats = ext.bn_prelu_statistics(y, gamma1, beta1, rm_r, rv_r, 0.1, 1e-5, slope)
    mean1_r, invstd1_r, pooled_r, affine = stats
    for stored, recomputed in ((mean1, mean1_r), (invstd1, invstd1_r), (pooled, pooled_r), (rm, rm_r), (rv, rv_r)):
        assert torch.equal(stored, recomputed)
    assert affine.shape == (3, c)
    for multiply in (True, False):
        common = (gate, residual, multiply, gamma2, beta2)
        forward = [ext.gated_bn_forward(b, *common, *statistics(), 0.1, 1e-5)]
        forward.append(ext.gated_bn_forward(y, *common, *statistics(), 0.1, 1e-5, affine))
        for stored, recomputed in zip(*forward):
            assert torch.equal(stored, recomputed)
        _, mean2, invstd2 = forward[0]
        backward = [ext.gated_bn_backward(grad, b, gate, residual, multiply, gamma2, mean2, invstd2)]
        backward.append(ext.gated_bn_backward(grad, y, gate, residual, multiply, gamma2, mean2, invstd2, affine))
        for stored, recomputed in zip(*backward):
            assert torch.equal(stored, recomputed)


def test_gated_kernels_check_the_coefficients_they_recompute_b_with() -> None:
    ext = fused_ops.load_extension()
    y, gate = torch.randn(2, 3, 2, 2), torch.rand(2, 3)
    args = (y, gate, y, True, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="b_affine must be a contiguous float32 CPU tensor of 3 x 3"):
        ext.gated_bn_forward(*args, torch.ones(2, 3))


def _adamw_case(shape: tuple[int, ...]) -> tuple[torch.Tensor, models.AdamWUpdate]:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=generator)
    grad = torch.randn(shape, generator=generator) * 1e-2
    return weight, models.AdamWUpdate(grad, torch.zeros(shape), torch.zeros(shape), 1.0, 1e-2, 0.9, 0.999, 0.1, 1e-8)


@pytest.mark.parametrize("tap_major", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1e-9], ids=["progressive", "one", "signs"])
def test_the_one_pass_adamw_kernel_gives_torchs_adamw_and_constraint_bits(tap_major: bool, temperature: float) -> None:
    weight, update = _adamw_case((32, 48, 3, 3))
    reference = nn.Parameter(weight.clone())
    optimizer = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
    t = torch.tensor([temperature])
    for step in (1, 2, 3):
        reference.grad = update.grad.clone()
        optimizer.step()
        reference.data.clamp_(-1.5, 1.5)
        got = fused_ops.adamw_clamp_and_binarize_weight(
            weight, update._replace(step=float(step)), 1.5, t, 1e-7, tap_major
        )
        state = optimizer.state[reference]
        assert torch.equal(weight, reference.detach()) and weight.abs().max() == 1.5
        assert torch.equal(update.exp_avg, state["exp_avg"]) and torch.equal(update.exp_avg_sq, state["exp_avg_sq"])
        expected = fused_ops.binarize_weight(reference.detach(), t, 1e-7, tap_major)
        assert torch.equal(got, expected) and got.stride() == expected.stride()


@pytest.mark.parametrize("case", ["size", "beta1", "gradient layout", "float64"])
def test_the_one_pass_adamw_kernel_declines_what_it_would_not_compute_with_torchs_bits(case: str) -> None:
    weight, update = _adamw_case((3, 5, 3, 3) if case == "size" else (16, 8, 3, 3))  # 135 values: not a multiple of 16
    if case == "beta1":
        update = update._replace(beta1=0.5)
    elif case == "gradient layout":
        update = update._replace(grad=update.grad.contiguous(memory_format=torch.channels_last))
    elif case == "float64":
        weight = weight.double()
    before = weight.clone()
    assert fused_ops.adamw_clamp_and_binarize_weight(weight, update, 1.5, torch.ones(1), 1e-7, False) is None
    assert torch.equal(weight, before) and not update.exp_avg.any() and not update.exp_avg_sq.any()


def _many_case(case: str) -> list[torch.Tensor]:
    # A parameter of 16 x 8 x 3 x 3 values that the many-tensor kernel takes, or one it declines.
    generator = torch.Generator().manual_seed(5)
    param = torch.randn((3, 5, 3, 3) if case == "size" else (16, 8, 3, 3), generator=generator)
    grad = torch.randn(param.shape, generator=generator) * 1e-2
    if case == "float64":
        param, grad = param.double(), grad.double()
    elif case == "gradient layout":
        grad = grad.contiguous(memory_format=torch.channels_last)
    elif case == "gradient shape":
        grad = grad.flatten()
    return [param, grad, torch.zeros_like(param), torch.zeros_like(param), torch.tensor(0.0)]


def test_the_many_tensor_adamw_gives_torchs_bits_and_leaves_what_it_would_not_compute_so() -> None:
    cases = ["taken", "size", "taken", "float64", "gradient layout", "gradient shape"]
    lists = [list(values) for values in zip(*(_many_case(case) for case in cases), strict=True)]
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    references = [nn.Parameter(param.clone()) for param in params]
    optimizer = torch.optim.AdamW(references, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
    before = copy.deepcopy(lists)
    for _ in range(3):
        for reference, grad in zip(references, grads, strict=True):
            reference.grad = grad.reshape(reference.shape).clone()
        optimizer.step()
        left = fused_ops.adamw_update_many(*lists, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)
        assert left == [i for i, case in enumerate(cases) if case != "taken"]
    for i, case in enumerate(cases):
        tensors = [params[i], exp_avgs[i], exp_avg_sqs[i], steps[i]]
        if case == "taken":
            state = optimizer.state[references[i]]
            expected = [references[i].detach(), state["exp_avg"], state["exp_avg_sq"], state["step"]]
        else:  # untouched, the step count included: torch's kernel will count it
            expected = [before[0][i], before[2][i], before[3][i], before[4][i]]
        assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True)), case
    assert steps[0] == 3 and steps[1] == 0
    assert fused_ops.adamw_update_many(*lists, lr=1e-2, beta1=0.5, beta2=0.999, weight_decay=0.1, eps=1e-8) is None


@pytest.mark.parametrize("kernel", ["adamw_clamp_and_divide_clamp", "adamw_many"])
def test_a_cpu_whose_torch_rounds_otherwise_switches_both_adamw_kernels_off(monkeypatch, kernel: str) -> None:
    real = fused_ops.load_extension()

    def one_step_off(*args):  # the kernel's update of its first weight one float32 step away from torch's
        out = getattr(real, kernel)(*args)
        weight = args[0][0] if kernel == "adamw_many" else args[0]
        weight.copy_(torch.nextafter(weight, torch.full_like(weight, 2.0)))
        return out

    other = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("_")})
    setattr(other, kernel, one_step_off)
    monkeypatch.setattr(fused_ops, "load_extension", lambda: other)
    monkeypatch.setattr(fused_ops, "_adamw_matches", None)  # not checked yet
    with pytest.warns(UserWarning, match="do not reproduce torch's fused AdamW"):
        assert not fused_ops.adamw_kernel_matches_torch()
    weight, update = _adamw_case((16, 8, 3, 3))
    assert fused_ops.adamw_clamp_and_binarize_weight(weight, update, 1.5, torch.ones(1), 1e-7, False) is None
    assert not update.exp_avg.any()
    many = [[weight], [update.grad], [update.exp_avg], [update.exp_avg_sq], [torch.tensor(0.0)]]
    assert fused_ops.adamw_update_many(*many, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8) is None
    monkeypatch.undo()  # the real kernel and its check's result again
    assert fused_ops.adamw_kernel_matches_torch()


def test_a_build_from_before_the_one_pass_adamw_leaves_the_update_to_torch(monkeypatch) -> None:
    real = fused_ops.load_extension()
    older = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("_")})
    del older.adamw_clamp_and_divide_clamp  # e.g. a baseline build of benchmarks/fused_kernels_ab.py
    del older.adamw_many
    monkeypatch.setattr(fused_ops, "load_extension", lambda: older)
    weight, update = _adamw_case((16, 8, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fused_ops.adamw_kernel_matches_torch()
        assert fused_ops.adamw_clamp_and_binarize_weight(weight, update, 1.5, torch.ones(1), 1e-7, False) is None
        many = [[weight], [update.grad], [update.exp_avg], [update.exp_avg_sq], [torch.tensor(0.0)]]
        assert fused_ops.adamw_update_many(*many, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8) is None
