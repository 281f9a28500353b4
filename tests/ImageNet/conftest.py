"""Fixtures of the training-script tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_helpers import make_image_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageNet-layout folder: 3 classes, 8 train and 3 val images each."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": 8, "val": 3})
