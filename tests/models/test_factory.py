"""create_model: names, stems, widths, ablation switches, timm registration and input errors."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from models.blocks import ELMAttention
from models.layers import BinaryConv2d


def _spatial_size_after_stem(model: torch.nn.Module, size: int) -> int:
    stem = model.feature[0] if hasattr(model, "feature") else torch.nn.Sequential(model.conv1, model.maxpool)
    return stem(torch.zeros(1, 3, size, size)).shape[-1]


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_runs_small(name: str) -> None:
    model = models.create_model(name, num_classes=7, stem="cifar", width_mult=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_stem_is_explicit_and_independent_of_classes() -> None:
    for classes in (10, 1000):
        assert (
            _spatial_size_after_stem(models.create_model("bnext_tiny", classes, stem="imagenet", width_mult=0.25), 64)
            == 32
        )
        assert (
            _spatial_size_after_stem(models.create_model("bnext_tiny", classes, stem="cifar", width_mult=0.25), 64)
            == 64
        )
        assert (
            _spatial_size_after_stem(models.create_model("bnext18", classes, stem="imagenet", width_mult=0.125), 64)
            == 16
        )
        assert (
            _spatial_size_after_stem(models.create_model("bnext18", classes, stem="cifar", width_mult=0.125), 64) == 64
        )


def test_official_sizes_have_the_published_block_counts_and_parameters() -> None:
    # Spec §1.4 and §1.7: 13/13/21/29 blocks; BNext-T 30.86 M parameters, 28.25 M of them binary.
    blocks = {"bnext_tiny": 13, "bnext_small": 13, "bnext_middle": 21, "bnext_large": 29}
    for name, count in blocks.items():
        assert len(models.create_model(name).feature) == count + 1
    tiny = models.create_model("bnext_tiny")
    binary = sum(p.numel() for _, p in models.latent_binary_parameters(tiny))
    total = sum(p.numel() for p in tiny.parameters())
    assert round(binary / 1e6, 2) == 28.25
    assert round(total / 1e6, 2) == 30.86


def test_width_mult_rounds_to_multiples_of_8_and_keeps_the_layout() -> None:
    model = models.create_model("bnext_small", width_mult=0.3)
    assert model.channels[0] == 16  # 48 * 0.3 = 14.4 -> 16
    assert all(c % 8 == 0 for c in model.channels)
    official = models.factory.BNEXT_CHANNELS["bnext_small"]
    for (a, b), (c, d) in zip(zip(official, official[1:]), zip(model.channels, model.channels[1:])):
        assert (a == b) == (c == d)
    assert models.create_model("bnext18", width_mult=0.5).channels == [32, 64, 128, 256]


def test_stage_channels_replace_the_list() -> None:
    model = models.create_model("bnext_tiny", num_classes=3, stage_channels=[8, 16, 16, 32])
    assert model.channels == [8, 16, 16, 32]
    assert len(model.feature) == 4
    assert model.fc.in_features == 32


def test_ablation_switches_change_the_modules() -> None:
    full = models.create_model("bnext_tiny", width_mult=0.25)
    no_elm = models.create_model("bnext_tiny", width_mult=0.25, elm_attention=False)
    no_ir = models.create_model("bnext_tiny", width_mult=0.25, info_recoupling=False)
    assert any(isinstance(m, ELMAttention) for m in full.modules())
    assert not any(isinstance(m, ELMAttention) for m in no_elm.modules())
    assert any(hasattr(m, "se") for m in full.modules() if isinstance(m, models.blocks.Processor))
    assert not any(m.info_recoupling for m in no_ir.modules() if isinstance(m, models.blocks.Processor))


def test_timm_create_model_builds_the_same_network() -> None:
    model = timm.create_model("bnext_tiny", num_classes=10, width_mult=0.25)
    reference = models.create_model("bnext_tiny", num_classes=10, width_mult=0.25)
    assert isinstance(model, models.BNext)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert set(models.list_models()) <= set(timm.list_models("bnext*"))


def test_timm_pretrained_without_a_source_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="load_checkpoint"):
        timm.create_model("bnext_tiny", pretrained=True)


def test_timm_pretrained_from_a_local_official_file(tmp_path) -> None:
    source = models.create_model("bnext_tiny", num_classes=10, width_mult=0.25)
    with torch.no_grad():
        source.fc.weight.fill_(0.125)
    path = tmp_path / "BNext-T.pth.tar"  # the official release layout: state_dict with module. prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = timm.create_model(
        "bnext_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=10, width_mult=0.25
    )
    assert torch.equal(model.fc.weight, source.fc.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="bnext_huge"), "valid names: bnext_tiny, bnext_small, bnext_middle, bnext_large, bnext18"),
        (dict(name="bnext_tiny", stem="mnist"), "stem must be one of"),
        (dict(name="bnext_tiny", num_classes=0), "num_classes"),
        (dict(name="bnext_tiny", width_mult=0), "width_mult"),
        (dict(name="bnext_tiny", stage_channels=[8, 24]), "keeps or doubles"),
        (dict(name="bnext_tiny", stage_channels=[4, 8]), ">= 8"),
        (dict(name="bnext18", stage_channels=[64, 128]), "4 stage widths"),
        (dict(name="bnext18", elm_attention=False), "no ablation variants"),
    ],
)
def test_invalid_arguments_are_explained(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.create_model(**kwargs)


def test_ablation_switches_must_be_booleans() -> None:
    # The official CLI parsed "False" as True; here a string is refused outright.
    with pytest.raises(TypeError, match="elm_attention must be a bool"):
        models.create_model("bnext_tiny", elm_attention="False")


def test_binary_convs_start_nearly_real_valued() -> None:
    conv = next(m for m in models.create_model("bnext_tiny", width_mult=0.25).modules() if isinstance(m, BinaryConv2d))
    assert conv.temperature.item() == 1.0
    assert conv.weight.abs().max().item() < 0.01  # N(0, 1e-6) init: fractional weights at T = 1
