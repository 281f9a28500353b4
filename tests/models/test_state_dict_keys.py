"""State-dict keys and shapes equal the official models', so released checkpoints load strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import models

# official configuration -> create_model keywords
CONFIGURATIONS = {
    "bnext_tiny/imagenet1000": dict(name="bnext_tiny"),
    "bnext_small/imagenet1000": dict(name="bnext_small"),
    "bnext_middle/imagenet1000": dict(name="bnext_middle"),
    "bnext_large/imagenet1000": dict(name="bnext_large"),
    "bnext_tiny/imagenet1000/elm=True/ir=False": dict(name="bnext_tiny", info_recoupling=False),
    "bnext_tiny/imagenet1000/elm=False/ir=True": dict(name="bnext_tiny", elm_attention=False),
    "bnext_tiny/imagenet1000/elm=False/ir=False": dict(name="bnext_tiny", elm_attention=False, info_recoupling=False),
    "bnext18/imagenet1000": dict(name="bnext18"),
    "bnext18/cifar10": dict(name="bnext18", num_classes=10, stem="cifar"),
}


@pytest.fixture(scope="module")
def official_keys(reference_dir: Path) -> dict[str, dict[str, list[int]]]:
    return json.loads((reference_dir / "official_state_dict_keys.json").read_text())


def test_all_official_configurations_are_covered(official_keys) -> None:
    assert set(official_keys) == set(CONFIGURATIONS)


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_keys_and_shapes_equal_official(configuration: str, official_keys) -> None:
    model = models.create_model(**CONFIGURATIONS[configuration])
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    official = official_keys[configuration]
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {key: shape for key, shape in ours.items() if official[key] != shape} == {}
