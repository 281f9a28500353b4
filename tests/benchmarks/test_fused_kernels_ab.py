"""The A/B kernel benchmark resolves its baseline, checks the bits and times both builds per shape."""

from __future__ import annotations

import os
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch

import models
from benchmarks import fused_kernels_ab
from models import fused_ops

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)

SHAPES = [(4, 8, 4, 4), (4, 3, 5, 7)]


def _in_git_checkout() -> bool:
    try:
        probe = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=fused_kernels_ab.REPOSITORY, capture_output=True, check=False
        )
    except OSError:  # no git here
        return False
    return probe.returncode == 0


def test_baseline_is_read_from_a_file(tmp_path: Path) -> None:
    source = tmp_path / "old.cpp"
    source.write_text("// an old kernel\n", encoding="utf-8")
    assert fused_kernels_ab.baseline_source(str(source)) == "// an old kernel\n"


@pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout: no revisions to read")
def test_baseline_is_read_from_a_git_revision() -> None:
    committed = fused_kernels_ab.baseline_source("HEAD")
    assert "biased_sign_forward" in committed and "PYBIND11_MODULE" in committed


def test_an_unknown_baseline_says_what_it_needs() -> None:
    with pytest.raises(SystemExit, match="neither a file nor a git revision|not a file, and git cannot be run"):
        fused_kernels_ab.baseline_source("no-such-revision-or-file")


def _stand_in(kernels) -> types.SimpleNamespace:
    """A baseline "build" with the functions of ``kernels`` (one can then be replaced)."""
    return types.SimpleNamespace(**{name: getattr(kernels, name) for name in dir(kernels) if not name.startswith("_")})


def test_a_baseline_with_other_kernel_signatures_is_refused_clearly() -> None:
    this = fused_ops.load_extension()
    base = _stand_in(this)
    base.bn_prelu_forward = lambda x, gamma, beta: None  # an older signature
    with pytest.raises(SystemExit, match="baseline's batch_norm_prelu kernels cannot be called"):
        fused_kernels_ab.compare(SHAPES[:1], base, this, iters=1)


def test_same_bits_compares_every_tensor() -> None:
    a = (torch.ones(3), (torch.zeros(2), torch.arange(4.0)))
    assert fused_kernels_ab.same_bits(a, (torch.ones(3), (torch.zeros(2), torch.arange(4.0))))
    assert not fused_kernels_ab.same_bits(a, (torch.ones(3), (torch.zeros(2), torch.arange(4.0) + 1e-7)))
    assert not fused_kernels_ab.same_bits(a, (torch.ones(3),))


def test_rows_cover_every_shape_and_kernel_and_flag_different_bits() -> None:
    this = fused_ops.load_extension()

    def perturbed_gated_bn_backward(*args):
        grad_b, *rest = this.gated_bn_backward(*args)
        return [grad_b.nextafter(torch.full_like(grad_b, float("inf"))), *rest]  # one float up everywhere

    base = _stand_in(this)
    base.gated_bn_backward = perturbed_gated_bn_backward
    rows = fused_kernels_ab.compare(SHAPES, base, this, iters=1)
    kernels = {"processor_inputs", "batch_norm_prelu", "gated_batch_norm_residual"}
    assert {(r["shape"], r["kernel"]) for r in rows} == {(s, k) for s in SHAPES for k in kernels}
    for row in rows:
        assert row["base_ms"] > 0 and row["this_ms"] > 0
        assert row["same_bits"] == (row["kernel"] != "gated_batch_norm_residual"), row


