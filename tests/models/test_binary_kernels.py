"""Bit packing, the XNOR/popcount convolution (C++ and pure PyTorch) and the exactness of the binary path."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import models
from models import binary_kernels, bitpack
from models.binary_inference import (
    ChannelAffine,
    PackedBinaryConv2d,
    binary_layers,
    convert_to_binary,
    randomize_for_inference,
)
from models.blocks import Processor
from models.layers import BinaryConv2d
from models.quantizers import LearnableBias

RESOLUTION = 16


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch) -> str:
    """Run a test with the compiled kernel and again with the forced pure-PyTorch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(binary_kernels, "load_extension", lambda: None)
    elif binary_kernels.load_extension() is None:
        message = "the XNOR C++ extension could not be built here (C++ compiler or ninja missing)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return request.param


def _small_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create_model(name, num_classes=10, stem="cifar", width_mult=0.25)
    return randomize_for_inference(model, torch.randn(8, 3, RESOLUTION, RESOLUTION), seed=seed)


@pytest.mark.parametrize("channels", [1, 13, 63, 64, 65, 130])
def test_pack_unpack_round_trip(channels: int) -> None:
    generator = torch.Generator().manual_seed(channels)
    bits = torch.rand(3, 5, channels, generator=generator) < 0.5
    words = bitpack.pack_bits(bits)
    assert words.dtype == torch.int64 and words.shape == (3, 5, bitpack.words_for(channels))
    assert torch.equal(bitpack.unpack_bits(words, channels), bits)
    # Bit c % 64 of word c // 64, and the unused high bits of the last word stay 0.
    flat = bits.reshape(-1, channels)[0]
    expected = [sum(int(b) << i for i, b in enumerate(flat[j : j + 64].tolist())) for j in range(0, channels, 64)]
    got = [w & ((1 << 64) - 1) for w in words.reshape(-1, words.shape[-1])[0].tolist()]
    assert got == expected
    signs = torch.where(bits, -1.0, 1.0)
    assert torch.equal(bitpack.unpack_signs(bitpack.pack_signs(signs), channels), signs)
    weights = torch.where(torch.rand(4, channels, 3, 3, generator=generator) < 0.5, -1.0, 1.0)
    assert torch.equal(bitpack.unpack_weights(bitpack.pack_weights(weights), channels), weights)


def test_popcount64_matches_python() -> None:
    values = torch.randint(-(2**63), 2**63 - 1, (1000,), dtype=torch.int64)
    values = torch.cat([values, torch.tensor([0, -1, 1, -(2**63), 2**63 - 1])])
    expected = [bin(v & ((1 << 64) - 1)).count("1") for v in values.tolist()]
    assert bitpack.popcount64(values).tolist() == expected


def _ternary_reference(x, threshold, weight_signs, stride, padding):
    return F.conv2d(torch.sign(x - threshold.view(1, -1, 1, 1)), weight_signs, stride=stride, padding=padding)


@pytest.mark.parametrize(
    "batch,channels,out_channels,height,width,kernel,stride",
    [
        (1, 13, 5, 7, 9, 3, 1),  # odd channels, odd and unequal spatial size
        (2, 70, 19, 8, 6, 3, 2),  # stride 2, two words, output channels not a multiple of 16
        (1, 130, 33, 9, 9, 3, 2),  # odd size with stride 2 (floor), three words
        (2, 64, 64, 5, 5, 1, 1),  # 1x1, exactly one word
        (1, 3, 17, 4, 4, 3, 1),  # fewer channels than a byte
        (1, 40, 16, 3, 3, 3, 1),  # every position touches the padding
    ],
)
def test_xnor_conv_matches_float_conv(backend, batch, channels, out_channels, height, width, kernel, stride) -> None:
    generator = torch.Generator().manual_seed(channels * 100 + out_channels)
    x = torch.randn(batch, channels, height, width, generator=generator)
    threshold = torch.randn(channels, generator=generator) * 0.3
    weight_signs = torch.where(torch.rand(out_channels, channels, kernel, kernel, generator=generator) < 0.5, -1.0, 1.0)
    padding = kernel // 2
    packed_weights = bitpack.pack_weights(weight_signs)
    packed, zeros = binary_kernels.pack_activations(x, threshold, padding)
    assert zeros == 0
    assert torch.equal(packed, bitpack.pack_activations(x, threshold, padding)[0])
    y = binary_kernels.xnor_conv2d(
        packed,
        packed_weights,
        binary_kernels.prepare_weights(packed_weights),
        bitpack.tap_sums(packed_weights, channels),
        channels,
        stride,
        padding,
        height,
        width,
    )
    assert torch.equal(y, _ternary_reference(x, threshold, weight_signs, stride, padding))


