"""The in-step breakdown times the kernels, the Python around them, the optimizer and the constraints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import models
from benchmarks import step_breakdown
from models import blocks, bnext, fused_ops, kernel_ops, tap_conv

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def test_main_times_every_piece_once_per_call_and_restores_the_library(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two pairs, measured in two placements of the threads: a column for each.
    round_trips = iter([70.0, 320.0])
    monkeypatch.setattr(step_breakdown.thread_placement, "unavailable_reason", lambda: None)
    monkeypatch.setattr(step_breakdown.thread_placement, "round_trip_ns", lambda: next(round_trips))
    originals = (
        fused_ops.load_extension,
        models.apply_constraints,
        blocks.batch_norm_prelu,
        bnext.batch_norm_prelu,
        kernel_ops._BatchNormPReLU.__dict__["backward"],
    )
    rows = step_breakdown.main(["--width-mult", "0.125", "--img-size", "16", "--batch", "2", "--iters", "2"])
    by_name = {name: (ms, calls) for name, ms, calls in rows}
    # BNext-T: 31 processors, each one call of every processor kernel per step, both ways; 4 pooled shortcuts
    # (the stride-2 ELM attentions pool their residual; their mix takes the mean of x instead of its pooling).
    # The stem's batch norm is the batch-norm kernel too; the tails' first batch norm takes its statistics
    # without storing its output (the gated kernels recompute it).
    for kernel, calls in (("biased_sign", 31), ("gated_bn", 31)):
        assert by_name[f"kernel {kernel}_forward"][1] == by_name[f"kernel {kernel}_backward"][1] == calls
    assert by_name["kernel bn_prelu_statistics"][1] == 31 and by_name["kernel bn_prelu_forward"][1] == 1
    assert by_name["kernel bn_prelu_backward"][1] == 32
    assert by_name["kernel pool_2x2_forward"][1] == 4
    # The recoupling gates (their C++ calls inside) have their own rows, one call per processor each way.
    gate_rows = [calls for name, (_, calls) in by_name.items() if name.startswith("recoupling gates")]
    assert gate_rows == [31, 31] and not [name for name in by_name if name.startswith("kernel recoupling")]
    # The optimizer hands each binary weight's update to its layer's constraint pass, which also binarizes it
    # for the next step: one kernel call per weight inside the optimizer step, none in the constraints.
    assert by_name["kernel adamw_clamp_and_divide_clamp"][1] == 31
    assert not {"kernel divide_clamp", "kernel clamp_and_divide_clamp"} & by_name.keys()
    # The other parameters' update: one kernel call per step.
    assert by_name["kernel adamw_many"][1] == 1
    optimizer_row = "optimizer step, besides its kernel calls"
    assert by_name[optimizer_row][1] == by_name["constraints, besides their kernel calls"][1] == 1
    # The tap products check their operands once per call (float weights at T = 1: the weights only), in the
    # steps; the floor's own calls are not counted.
    products: list[int] = []
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    forward = tap_conv.forward
    monkeypatch.setattr(tap_conv, "forward", lambda *args: products.append(1) or forward(*args))
    model(torch.randn(2, 3, 16, 16))
    in_the_floor = step_breakdown.IN_THE_FLOOR
    assert by_name[f"kernel to_ternary_int8{in_the_floor}"][1] == len(products) > 0
    # The tap products' layout kernels: into rows (the input, the output gradient) twice per product, back into
    # planes at most twice (not on 1x1 planes, whose rows are their planes).
    assert by_name[f"kernel to_rows{in_the_floor}"][1] == 2 * len(products)
    assert 0 < by_name[f"kernel from_rows{in_the_floor}"][1] < 2 * len(products)
    # Per processor the signs and the tail (both batch norms and the gate in one call); the stem's batch norm.
    assert by_name["Python and autograd around the processor kernels, forward"][1] == 31 + 31 + 1
    assert all(ms > 0 for name, (ms, _) in by_name.items() if not name.startswith("remainder"))
    assert rows[-1][0].startswith("remainder")
    out = capsys.readouterr().out.splitlines()
    step_line = next(line for line in out if line.startswith("step "))
    step_ms, floor_ms = (float(step_line.split()[i]) for i in (1, 4))
    # The pieces and the remainder add up to step - floor, the tap products' kernels (in the floor too) aside.
    pieces = sum(ms for name, ms, _ in rows if not name.endswith(in_the_floor))
    assert pieces == pytest.approx(step_ms - floor_ms, abs=0.2)
    assert [line.split(",")[0] for line in out if line.startswith("threads'")] == [
        "threads' round trip 70 to 70 ns",
        "threads' round trip 320 to 320 ns",
    ]
    header = next(line for line in out if line.startswith("piece"))
    assert header.split()[-4:] == ["70-70", "ns", "320-320", "ns"]
    # One step per placement: each column is that step's own pieces, whose mean over the two is the overall.
    for name, ms, _ in rows[:-1]:
        line = next(line for line in out if line.startswith(name))
        first, second = (float(cell) for cell in line.split()[-2:])
        assert (first + second) / 2 == pytest.approx(ms, abs=0.01), name
    assert originals == (
        fused_ops.load_extension,
        models.apply_constraints,
        blocks.batch_norm_prelu,
        bnext.batch_norm_prelu,
        kernel_ops._BatchNormPReLU.__dict__["backward"],
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    timers = step_breakdown.Timers()
    with step_breakdown.timed_pieces(timers, optimizer):
        assert "step" in vars(optimizer)
    assert "step" not in vars(optimizer)  # the class's method again


def _timers(**milliseconds: float) -> step_breakdown.Timers:
    timers = step_breakdown.Timers()
    for name, ms in milliseconds.items():
        timers.seconds[name.replace("_", " ")] = ms / 1e3
        timers.calls[name.replace("_", " ")] = 1
    return timers


def test_placement_breakdowns_take_each_placements_own_steps_and_medians() -> None:
    steps = [_timers(optimizer_step=10.0), _timers(optimizer_step=30.0), _timers(optimizer_step=12.0)]
    timings = {"round_trip_ns": [60.0, 330.0, 80.0], "step_ms": [100.0, 150.0, 110.0], "floor_ms": [80.0, 90.0, 84.0]}
    (together, near, near_step, near_floor), (apart, far, far_step, far_floor) = step_breakdown.placement_breakdowns(
        steps, timings
    )
    assert together.indices == (0, 2) and apart.indices == (1,)
    assert (near_step, near_floor, far_step, far_floor) == (105.0, 82.0, 150.0, 90.0)
    near_rows, far_rows = ({name: ms for name, ms, _ in rows} for rows in (near, far))
    optimizer_row = "optimizer step, besides its kernel calls"
    assert near_rows[optimizer_row] == pytest.approx(11.0) and far_rows[optimizer_row] == pytest.approx(30.0)
    assert near_rows["remainder: step - floor - the pieces above"] == pytest.approx(105.0 - 82.0 - 11.0)

    # One placement, or none measured: no columns.
    assert step_breakdown.placement_breakdowns(steps, {**timings, "round_trip_ns": [60.0, 70.0, 80.0]}) == []
    assert step_breakdown.placement_breakdowns(steps, {**timings, "round_trip_ns": []}) == []


def test_timers_subtract_a_snapshot_and_add_up() -> None:
    timers = _timers(optimizer_step=5.0)
    snapshot = dict(timers.seconds), dict(timers.calls)
    timers.seconds["optimizer step"] += 0.002
    timers.calls["optimizer step"] += 1
    timers.seconds["constraints"] = 0.001
    timers.calls["constraints"] = 1
    delta = timers.since(*snapshot)
    assert delta.seconds["optimizer step"] == pytest.approx(0.002) and delta.calls["optimizer step"] == 1
    assert delta.seconds["constraints"] == pytest.approx(0.001) and delta.calls["constraints"] == 1
    delta.add(delta)
    assert delta.seconds["optimizer step"] == pytest.approx(0.004) and delta.calls["constraints"] == 2


def test_the_python_around_the_kernels_excludes_every_kernel_they_call() -> None:
    timers = step_breakdown.Timers()
    for name, seconds in (("forward processor_tail", 0.010), ("kernel bn_prelu_statistics", 0.003),
                          ("kernel gated_bn_forward", 0.004), ("gate forward", 0.001)):  # fmt: skip
        timers.seconds[name] = seconds
        timers.calls[name] = 1
    rows = {name: ms for name, ms, _ in step_breakdown.breakdown(timers, steps=1)}
    assert rows["Python and autograd around the processor kernels, forward"] == pytest.approx(2.0)


def test_the_remainder_leaves_the_tap_products_kernels_in_the_floor() -> None:
    timers = _timers(optimizer_step=10.0)
    timers.seconds["kernel to_rows"], timers.calls["kernel to_rows"] = 0.004, 2
    rows = step_breakdown.with_remainder(step_breakdown.breakdown(timers, 1), 100.0, 80.0)
    by_name = {name: ms for name, ms, _ in rows}
    assert by_name["kernel to_rows" + step_breakdown.IN_THE_FLOOR] == pytest.approx(4.0)
    assert by_name["remainder: step - floor - the pieces above"] == pytest.approx(100.0 - 80.0 - 10.0)


def test_touched_bytes_count_each_distinct_tensor_once() -> None:
    a, b = torch.zeros(4, 8), torch.zeros(16, dtype=torch.float64)
    # An in-place result (the same tensor) and a same-sized view of it are the same memory; nested results are found.
    assert step_breakdown.touched_bytes(a, (a, [a.view(8, 4), b]), torch.empty(0), 3.0, None) == 4 * 32 + 8 * 16
    # A slice is other values than the whole: it counts on its own.
    assert step_breakdown.touched_bytes(a, a[:2]) == 4 * 32 + 4 * 16
    assert step_breakdown.touched_bytes() == 0


def test_shape_timers_record_only_while_active_by_kernel_and_largest_tensor() -> None:
    shapes = step_breakdown.ShapeTimers()
    double = shapes.wrap("double", lambda x, factor=2.0: x * factor)
    small, large = torch.ones(2, 3), torch.ones(4, 5)
    double(small)  # inactive: not recorded
    shapes.active = True
    for x in (small, large, large):
        double(x)
    double(factor=3.0, x=small)  # keyword arguments too
    shapes.active = False
    double(large)
    rows = shapes.rows(steps=2)
    # Per step: two calls of each shape in two steps.
    assert sorted((name, shape, calls) for name, shape, _, calls, *_ in rows) == [
        ("double", (2, 3), 1.0),
        ("double", (4, 5), 1.0),
    ]
    by_shape = {shape: (ms, megabytes, rate) for _, shape, ms, _, megabytes, rate in rows}
    # Argument and result: two tensors of the shape per call.
    assert by_shape[(4, 5)][1] == pytest.approx(2 * 4 * 20 / 1e6)
    assert by_shape[(2, 3)][1] == pytest.approx(2 * 4 * 6 / 1e6)
    for ms, megabytes, rate in by_shape.values():
        assert ms >= 0 and rate == pytest.approx(2 * megabytes / (2 * ms / 1e3) / 1e3, rel=1e-6)
    shapes.clear()
    assert shapes.rows(steps=1) == []


def test_largest_shape_looks_into_lists_and_keeps_the_first_of_equals() -> None:
    assert step_breakdown.largest_shape(torch.zeros(1, 3), [torch.zeros(2, 2), (torch.zeros(5),)], 7) == (5,)
    assert step_breakdown.largest_shape(torch.zeros(4, 1), torch.zeros(2, 2), torch.zeros(1, 4)) == (4, 1)
    assert step_breakdown.largest_shape([], 1.0) == ()


def test_activation_sizes_are_the_processor_kernels_shapes() -> None:
    rows = [
        ("biased_sign_forward", (2, 4, 8, 8), 1.0, 1.0, 0.0, 0.0),
        ("gated_bn_backward", (2, 16, 4, 4), 1.0, 1.0, 0.0, 0.0),
        ("bn_prelu_statistics", (2, 64, 2, 2), 1.0, 1.0, 0.0, 0.0),
        ("adamw_clamp_and_divide_clamp", (2, 2, 64, 64), 1.0, 1.0, 0.0, 0.0),  # a weight
        ("recoupling_gate_forward", (2, 4096, 1, 1), 1.0, 1.0, 0.0, 0.0),  # the gate's means
    ]
    assert step_breakdown.activation_sizes_mib(rows) == [4 * 2 * 256 / 2**20]
    rows.append(("biased_sign_backward", (2, 4, 16, 16), 1.0, 1.0, 0.0, 0.0))
    rows.append(("bn_prelu_forward", (2, 4, 32, 32), 1.0, 1.0, 0.0, 0.0))
    rows.append(("gated_bn_forward", (2, 4, 64, 64), 1.0, 1.0, 0.0, 0.0))
    # The smallest, the middle one of the four sizes, the largest.
    assert step_breakdown.activation_sizes_mib(rows) == [4 * 2 * n / 2**20 for n in (256, 4096, 16384)]
    assert step_breakdown.activation_sizes_mib(rows[3:5]) == []


def test_last_level_cache_is_the_largest_size_reported(tmp_path: Path) -> None:
    for index, size in enumerate(["48K", "2048K", "307200K", "unknown"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert step_breakdown.last_level_cache_bytes(tmp_path) == 307200 * 2**10
    (tmp_path / "index4").mkdir()
    (tmp_path / "index4" / "size").write_text("1G\n")
    assert step_breakdown.last_level_cache_bytes(tmp_path) == 2**30
    assert step_breakdown.last_level_cache_bytes(tmp_path / "missing") is None


def test_reference_beyond_the_caches_outgrows_the_last_level_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_breakdown, "last_level_cache_bytes", lambda: None)
    assert step_breakdown.beyond_caches_mib() == step_breakdown.BEYOND_CACHES_MIN_MIB
    monkeypatch.setattr(step_breakdown, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert step_breakdown.beyond_caches_mib() == step_breakdown.BEYOND_CACHES_MIN_MIB
    monkeypatch.setattr(step_breakdown, "last_level_cache_bytes", lambda: 300 * 2**20)
    assert step_breakdown.beyond_caches_mib() == 300.0


def test_bandwidth_budget_counts_the_kernels_outside_the_floor() -> None:
    rows = [
        ("gated_bn_backward", (2, 4, 8, 8), 3.0, 2.0, 5.0, 0.0),  # two calls of 5 MB per step
        ("biased_sign_forward", (2, 4, 8, 8), 1.5, 1.0, 4.0, 0.0),
        ("adamw_clamp_and_divide_clamp", (8, 8, 3, 3), 0.5, 0.5, 2.0, 0.0),  # every other step
        ("from_tap_major", (8, 9, 8), 7.0, 1.0, 100.0, 0.0),  # tap products: the floor's work
        ("to_rows", (2, 4, 8, 8), 7.0, 1.0, 100.0, 0.0),
        ("recoupling_gate_forward", (2, 4, 1, 1), 7.0, 1.0, 100.0, 0.0),  # its products are in the floor
    ]
    assert step_breakdown.bandwidth_budget(rows) == pytest.approx((10.0 + 4.0 + 1.0, 5.0))
    assert step_breakdown.bandwidth_budget(rows[3:]) == (0.0, 0.0)


def test_by_shape_splits_every_kernel_row_into_its_shapes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_breakdown, "beyond_caches_mib", lambda: 2.0)  # small here: the test's own speed
    argv = ["--width-mult", "0.125", "--img-size", "16", "--batch", "2", "--iters", "2", "--by-shape"]
    rows = step_breakdown.main(argv)
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("kernel ") and "largest argument" in line)
    table = []
    for line in out[start + 1 :]:
        if line.startswith("GB/s:"):
            break
        name, rest = line.split(" ", 1)
        shape, numbers = rest.rsplit(")", 1)
        ms, calls, megabytes, rate = (float(v) for v in numbers.split())
        table.append((name, shape.strip() + ")", ms, calls, megabytes, rate))
    kernels = {name.removeprefix("kernel ").removesuffix(step_breakdown.IN_THE_FLOOR): (ms, calls)
               for name, ms, calls in rows if name.startswith("kernel ")}  # fmt: skip
    # Every kernel of the breakdown (the gate's, inside its own rows there, included here) is split into its
    # shapes, in steps of their own after the timed ones: the same calls per step (the steps' own, not the
    # floor's tap products), however long they took.
    assert {name for name, *_ in table} >= kernels.keys()
    for kernel, (_, calls) in kernels.items():
        assert sum(row[3] for row in table if row[0] == kernel) == pytest.approx(calls, abs=0.01), kernel
    # BNext-T's 31 sign kernels on their inputs: two samples, planes from the input's 16x16 down to 1x1.
    signs = {shape for name, shape, *_ in table if name == "biased_sign_forward"}
    assert all(shape.startswith("(2, ") for shape in signs)
    assert {shape.split(", ", 2)[2] for shape in signs} == {"16, 16)", "8, 8)", "4, 4)", "2, 2)", "1, 1)"}
    assert all(megabytes >= 0 and rate >= 0 for *_, megabytes, rate in table)
    # The gate's kernels are labelled by their largest tensor (the batch's means, or a weight), not a 1-sample one.
    assert all(not shape.startswith("(1, ") for name, shape, *_ in table if name.startswith("recoupling_gate"))
    reference = next(line for line in out if line.startswith("streaming reference"))
    assert reference.count("GB/s at") >= 1 and "no activation shapes" not in reference
    assert any(line.startswith("beyond the caches, the same add: ") and line.endswith(" at 2 MiB per tensor")
               for line in out)  # fmt: skip
    # The budget line adds up the table's rows outside the floor: their MB per call times calls per step.
    budget = next(line for line in out if line.startswith("kernels outside the floor"))
    in_floor = (*step_breakdown.TAP_PRODUCT_KERNELS, step_breakdown.GATE_KERNEL_PREFIX)
    outside = [row for row in table if not row[0].startswith(in_floor)]
    megabytes = float(budget.split(": ", 1)[1].split(" MB", 1)[0])
    # (the table's MB per call are rounded to 0.01: a few per cent over some hundred rows)
    assert megabytes == pytest.approx(sum(row[3] * row[4] for row in outside), rel=0.05, abs=1.0)
    assert budget.count(" ms at ") == reference.count("GB/s at") + 1
    assert any(line.startswith("per shape: 2 steps after the timed ones") for line in out)
