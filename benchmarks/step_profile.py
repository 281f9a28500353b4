"""Where a training step's CPU time goes: torch.profiler self time, grouped by kind of work.

Profiles the training step of :func:`benchmarks.train_step.make_step` and sums each
operator's self CPU time into four groups, by its first input:

* ``convolution``: convolution forward and backward (the floor's work), with the tap
  products of small planes (:mod:`models.tap_conv`) and every operator they call;
* ``activation``: operators on activations (first input ``batch x ...``), the fused
  kernels included;
* ``weight``: operators on a weight tensor (binarization, constraints);
* ``compiled``: with ``--compile``, the code inductor generated (everything of the
  compiled forward and backward graphs but the convolutions and the fused kernels, which
  stay library calls and count as above);
* ``other``: the rest (optimizer, allocation, autograd bookkeeping, small tensors).

It prints the groups and the largest operators of each, per step. The profiler adds its
own overhead per operator, so the shares, not the milliseconds, are the figures to use.

Usage::

    python benchmarks/step_profile.py                    # BNext-T, CIFAR stem, 32x32, batch 64
    python benchmarks/step_profile.py --unfused --top 8
    python benchmarks/step_profile.py --compile          # torch.compile'd forward (compiles first)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks.train_step import host_memory_lines, make_step  # noqa: E402
from ImageNet.host_memory import add_huge_pages_flag, add_keep_freed_memory_flag  # noqa: E402
from models import fused_ops  # noqa: E402

#: Names of the tap-product convolution's profiler events: its eager twin and backward, and its operators.
TAP_CONV_EVENTS = ("Eager_tap_conv2d", "bnext::tap_conv2d")


def inside_tap_conv(event: Any) -> bool:
    """Whether a profiler event is a tap-product convolution or runs inside one (its matrix products, copies)."""
    while event is not None:
        if event.name.startswith(TAP_CONV_EVENTS):
            return True
        event = event.cpu_parent
    return False


def group_of(name: str, first_shape: list[int], batch: int, weight_shapes: set[tuple[int, ...]]) -> str:
    """The group of one operator call (see the module docstring)."""
    if "convolution" in name:
        return "convolution"
    if name.startswith("## Call CompiledFxGraph"):
        return "compiled"
    if tuple(first_shape) in weight_shapes:
        return "weight"
    if len(first_shape) == 4 and first_shape[0] == batch:
        return "activation"
    return "other"


def profile_step(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, list[tuple[str, float]]]]:
    """Milliseconds per step by group, and the operators of each group, largest first."""
    torch.manual_seed(0)
    model = models.create_model(args.model, num_classes=10, stem="cifar", width_mult=args.width_mult)
    models.set_temperature(model, 1.0)
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 4 and p.shape[0] != args.batch}
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    forward = torch.compile(model, options=models.compile_options("cpu")) if args.compile else None
    step = make_step(model, (images, torch.randint(0, 10, (args.batch,))), forward=forward)
    with fused_ops.disabled() if args.unfused else contextlib.nullcontext():
        for _ in range(args.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step()
    groups: dict[str, float] = collections.defaultdict(float)
    operators: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for event in prof.events():
        name = event.name
        if inside_tap_conv(event):
            group = "convolution"
            name = name if name.startswith(TAP_CONV_EVENTS) else f"tap conv: {name}"
        else:
            first = event.input_shapes[0] if event.input_shapes else []
            group = group_of(name, first, args.batch, weight_shapes)
        milliseconds = event.self_cpu_time_total / 1e3 / args.steps
        groups[group] += milliseconds
        operators[group][name] += milliseconds
    ranked = {g: sorted(ops.items(), key=lambda item: -item[1]) for g, ops in operators.items()}
    return dict(groups), ranked


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The CPU configuration of the CIFAR-stem benchmarks.

    ``--model --width-mult --img-size --batch --threads --keep-freed-memory --huge-pages``.
    """
    parser.add_argument("--model", default="bnext_tiny", choices=models.list_models(), help="default: %(default)s")
    parser.add_argument("--width-mult", type=float, default=1.0, help="channel multiplier (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=32, help="CIFAR-stem input side (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own choice)")
    add_keep_freed_memory_flag(parser)  # as the training script: off by default
    add_huge_pages_flag(parser)


def main(argv: list[str] | None = None) -> None:
    """Print the grouped profile of one configuration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (default: %(default)s)")
    parser.add_argument("--top", type=int, default=5, help="operators listed per group (default: %(default)s)")
    parser.add_argument("--unfused", action="store_true", help="turn the fused CPU training kernels off")
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd step (compiles first)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(*host_memory_lines(parser, args, argv), sep="\n")
    groups, ranked = profile_step(args)
    total = sum(groups.values())
    overhead = total - groups.get("convolution", 0.0)
    kernels = "off" if args.unfused else fused_ops.backend()
    print(
        f"{args.model} batch {args.batch} img {args.img_size}, {'compiled' if args.compile else 'eager'}, "
        f"fused kernels {kernels}, {torch.get_num_threads()} threads"
    )
    print(f"{'group':<12} {'ms/step':>9} {'of step':>8} {'of non-conv':>12}")
    for group in ("convolution", "activation", "weight", "compiled", "other"):
        if group == "compiled" and group not in groups:
            continue
        ms = groups.get(group, 0.0)
        share = f"{100 * ms / overhead:.0f} %" if group != "convolution" and overhead > 0 else "-"
        print(f"{group:<12} {ms:>9.1f} {100 * ms / total:>7.0f}% {share:>12}")
        for name, op_ms in ranked.get(group, [])[: args.top]:
            print(f"    {name[:48]:<48} {op_ms:>8.1f}")


if __name__ == "__main__":
    main()
