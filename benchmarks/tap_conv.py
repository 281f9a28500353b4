"""Binary convolutions by tap products (models.tap_conv) against F.conv2d, per shape of a model.

For every distinct binary convolution of a model's forward pass (input shape, weight
shape, stride), times forward plus backward (the input and weight gradients) twice,
alternating: ``F.conv2d`` (oneDNN on the CPU) and :func:`models.tap_conv.conv2d`. Medians;
``conv/taps`` above 1 means the tap products are faster. ``used`` says whether a training
step takes the tap products for that shape (:func:`models.tap_conv.applies`), so the
table shows the rule's both sides; ``max rel diff`` is the largest difference of the
output and the gradients, relative to each one's largest value (float32 rounding).
``per step`` weighs each shape by its calls per forward, over the shapes that are used.
The tap products get the weight in the layout a training step hands them: channels-last
(tap-major) where the step's binarization writes it (used shapes, C++ kernels built),
so they read it in place. ``copy/in place`` times them once more with a plain weight,
which they first copy into that layout, against the tap-major one: what the layout saves.

Then (``--step-pairs``, default 6) the whole eager training step of
``benchmarks/train_step.py`` (forward, loss, backward, AdamW, constraints), with the
tap products and inside :func:`models.tap_conv.disabled`, on two copies of the same
model, alternating: the change's effect on a step, which the per-shape rows only add up to.
``--layout-pairs`` (default 0) does the same for the tap-major binarization: steps whose
binary layers binarize into the taps' layout against steps whose layers binarize into
the plain one (the taps then copy the weight). ``--integer-pairs`` (default 0) times
whole steps below the sign threshold (temperature 1e-8: weights and inputs exact signs),
where the tap products' forward runs on int8, against the same steps inside
:func:`models.tap_conv.integer_products_disabled` (float32 products), alternating; the
two give the same bits, which it checks on the losses. ``--transpose-pairs`` (default 0)
times the weight gradient's transposition from the taps' layout
(:func:`models.tap_conv.weight_layout`, the C++ extension's kernel) against PyTorch's
strided copy, for each used 3x3 weight shape, then whole steps with either,
alternating.

Usage::

    python benchmarks/tap_conv.py                      # BNext-T, CIFAR stem, 32x32, batch 64
    python benchmarks/tap_conv.py --iters 15 --step-pairs 12 --keep-freed-memory
    python benchmarks/tap_conv.py --step-pairs 0 --layout-pairs 10 --keep-freed-memory
    python benchmarks/tap_conv.py --iters 1 --step-pairs 0 --integer-pairs 16 --keep-freed-memory
    python benchmarks/tap_conv.py --iters 1 --step-pairs 0 --transpose-pairs 30 --keep-freed-memory
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks.fused_kernels import time_alternating  # noqa: E402
from benchmarks.step_profile import add_model_arguments  # noqa: E402
from benchmarks.train_step import ConvShape, collect_conv_shapes, host_memory_lines, make_step  # noqa: E402
from models import fused_ops, tap_conv  # noqa: E402

Key = tuple[tuple[int, ...], tuple[int, ...], int, int]


def binary_conv_shapes(model: torch.nn.Module, example: torch.Tensor) -> collections.Counter[Key]:
    """``(input shape, weight shape, stride, padding)`` of each binary convolution, with its calls per forward."""
    counts: collections.Counter[Key] = collections.Counter()
    for shape in collect_conv_shapes(model, example):
        if shape.binary:
            counts[_key(shape)] += 1
    return counts


def _key(shape: ConvShape) -> Key:
    return shape.input_shape, shape.weight_shape, shape.stride[0], shape.padding[0]


def forward_backward(
    conv: Callable[..., torch.Tensor], key: Key, tap_major: bool = False
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A call running ``conv`` forward and backward on fixed random tensors of ``key``'s shapes.

    With ``tap_major`` the weight is channels-last (:func:`models.tap_conv.is_tap_major`).
    """
    input_shape, weight_shape, stride, padding = key
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, generator=generator).requires_grad_(True)
    weight = torch.randn(weight_shape, generator=generator)
    if tap_major:
        weight = weight.contiguous(memory_format=torch.channels_last)
    weight.requires_grad_(True)
    grad = torch.randn(F.conv2d(x.detach(), weight.detach(), stride=stride, padding=padding).shape, generator=generator)

    def run() -> tuple[torch.Tensor, ...]:
        out = conv(x, weight, stride, padding)
        return (out.detach(), *torch.autograd.grad(out, (x, weight), grad))

    return run


def _conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    return F.conv2d(x, weight, stride=stride, padding=padding)


