"""Where an eager training step's time goes outside the convolutions, timed inside real steps.

``torch.profiler`` distorts some per-operator times: on the AMD EPYC development machine
``benchmarks/step_profile.py`` gave the weight binarization 83 ms of a step in which the
same calls took 6 to 16 ms. This benchmark puts wall-clock timers around the pieces of
the step that are single Python-visible calls instead, runs real steps, and reports
milliseconds per step:

* every call of the C++ training kernels (``models/csrc/fused_train.cpp``): the three
  processor kernels forward and backward (the batch-norm one also for the stem), the 2x2
  pooling, the weight binarization (in a step, or with the constraint's clamp after the
  optimizer step, preparing the next); those that the tap products call
  (:data:`TAP_PRODUCT_KERNELS`) are convolution work, which the floor does too: their rows
  say so, and the remainder does not subtract them;
* the Python and autograd around the processor kernels: the time of their functions in
  :mod:`models.fused_ops` (forward; a recoupled processor calls two kernels in one,
  :func:`models.fused_ops.processor_tail`) and of their autograd backward, less the kernel
  calls inside;
* the recoupling gates inside the tail, forward and backward (their C++ calls included):
  their 1x1 products are part of the floor as well, so the remainder is that much smaller;
* the optimizer step and :func:`models.apply_constraints` (each less its kernel calls: with
  :class:`ImageNet.optim.LayerConstrainedAdamW` the binary weights' update, clamp and next
  binarization are one kernel call per weight inside the optimizer step, and the other
  parameters' update one call for all, ``adamw_many``);
* the remainder: the step less the convolution floor of ``benchmarks/train_step.py``
  (timed alternately with the steps, medians) less the pieces above (means). It holds the
  element-wise work outside the kernels (gates, mixes, concatenations), gradient
  accumulation, the Python of the modules and autograd's bookkeeping, and whatever the
  convolutions cost more inside the step than alone.

Where the steps fell into two placements of the CPU threads (measured before every pair,
:mod:`benchmarks.thread_placement`), a column per placement follows, each from its own
steps: on the AMD EPYC development machine the kernels that read what the other thread
wrote took up to twice as long with its two vCPUs on different core complexes.

With ``--by-shape``, ``--iters`` more steps follow, each with a floor as before (finding the
shapes and bytes between the calls would lengthen the timed steps), and a second table splits
every kernel's time in them by the shape of its largest tensor argument (an activation, a
weight, the tap products' rows), with the megabytes its calls touch (each tensor argument
and result once, :func:`touched_bytes`) and the rate they make. Those bytes are a lower
bound of the kernel's memory traffic: a two-pass kernel reads its inputs twice, and a store
to a line that no cache holds reads the line first. A streaming reference measured in the same
run follows (``torch.add`` of two tensors into a third, at sizes of the step's activations,
and at a size beyond the last-level cache, :func:`beyond_caches_mib`), so that each row reads
against what this machine moves (``RESULTS.md``, twenty-first session). A last line adds up
the bytes that the kernels outside the floor touch per step (:func:`bandwidth_budget`) and
the time they take at each reference rate: a yardstick for the kernels as a whole, like the
convolution floor for the step (not a bound: some of their reads come from the caches, and
the touched bytes undercount what they move).

Usage::

    python benchmarks/step_breakdown.py --keep-freed-memory    # BNext-T, CIFAR stem, 32x32, batch 64
    python benchmarks/step_breakdown.py --keep-freed-memory --by-shape   # each kernel per shape, GB/s
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks import thread_placement  # noqa: E402
from benchmarks.step_profile import add_model_arguments  # noqa: E402
from benchmarks.train_step import collect_conv_shapes, host_memory_lines, make_floor, make_step, measure  # noqa: E402
from ImageNet.optim import build_optimizer  # noqa: E402
from models import blocks, bnext, fused_ops, kernel_ops  # noqa: E402

#: The processor kernels: their function in models.fused_ops (as models.blocks calls it), its
#: autograd function (models.kernel_ops, models.fused_ops), and the C++ kernels whose forward and
#: backward calls it makes. A recoupled processor's batch norms run in one function (the tail);
#: the others, and the stem, call the batch-norm functions themselves.
PROCESSOR_KERNELS = {
    "processor_inputs": (kernel_ops._ProcessorInputs, ("biased_sign",)),
    "processor_tail": (fused_ops._ProcessorTail, ("bn_prelu", "gated_bn")),
    "batch_norm_prelu": (kernel_ops._BatchNormPReLU, ("bn_prelu",)),
    "gated_batch_norm_residual": (kernel_ops._GatedBatchNorm, ("gated_bn",)),
}


#: Forward kernels of those functions not named ``<kernel>_forward``: the tail's first batch norm,
#: which computes its statistics and the gate's means without storing its output.
OTHER_FORWARD_KERNELS = ("bn_prelu_statistics",)

#: Kernels that the tap products call (:mod:`models.tap_conv`: the operands' int8 check, the
#: weight gradient's transposition, the rows' layouts): convolution work, which the floor runs too.
TAP_PRODUCT_KERNELS = ("to_ternary_int8", "from_tap_major", "to_rows", "from_rows")

#: The suffix of their rows, which the remainder does not subtract.
IN_THE_FLOOR = " (tap products: in the floor too, not subtracted)"

#: The recoupling gates' kernels (forward, backward): their time is mostly their 1x1 products,
#: which the floor runs too; they are counted in the gates' own rows.
GATE_KERNEL_PREFIX = "recoupling_gate"

#: The model modules that call the processor kernels' functions by these names.
CALLERS = (blocks, bnext)


class Timers:
    """Seconds and calls per named piece."""

    def __init__(self) -> None:
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its wall-clock time and calls added to ``name``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def since(self, seconds: dict[str, float], calls: dict[str, int]) -> Timers:
        """What was added since the snapshot ``(dict(self.seconds), dict(self.calls))``, as new timers."""
        delta = Timers()
        for name, value in self.seconds.items():
            delta.seconds[name] = value - seconds.get(name, 0.0)
            delta.calls[name] = self.calls[name] - calls.get(name, 0)
        return delta

    def add(self, other: Timers) -> None:
        """Add ``other``'s seconds and calls to these."""
        for name, value in other.seconds.items():
            self.seconds[name] += value
            self.calls[name] += other.calls[name]


