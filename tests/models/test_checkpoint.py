"""load_checkpoint: official release format, plain state dicts, safetensors, mismatches, unsafe files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models


def _small(**kwargs) -> torch.nn.Module:
    return models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25, **kwargs)


def _trained_like_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value if value.dtype == torch.long else torch.rand(value.shape, generator=generator) * 0.9
    return state


def _assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_official_release_format_with_module_prefix(tmp_path: Path) -> None:
    source = _trained_like_state(_small())
    path = tmp_path / "official.pth.tar"
    torch.save({"epoch": 511, "best_top1_acc": 72.4, "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    model = models.load_checkpoint(_small(), path)
    _assert_same_weights(model, source)


def test_plain_state_dict_and_safetensors(tmp_path: Path) -> None:
    source = _trained_like_state(_small())
    torch.save(source, tmp_path / "plain.pth")
    save_file(source, str(tmp_path / "weights.safetensors"))
    _assert_same_weights(models.load_checkpoint(_small(), tmp_path / "plain.pth"), source)
    _assert_same_weights(models.load_checkpoint(_small(), tmp_path / "weights.safetensors"), source)


def test_mismatch_lists_missing_unexpected_and_shape_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    other = _small(info_recoupling=False).state_dict()  # no scale/se: missing keys in the target
    other["fc.weight"] = torch.zeros(1000, other["fc.weight"].shape[1])  # class-count conflict
    other["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": other}, path)
    with pytest.raises(models.CheckpointMismatchError) as info:
        models.load_checkpoint(_small(), path)
    text = str(info.value)
    assert "missing from the checkpoint" in text and "feature.1.Attention.scale" in text
    assert "unexpected in the checkpoint (1)" in text and "extra.weight" in text
    assert "fc.weight: checkpoint (1000, 256) vs model (10, 256)" in text


def test_non_strict_ignores_key_differences_but_not_shapes(tmp_path: Path) -> None:
    model = _small()
    partial = {k: v for k, v in _trained_like_state(model).items() if k.startswith("fc.")}
    torch.save(partial, tmp_path / "head.pth")
    loaded = models.load_checkpoint(model, tmp_path / "head.pth", strict=False)
    assert torch.equal(loaded.fc.weight, partial["fc.weight"])
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(models.CheckpointMismatchError, match="shape conflicts"):
        models.load_checkpoint(model, tmp_path / "bad.pth", strict=False)


def test_latent_weights_outside_the_clip_are_clipped_at_load(tmp_path: Path) -> None:
    state = _trained_like_state(_small())
    key = "feature.2.Attention.binary_conv.weight"
    state[key] = state[key] * 4 - 2  # in [-2, 1.6]
    torch.save(state, tmp_path / "wide.pth")
    model = models.load_checkpoint(_small(), tmp_path / "wide.pth")
    weight = model.feature[2].Attention.binary_conv.weight
    assert weight.min().item() == -1.5 and weight.max().item() == 1.5


def test_a_file_that_would_execute_code_is_refused(tmp_path: Path, code_running_payload) -> None:
    payload, marker = code_running_payload
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "payload": payload}, path)
    with pytest.raises(ValueError, match="weights-only"):
        models.load_checkpoint(_small(), path)
    assert not marker.exists()


def test_missing_file_and_non_dict_contents(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_checkpoint(_small(), tmp_path / "nope.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        models.load_checkpoint(_small(), tmp_path / "list.pth")
