"""This tree's fused CPU training kernels against another revision's, interleaved in one process.

Builds ``models/csrc/fused_train.cpp`` of a baseline (a git revision, or a file) as a
second extension next to this tree's, then for every activation shape of the model
times the C++ forward and backward calls of each kernel (those of
``benchmarks/fused_kernels.py``'s ``kernel ms`` column) alternately, baseline then this
tree, after a warm-up, and prints the medians, ``base/this`` (above 1: this tree is
faster) and whether the two builds give the same bits (every output tensor compared
with ``torch.equal``).

On a shared machine two separate runs of ``fused_kernels.py`` differ by more than a
kernel change gains; alternating the two builds in one process on the same tensors
puts the machine's drift on both sides. With ``--keep-freed-memory`` the outputs' memory
is reused from call to call: without it, glibc may hand out freshly mapped pages for the
large activations on some calls (page faults cost both sides alike, but can swamp the
kernels' own time on the 32x32 shapes).

With ``--in-step`` it times the kernels inside whole eager training steps instead,
alternating the two builds step by step (``models.fused_ops.load_extension`` swapped):
each kernel's milliseconds per step with either build, and the steps' medians, also per
placement of the two CPU threads (:mod:`benchmarks.thread_placement`, measured before
every pair), which moves a step by more than most kernel changes do. A
kernel's time in a step depends on what the steps before it left in the caches (which
core wrote its inputs, and when), which the per-shape calls on fresh tensors do not see.
No bits are compared in this mode (the per-shape mode does that).

Usage::

    python benchmarks/fused_kernels_ab.py --baseline HEAD~1        # a git revision of this repository
    python benchmarks/fused_kernels_ab.py --baseline /tmp/old.cpp   # a saved fused_train.cpp
    python benchmarks/fused_kernels_ab.py --baseline 3fb00cc --keep-freed-memory
    python benchmarks/fused_kernels_ab.py --baseline HEAD~1 --weights   # the weight binarization kernels
    python benchmarks/fused_kernels_ab.py --baseline HEAD~1 --in-step --keep-freed-memory   # inside training steps
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks import thread_placement  # noqa: E402
from benchmarks.fused_kernels import kernel_calls, norm_input_shapes, time_alternating  # noqa: E402
from benchmarks.step_breakdown import TimedExtension, Timers  # noqa: E402
from benchmarks.step_profile import add_model_arguments  # noqa: E402
from benchmarks.train_step import host_memory_lines, make_step  # noqa: E402
from models import extensions, fused_ops  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE = "models/csrc/fused_train.cpp"
#: Where baseline sources are written: a fixed place, so that torch's build cache finds them again.
BUILD_DIR = Path(tempfile.gettempdir()) / "bnext_fused_train_baselines"


def baseline_source(baseline: str) -> str:
    """The C++ text of ``baseline``: an existing file, else ``git show <baseline>:models/csrc/fused_train.cpp``."""
    path = Path(baseline)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        shown = subprocess.run(
            ["git", "show", f"{baseline}:{SOURCE}"], cwd=REPOSITORY, capture_output=True, text=True, check=False
        )
    except OSError as error:  # no git on this machine
        raise SystemExit(f"--baseline {baseline!r} is not a file, and git cannot be run here ({error})") from error
    if shown.returncode != 0:
        raise SystemExit(
            f"--baseline {baseline!r} is neither a file nor a git revision with {SOURCE}: {shown.stderr.strip()}"
        )
    return shown.stdout


def build_baseline(text: str, build_dir: Path) -> ModuleType:
    """Compile ``text`` with the project's flags as an extension named after its content (cached by torch)."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / f"fused_train_{digest}.cpp"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)  # atomic: a concurrent run never compiles half a file
    return extensions.compile_source(f"bnext_fused_train_base_{digest}_{extensions.cpu_tag()}", path)


def same_bits(first: object, second: object) -> bool:
    """Whether two nested tuples/lists of tensors are equal tensor by tensor (``torch.equal``)."""
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.equal(first, second)
    if isinstance(first, (tuple, list)) and isinstance(second, (tuple, list)) and len(first) == len(second):
        return all(same_bits(a, b) for a, b in zip(first, second))
    return False