def tensors_in(*values: Any) -> Iterator[torch.Tensor]:
    """The tensors among ``values``, in order, lists and tuples looked into."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from tensors_in(*value)
        elif isinstance(value, torch.Tensor):
            yield value


def touched_bytes(*values: Any) -> int:
    """Bytes of the distinct tensors among ``values`` (:func:`tensors_in`): each tensor's values once,
    however many of the arguments and results share its memory (an in-place update)."""
    sizes = {(t.data_ptr(), t.numel() * t.element_size()) for t in tensors_in(*values) if t.numel() > 0}
    return sum(size for _, size in sizes)


def largest_shape(*values: Any) -> tuple[int, ...]:
    """The shape of the largest tensor among ``values`` (:func:`tensors_in`; the first of equal sizes),
    ``()`` without one: what a kernel call works on (an activation, a weight)."""
    largest = max(tensors_in(*values), key=torch.Tensor.numel, default=None)
    return tuple(largest.shape) if largest is not None else ()


class ShapeTimers:
    """Seconds, calls and touched bytes per ``(kernel, shape of its largest tensor argument)``, while active."""

    def __init__(self) -> None:
        self.seconds: collections.defaultdict[tuple[str, tuple[int, ...]], float] = collections.defaultdict(float)
        self.calls: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()
        self.bytes: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()
        self.bookkeeping_seconds = 0.0  # finding the shapes and bytes, after each timed call
        self.active = False

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, its calls recorded by the shape of their largest tensor argument while :attr:`active`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            end = time.perf_counter()
            key = (name, largest_shape(args, tuple(kwargs.values())))
            self.seconds[key] += end - start
            self.calls[key] += 1
            self.bytes[key] += touched_bytes(args, tuple(kwargs.values()), result)
            self.bookkeeping_seconds += time.perf_counter() - end
            return result

        return timed

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.bytes.clear()
        self.bookkeeping_seconds = 0.0

    def rows(self, steps: int) -> list[tuple[str, tuple[int, ...], float, float, float, float]]:
        """``(kernel, shape, ms per step, calls per step, MB touched per call, GB/s)``, by kernel, the
        slowest shapes first (GB/s: the touched bytes over the calls' time)."""
        rows = []
        for key, seconds in self.seconds.items():
            calls, touched = self.calls[key], self.bytes[key]
            rate = touched / seconds / 1e9 if seconds > 0 else float("inf")
            rows.append((*key, 1e3 * seconds / steps, calls / steps, touched / calls / 1e6, rate))
        kernel_ms = collections.defaultdict(float)
        for name, _, ms, *_ in rows:
            kernel_ms[name] += ms
        return sorted(rows, key=lambda r: (-kernel_ms[r[0]], r[0], -r[2]))


class TimedExtension:
    """The C++ extension with every function timed as ``kernel <name>`` (and per shape, given ``shapes``)."""

    def __init__(self, extension: Any, timers: Timers, shapes: ShapeTimers | None = None) -> None:
        self._extension, self._timers, self._shapes = extension, timers, shapes

    def __getattr__(self, name: str) -> Callable[..., Any]:
        timed = self._timers.wrap(f"kernel {name}", getattr(self._extension, name))
        # Per shape outside: its bookkeeping stays out of the kernels' rows.
        return self._shapes.wrap(name, timed) if self._shapes is not None else timed


def streaming_rates(sizes_mib: list[float], repeats: int = 20) -> list[tuple[float, float]]:
    """``(MiB per tensor, GB/s)`` of ``torch.add(a, b, out=c)`` (three tensors of that size, 12 bytes per
    value moved), the median of ``repeats`` timed calls after two untimed ones: the machine's streaming
    rate for working sets like the step's activations, measured where the kernels were."""
    rates = []
    for mib in sizes_mib:
        values = max(1, int(mib * 2**20 / 4))
        a, b, c = torch.randn(values), torch.randn(values), torch.empty(values)
        times = []
        for index in range(repeats + 2):
            start = time.perf_counter()
            torch.add(a, b, out=c)
            if index >= 2:
                times.append(time.perf_counter() - start)
        times.sort()
        rates.append((mib, 12 * values / times[len(times) // 2] / 1e9))
    return rates


#: The smallest per-tensor size of the streaming reference beyond the caches (three tensors of it).
BEYOND_CACHES_MIN_MIB = 256.0


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The largest cache that Linux reports for CPU 0 (``index*/size``, e.g. ``307200K``), None where unknown."""
    sizes = []
    for size_file in cache_dir.glob("index*/size"):
        text = size_file.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale > 1 else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def beyond_caches_mib() -> float:
    """Per-tensor MiB of the streaming reference whose three tensors cannot stay in any cache: the larger
    of :data:`BEYOND_CACHES_MIN_MIB` and the last-level cache that the machine reports (which a virtual
    machine may overstate; three times that is beyond it either way)."""
    cache = last_level_cache_bytes()
    return max(BEYOND_CACHES_MIN_MIB, cache / 2**20 if cache else 0.0)


def bandwidth_budget(
    rows: list[tuple[str, tuple[int, ...], float, float, float, float]],
) -> tuple[float, float]:
    """``(MB touched per step, ms per step)`` of the kernels outside the convolution floor, from
    :meth:`ShapeTimers.rows`: every kernel but the tap products' (:data:`TAP_PRODUCT_KERNELS`, which
    the floor runs) and the recoupling gates' (whose time is mostly their 1x1 products, in the floor)."""
    outside = [row for row in rows if row[0] not in TAP_PRODUCT_KERNELS and not row[0].startswith(GATE_KERNEL_PREFIX)]
    megabytes = sum(calls * per_call for _, _, _, calls, per_call, _ in outside)
    return megabytes, sum(ms for _, _, ms, *_ in outside)


@contextlib.contextmanager
def timed_pieces(timers: Timers, optimizer: torch.optim.Optimizer, shapes: ShapeTimers | None = None) -> Iterator[None]:
    """Inside, the step's pieces add their time to ``timers`` (the kernels' calls also to ``shapes``,
    while it is active); everything is restored on exit."""
    extension = fused_ops.load_extension()
    if extension is None:
        raise RuntimeError("the fused C++ extension is not available here (see the warning): nothing to time")
    timed = TimedExtension(extension, timers, shapes)
    patches: list[tuple[Any, str, Any]] = [
        (fused_ops, "load_extension", lambda: timed),
        (models, "apply_constraints", timers.wrap("constraints", models.apply_constraints)),
        (optimizer, "step", timers.wrap("optimizer step", optimizer.step)),
    ]
    for piece in ("_gate_forward", "_gate_backward"):  # the recoupling gate's operators, inside the tail
        patches.append((fused_ops, piece, timers.wrap(f"gate {piece[6:]}", getattr(fused_ops, piece))))
    for name, (function, _) in PROCESSOR_KERNELS.items():
        for caller in CALLERS:  # where the model code calls it (the stem's batch norm too)
            if name in vars(caller):
                patches.append((caller, name, timers.wrap(f"forward {name}", getattr(caller, name))))
        backward = function.backward
        patches.append((function, "backward", staticmethod(timers.wrap(f"backward {name}", backward))))
    # (owner, attribute, its own value or None where it was inherited, e.g. the optimizer's step method)
    saved = [(owner, attribute, vars(owner).get(attribute)) for owner, attribute, _ in patches]
    try:
        for owner, attribute, replacement in patches:
            setattr(owner, attribute, replacement)
        yield
    finally:
        for owner, attribute, original in saved:
            if original is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)


def breakdown(timers: Timers, steps: int) -> list[tuple[str, float, float]]:
    """``(piece, ms per step, calls per step)``: the kernel calls, the Python and autograd around them, the rest."""
    per_step = {name: (1e3 * seconds / steps, timers.calls[name] / steps) for name, seconds in timers.seconds.items()}
    # The gate's kernel calls are inside its own rows (below), with the products they make.
    kernel_rows = (
        (name + (IN_THE_FLOOR if name.removeprefix("kernel ") in TAP_PRODUCT_KERNELS else ""), *value)
        for name, value in per_step.items()
        if name.startswith("kernel ") and not name.startswith(f"kernel {GATE_KERNEL_PREFIX}")
    )
    rows = sorted(kernel_rows, key=lambda r: -r[1])
    for direction in ("forward", "backward"):
        wrapped = sum(per_step.get(f"{direction} {name}", (0.0, 0.0))[0] for name in PROCESSOR_KERNELS)
        suffix = "_forward" if direction == "forward" else "_backward"
        kernels = {kernel for _, names in PROCESSOR_KERNELS.values() for kernel in names}
        inside = sum(per_step.get(f"kernel {kernel}{suffix}", (0.0, 0.0))[0] for kernel in kernels)
        if direction == "forward":
            inside += sum(per_step.get(f"kernel {kernel}", (0.0, 0.0))[0] for kernel in OTHER_FORWARD_KERNELS)
        inside += per_step.get(f"gate {direction}", (0.0, 0.0))[0]
        calls = sum(per_step.get(f"{direction} {name}", (0.0, 0.0))[1] for name in PROCESSOR_KERNELS)
        rows.append((f"Python and autograd around the processor kernels, {direction}", wrapped - inside, calls))
    for direction in ("forward", "backward"):
        ms, calls = per_step.get(f"gate {direction}", (0.0, 0.0))
        rows.append((f"recoupling gates, {direction} (their 1x1 products are in the floor too)", ms, calls))
    # With ImageNet.optim.LayerConstrainedAdamW the binary weights' update is a kernel call of
    # the layers' constraint pass (AdamW, the clamp and the next step's binarization), and the
    # other parameters' one call of adamw_many: each kernel in its own row.
    optimizer_ms, optimizer_calls = per_step.get("optimizer step", (0.0, 0.0))
    inside = sum(
        per_step.get(f"kernel {name}", (0.0, 0.0))[0] for name in ("adamw_clamp_and_divide_clamp", "adamw_many")
    )
    rows.append(("optimizer step, besides its kernel calls", optimizer_ms - inside, optimizer_calls))
    # The binary layers' constraint pass calls a kernel (the clamp and the next step's binarization),
    # which has its own row: the constraints' row holds the rest.
    constraints_ms, constraints_calls = per_step.get("constraints", (0.0, 0.0))
    inside = per_step.get("kernel clamp_and_divide_clamp", (0.0, 0.0))[0]
    rows.append(("constraints, besides their kernel calls", constraints_ms - inside, constraints_calls))
    return rows


def with_remainder(
    rows: list[tuple[str, float, float]], step_ms: float, floor_ms: float
) -> list[tuple[str, float, float]]:
    """``rows`` and a last row: the step less the floor less every piece (but the tap products' kernels)."""
    pieces = sum(ms for name, ms, _ in rows if not name.endswith(IN_THE_FLOOR))
    return [*rows, ("remainder: step - floor - the pieces above", step_ms - floor_ms - pieces, 0.0)]


def placement_breakdowns(
    per_step: list[Timers], timings: dict[str, Any]
) -> list[tuple[thread_placement.Placement, list[tuple[str, float, float]], float, float]]:
    """The breakdown of each placement of the threads, where the steps fell in two (else nothing).

    ``per_step`` holds each timed step's timers, ``timings`` what
    :func:`benchmarks.train_step.measure` returned for the same pairs (with round trips).
    Per placement: the group, its rows (with the remainder, from its pairs' medians), and
    those medians of the step and of the floor.
    """
    groups = thread_placement.group_by_round_trip(timings["round_trip_ns"])
    if len(groups) < 2:
        return []
    result = []
    for group in groups:
        merged = Timers()
        for index in group.indices:
            merged.add(per_step[index])
        step_ms, floor_ms = thread_placement.pair_medians(timings["step_ms"], timings["floor_ms"], group.indices)
        rows = with_remainder(breakdown(merged, len(group.indices)), step_ms, floor_ms)
        result.append((group, rows, step_ms, floor_ms))
    return result


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    """Print the breakdown of one configuration; returns its rows (the remainder last)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps, each with a floor (default: %(default)s)")
    parser.add_argument(
        "--by-shape",
        action="store_true",
        help="then as many steps again, each kernel timed per shape of its largest tensor argument: ms, MB "
        "touched per call, GB/s; then a streaming reference (torch.add) at the activations' sizes and beyond "
        "the caches, and the time the kernels' bytes per step take at each of its rates",
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(*host_memory_lines(parser, args, argv), sep="\n")
    torch.manual_seed(0)
    model = models.create_model(args.model, num_classes=10, stem="cifar", width_mult=args.width_mult)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    targets = torch.randint(0, 10, (args.batch,))
    floor = make_floor(collect_conv_shapes(model, images), "cpu")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-3, binary_weight_decay=1e-8)
    step = make_step(model, (images, targets), optimizer)
    timers = Timers()
    shapes = ShapeTimers() if args.by_shape else None
    per_step: list[Timers] = []

    def recorded_step() -> None:
        before = dict(timers.seconds), dict(timers.calls)
        step()
        per_step.append(timers.since(*before))

    # Where the two threads ran, before every pair: the kernels' times depend on it
    # (benchmarks/TRAINING_SPEED.md, Thread placement).
    probe = thread_placement.probe_if_available()
    with timed_pieces(timers, optimizer, shapes):
        for _ in range(args.warmup):
            step()
            floor()
        timers.clear()
        timings = measure(recorded_step, floor, warmup=0, iters=args.iters, probe=probe)
        if shapes is not None:
            # Steps of their own (the bookkeeping between the calls would lengthen the timed ones), each
            # followed by a floor as above; the steps' calls only, not the floor's (the tap products').
            for _ in range(args.iters):
                shapes.active = True
                try:
                    step()
                finally:
                    shapes.active = False
                floor()
    # The steps' own timers: the floor calls some of the kernels too (the tap products' conversion).
    in_steps = Timers()
    for timed in per_step:
        in_steps.add(timed)
    step_ms, floor_ms = timings["step_ms_median"], timings["floor_ms_median"]
    rows = with_remainder(breakdown(in_steps, args.iters), step_ms, floor_ms)
    placements = placement_breakdowns(per_step, timings)
    print(f"{args.model} img {args.img_size} batch {args.batch}, eager, {torch.get_num_threads()} threads")
    gap = step_ms - floor_ms
    print(f"step {step_ms:.1f} ms, floor {floor_ms:.1f} ms (medians of {args.iters}), step - floor {gap:.1f} ms")
    for group, _, group_step, group_floor in placements:
        print(
            f"threads' round trip {group.low_ns:.0f} to {group.high_ns:.0f} ns, {len(group.indices)} steps: "
            f"step {group_step:.1f} ms, floor {group_floor:.1f} ms"
        )
    columns = [f"{group.low_ns:.0f}-{group.high_ns:.0f} ns" for group, *_ in placements]
    print(f"{'piece':<70} {'ms/step':>8} {'calls/step':>11}" + "".join(f" {column:>12}" for column in columns))
    by_placement = [{name: ms for name, ms, _ in group_rows} for _, group_rows, *_ in placements]
    for name, ms, calls in rows:
        cells = "".join(f" {values.get(name, 0.0):>12.2f}" for values in by_placement)
        print(f"{name:<70} {ms:>8.2f} {calls:>11.0f}" + cells)
    if shapes is not None:
        print_by_shape(shapes.rows(args.iters))
        bookkeeping_ms = 1e3 * shapes.bookkeeping_seconds / args.iters
        print(
            f"per shape: {args.iters} steps after the timed ones (each followed by a floor), whose bookkeeping "
            f"took {bookkeeping_ms:.2f} ms per step outside the kernels' times"
        )
    return rows


def activation_sizes_mib(rows: list[tuple[str, tuple[int, ...], float, float, float, float]]) -> list[float]:
    """The smallest, a middle and the largest size in MiB (float32) of the activations that the processor
    kernels (:data:`PROCESSOR_KERNELS`) took, by the rows' shapes: where the streaming reference is taken."""
    prefixes = tuple({kernel for _, kernels in PROCESSOR_KERNELS.values() for kernel in kernels})
    sizes = sorted({4 * math.prod(shape) / 2**20 for name, shape, *_ in rows if name.startswith(prefixes)})
    if not sizes:
        return []
    return sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})


