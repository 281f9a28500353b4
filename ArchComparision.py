"""Write the computation graph of one binary basic block to TensorBoard, for comparing designs.

The graph is traced with :meth:`torch.utils.tensorboard.SummaryWriter.add_graph` and
written to ``<logdir>/<arc>_<inplanes>_<out_planes>/``; open it in TensorBoard's
"Graphs" tab. The designs are those of :data:`visualization.block_designs.DESIGNS`:
BNext and its ablations (no ELM-attention, no info-recoupling, neither) and the
XNOR-Net, Bi-Real Net, Real-to-Binary Net and ReActNet-A blocks.

Usage::

    python ArchComparision.py --arc BNext --inplanes 64 --out_planes 64
    python ArchComparision.py --arc ReActNet --inplanes 64 --out_planes 128   # stride 2 by default
    python ArchComparision.py --arc all --inplanes 64 --out_planes 64 --logdir visualization/runs
    tensorboard --logdir runs

(The file name keeps the official README's spelling, which users' scripts call.)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from visualization.block_designs import DESIGNS, build_block

#: The ``--arc`` value that writes every design.
ALL = "all"
#: TensorBoard's event-file prefix; older graphs of the same block are replaced.
EVENT_PREFIX = "events.out.tfevents."


def default_stride(inplanes: int, out_planes: int) -> int:
    """2 for a channel-doubling block (it starts a new stage), 1 otherwise."""
    return 2 if out_planes == 2 * inplanes else 1


def run_dir(logdir: Path, arc: str, inplanes: int, out_planes: int) -> Path:
    """Where the graph of one block goes: ``<logdir>/<arc>_<in>_<out>``."""
    return logdir / f"{arc}_{inplanes}_{out_planes}"


def write_graph(arc: str, inplanes: int, out_planes: int, stride: int, img_size: int, batch: int, logdir: Path) -> Path:
    """Trace the block of ``arc`` on a random input and write its graph; returns the run directory.

    Earlier event files in that directory are removed first, so that it holds the
    graph of this block only (another event file would add a second graph to the same run).
    """
    torch.manual_seed(0)
    # eval(): the trace does not need BN to update its running statistics.
    block = build_block(arc, inplanes, out_planes, stride).eval()
    example = torch.randn(batch, inplanes, img_size, img_size)
    target = run_dir(logdir, arc, inplanes, out_planes)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob(EVENT_PREFIX + "*"):
        old.unlink()
    with SummaryWriter(log_dir=str(target)) as writer, warnings.catch_warnings():
        # add_graph traces with torch.jit.trace, whose deprecation notice is noise here.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.trace")
        writer.add_graph(block, example)
    return target


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="Write the computation graph of a binary basic block to TensorBoard.",
        epilog=f"designs: {', '.join(DESIGNS)}, or '{ALL}' for every one",
    )
    parser.add_argument("--arc", required=True, help=f"design name ({', '.join(DESIGNS)}) or '{ALL}'")
    parser.add_argument("--inplanes", type=int, default=64, help="input channels (default 64)")
    parser.add_argument("--out_planes", type=int, default=64, help="output channels (default 64)")
    parser.add_argument(
        "--stride", type=int, choices=(1, 2), default=None, help="default: 2 if out_planes == 2*inplanes, else 1"
    )
    parser.add_argument("--img-size", type=int, default=56, help="input height and width (default 56)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the traced input (default 1)")
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard log directory (default runs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for an unknown design or a bad shape)."""
    args = build_parser().parse_args(argv)
    if args.arc != ALL and args.arc not in DESIGNS:
        print(f"unknown --arc {args.arc!r}; valid names: {', '.join(DESIGNS)}, {ALL}", file=sys.stderr)
        return 2
    stride = args.stride if args.stride is not None else default_stride(args.inplanes, args.out_planes)
    if args.img_size < 1 or args.batch < 1 or args.img_size % stride:
        print(f"--img-size ({args.img_size}) must be positive and divisible by the stride ({stride})", file=sys.stderr)
        return 2
    arcs = list(DESIGNS) if args.arc == ALL else [args.arc]
    written = 0
    for arc in arcs:
        try:
            target = write_graph(arc, args.inplanes, args.out_planes, stride, args.img_size, args.batch, args.logdir)
        except ValueError as error:  # a design that cannot build this shape says why
            if args.arc != ALL:
                print(error, file=sys.stderr)
                return 2
            # With 'all', the designs that can build the shape are still written.
            print(f"skipped {arc}: {error}", file=sys.stderr)
            continue
        written += 1
        print(f"{arc}: {args.inplanes}->{args.out_planes} channels, stride {stride}: graph written to {target}")
    if not written:
        return 2
    print(f"view with: tensorboard --logdir {args.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