def compare(shapes: list[tuple[int, ...]], base: ModuleType, this: ModuleType, iters: int) -> list[dict]:
    """One row per (shape, kernel): ``base_ms``, ``this_ms`` and ``same_bits``."""
    rows = []
    for shape in shapes:
        base_calls, this_calls = kernel_calls(shape, base), kernel_calls(shape, this)
        for name, this_fn in this_calls.items():
            base_fn = base_calls[name]
            try:
                same = same_bits(base_fn(), this_fn())
            except (AttributeError, TypeError) as error:  # a baseline older than these kernels' signatures
                raise SystemExit(f"the baseline's {name} kernels cannot be called as this tree's: {error}") from error
            base_ms, this_ms = time_alternating(base_fn, this_fn, iters, warmup=3)
            rows.append({"shape": shape, "kernel": name, "base_ms": base_ms, "this_ms": this_ms, "same_bits": same})
    return rows


def weight_layouts(model: nn.Module, example: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """Each binary layer's latent weight and whether a training step binarizes it tap-major (channels-last).

    Read from one training forward of ``example`` (:func:`models.fused_ops.hands_tap_major_weight`).
    """
    layouts: list[tuple[torch.Tensor, bool]] = []

    def record(module: models.BinaryConv2d, args: tuple) -> None:
        tap_major = fused_ops.hands_tap_major_weight(
            args[0], module.weight, module.stride, module.padding, module.groups
        )
        layouts.append((module.weight.detach(), tap_major))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, models.BinaryConv2d)]
    try:
        model.train()(example)
    finally:
        for handle in handles:
            handle.remove()
    return layouts


#: The binarization's divisors (models.fused_ops._divisors) in the three phases of training:
#: T = 1 (the first epoch), T = 0.9^10 (the progressive phase, a temperature that is not a
#: power of two) and T below the sign threshold (both divisors the smallest normal float).
WEIGHT_PHASES = (
    ("T=1", 1.0, 1.0),
    ("T=0.9^10", float(torch.tensor(0.9**10, dtype=torch.float32)), 1.0),
    ("sign", torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).tiny),
)


def compare_weights(
    layouts: list[tuple[torch.Tensor, bool]], base: ModuleType, this: ModuleType, iters: int
) -> list[dict]:
    """The weight kernels over all the layers' weights, each in its step's layout: one row per kernel and phase.

    ``divide_clamp`` (a step's binarization) and, where both builds have it,
    ``clamp_and_divide_clamp`` (the constraint pass with the next step's binarization; the
    weights are inside the clip, so its clamp writes nothing and every call is the same),
    at each temperature of :data:`WEIGHT_PHASES`.
    """
    rows = []
    tap_values = sum(weight.numel() for weight, tap_major in layouts if tap_major) / 1e6
    values = sum(weight.numel() for weight, _ in layouts) / 1e6
    shape = f"{len(layouts)} weights, {tap_values:.1f}M of {values:.1f}M tap-major"
    for phase, first, second in WEIGHT_PHASES:
        for name, arguments in (("divide_clamp", (first, second)), ("clamp_and_divide_clamp", (1.5, first, second))):
            if not (hasattr(base, name) and hasattr(this, name)):
                continue

            def calls(kernels: ModuleType, name: str = name, arguments: tuple = arguments) -> Callable[[], list]:
                function = getattr(kernels, name)
                return lambda: [function(weight, *arguments, tap_major) for weight, tap_major in layouts]

            base_fn, this_fn = calls(base), calls(this)
            same = same_bits(base_fn(), this_fn())
            base_ms, this_ms = time_alternating(base_fn, this_fn, iters, warmup=3)
            kernel = f"{name} {phase}"
            rows.append({"shape": shape, "kernel": kernel, "base_ms": base_ms, "this_ms": this_ms, "same_bits": same})
    return rows


