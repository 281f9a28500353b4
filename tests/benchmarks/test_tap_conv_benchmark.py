"""The tap-product benchmark finds the model's binary convolutions and times both implementations of each."""

from __future__ import annotations

import pytest
import torch

import models
from benchmarks import tap_conv as bench
from models import fused_ops, tap_conv


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
    rows = bench.main(
        ["--width-mult", "0.125", "--img-size", "16", "--batch", "2", "--iters", "1", "--step-pairs", "0"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "host memory: malloc's defaults (no --keep-freed-memory)"
    assert lines[1] == "huge pages: malloc's default pages (no --huge-pages)"
    table = lines[4:-1]
    assert len(table) == len(rows) > 0
    used = [row for row in rows if row["used"]]
    assert 0 < len(used) < len(rows)  # at 16 px only the late, small planes take the taps
    for line, row in zip(table, rows):
        tokens = line.split()
        if "copy_over_in_place" in row:  # used 3x3 shapes with the C++ kernels: the layout's column
            assert float(tokens.pop()) == pytest.approx(row["copy_over_in_place"], abs=0.005)
        assert tokens[-2] == ("yes" if row["used"] else "no")
        assert float(tokens[-1]) < 1e-5
    layouts = [row for row in rows if "copy_over_in_place" in row]
    assert all(row["used"] and row["key"][1][-1] == 3 for row in layouts)
    assert bool(layouts) == (fused_ops.backend() == "cpp")
    conv = sum(row["calls"] * row["conv_ms"] for row in used)
    assert lines[-1].startswith("per step, used shapes x calls: conv ")
    assert float(lines[-1].split("conv ")[1].split(" ms")[0]) == pytest.approx(conv, abs=0.05)


# A small model at a small size, one timed pair per shape, no whole-step pairs unless a test asks.
SMALL = ["--width-mult", "0.125", "--img-size", "16", "--batch", "2", "--iters", "1", "--step-pairs", "0"]


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def _record_shapes(monkeypatch, owner: object, name: str) -> list[tuple[int, ...]]:
    """Replaces ``owner.name`` by a wrapper that records its first argument's shape; returns the records."""
    shapes: list[tuple[int, ...]] = []
    real = getattr(owner, name)

    def recording(first, *args):
        shapes.append(tuple(first.shape))
        return real(first, *args)

    monkeypatch.setattr(owner, name, recording)
    return shapes


def _each_once_counting(events: list, per_step: list[int]):
    """A stand-in for ``time_alternating`` that runs each side once and records how many ``events`` it added."""

    def run_each_once(first, second, iters):
        for fn in (first, second):
            before = len(events)
            fn()
            per_step.append(len(events) - before)
        return 2.0, 3.0

    return run_each_once


def test_step_pairs_time_the_step_with_and_without_taps(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = _record_shapes(monkeypatch, tap_conv, "conv2d")
    per_step: list[int] = []
    monkeypatch.setattr(bench, "time_alternating", _each_once_counting(calls, per_step))
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    assert bench.time_steps(model, 2, 16, 1) == (2.0, 3.0)
    assert per_step[0] > 0 and per_step[1] == 0  # with the taps, then inside tap_conv.disabled()
    assert tap_conv.enabled()

    monkeypatch.setattr(bench, "time_alternating", lambda first, second, iters: (2.0, 3.0))
    bench.main(["--width-mult", "0.125", "--img-size", "16", "--batch", "2", "--iters", "1", "--step-pairs", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "training step (eager, 1 pairs): with taps 2.0 ms, without 3.0 ms, without/with 1.50"


def test_layout_pairs_time_steps_binarizing_into_both_layouts(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    copies = _record_shapes(monkeypatch, tap_conv, "tap_matrices")
    per_step: list[int] = []
    monkeypatch.setattr(bench, "time_alternating", _each_once_counting(copies, per_step))
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    assert bench.time_layouts(model, 2, 16, 1) == (2.0, 3.0)
    # Binarized into the taps' layout, the 3x3 taps copy no weight; binarized plainly, each of them does.
    expected_first = 0 if fused_ops.backend() == "cpp" else per_step[1]
    assert per_step[1] > 0 and per_step[0] == expected_first
    assert all(not isinstance(getattr(layer, "binary_weight", None), type(lambda: 0)) for layer in model.modules())

    monkeypatch.setattr(bench, "time_alternating", lambda first, second, iters: (2.0, 3.0))
    bench.main([*SMALL, "--layout-pairs", "1"])
    assert _last_line(capsys) == (
        "training step (eager, 1 pairs): binarized into the taps' layout 2.0 ms, into the plain one 3.0 ms, "
        "plain/taps' 1.50"
    )


def test_integer_pairs_time_sign_phase_steps_with_and_without_integer_products(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    products = _record_shapes(monkeypatch, torch, "_int_mm")
    per_step: list[int] = []
    monkeypatch.setattr(bench, "time_alternating", _each_once_counting(products, per_step))
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    integer_ms, float_ms, same = bench.time_integer_products(model, 2, 16, 1)
    assert (integer_ms, float_ms) == (2.0, 3.0) and same  # the same loss bit for bit
    # With the C++ conversion, the first side's tap products ran on integers; the second side's never do.
    assert per_step[1] == 0 and (per_step[0] > 0) == (fused_ops.backend() == "cpp")
    assert float(next(m for m in model.modules() if isinstance(m, models.BinaryConv2d)).temperature) == 1.0

    monkeypatch.setattr(bench, "time_integer_products", lambda *args: (2.0, 3.0, True))
    bench.main([*SMALL, "--integer-pairs", "1"])
    assert _last_line(capsys) == (
        "training step below the sign threshold (eager, 1 pairs): integer products 2.0 ms, float32 3.0 ms, "
        "float32/integer 1.50, same losses: yes"
    )


def test_transpose_pairs_time_the_kernel_against_the_strided_copy(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copies = _record_shapes(monkeypatch, bench, "strided_weight_layout")
    per_step: list[int] = []
    monkeypatch.setattr(bench, "time_alternating", _each_once_counting(copies, per_step))
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    assert bench.time_transposition_steps(model, 2, 16, 1) == (2.0, 3.0)
    # The first side transposes by the kernel; the second by the strided copy (a 1x1 layer's gradient as it is).
    assert per_step[0] == 0 and per_step[1] > 0
    assert {shape[1] for shape in copies} == {1, 9}
    assert tap_conv.weight_layout is not bench.strided_weight_layout  # restored
    copies.clear()
    assert bench.time_transposition((8, 4, 3, 3), 1) == (2.0, 3.0) and copies == [(8, 9, 4)]

    monkeypatch.setattr(bench, "time_alternating", lambda first, second, iters: (2.0, 3.0))
    rows = bench.main([*SMALL, "--transpose-pairs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == (
        "training step (eager, 1 pairs): weight gradients transposed by the kernel 2.0 ms, by the strided copy "
        "3.0 ms, copy/kernel 1.500"
    )
    shapes = {row["key"][1] for row in rows if row["used"] and row["key"][1][-1] == 3}
    transpositions = [line for line in lines if line.startswith("weight gradient ")]
    assert len(transpositions) == len(shapes) > 0
    assert all(line.endswith("kernel 2.00 ms, strided copy 3.00 ms, copy/kernel 1.50") for line in transpositions)
