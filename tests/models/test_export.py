"""The 1-bit inference file (export, load, same logits), the folded affine algebra, int8 and ONNX."""

from __future__ import annotations

import json
import os

import pytest
import torch

import models
from models import bitpack
from models.binary_inference import ChannelAffine, PackedBinaryConv2d, randomize_for_inference
from models.export import (
    dequantize_int8,
    export_inference,
    load_inference_model,
    main,
    model_config,
    quantize_int8,
    read_inference_file,
)
from models.layers import BinaryConv2d
from models.precision import parameter_bits

RESOLUTION = 16


def _small_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10, stem="cifar", width_mult=0.25, **kwargs)
    return randomize_for_inference(model, torch.randn(8, 3, RESOLUTION, RESOLUTION))


def _inputs(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))


def test_batch_norm_fold_algebra() -> None:
    """BN(x) = x * a + c with a = gamma / sqrt(var + eps), c = beta - mean * a, negative gammas included."""
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.BatchNorm2d(37, eps=1e-3).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37, generator=generator))
        norm.bias.copy_(torch.randn(37, generator=generator))
        norm.running_mean.copy_(torch.randn(37, generator=generator) * 5)
        norm.running_var.copy_(torch.rand(37, generator=generator) * 3 + 1e-3)
    affine = ChannelAffine.from_batch_norm(norm)
    x = torch.randint(-200, 200, (2, 37, 5, 5)).float()  # binary conv outputs are integers
    expected = (x.double() - norm.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(
        norm.running_var.double().view(1, -1, 1, 1) + norm.eps
    ) * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(affine(x).double(), expected, rtol=2e-6, atol=1e-5)
        torch.testing.assert_close(affine(x), norm(x), rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["bnext_tiny", "bnext18"])
def test_export_round_trip(tmp_path, name: str) -> None:
    model = _small_model(name)
    path = tmp_path / f"{name}.safetensors"
    export_inference(model, name, path)
    loaded = load_inference_model(path)
    x = _inputs()
    with torch.no_grad():
        reference = model(x)
        logits = loaded(x)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert loaded.export_metadata["model"] == name
    assert json.loads(loaded.export_metadata["config"]) == model_config(model)


def test_export_of_the_8_bit_variant(tmp_path) -> None:
    """create_model(real_bits=8): the loaded model keeps the fake-quantized real-valued layers."""
    model = _small_model("bnext_tiny", real_bits=8)
    path = tmp_path / "q8.safetensors"
    export_inference(model, "bnext_tiny", path)
    loaded = load_inference_model(path)
    assert json.loads(loaded.export_metadata["config"])["real_bits"] == 8
    x = _inputs()
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(loaded(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_file_holds_one_bit_per_binary_weight(tmp_path) -> None:
    model = _small_model("bnext_tiny")
    path = tmp_path / "tiny.safetensors"
    export_inference(model, "bnext_tiny", path)
    tensors, _ = read_inference_file(path)
    packed = {key: value for key, value in tensors.items() if key.endswith("packed_weight")}
    bits = parameter_bits(model)
    latent = {name: p for name, p in model.named_parameters() if bits[name] == 1}
    assert len(packed) == len(latent) > 0
    for key, words in packed.items():
        weight = latent[key.replace("packed_weight", "weight")]
        assert words.dtype == torch.int64
        assert words.shape[-1] == bitpack.words_for(weight.shape[1])
        assert torch.equal(bitpack.unpack_weights(words, weight.shape[1]), torch.where(weight < 0, -1.0, 1.0))
    # No float copy of a binary weight, no batch-norm statistics, no temperatures.
    assert not any(key.endswith(("running_mean", "running_var", "temperature")) for key in tensors)
    assert not any(key.endswith("binary_conv.weight") for key in tensors)
    binary_bits = sum(p.numel() for p in latent.values())
    stored_packed = sum(w.numel() * 8 for w in packed.values())
    # 64-channel words waste at most the padding of the last word per (o, kh, kw).
    assert stored_packed * 8 < binary_bits * 2.1


def test_int8_export(tmp_path) -> None:
    """int8 weights round to within half a step, and the loaded model is the float model with those weights."""
    model = _small_model("bnext_tiny")
    path = tmp_path / "tiny_int8.safetensors"
    export_inference(model, "bnext_tiny", path, int8=True)
    tensors, metadata = read_inference_file(path)
    quantized = json.loads(metadata["int8"])
    assert "fc.weight" in quantized and "feature.0.conv1.weight" in quantized
    float_state = model.state_dict()
    rounded = {}
    for key in quantized:
        q, scale = tensors[key + ".q"], tensors[key + ".qscale"]
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0],)
        weight = float_state[key]
        step = scale.view(-1, *([1] * (weight.dim() - 1)))
        assert bool(((dequantize_int8(q, scale) - weight).abs() <= step / 2 + 1e-7).all())
        rounded[key] = dequantize_int8(q, scale)
    model_rounded = _small_model("bnext_tiny")
    model_rounded.load_state_dict({**float_state, **rounded})
    loaded = load_inference_model(path)
    x = _inputs()
    with torch.no_grad():
        reference = model_rounded(x)
        torch.testing.assert_close(loaded(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert os.path.getsize(path) < 0.7 * os.path.getsize(_export_fp32(model, tmp_path))


def _export_fp32(model, tmp_path):
    path = tmp_path / "tiny_fp32.safetensors"
    export_inference(model, "bnext_tiny", path)
    return path


def test_quantize_int8_symmetric_per_channel() -> None:
    weight = torch.randn(6, 4, 3, 3)
    weight[2] = 0.0
    q, scale = quantize_int8(weight)
    assert int(q.abs().max()) == 127 and bool((q[2] == 0).all())
    torch.testing.assert_close(scale[0], weight[0].abs().max() / 127)


def test_export_of_ablation_and_zero_weights(tmp_path) -> None:
    model = _small_model("bnext_tiny", elm_attention=False, info_recoupling=False)
    conv = next(m for m in model.modules() if isinstance(m, BinaryConv2d))
    with torch.no_grad():
        conv.weight[0, :3] = 0.0
    path = tmp_path / "ablation.safetensors"
    export_inference(model, "bnext_tiny", path)
    loaded = load_inference_model(path)
    assert any(m.weight_zero_index.numel() for m in loaded.modules() if isinstance(m, PackedBinaryConv2d))
    x = _inputs()
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(loaded(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_cli_exports_a_checkpoint(tmp_path, capsys) -> None:
    model = _small_model("bnext18")
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    output = tmp_path / "out.safetensors"
    args = ["--model", "bnext18", "--checkpoint", str(checkpoint), "--output", str(output)]
    assert main([*args, "--num-classes", "10", "--stem", "cifar", "--width-mult", "0.25"]) == 0
    assert "wrote" in capsys.readouterr().out
    with torch.no_grad():
        reference = model(_inputs())
        torch.testing.assert_close(load_inference_model(output)(_inputs()), reference, rtol=1e-5, atol=1e-5)


def test_loader_rejects_other_files(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a BNext binary inference file"):
        load_inference_model(path)


def test_onnx_export_matches_pytorch(tmp_path) -> None:
    pytest.importorskip("onnx", reason="the onnx package is needed to export ONNX files")
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed to check the ONNX file")
    from models.export_onnx import check_onnx, export_onnx

    model = _small_model("bnext_tiny")
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, input_size=RESOLUTION)
    result = check_onnx(model, path, torch.randn(3, 3, RESOLUTION, RESOLUTION))
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_diff"] <= 1e-4 * result["max_abs_logit"]


def test_cli_refuses_a_mid_training_checkpoint(tmp_path, capsys) -> None:
    model = models.create_model("bnext18", num_classes=10, stem="cifar", width_mult=0.25)  # temperature 1
    checkpoint = tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), checkpoint)
    args = ["--model", "bnext18", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out.safetensors")]
    assert main([*args, "--num-classes", "10", "--stem", "cifar", "--width-mult", "0.25"]) == 2
    assert "not below the sign threshold" in capsys.readouterr().err
