"""Each fused CPU training kernel against the modules it replaces, per activation shape of a model.

For every distinct shape that a batch norm of the model sees in a forward pass, times
forward plus backward of the three processor kernels of :mod:`models.fused_ops`
(``processor_inputs`` with mean and PReLU, ``batch_norm_prelu`` with PReLU and pooled
mean, ``gated_batch_norm_residual`` with a gate and multiplied residual) twice,
alternating: through the C++ kernels and with :func:`models.fused_ops.disabled` (the
modules one by one). Medians; the ratio ``unfused / fused`` is the figure to use.

The last columns put the kernels against the memory: ``copy ms`` is one ``copy_`` of a
tensor of the shape into a preallocated one (a read and a write of the activation),
and ``fused/copy`` the kernel's forward plus backward in such copies. ``kernel ms`` is
the C++ forward and backward calls alone (the same arguments, no autograd, no module
code) and ``kernel/copy`` that in copies: the difference between ``fused ms`` and
``kernel ms`` is the per-call cost of Python and autograd, which dominates on small
activations. The kernels need a few passes over the activation each (two or three
reads and a write forward, about as many backward), so a ``kernel/copy`` far above
that is overhead inside the kernel, not memory traffic.

With ``--gates`` a second table does the same for the squeeze-excitation gates, whose
two 1x1 convolutions of ``N x C x 1 x 1`` inputs a training step computes as matrix
products (:func:`models.fused_ops.conv2d_of_points`): one row per gate size, forward and
backward of ``SqueezeExcite.gate_from_pooled`` with the products and inside
:func:`models.fused_ops.disabled` (oneDNN's convolutions), alternating; the last line
weighs each row by its gates per forward.

Usage::

    python benchmarks/fused_kernels.py                      # BNext-T, CIFAR stem, 32x32, batch 64
    python benchmarks/fused_kernels.py --batch 32 --iters 30
    python benchmarks/fused_kernels.py --gates --keep-freed-memory
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks.step_profile import add_model_arguments  # noqa: E402
from benchmarks.train_step import host_memory_lines  # noqa: E402
from models import fused_ops  # noqa: E402
from models.quantizers import HardSign, LearnableBias  # noqa: E402


def norm_input_shapes(model: nn.Module, example: torch.Tensor) -> list[tuple[int, ...]]:
    """The distinct 4-D input shapes of the model's batch norms in one forward pass, largest first."""
    shapes: set[tuple[int, ...]] = set()
    handles = [
        m.register_forward_hook(lambda mod, args, out: shapes.add(tuple(args[0].shape)))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return sorted((s for s in shapes if len(s) == 4), key=lambda s: (-s[1] * s[2] * s[3], s))


def kernel_cases(shape: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    """Forward + backward of each processor kernel on tensors of ``shape`` (one closure per kernel)."""
    torch.manual_seed(0)
    channels = shape[1]
    x, b, residual = (torch.randn(shape).requires_grad_(True) for _ in range(3))
    gate = torch.rand(shape[0], channels, 1, 1).requires_grad_(True)
    move, sign, prelu = LearnableBias(channels), HardSign(), models.layers.PReLU(channels)
    norm = nn.BatchNorm2d(channels)
    upstream = torch.randn(shape)
    leaves = [x, b, residual, gate, *move.parameters(), *prelu.parameters(), *norm.parameters()]

    def clear() -> None:  # no gradient accumulation between calls
        for leaf in leaves:
            leaf.grad = None

    def inputs() -> None:
        clear()
        signs, mean, activated, _ = fused_ops.processor_inputs(x, move, sign, mean=True, prelu=prelu)
        torch.autograd.backward([signs, activated, mean], [upstream, upstream, torch.ones_like(mean)])

    def norm_prelu() -> None:
        clear()
        y, pooled = fused_ops.batch_norm_prelu(x, norm, prelu, pooled=True)
        torch.autograd.backward([y, pooled], [upstream, torch.ones_like(pooled)])

    def gated() -> None:
        clear()
        y = fused_ops.gated_batch_norm_residual(b, gate, residual, norm, multiply_residual=True)
        y.backward(upstream)

    return {"processor_inputs": inputs, "batch_norm_prelu": norm_prelu, "gated_batch_norm_residual": gated}


def gate_sizes(model: nn.Module) -> collections.Counter[tuple[int, int]]:
    """``(channels, hidden channels)`` of each squeeze-excitation gate of ``model``, with its count."""
    return collections.Counter(
        (m.se[1].in_channels, m.se[1].out_channels) for m in model.modules() if isinstance(m, models.SqueezeExcite)
    )


def gate_case(channels: int, hidden: int, batch: int) -> Callable[[], None]:
    """Forward + backward of a ``channels`` gate (``channels // hidden`` reduction) on a pooled batch."""
    torch.manual_seed(0)
    gate = models.SqueezeExcite(channels, ratio=channels // hidden)
    pooled = torch.randn(batch, channels, 1, 1).requires_grad_(True)
    upstream = torch.randn(batch, channels, 1, 1)
    leaves = [pooled, *gate.parameters()]

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        gate.gate_from_pooled(pooled).backward(upstream)

    return run


def print_gate_table(model: nn.Module, batch: int, iters: int) -> None:
    """One row per gate size: matrix products against oneDNN's convolutions, then the per-forward sum."""
    print(f"squeeze-excitation gates, batch {batch}, forward + backward")
    print(f"{'channels':>8} {'hidden':>6} {'gates':>5} {'products ms':>12} {'conv ms':>8} {'conv/products':>14}")
    totals = [0.0, 0.0]
    for (channels, hidden), count in sorted(gate_sizes(model).items()):
        products_ms, conv_ms = time_pair(gate_case(channels, hidden, batch), iters)
        totals = [totals[0] + count * products_ms, totals[1] + count * conv_ms]
        row = f"{channels:>8} {hidden:>6} {count:>5} {products_ms:>12.3f} {conv_ms:>8.3f}"
        print(f"{row} {conv_ms / products_ms:>14.2f}")
    print(f"per forward (rows x gates): products {totals[0]:.2f} ms, conv {totals[1]:.2f} ms, ", end="")
    print(f"conv/products {totals[1] / totals[0]:.2f}")


def kernel_calls(shape: tuple[int, ...], kernels: ModuleType | None = None) -> dict[str, Callable[[], tuple]]:
    """The C++ forward and backward calls of each case of :func:`kernel_cases`, without autograd.

    ``kernels`` is the extension to call (default: this tree's); each closure returns the
    forward's and the backward's results, and gives the same results on every call.
    """
    kernels = kernels if kernels is not None else fused_ops.load_extension()
    torch.manual_seed(0)
    n, channels = shape[:2]
    x, b, residual, upstream = (torch.randn(shape) for _ in range(4))
    gate, ones = torch.rand(n, channels), torch.ones(n, channels)
    bias, beta, gamma = torch.zeros(channels), torch.zeros(channels), torch.ones(channels)
    slope = torch.full((channels,), 0.25)

    def running_statistics() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(channels), torch.ones(channels)

    def inputs() -> tuple:
        forward = kernels.biased_sign_forward(x, bias, True, slope)
        return forward, kernels.biased_sign_backward(upstream, ones, upstream, x, bias, slope, 1.5)

    def norm_prelu() -> tuple:
        forward = kernels.bn_prelu_forward(x, gamma, beta, *running_statistics(), 0.1, 1e-5, slope, True)
        _, mean, invstd, _ = forward
        return forward, kernels.bn_prelu_backward(upstream, ones, x, gamma, beta, slope, mean, invstd)

    def gated() -> tuple:
        forward = kernels.gated_bn_forward(b, gate, residual, True, gamma, beta, *running_statistics(), 0.1, 1e-5)
        _, mean, invstd = forward
        return forward, kernels.gated_bn_backward(upstream, b, gate, residual, True, gamma, mean, invstd)

    return {"processor_inputs": inputs, "batch_norm_prelu": norm_prelu, "gated_batch_norm_residual": gated}


def time_alone(fn: Callable[[], None], iters: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn``."""
    samples = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_alternating(
    first: Callable[[], object], second: Callable[[], object], iters: int, warmup: int = 2
) -> tuple[float, float]:
    """Median milliseconds of ``first`` and ``second``, called alternately (first, then second) after a warm-up."""
    samples: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + iters):
        for fn, out in zip((first, second), samples):
            start = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                out.append(elapsed)
    return statistics.median(samples[0]), statistics.median(samples[1])


def time_pair(fn: Callable[[], None], iters: int, warmup: int = 2) -> tuple[float, float]:
    """Median milliseconds of ``fn`` with the kernels and without, alternating after a warm-up."""

    def unfused() -> None:
        with fused_ops.disabled():
            fn()

    return time_alternating(fn, unfused, iters, warmup)


def time_copy(shape: tuple[int, ...], iters: int, warmup: int = 2) -> float:
    """Median milliseconds of one ``copy_`` of a ``shape`` tensor into a preallocated one."""
    source, target = torch.randn(shape), torch.empty(shape)
    return time_alone(lambda: target.copy_(source), iters, warmup)


def main(argv: list[str] | None = None) -> None:
    """Print one line per (shape, kernel): fused and unfused milliseconds and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--iters", type=int, default=15, help="timed pairs per case (default: %(default)s)")
    parser.add_argument(
        "--gates",
        action="store_true",
        help="then time the squeeze-excitation gates: matrix products against oneDNN's 1x1 convolutions",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(*host_memory_lines(parser, args, argv), sep="\n")
    if fused_ops.backend() != "cpp":
        raise SystemExit("the fused C++ extension is not available here (see the warning): nothing to compare")
    model = models.create_model(args.model, num_classes=10, stem="cifar", width_mult=args.width_mult)
    shapes = norm_input_shapes(model, torch.randn(2, 3, args.img_size, args.img_size))
    print(f"{args.model} img {args.img_size} batch {args.batch}, {torch.get_num_threads()} threads, forward + backward")
    header = f"{'shape':<22} {'kernel':<26} {'fused ms':>9} {'unfused ms':>11} {'unfused/fused':>14}"
    print(f"{header} {'copy ms':>8} {'fused/copy':>11} {'kernel ms':>10} {'kernel/copy':>12}")
    totals = [0.0, 0.0, 0.0]  # fused, unfused, kernel
    for shape in shapes:
        shape = (args.batch, *shape[1:])
        copy_ms = time_copy(shape, args.iters)
        calls = kernel_calls(shape)
        for name, fn in kernel_cases(shape).items():
            fused_ms, unfused_ms = time_pair(fn, args.iters)
            kernel_ms = time_alone(calls[name], args.iters)
            totals = [t + v for t, v in zip(totals, (fused_ms, unfused_ms, kernel_ms))]
            row = f"{str(shape):<22} {name:<26} {fused_ms:>9.2f} {unfused_ms:>11.2f} {unfused_ms / fused_ms:>14.2f}"
            print(f"{row} {copy_ms:>8.3f} {fused_ms / copy_ms:>11.1f} {kernel_ms:>10.3f} {kernel_ms / copy_ms:>12.1f}")
    fused_ms, unfused_ms, kernel_ms = totals
    # One call of each kernel per shape: a summary of the table, not of a model's step.
    row = f"{'total (one call per row)':<49} {fused_ms:>9.2f} {unfused_ms:>11.2f} {unfused_ms / fused_ms:>14.2f}"
    print(f"{row} {'':>8} {'':>11} {kernel_ms:>10.3f}")
    if args.gates:
        print_gate_table(model, args.batch, args.iters)


if __name__ == "__main__":
    main()
