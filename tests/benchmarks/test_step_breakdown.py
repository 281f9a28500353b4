"""The in-step breakdown times the kernels, the Python around them, the optimizer and the constraints."""

from __future__ import annotations

import os

import pytest
import torch

import models
from benchmarks import step_breakdown
from models import blocks, bnext, fused_ops, kernel_ops

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def test_main_times_every_piece_once_per_call_and_restores_the_library(capsys: pytest.CaptureFixture[str]) -> None:
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
    # The weights are binarized by the constraint pass after each optimizer step, for the next step.
    assert by_name["kernel clamp_and_divide_clamp"][1] == 31 and "kernel divide_clamp" not in by_name
    assert by_name["optimizer step"][1] == by_name["constraints, besides their kernel calls"][1] == 1
    # Per processor the signs and the tail (both batch norms and the gate in one call); the stem's batch norm.
    assert by_name["Python and autograd around the processor kernels, forward"][1] == 31 + 31 + 1
    assert all(ms > 0 for name, (ms, _) in by_name.items() if not name.startswith("remainder"))
    assert rows[-1][0].startswith("remainder")
    out = capsys.readouterr().out.splitlines()
    step_line = next(line for line in out if line.startswith("step "))
    step_ms, floor_ms = (float(step_line.split()[i]) for i in (1, 4))
    assert sum(ms for _, ms, _ in rows) == pytest.approx(step_ms - floor_ms, abs=0.2)
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


def test_the_python_around_the_kernels_excludes_every_kernel_they_call() -> None:
    timers = step_breakdown.Timers()
    for name, seconds in (("forward processor_tail", 0.010), ("kernel bn_prelu_statistics", 0.003),
                          ("kernel gated_bn_forward", 0.004), ("gate forward", 0.001)):  # fmt: skip
        timers.seconds[name] = seconds
        timers.calls[name] = 1
    rows = {name: ms for name, ms, _ in step_breakdown.breakdown(timers, steps=1)}
    assert rows["Python and autograd around the processor kernels, forward"] == pytest.approx(2.0)
