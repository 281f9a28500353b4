"""Binarization primitives: sign STE, progressive weight binarization, constraints, precision tags."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models import fused_ops
from models.layers import BinaryConv2d
from models.quantizers import MIN_TEMPERATURE, HardSign, progressive_binarize, sign_ste


def test_sign_forward_is_exact_and_keeps_zero() -> None:
    x = torch.tensor([-2.0, -0.3, 0.0, 1e-9, 0.7, 3.0])
    assert torch.equal(HardSign()(x), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0, 1.0]))


def test_sign_gradient_passes_inside_clip_only() -> None:
    x = torch.tensor([-1.6, -1.5, -1.0, 0.2, 1.5, 1.50001, 4.0], requires_grad=True)
    HardSign()(x).backward(torch.arange(1.0, 8.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_gradient_clip_is_inclusive_to_the_last_bit(dtype: torch.dtype) -> None:
    # The official STE is the gradient of clamp(x, -1.5, 1.5): 1 at exactly ±1.5, 0 one step beyond.
    clip = torch.tensor(1.5, dtype=dtype)
    beyond = torch.nextafter(clip, torch.tensor(math.inf, dtype=dtype))
    below = torch.nextafter(clip, torch.tensor(0.0, dtype=dtype))
    x = torch.stack([-beyond, -clip, -below, below, clip, beyond]).requires_grad_(True)
    sign_ste(x, 1.5).backward(torch.ones_like(x))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_sign_saves_nothing_without_a_gradient() -> None:
    x = torch.randn(4, 8)
    with torch.no_grad():
        y = sign_ste(x)
    assert y.grad_fn is None and torch.equal(y, torch.sign(x))


# A trained float32 conv weight (requires grad) takes the one-pass C++ kernel where it is
# built (models.fused_ops.divide_clamp); a buffer-like one the PyTorch operators. Same bits.
TRAINED = pytest.mark.parametrize("trained", [False, True], ids=["operators", "trained"])


@TRAINED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_hard_binarization_is_exactly_sign_even_for_subnormal_weights(dtype: torch.dtype, trained: bool) -> None:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 1024, 1e-30, 0.3, -1.4, info.max]
    weight = torch.tensor(values, dtype=dtype).view(-1, 1, 1, 1).requires_grad_(trained)
    out = progressive_binarize(weight, torch.tensor([5e-8], dtype=dtype), 1e-7)
    assert torch.equal(out, torch.sign(weight))


@TRAINED
# The kernel multiplies by the reciprocal of a power-of-two temperature (0.5, 2**-26) and divides otherwise.
@pytest.mark.parametrize("temperature", [1.0, 0.3, 0.5, 1e-7, 5e-9, 2**-26])
def test_soft_binarization_is_the_official_formula_bit_for_bit(temperature: float, trained: bool) -> None:
    weight = torch.randn(64, 32, 3, 3) * 1e-3
    weight[0, 0, 0, :] = torch.tensor([math.nan, 0.0, -0.0])
    tiny = torch.finfo(torch.float32).tiny
    weight[0, 1, 0, :] = torch.tensor([tiny / 4, -tiny / 1024, 3 * tiny])  # subnormal and near-subnormal values
    t = torch.tensor([temperature])
    expected = (weight / t.clamp(min=MIN_TEMPERATURE)).clamp(-1.0, 1.0)
    # 5e-9 and 2**-26 are below the threshold 1e-7 but above 1e-9: exact sign there.
    threshold = 1e-9 if temperature < 1e-7 else 1e-7
    out = progressive_binarize(weight.requires_grad_(trained), t, threshold)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert torch.equal(out.signbit(), expected.signbit())  # -0.0 stays -0.0


@pytest.mark.parametrize("threshold", [1e-7, 1e-5])
@pytest.mark.parametrize("step", [-1, 0, 1], ids=["below", "at", "above"])
def test_kernel_and_operators_pick_the_same_regime_at_the_threshold(threshold: float, step: int) -> None:
    """The kernel path picks its divisors on the host: in float32, as the operators compare on the tensor."""
    at = torch.tensor([threshold])  # float32: the threshold as the comparison sees it
    towards = torch.tensor([math.inf if step > 0 else 0.0])
    t = at if step == 0 else torch.nextafter(at, towards)
    weight = torch.randn(16, 8, 3, 3) * threshold
    by_operators = progressive_binarize(weight, t, threshold)
    by_kernel = progressive_binarize(weight.clone().requires_grad_(True), t, threshold)
    assert torch.equal(by_kernel, by_operators)
    assert torch.equal(by_kernel, torch.sign(weight)) == (step < 0)


# 37 input channels: two blocks of 16 that the kernel transposes in registers, and a rest of 5; 32:
# rows whose 16-channel blocks start cache lines, which the kernel streams past the caches.
@pytest.mark.parametrize("in_channels", [5, 32, 37])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 5e-9])
def test_tap_major_binarization_has_the_same_values(temperature: float, in_channels: int) -> None:
    torch.manual_seed(8)
    weight = (torch.randn(6, in_channels, 3, 3) * 0.8).requires_grad_(True)
    t = torch.tensor([temperature])
    plain = progressive_binarize(weight, t, 1e-7)
    tap_major = progressive_binarize(weight, t, 1e-7, tap_major=True)
    assert torch.equal(tap_major, plain) and plain.is_contiguous()
    # The one-pass kernel (where it is built) writes channels-last; the operators keep the weight's layout.
    assert tap_major.is_contiguous(memory_format=torch.channels_last) == (fused_ops.backend() == "cpp")
    grad = torch.randn(6, in_channels, 3, 3)
    (tap_major * grad).sum().backward()
    assert torch.equal(weight.grad, grad)


def test_activation_temperature_does_not_change_the_sign() -> None:
    sign = HardSign()
    x = torch.randn(100)
    before = sign(x)
    sign.temperature.fill_(1e-3)
    assert torch.equal(sign(x), before)


def test_weight_binarization_follows_the_temperature() -> None:
    conv = BinaryConv2d(1, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.5]).view(1, 1, 1, 1))
    for temperature, expected in ((1.0, 0.5), (0.25, 1.0), (2.0, 0.25), (1e-6, 1.0), (1e-8, 1.0)):
        conv.temperature.fill_(temperature)
        assert conv.binary_weight().item() == expected
    with torch.no_grad():
        conv.weight.fill_(-1e-9)
    conv.temperature.fill_(1e-6)  # soft: -1e-9 / 1e-6
    assert abs(conv.binary_weight().item() + 1e-3) < 1e-9
    conv.temperature.fill_(5e-8)  # below the 1e-7 threshold: exact sign, whatever |W|
    assert conv.binary_weight().item() == -1.0


def test_weight_gradient_is_identity() -> None:
    conv = BinaryConv2d(2, 3, kernel_size=3)
    with torch.no_grad():
        conv.weight.uniform_(-1.4, 1.4)
    conv.temperature.fill_(0.1)  # most weights saturate, yet the gradient is not masked
    upstream = torch.randn_like(conv.weight)
    conv.binary_weight().backward(upstream)
    assert torch.equal(conv.weight.grad, upstream)


def test_temperature_is_a_state_dict_buffer() -> None:
    conv = BinaryConv2d(8, 8)
    conv.temperature.fill_(0.25)
    state = conv.state_dict()
    assert state["temperature"].item() == 0.25
    assert "temperature" not in dict(conv.named_parameters())


def test_constraints_clip_latent_weights_and_recoupling_mix() -> None:
    model = models.create_model("bnext_tiny", num_classes=4, stem="cifar", width_mult=0.25)
    block = model.feature[2].Attention
    with torch.no_grad():
        block.binary_conv.weight.fill_(3.0)
        block.binary_conv.weight[0].fill_(-2.0)
        block.scale.fill_(1.7)
        block.scale[0, 0].fill_(-0.2)
    models.apply_constraints(model)
    assert block.binary_conv.weight.max().item() == 1.5
    assert block.binary_conv.weight.min().item() == -1.5
    assert block.scale.max().item() == 1.0 and block.scale.min().item() == 0.0


def test_set_temperature_reaches_every_binarizer() -> None:
    model = models.create_model("bnext18", num_classes=10, stem="cifar", width_mult=0.125)
    models.set_temperature(model, 0.125)
    temps = {m.temperature.item() for m in models.binarizers(model)}
    assert temps == {0.125}
    assert models.get_temperature(model) == 0.125
    count = sum(1 for m in model.modules() if isinstance(m, (HardSign, BinaryConv2d)))
    assert count == 2 * 16  # 16 processors, each with a sign and a binary conv


def test_precision_tags_drive_parameter_bits() -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25)
    binary = dict(models.latent_binary_parameters(model))
    convs = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == len(convs) == 13 + 13 + 5  # 3x3 per block, 1x1 per block, one more per doubling block
    assert all(name.endswith("binary_conv.weight") for name in binary)
    precision = models.layer_precision(convs[0])
    assert precision.is_binary and precision.weight_bits == 1 and precision.input_bits == 1
    assert models.layer_precision(model.fc) == models.LayerPrecision(32, 32)
    assert models.layer_precision(model.prelu) is None
    bits = models.parameter_bits(model)
    assert {bits[name] for name in binary} == {1}
    assert {b for name, b in bits.items() if name not in binary} == {32}


def test_set_temperature_rejects_non_positive() -> None:
    model = models.create_model("bnext_tiny", num_classes=2, width_mult=0.25)
    for bad in (0.0, -1.0, float("nan")):
        try:
            models.set_temperature(model, bad)
        except ValueError as error:
            assert "positive" in str(error)
        else:
            raise AssertionError(f"accepted temperature {bad}")