def max_relative_difference(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """The largest ``|a - e|`` over the tensors, each relative to its own largest ``|e|``."""
    return max(((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for a, e in zip(actual, expected))


def time_steps(model: torch.nn.Module, batch: int, img_size: int, pairs: int) -> tuple[float, float]:
    """Median ms of a training step of ``model`` with the tap products and without, alternating."""
    images, targets = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    with_taps = make_step(copy.deepcopy(model), (images, targets))
    conv2d_step = make_step(copy.deepcopy(model), (images, targets))

    def without_taps() -> None:
        with tap_conv.disabled():
            conv2d_step()

    return time_alternating(with_taps, without_taps, pairs)


def binarize_into_plain_layout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every binary layer binarizing into the plain layout (the taps then copy the weight)."""
    for layer in model.modules():
        if isinstance(layer, models.BinaryConv2d):
            # An instance attribute shadows the method: forward's tap_major request is dropped.
            layer.binary_weight = lambda tap_major=False, layer=layer: models.BinaryConv2d.binary_weight(layer)
    return model


def time_layouts(model: torch.nn.Module, batch: int, img_size: int, pairs: int) -> tuple[float, float]:
    """Median ms of a training step binarizing into the taps' layout and into the plain one, alternating."""
    images, targets = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    tap_major = make_step(copy.deepcopy(model), (images, targets))
    plain = make_step(binarize_into_plain_layout(copy.deepcopy(model)), (images, targets))
    return time_alternating(tap_major, plain, pairs)


#: A temperature below the binary layers' sign threshold (1e-7): their weights are exact signs.
SIGN_PHASE_TEMPERATURE = 1e-8


def time_integer_products(model: torch.nn.Module, batch: int, img_size: int, pairs: int) -> tuple[float, float, bool]:
    """Median ms of a sign-phase training step with integer tap products and with float32 ones, alternating.

    Two copies of ``model`` at :data:`SIGN_PHASE_TEMPERATURE`; the third value says whether
    every pair of steps gave the same loss bit for bit (the copies train alike).
    """
    images, targets = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    copies = [copy.deepcopy(model) for _ in range(2)]
    for model_copy in copies:
        models.set_temperature(model_copy, SIGN_PHASE_TEMPERATURE)
    integer_step = make_step(copies[0], (images, targets))
    float_step = make_step(copies[1], (images, targets))
    losses: list[list[torch.Tensor]] = [[], []]

    def with_integers() -> None:
        losses[0].append(integer_step())

    def with_floats() -> None:
        with tap_conv.integer_products_disabled():
            losses[1].append(float_step())

    integer_ms, float_ms = time_alternating(with_integers, with_floats, pairs)
    same = all(torch.equal(a, b) for a, b in zip(*losses, strict=True))
    return integer_ms, float_ms, same


def strided_weight_layout(tap_major: torch.Tensor) -> torch.Tensor:
    """The weight gradient in the weight's layout by PyTorch's strided copy (what the kernel replaced)."""
    return tap_major if tap_major.shape[1] == 1 else tap_major.transpose(1, 2).contiguous()


@contextlib.contextmanager
def weight_gradients_by_strided_copy() -> Iterator[None]:
    """Inside, the tap products transpose their weight gradients by :func:`strided_weight_layout`."""
    kernel = tap_conv.weight_layout
    tap_conv.weight_layout = strided_weight_layout
    try:
        yield
    finally:
        tap_conv.weight_layout = kernel


def time_transposition(weight_shape: tuple[int, ...], iters: int) -> tuple[float, float]:
    """Median ms of one weight gradient's transposition from the taps' layout: the kernel's, then the strided copy's."""
    cout, cin, height, width = weight_shape
    tap_major = torch.randn(cout, height * width, cin)
    return time_alternating(lambda: tap_conv.weight_layout(tap_major), lambda: strided_weight_layout(tap_major), iters)


def time_transposition_steps(model: torch.nn.Module, batch: int, img_size: int, pairs: int) -> tuple[float, float]:
    """Median ms of a training step transposing its weight gradients by the kernel and by the strided copy."""
    images, targets = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    by_kernel = make_step(copy.deepcopy(model), (images, targets))
    copy_step = make_step(copy.deepcopy(model), (images, targets))

    def by_copy() -> None:
        with weight_gradients_by_strided_copy():
            copy_step()

    return time_alternating(by_kernel, by_copy, pairs)


def print_transpositions(model: torch.nn.Module, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    """The ``--transpose-pairs`` lines: each used 3x3 weight shape's transposition, then whole steps."""
    weight_shapes = sorted({row["key"][1] for row in rows if row["used"] and row["key"][1][-1] > 1}, reverse=True)
    for weight_shape in weight_shapes:
        kernel_ms, copy_ms = time_transposition(weight_shape, args.transpose_pairs)
        print(
            f"weight gradient {weight_shape} from the taps' layout: kernel {kernel_ms:.2f} ms, "
            f"strided copy {copy_ms:.2f} ms, copy/kernel {copy_ms / kernel_ms:.2f}"
        )
    kernel_ms, copy_ms = time_transposition_steps(model, args.batch, args.img_size, args.transpose_pairs)
    print(
        f"training step (eager, {args.transpose_pairs} pairs): weight gradients transposed by the kernel "
        f"{kernel_ms:.1f} ms, by the strided copy {copy_ms:.1f} ms, copy/kernel {copy_ms / kernel_ms:.3f}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Print one row per binary convolution shape; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--iters", type=int, default=9, help="timed pairs per shape (default: %(default)s)")
    parser.add_argument(
        "--step-pairs",
        type=int,
        default=6,
        help="timed pairs of whole training steps with and without the taps; 0 skips them (default: %(default)s)",
    )
    parser.add_argument(
        "--layout-pairs",
        type=int,
        default=0,
        help="timed pairs of whole training steps binarizing into the taps' layout and into the plain one; "
        "0 skips them (default: %(default)s)",
    )
    parser.add_argument(
        "--integer-pairs",
        type=int,
        default=0,
        help="timed pairs of whole sign-phase training steps with the taps' integer products and with float32 "
        "ones; 0 skips them (default: %(default)s)",
    )
    parser.add_argument(
        "--transpose-pairs",
        type=int,
        default=0,
        help="timed pairs of each used 3x3 weight gradient's transposition by the kernel and by PyTorch's strided "
        "copy, then of whole training steps with either; 0 skips them (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    pairs = (args.step_pairs, args.layout_pairs, args.integer_pairs, args.transpose_pairs)
    if args.iters < 1 or min(pairs) < 0:
        parser.error("--iters must be >= 1; --step-pairs, --layout-pairs, --integer-pairs and --transpose-pairs >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(*host_memory_lines(parser, args, argv), sep="\n")
    model = models.create_model(args.model, num_classes=10, stem="cifar", width_mult=args.width_mult)
    counts = binary_conv_shapes(model, torch.randn(args.batch, 3, args.img_size, args.img_size))
    print(f"{args.model} img {args.img_size} batch {args.batch}, {torch.get_num_threads()} threads, forward + backward")
    header = f"{'input':<20} {'weight':<20} {'stride':>6} {'calls':>5} {'conv ms':>9} {'taps ms':>9}"
    print(f"{header} {'conv/taps':>9} {'used':>5} {'max rel diff':>13} {'copy/in place':>13}")
    rows: list[dict[str, object]] = []
    totals = [0.0, 0.0]
    for key, calls in counts.items():
        input_shape, weight_shape, stride, padding = key
        x, weight = torch.empty(input_shape), torch.empty(weight_shape)
        used = tap_conv.applies(x, weight, stride, padding, 1)
        # The layout a training step hands the taps (see the module docstring); a 1x1 weight is tap-major anyway.
        as_in_a_step = torch.empty(input_shape, requires_grad=True), torch.empty(weight_shape, requires_grad=True)
        tap_major = weight_shape[-1] > 1 and fused_ops.hands_tap_major_weight(*as_in_a_step, stride, padding, 1)
        reference = forward_backward(_conv2d, key)
        taps = forward_backward(tap_conv.conv2d, key, tap_major=tap_major)
        difference = max_relative_difference(taps(), reference())
        conv_ms, taps_ms = time_alternating(reference, taps, args.iters)
        row: dict[str, object] = {"key": key, "calls": calls, "conv_ms": conv_ms, "taps_ms": taps_ms, "used": used}
        layout = ""
        if tap_major:
            copied_ms, in_place_ms = time_alternating(forward_backward(tap_conv.conv2d, key), taps, args.iters)
            row["copy_over_in_place"] = copied_ms / in_place_ms
            layout = f"{copied_ms / in_place_ms:.2f}"
        if used:
            totals = [totals[0] + calls * conv_ms, totals[1] + calls * taps_ms]
        rows.append(row)
        line = f"{str(input_shape):<20} {str(weight_shape):<20} {stride:>6} {calls:>5} {conv_ms:>9.2f} {taps_ms:>9.2f}"
        print(f"{line} {conv_ms / taps_ms:>9.2f} {'yes' if used else 'no':>5} {difference:>13.1e} {layout:>13}")
    if totals[1] > 0:
        print(
            f"per step, used shapes x calls: conv {totals[0]:.1f} ms, taps {totals[1]:.1f} ms, "
            f"conv/taps {totals[0] / totals[1]:.2f}"
        )
    if args.step_pairs:
        taps_ms, conv_ms = time_steps(model, args.batch, args.img_size, args.step_pairs)
        print(
            f"training step (eager, {args.step_pairs} pairs): with taps {taps_ms:.1f} ms, "
            f"without {conv_ms:.1f} ms, without/with {conv_ms / taps_ms:.2f}"
        )
    if args.layout_pairs:
        tap_major_ms, plain_ms = time_layouts(model, args.batch, args.img_size, args.layout_pairs)
        print(
            f"training step (eager, {args.layout_pairs} pairs): binarized into the taps' layout {tap_major_ms:.1f} ms, "
            f"into the plain one {plain_ms:.1f} ms, plain/taps' {plain_ms / tap_major_ms:.2f}"
        )
    if args.integer_pairs:
        integer_ms, float_ms, same = time_integer_products(model, args.batch, args.img_size, args.integer_pairs)
        print(
            f"training step below the sign threshold (eager, {args.integer_pairs} pairs): integer products "
            f"{integer_ms:.1f} ms, float32 {float_ms:.1f} ms, float32/integer {float_ms / integer_ms:.2f}, "
            f"same losses: {'yes' if same else 'NO'}"
        )
    if args.transpose_pairs:
        print_transpositions(model, rows, args)
    return rows


if __name__ == "__main__":
    main()
