"""The kernel benchmark finds the model's activation shapes and times each kernel fused and unfused."""

from __future__ import annotations

import os

import pytest
import torch

import models
from benchmarks import fused_kernels
from models import fused_ops

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def test_shapes_are_the_batch_norm_inputs_largest_first() -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    shapes = fused_kernels.norm_input_shapes(model, torch.randn(2, 3, 16, 16))
    sizes = [c * h * w for _, c, h, w in shapes]
    assert sizes == sorted(sizes, reverse=True) and len(set(shapes)) == len(shapes) >= 4
    assert shapes[-1][2:] == (1, 1) or min(h for *_, h, _ in shapes) < 16  # the network downsamples
    assert model.training  # its mode is restored


def test_the_fused_half_calls_the_kernels_and_the_unfused_half_does_not(monkeypatch) -> None:
    calls: list[tuple[bool, str]] = []
    real = fused_ops.load_extension()

    class Spy:
        def __getattr__(self, attr):
            calls.append((fused_ops._enabled, attr))
            return getattr(real, attr)

    monkeypatch.setattr(fused_ops, "load_extension", lambda: Spy())
    cases = fused_kernels.kernel_cases((4, 8, 4, 4))
    assert set(cases) == {"processor_inputs", "batch_norm_prelu", "gated_batch_norm_residual"}
    for fn in cases.values():
        calls.clear()
        fused_ms, unfused_ms = fused_kernels.time_pair(fn, iters=1, warmup=0)
        assert fused_ms > 0 and unfused_ms > 0
        assert calls and all(enabled for enabled, _ in calls)  # every kernel call came from the fused half
        assert any(name.endswith("_backward") for _, name in calls)


def test_kernel_calls_run_each_kernel_forward_and_backward(extension_calls: list[str]) -> None:
    calls = extension_calls
    kernel_calls = fused_kernels.kernel_calls((4, 8, 4, 4))
    expected = {
        "processor_inputs": ["biased_sign_forward", "biased_sign_backward"],
        "batch_norm_prelu": ["bn_prelu_forward", "bn_prelu_backward"],
        "gated_batch_norm_residual": ["gated_bn_forward", "gated_bn_backward"],
    }
    assert set(kernel_calls) == set(expected)
    for name, fn in kernel_calls.items():
        calls.clear()
        fn()
        assert calls == expected[name], name


def test_main_prints_one_line_per_shape_and_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    fused_kernels.main(["--width-mult", "0.125", "--img-size", "16", "--batch", "4", "--iters", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "host memory: malloc's defaults (no --keep-freed-memory)"
    assert lines[1] == "huge pages: malloc's default pages (no --huge-pages)"
    assert lines[3].split()[-6:] == ["copy", "ms", "fused/copy", "kernel", "ms", "kernel/copy"]
    rows = [line.split() for line in lines[4:-1]]
    assert rows and len(rows) % 3 == 0
    total = lines[-1].split()
    assert total[:4] == ["total", "(one", "call", "per"]
    sums = [sum(float(row[i]) for row in rows) for i in (-7, -6, -2)]  # fused, unfused, kernel ms
    assert [float(total[i]) for i in (-4, -3, -1)] == pytest.approx(sums, abs=0.02 * len(rows))
    for row in rows:
        fused_ms, unfused_ms, ratio, copy_ms, per_copy, kernel_ms, kernel_per_copy = map(float, row[-7:])
        assert min(fused_ms, unfused_ms, ratio, copy_ms, per_copy, kernel_ms, kernel_per_copy) > 0


def test_time_alternating_calls_first_then_second_after_the_warm_up() -> None:
    calls: list[str] = []
    first_ms, second_ms = fused_kernels.time_alternating(
        lambda: calls.append("first"), lambda: calls.append("second"), iters=3, warmup=2
    )
    assert calls == ["first", "second"] * 5
    assert first_ms >= 0 and second_ms >= 0


def test_gates_time_matrix_products_against_convolutions(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125)
    sizes = fused_kernels.gate_sizes(model)
    assert sum(sizes.values()) == 31 and all(channels // hidden == 8 for channels, hidden in sizes)
    calls: list[str] = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append("linear") or real_linear(*a))
    run = fused_kernels.gate_case(64, 8, batch=4)
    run()
    assert calls == ["linear", "linear"]  # both 1x1 convolutions as matrix products
    with fused_ops.disabled():
        run()
    assert len(calls) == 2
    fused_kernels.main(["--width-mult", "0.125", "--img-size", "16", "--batch", "4", "--iters", "1", "--gates"])
    lines = capsys.readouterr().out.strip().splitlines()
    start = lines.index("squeeze-excitation gates, batch 4, forward + backward")
    rows = [line.split() for line in lines[start + 2 : -1]]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == sorted((c, h, n) for (c, h), n in sizes.items())
    products = sum(int(r[2]) * float(r[3]) for r in rows)
    assert lines[-1].startswith("per forward (rows x gates): products ")
    assert float(lines[-1].split("products ")[1].split(" ms")[0]) == pytest.approx(products, abs=0.01 * len(rows))