def compare_in_steps(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    base: ModuleType,
    this: ModuleType,
    steps: int,
    warmup: int,
    probe: Callable[[], float | None] | None = None,
) -> tuple[dict[str, float], list[dict], list[dict]]:
    """Whole eager training steps of ``model``, the two builds alternating step by step.

    A first untimed step with this tree's build finds the functions a step calls; a
    baseline lacking one is refused. Returns the steps' medians (``{"base": ms, "this":
    ms}``), one row per kernel called (``base_ms`` and ``this_ms`` per step, and ``calls``
    per step) and one dict per timed pair of steps: ``base_ms`` and ``this_ms`` (the
    steps), ``base_kernels_ms`` and ``this_kernels_ms`` (their kernel calls) and
    ``round_trip_ns``, what ``probe`` returned before the pair (None without one; see
    :func:`benchmarks.thread_placement.round_trip_ns`).
    """
    builds = {"base": base, "this": this}
    timers = {label: Timers() for label in builds}
    step_ms: dict[str, list[float]] = {label: [] for label in builds}
    pairs: list[dict] = []
    step = make_step(model, batch)
    original = fused_ops.load_extension

    def timed_step(label: str) -> tuple[float, float]:
        # The step's milliseconds, and those of its kernel calls.
        extension = TimedExtension(builds[label], timers[label])
        fused_ops.load_extension = lambda: extension
        kernels_before = sum(timers[label].seconds.values())
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        return 1e3 * elapsed, 1e3 * (sum(timers[label].seconds.values()) - kernels_before)

    try:
        timed_step("this")
        called = [name.removeprefix("kernel ") for name in timers["this"].calls]
        missing = sorted(name for name in called if not hasattr(base, name))
        if missing:  # the step would call them on the baseline build and fail half-way
            raise SystemExit(
                f"the baseline build lacks {', '.join(missing)}, which this tree's code calls in a step: --in-step "
                "compares builds of the same functions; time such a change with benchmarks/train_step.py instead"
            )
        for i in range(warmup + steps):
            if i == warmup:
                for timer in timers.values():
                    timer.clear()
            pair: dict = {"round_trip_ns": probe() if probe is not None and i >= warmup else None}
            for label in ("base", "this") if i % 2 == 0 else ("this", "base"):
                pair[f"{label}_ms"], pair[f"{label}_kernels_ms"] = timed_step(label)
                if i >= warmup:
                    step_ms[label].append(pair[f"{label}_ms"])
            if i >= warmup:
                pairs.append(pair)
    finally:
        fused_ops.load_extension = original
    names = sorted(set(timers["base"].seconds) | set(timers["this"].seconds))
    rows = [
        {
            "kernel": name.removeprefix("kernel "),
            "base_ms": 1e3 * timers["base"].seconds[name] / steps,
            "this_ms": 1e3 * timers["this"].seconds[name] / steps,
            "calls": timers["this"].calls[name] / steps,
        }
        for name in names
    ]
    rows.sort(key=lambda row: -row["base_ms"])
    return {label: statistics.median(ms) for label, ms in step_ms.items()}, rows, pairs


def placement_lines(pairs: list[dict]) -> list[str]:
    """Per placement of the CPU threads (:mod:`benchmarks.thread_placement`), the medians of the pairs in it.

    One line per group of :func:`benchmarks.thread_placement.group_by_round_trip`: its
    round trips, pairs, the steps' medians and the kernel calls' medians, each as
    ``base``, ``this`` and base/this. Nothing where no round trip was measured.
    """
    lines = []
    for group in thread_placement.group_by_round_trip([pair["round_trip_ns"] for pair in pairs]):
        mine = [pairs[i] for i in group.indices]
        parts = []
        for what, key in (("step", "ms"), ("kernels", "kernels_ms")):
            base, this = (statistics.median(pair[f"{label}_{key}"] for pair in mine) for label in ("base", "this"))
            parts.append(f"{what} {base:.2f} / {this:.2f} ms ({base / this:.2f})")
        lines.append(
            f"threads' round trip {group.low_ns:.0f} to {group.high_ns:.0f} ns, {len(mine)} pairs: " + ", ".join(parts)
        )
    return lines


