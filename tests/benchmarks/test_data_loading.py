"""benchmarks/data_loading.py: it times the three pipelines on files it writes and reports workers needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import data_loading


def test_report_has_a_rate_per_pipeline_and_the_workers_for_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert data_loading.main(["--images", "3", "--size", "64", "80", "--img-size", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 JPEGs of 64x80" in out and "img_size 32" in out
    for name in ("decode", "train", "eval"):
        row = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+-$", out, re.MULTILINE)
        assert row, out
        rate, milliseconds = float(row.group(1)), float(row.group(2))
        assert rate > 0 and milliseconds == pytest.approx(1000.0 / rate, rel=0.01, abs=0.01)


def test_workers_needed_is_the_target_over_the_rate() -> None:
    report = data_loading.format_report({"train": 100.0}, batch=256, target=450.0)
    assert re.search(r"^train\s+100\.0\s+10\.00\s+4\.5$", report, re.MULTILINE)


def test_the_transforms_follow_the_recipe() -> None:
    transforms = data_loading.recipe_transforms({"img_size": 48, "aa": "none", "crop_pct": 1.0})
    image = Image.new("RGB", (100, 60), (10, 200, 30))
    assert tuple(transforms["train"](image).shape) == (3, 48, 48)
    assert tuple(transforms["eval"](image).shape) == (3, 48, 48)


def test_a_missing_recipe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        data_loading.main(["--config", str(tmp_path / "nope.yaml")])