def _packed_layer(channels: int, out_channels: int, kernel: int, stride: int, generator: torch.Generator):
    move = LearnableBias(channels)
    conv = BinaryConv2d(channels, out_channels, kernel, stride)
    with torch.no_grad():
        move.bias.copy_(torch.randn(move.bias.shape, generator=generator))
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.temperature.fill_(1e-12)
    return move, conv


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_exact_zeros_follow_the_float_model(backend, kernel, stride) -> None:
    """sign(0) = 0 for inputs on their threshold and for zero weights, as in the float model."""
    generator = torch.Generator().manual_seed(kernel + stride)
    move, conv = _packed_layer(21, 18, kernel, stride, generator)
    with torch.no_grad():
        conv.weight[3, 5] = 0.0
        conv.weight[7, :, 0, 0] = 0.0
    x = torch.randn(2, 21, 7, 7, generator=generator)
    on_threshold = torch.rand(x.shape, generator=generator) < 0.1
    x = torch.where(on_threshold, -move.bias.detach().expand_as(x), x)
    layer = PackedBinaryConv2d.from_float(move, conv)
    assert layer.weight_zero_index.shape[0] == int((conv.weight == 0).sum())
    with torch.no_grad():
        expected = conv(torch.sign(move(x)))
    assert int((torch.sign(move(x)) == 0).sum()) == int(on_threshold.sum())
    assert torch.equal(layer(x), expected)


def test_threshold_fold_is_exact_in_float32() -> None:
    """sign(x + beta) == sign(x - (-beta)) even when x + beta rounds, underflows or cancels."""
    beta = torch.tensor([0.1, -0.3, 1e-38, -1e-45, 0.0, 3.0e7, 1.0])
    base = torch.randn(4096, 1) * torch.tensor([1.0, 1.0, 1e-38, 1e-44, 1e-30, 3.0e7, 1.0])
    edges = torch.stack(
        [
            -beta,
            torch.nextafter(-beta, torch.full_like(beta, float("inf"))),
            torch.nextafter(-beta, torch.full_like(beta, -float("inf"))),
        ]
    )
    x = torch.cat([base, edges])
    assert torch.equal(torch.sign(x + beta), torch.sign(x - (-beta)))
    packed, zeros = bitpack.pack_activations(x.t().reshape(1, 7, -1, 1), -beta, 0)
    assert zeros == int((x + beta == 0).sum())


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_binary_path_is_bit_identical_without_folding(name: str) -> None:
    """Every model size: the packed path with the float model's own real-valued ops gives the same logits."""
    model = _small_model(name)
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    converted = convert_to_binary(model, fold=False)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_folded_binary_path_integers_and_logits(name: str) -> None:
    """Same integers before the first real-valued op in every binary layer; logits equal to float32 rounding."""
    model = _small_model(name)
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(2))
    inputs, outputs = {}, {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, Processor):
            hooks.append(module.move.register_forward_hook(_store_input(inputs, module_name)))
            hooks.append(module.binary_conv.register_forward_hook(_store_output(outputs, module_name)))
    with torch.no_grad():
        reference = model(x)
    for hook in hooks:
        hook.remove()
    converted = convert_to_binary(model, fold=True)
    layers = binary_layers(converted)
    assert len(layers) == len(inputs) > 0
    with torch.no_grad():
        for layer_name, layer in layers:
            processor = layer_name.rsplit(".", 1)[0]
            assert torch.equal(layer.integer_output(inputs[processor]), outputs[processor]), layer_name
        logits = converted(x)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def _store_input(store: dict, key: str):
    def hook(module, args, output):
        store[key] = args[0].detach().clone()

    return hook


def _store_output(store: dict, key: str):
    def hook(module, args, output):
        store[key] = output.detach().clone()

    return hook


def test_fallback_path_matches_compiled_path(monkeypatch) -> None:
    """A whole model through the forced pure-PyTorch fallback gives the same logits as the float model."""
    monkeypatch.setenv(binary_kernels.BACKEND_ENV, "torch")
    binary_kernels.load_extension.cache_clear()
    try:
        assert binary_kernels.backend() == "torch"
        model = _small_model("bnext18")
        x = torch.randn(1, 3, RESOLUTION, RESOLUTION)
        with torch.no_grad():
            reference = model(x)
            assert torch.equal(convert_to_binary(model, fold=False)(x), reference)
            folded = convert_to_binary(model, fold=True)(x)
        torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    finally:
        binary_kernels.load_extension.cache_clear()