def print_in_steps(medians: dict[str, float], rows: list[dict], pairs: list[dict]) -> None:
    """The table of :func:`compare_in_steps`, then the pairs' medians per placement of the threads."""
    print(f"{'kernel':<28} {'calls':>6} {'base ms':>9} {'this ms':>9} {'base/this':>10}   (per step)")
    for row in rows:
        ratio = row["base_ms"] / row["this_ms"] if row["this_ms"] else float("nan")
        print(f"{row['kernel']:<28} {row['calls']:>6.0f} {row['base_ms']:>9.2f} {row['this_ms']:>9.2f} {ratio:>10.2f}")
    base_total, this_total = sum(r["base_ms"] for r in rows), sum(r["this_ms"] for r in rows)
    print(f"{'all kernels':<35} {base_total:>9.2f} {this_total:>9.2f} {base_total / this_total:>10.2f}")
    ratio = medians["base"] / medians["this"]
    print(f"{'whole step (medians)':<35} {medians['base']:>9.2f} {medians['this']:>9.2f} {ratio:>10.2f}")
    lines = placement_lines(pairs)
    if len(lines) > 1:
        print("base / this by placement (compare within a line: the placements differ by more than most changes):")
    print(*lines, sep="\n")


def main(argv: list[str] | None = None) -> None:
    """Print one line per (shape, kernel) and a total: baseline ms, this tree's ms, their ratio, same bits."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--baseline", required=True, help="a git revision of this repository, or a fused_train.cpp file, to compare"
    )
    parser.add_argument("--iters", type=int, default=25, help="timed pairs per kernel (default: %(default)s)")
    parser.add_argument(
        "--weights",
        action="store_true",
        help="compare the weight kernels instead (the binarization, and the constraint pass with it) over all "
        "binary weights of the model, each in the layout a training step uses",
    )
    parser.add_argument(
        "--in-step",
        action="store_true",
        help="time the kernels inside whole eager training steps (CIFAR stem), the builds alternating step by step; "
        "--iters steps each after 3 warm-up steps each (no bits compared)",
    )
    args = parser.parse_args(argv)
    if args.weights and args.in_step:
        parser.error("--weights and --in-step are separate comparisons: choose one")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(*host_memory_lines(parser, args, argv), sep="\n")
    this = fused_ops.load_extension()
    if this is None:
        raise SystemExit("the fused C++ extension is not available here (see the warning): nothing to compare")
    text = baseline_source(args.baseline)
    base = build_baseline(text, BUILD_DIR)
    model = models.create_model(args.model, num_classes=10, stem="cifar", width_mult=args.width_mult)
    what = "weight kernels over all binary weights" if args.weights else "kernel forward + backward"
    if args.in_step:
        what = "kernels inside whole eager training steps"
    print(
        f"{args.model} img {args.img_size} batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{what}, baseline {args.baseline} against this tree, alternating"
    )
    if args.in_step:
        torch.manual_seed(0)
        images = torch.randn(args.batch, 3, args.img_size, args.img_size)
        batch = (images, torch.randint(0, 10, (args.batch,)))
        probe = thread_placement.probe_if_available()
        print_in_steps(*compare_in_steps(model, batch, base, this, args.iters, warmup=3, probe=probe))
        return
    if args.weights:
        layouts = weight_layouts(model, torch.randn(args.batch, 3, args.img_size, args.img_size))
        rows = compare_weights(layouts, base, this, args.iters)
    else:
        example = torch.randn(2, 3, args.img_size, args.img_size)
        rows = compare([(args.batch, *s[1:]) for s in norm_input_shapes(model, example)], base, this, args.iters)
    width = max([22] + [len(str(row["shape"])) for row in rows])
    kernel_width = max([26] + [len(row["kernel"]) for row in rows])
    print(
        f"{'shape':<{width}} {'kernel':<{kernel_width}} {'base ms':>9} {'this ms':>9} {'base/this':>10} "
        f"{'same bits':>10}"
    )
    for row in rows:
        ratio = row["base_ms"] / row["this_ms"]
        print(
            f"{str(row['shape']):<{width}} {row['kernel']:<{kernel_width}} {row['base_ms']:>9.3f} "
            f"{row['this_ms']:>9.3f} {ratio:>10.2f} {'yes' if row['same_bits'] else 'NO':>10}"
        )
    base_total, this_total = sum(r["base_ms"] for r in rows), sum(r["this_ms"] for r in rows)
    all_same = all(r["same_bits"] for r in rows)
    ratio = base_total / this_total
    print(
        f"{'total (one call per row)':<{width + kernel_width + 1}} {base_total:>9.3f} {this_total:>9.3f} "
        f"{ratio:>10.2f} {'yes' if all_same else 'NO':>10}"
    )


if __name__ == "__main__":
    main()
