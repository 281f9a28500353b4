"""The 8-bit variant of the real-valued parts: the fake quantizer, the quantized layers, the factory switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.layers import QuantConv2d, QuantLinear
from models.precision import LayerPrecision, layer_precision, parameter_bits
from models.quantizers import fake_quantize


def test_fake_quantize_uses_2_to_the_bits_levels_per_slice_and_keeps_the_extremes() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 500) * torch.tensor([[1.0], [10.0], [0.01]])
    q = fake_quantize(x, bits=4)
    for row, q_row in zip(x, q):
        assert q_row.unique().numel() <= 16
        assert torch.allclose(q_row.min(), row.min()) and torch.allclose(q_row.max(), row.max())
        step = (row.max() - row.min()) / 15
        # Rounding to the nearest level: at most half a step away, per slice (rows have different ranges).
        assert (q_row - row).abs().max() <= step / 2 * (1 + 1e-5)


def test_fake_quantize_keeps_a_constant_slice_and_clips_outliers() -> None:
    constant = torch.full((2, 1, 1, 1), 0.37)
    assert torch.equal(fake_quantize(constant, bits=8), constant)
    x = torch.tensor([[-100.0, 0.0, 3.0, 100.0]])
    q = fake_quantize(x, bits=8, clip=25.0)
    assert q.min() == -25.0 and q.max() == 25.0


def test_fake_quantize_gradient_is_straight_through_inside_the_clip() -> None:
    x = torch.tensor([[-30.0, -1.2, 0.4, 24.9, 26.0]], requires_grad=True)
    fake_quantize(x, bits=8, clip=25.0).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("bits", [1, 17, 32])
def test_fake_quantize_rejects_unsupported_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="2 to 16 bits"):
        fake_quantize(torch.ones(2, 2), bits)


def test_quantized_layers_carry_their_bits_and_stay_near_the_float_layer() -> None:
    torch.manual_seed(0)
    conv = QuantConv2d(16, 8, 3, padding=1, bits=8)
    linear = QuantLinear(16, 4, bits=8)
    assert layer_precision(conv) == LayerPrecision(8, 8) and layer_precision(linear) == LayerPrecision(8, 8)
    x = torch.randn(2, 16, 6, 6)
    float_out = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    error = (conv(x) - float_out).abs().max() / float_out.abs().max()
    assert 0 < error < 0.02  # quantized (not the float result), but only by 8-bit rounding
    low = QuantConv2d(16, 8, 3, padding=1, bits=2)
    low.load_state_dict(conv.state_dict())
    assert (low(x) - float_out).abs().max() > (conv(x) - float_out).abs().max()


@pytest.mark.parametrize("name", ["bnext_tiny", "bnext18"])
def test_real_bits_8_quantizes_every_real_layer_and_keeps_the_checkpoint_keys(name: str) -> None:
    torch.manual_seed(0)
    float_model = models.create_model(name, num_classes=10, stem="cifar", width_mult=0.25).eval()
    quant_model = models.create_model(name, num_classes=10, stem="cifar", width_mult=0.25, real_bits=8).eval()
    assert list(quant_model.state_dict()) == list(float_model.state_dict())
    quant_model.load_state_dict(float_model.state_dict())

    precisions = [(n, layer_precision(m), m) for n, m in quant_model.named_modules() if layer_precision(m)]
    assert all(p.is_binary or (p.weight_bits, p.input_bits) == (8, 8) for _, p, _ in precisions)
    real = [(n, m) for n, p, m in precisions if not p.is_binary]
    assert isinstance(real[-1][1], QuantLinear)
    # Only the first convolution, which sees the image, is left without an input quantizer.
    assert [n for n, m in real if isinstance(m, QuantConv2d) and not m.quantize_input] == [real[0][0]]
    bits = parameter_bits(quant_model)
    assert {bits[f"{n}.weight"] for n, _ in real} == {8}

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = float_model(x), quant_model(x)
    assert not torch.equal(got, expected)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_the_8_bit_model_passes_gradients_where_the_float_model_does() -> None:
    x = torch.randn(4, 3, 32, 32)

    def without_gradient(real_bits: int) -> list[str]:
        torch.manual_seed(0)
        model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25, real_bits=real_bits)
        model(x).logsumexp(1).sum().backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]

    # At initialization a few gates upstream of near-zero binary weights get exactly zero
    # gradient in both variants; the quantizers' straight-through gradients add no other gap.
    assert without_gradient(8) == without_gradient(32)


@pytest.mark.parametrize("real_bits", [1, 17, 8.0, "8"])
def test_real_bits_must_be_32_or_2_to_16(real_bits) -> None:
    with pytest.raises(ValueError, match="real_bits"):
        models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25, real_bits=real_bits)