def print_by_shape(rows: list[tuple[str, tuple[int, ...], float, float, float, float]]) -> None:
    """The per-shape table of ``--by-shape``, then the streaming reference at the activations' sizes."""
    print()
    print(f"{'kernel':<30} {'largest argument':<22} {'ms/step':>8} {'calls/step':>10} {'MB/call':>8} {'GB/s':>7}")
    for name, shape, ms, calls, megabytes, rate in rows:
        print(f"{name:<30} {str(shape):<22} {ms:>8.2f} {calls:>10.0f} {megabytes:>8.2f} {rate:>7.1f}")
    print("GB/s: the bytes of the distinct tensors a call takes and returns, over its time; those bytes are a lower")
    print("bound of its memory traffic (two-pass kernels read their inputs twice, stores to uncached lines read them)")
    rates = streaming_rates(activation_sizes_mib(rows))
    reference = ", ".join(f"{rate:.1f} GB/s at {mib:.3g} MiB" for mib, rate in rates) or "no activation shapes"
    print(f"streaming reference, torch.add(a, b, out=c), 12 bytes per value, this run: {reference} per tensor")
    # Fewer repeats: each call moves gigabytes.
    (beyond_mib, beyond_rate), *_ = streaming_rates([beyond_caches_mib()], repeats=5)
    print(f"beyond the caches, the same add: {beyond_rate:.1f} GB/s at {beyond_mib:.4g} MiB per tensor")
    megabytes, ms = bandwidth_budget(rows)
    if ms > 0:
        at_rates = ", ".join(
            f"{megabytes / rate:.1f} ms at {rate:.1f} GB/s" for rate in (*(r for _, r in rates), beyond_rate)
        )
        print(
            f"kernels outside the floor (not the tap products' or the gates'): {megabytes:.0f} MB touched per step "
            f"in {ms:.1f} ms ({megabytes / ms:.1f} GB/s); at the reference rates those bytes take {at_rates}"
        )


if __name__ == "__main__":
    main()
