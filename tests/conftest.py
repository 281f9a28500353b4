"""Shared test fixtures: the official reference data and small helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the fixtures of the official implementation live (see its README).
REFERENCE_DIR = Path(os.environ.get("BNEXT_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official-numerics fixtures; skipped when absent, but never under CI=true."""
    if not (REFERENCE_DIR / "official_state_dict_keys.json").is_file():
        message = (
            f"official reference fixtures not found in {REFERENCE_DIR} "
            "(set BNEXT_REFERENCE_DIR or place shared/reference beside the repository)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires them")
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reduced_channels(reference_dir: Path) -> dict[str, list[int]]:
    """Stage-channel lists of the width-reduced fixture models."""
    return json.loads((reference_dir / "reduced_stage_channels.json").read_text())