def test_main_prints_a_row_per_shape_and_kernel_and_a_total(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The baseline build is this tree's extension (a second compile takes a minute).
    monkeypatch.setattr(fused_kernels_ab, "build_baseline", lambda text, build_dir: fused_ops.load_extension())
    monkeypatch.setattr(fused_kernels_ab, "baseline_source", lambda baseline: "// unused")
    fused_kernels_ab.main(
        ["--baseline", "HEAD", "--width-mult", "0.125", "--img-size", "16", "--batch", "4", "--iters", "1"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("shape"))
    assert lines[header].split() == ["shape", "kernel", "base", "ms", "this", "ms", "base/this", "same", "bits"]
    rows = [line.split() for line in lines[header + 1 : -1]]
    assert rows and len(rows) % 3 == 0 and all(row[-1] == "yes" for row in rows)
    total = lines[-1].split()
    assert total[:5] == ["total", "(one", "call", "per", "row)"] and total[-1] == "yes"
    base_sum = sum(float(row[-4]) for row in rows)
    assert float(total[-4]) == pytest.approx(base_sum, abs=0.002 * len(rows))


def test_weight_kernels_are_compared_in_each_layers_step_layout() -> None:
    this = fused_ops.load_extension()
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25)
    layouts = fused_kernels_ab.weight_layouts(model, torch.randn(2, 3, 16, 16))
    assert len(layouts) == 31 and any(tap for _, tap in layouts) and not all(tap for _, tap in layouts)
    rows = fused_kernels_ab.compare_weights(layouts, _stand_in(this), this, iters=1)
    phases = [phase for phase, _, _ in fused_kernels_ab.WEIGHT_PHASES]
    assert phases == ["T=1", "T=0.9^10", "sign"]
    kernels = [f"{kernel} {phase}" for phase in phases for kernel in ("divide_clamp", "clamp_and_divide_clamp")]
    assert [row["kernel"] for row in rows] == kernels
    assert all(row["same_bits"] and row["base_ms"] > 0 for row in rows)
    older = _stand_in(this)
    del older.clamp_and_divide_clamp  # a baseline from before the constraint pass binarized
    rows = fused_kernels_ab.compare_weights(layouts, older, this, iters=1)
    assert [row["kernel"] for row in rows] == [f"divide_clamp {phase}" for phase in phases]


def test_in_step_mode_times_every_kernel_of_both_builds_inside_whole_steps() -> None:
    this = fused_ops.load_extension()
    base = _stand_in(this)
    slow_calls: list[int] = []

    def slower_sign_backward(*args):
        slow_calls.append(1)
        time.sleep(0.002)
        return this.biased_sign_backward(*args)

    base.biased_sign_backward = slower_sign_backward
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    round_trips = iter([70.0, 320.0])
    medians, rows, pairs = fused_kernels_ab.compare_in_steps(
        model, batch, base, this, steps=2, warmup=1, probe=lambda: next(round_trips)
    )
    assert fused_ops.load_extension() is this  # restored
    by_kernel = {row["kernel"]: row for row in rows}
    # BNext-T: one sign kernel call per processor each way, every step; 3 steps ran on the baseline.
    assert by_kernel["biased_sign_backward"]["calls"] == by_kernel["biased_sign_forward"]["calls"] == 31
    assert len(slow_calls) == 3 * 31
    # Only the baseline's sign backward sleeps: 31 calls x 2 ms per step at least.
    assert by_kernel["biased_sign_backward"]["base_ms"] > 31 * 2 > by_kernel["biased_sign_backward"]["this_ms"]
    # The optimizer makes each binary weight's update in its layer's one pass (the update, clamp and binarization).
    assert {"bn_prelu_forward", "gated_bn_backward", "adamw_clamp_and_divide_clamp"} <= set(by_kernel)
    assert all(row["base_ms"] > 0 and row["this_ms"] > 0 for row in rows)
    assert medians["base"] > medians["this"] > 0
    # One record per timed pair, with the round trip measured before it.
    assert [pair["round_trip_ns"] for pair in pairs] == [70.0, 320.0]
    for pair in pairs:
        assert pair["base_ms"] > pair["base_kernels_ms"] > 31 * 2 > pair["this_kernels_ms"] > 0
        assert pair["this_ms"] > pair["this_kernels_ms"]
    assert medians["base"] == pytest.approx(sum(pair["base_ms"] for pair in pairs) / 2)


def test_in_step_pairs_are_summarised_per_placement_of_the_threads() -> None:
    def pair(round_trip: float | None, base: float, this: float) -> dict:
        return {
            "round_trip_ns": round_trip,
            "base_ms": base,
            "this_ms": this,
            "base_kernels_ms": base / 10,
            "this_kernels_ms": this / 20,
        }

    together = [pair(60.0, 800.0, 790.0), pair(80.0, 820.0, 800.0), pair(70.0, 900.0, 700.0)]
    apart = [pair(320.0, 1000.0, 900.0), pair(340.0, 1000.0, 950.0)]
    lines = fused_kernels_ab.placement_lines([together[0], apart[0], together[1], apart[1], together[2]])
    assert lines == [
        "threads' round trip 60 to 80 ns, 3 pairs: step 820.00 / 790.00 ms (1.04), kernels 82.00 / 39.50 ms (2.08)",
        "threads' round trip 320 to 340 ns, 2 pairs: step 1000.00 / 925.00 ms (1.08), kernels 100.00 / 46.25 ms (2.16)",
    ]
    assert fused_kernels_ab.placement_lines([pair(None, 1.0, 1.0)]) == []  # not measured: no line


def test_in_step_mode_refuses_a_baseline_without_a_kernel_this_tree_calls() -> None:
    this = fused_ops.load_extension()
    base = _stand_in(this)
    del base.bn_prelu_statistics  # a build from before the tail stopped storing b
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    with pytest.raises(SystemExit, match="the baseline build lacks bn_prelu_statistics"):
        fused_kernels_ab.compare_in_steps(model, batch, base, this, steps=1, warmup=0)
    assert fused_ops.load_extension() is this


def test_in_step_and_weights_are_separate_comparisons() -> None:
    with pytest.raises(SystemExit):
        fused_kernels_ab.main(["--baseline", "HEAD", "--in-step", "--weights"])
