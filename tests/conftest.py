"""Shared test fixtures: the official reference data and small helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the fixtures of the official implementation live (see its README).
REFERENCE_DIR = Path(os.environ.get("BNEXT_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Restore torch's intra-op thread count after each test.

    Some code under test sets it for the whole process (the data-loading benchmark
    emulates a one-thread worker); later tests would otherwise run on other BLAS paths,
    and their results would depend on the tests that ran before them.
    """
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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


class _CodeRunningPayload:
    """Unpickling this calls ``os.mkdir(marker)``: what every weights-only reader must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def code_running_payload(tmp_path: Path) -> tuple[object, Path]:
    """An object to save into a checkpoint, and the directory that loading it unsafely would create."""
    marker = tmp_path / "executed"
    return _CodeRunningPayload(str(marker)), marker


@pytest.fixture
def extension_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the fused C++ extension's functions that the test reads, in order (a spy on the real one)."""
    from models import fused_ops

    calls: list[str] = []
    real = fused_ops.load_extension()

    class Spy:
        def __getattr__(self, attr: str):
            calls.append(attr)
            return getattr(real, attr)

    monkeypatch.setattr(fused_ops, "load_extension", lambda: Spy())
    return calls
