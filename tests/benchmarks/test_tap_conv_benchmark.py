"""The tap-product benchmark finds the model's binary convolutions and times both implementations of each."""

from __future__ import annotations

import pytest
import torch

import models
from benchmarks import tap_conv as bench
from models import tap_conv


def test_shapes_are_the_binary_convolutions_with_their_calls() -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar")
    counts = bench.binary_conv_shapes(model, torch.randn(2, 3, 32, 32))
    # BNext-T at 32x32: five 3x3 convolutions of the 512-channel stage on 4x4 planes, 31 binary convolutions in all.
    assert counts[((2, 512, 4, 4), (512, 512, 3, 3), 1, 1)] == 5
    assert counts[((2, 1024, 2, 2), (1024, 1024, 3, 3), 1, 1)] == 1
    assert sum(counts.values()) == 31


def test_both_implementations_give_the_same_values() -> None:
    key = ((3, 8, 2, 2), (6, 8, 3, 3), 1, 1)
    reference = bench.forward_backward(bench._conv2d, key)()
    taps = bench.forward_backward(tap_conv.conv2d, key)()
    assert [t.shape for t in taps] == [(3, 6, 2, 2), (3, 8, 2, 2), (6, 8, 3, 3)]
    assert bench.max_relative_difference(taps, reference) < 1e-5
    assert bench.max_relative_difference((reference[0] * 1.5,), (reference[0],)) == pytest.approx(0.5)


def test_main_prints_one_row_per_shape_and_the_step_total(capsys: pytest.CaptureFixture[str]) -> None:
    rows = bench.main(["--width-mult", "0.125", "--img-size", "16", "--batch", "2", "--iters", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "host memory: malloc's defaults (no --keep-freed-memory)"
    table = lines[3:-1]
    assert len(table) == len(rows) > 0
    used = [row for row in rows if row["used"]]
    assert 0 < len(used) < len(rows)  # at 16 px only the late, small planes take the taps
    for line, row in zip(table, rows):
        assert line.split()[-2] == ("yes" if row["used"] else "no")
        assert float(line.split()[-1]) < 1e-5
    conv = sum(row["calls"] * row["conv_ms"] for row in used)
    assert lines[-1].startswith("per step, used shapes x calls: conv ")
    assert float(lines[-1].split("conv ")[1].split(" ms")[0]) == pytest.approx(conv, abs=0.05)