def test_failed_build_warns_and_falls_back(monkeypatch) -> None:
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise OSError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setenv(binary_kernels.BACKEND_ENV, "auto")
    binary_kernels.load_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="pure-PyTorch fallback"):
            assert binary_kernels.load_extension() is None
        binary_kernels.load_extension.cache_clear()
        monkeypatch.setenv(binary_kernels.BACKEND_ENV, "cpp")
        with pytest.raises(RuntimeError, match="could not be built"):
            binary_kernels.load_extension()
        binary_kernels.load_extension.cache_clear()
        monkeypatch.setenv(binary_kernels.BACKEND_ENV, "torch")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert binary_kernels.load_extension() is None
    finally:
        binary_kernels.load_extension.cache_clear()


def test_conversion_refuses_progressive_weights() -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25)
    with pytest.raises(ValueError, match="not below the sign threshold"):
        convert_to_binary(model)


def test_fused_epilogue_matches_the_modules(backend) -> None:
    """prelu(batch_norm(y)) applied by the conv as it stores y has the bits of the two PyTorch modules."""
    generator = torch.Generator().manual_seed(5)
    move, conv = _packed_layer(40, 35, 3, 1, generator)
    layer = PackedBinaryConv2d.from_float(move, conv)
    norm = torch.nn.BatchNorm2d(35).eval()
    prelu = torch.nn.PReLU(35)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(35, generator=generator))
        norm.bias.copy_(torch.randn(35, generator=generator))
        norm.running_mean.copy_(torch.randn(35, generator=generator) * 3)
        norm.running_var.copy_(torch.rand(35, generator=generator) + 0.5)
        prelu.weight.copy_(torch.randn(35, generator=generator))
    affine = ChannelAffine.from_batch_norm(norm)
    x = torch.randn(2, 40, 9, 11, generator=generator)
    with torch.no_grad():
        expected = prelu(affine(layer.integer_output(x)))
        layer.fuse_epilogue(affine, prelu)
        assert torch.equal(layer(x), expected)


def test_fused_tail_ops(backend) -> None:
    """The info-recoupling tail: same bits as the PyTorch ops for the output pass, the mean to rounding."""
    generator = torch.Generator().manual_seed(6)
    b, x_mix, residual = (torch.randn(2, 24, 7, 9, generator=generator) for _ in range(3))
    gate = torch.rand(1, 24, 1, 1, generator=generator)
    mean = binary_kernels.mix_mean(b, x_mix, gate)
    torch.testing.assert_close(mean, (gate * x_mix + (1 - gate) * b).mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    s = torch.rand(2, 24, generator=generator)
    scale, shift = torch.randn(24, generator=generator), torch.randn(24, generator=generator)
    affine = ChannelAffine(24)
    affine.scale.copy_(scale)
    affine.shift.copy_(shift)
    gated = s.view(2, 24, 1, 1) * b
    for multiply in (True, False):
        expected = affine(gated * residual if multiply else gated) + residual
        got = binary_kernels.gate_affine_residual(b, s, residual, scale, shift, multiply)
        assert torch.equal(got, expected)


def test_pool2x2_prelu_matches_the_model(backend) -> None:
    """Stride-2 ELM shortcuts in one pass: the bits of F.avg_pool2d(x, 2, 2), odd sizes included."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 19, 9, 7, generator=generator)
    prelu = torch.nn.PReLU(19)
    with torch.no_grad():
        prelu.weight.copy_(torch.randn(19, generator=generator))
        pooled, pooled_prelu = binary_kernels.pool2x2_prelu(x, prelu.weight)
        assert torch.equal(pooled, F.avg_pool2d(x, 2, 2))
        assert torch.equal(pooled_prelu, F.avg_pool2d(prelu(x), 2, 2))


def test_benchmark_script_runs_on_a_small_model() -> None:
    """benchmarks/binary_inference.py: shapes, the three convolutions (checked equal inside) and the table."""
    from benchmarks import binary_inference as bench

    torch.backends.quantized.engine = bench._quantized_engine()
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25).eval()
    shapes = bench.binary_conv_shapes(model, RESOLUTION)
    assert {shape["k"] for shape in shapes} == {1, 3} and any(shape["stride"] == 2 for shape in shapes)
    threads = torch.get_num_threads()
    try:
        rows = bench.bench_shapes(shapes[:2], [1], repeats=1)
    finally:
        torch.set_num_threads(threads)
    report = bench.format_report(rows, [], float("nan"), RESOLUTION, torch.backends.quantized.engine)
    assert "float/binary" in report and report.count("\n| 3x3") >= 1
