"""Does distillation help the BNext CPU demo? Students with and without a teacher, same budget, several seeds.

The measurement, all on the 5,000 MNIST digits of the CPU demo (``ImageNet.demo_data``):

1. train the full-precision teacher of ``configs/cpu_demo_teacher.yaml`` once (or reuse
   ``--teacher-checkpoint``);
2. for every seed in ``--seeds``, train the width-reduced BNext-T student twice for
   ``--epochs`` epochs: with cross-entropy on the labels (``configs/cpu_demo.yaml``) and
   with the distribution loss against the teacher (``configs/cpu_demo_kd.yaml``). The two
   runs differ only in the loss; data order, initial weights and schedules are the same;
3. read each run's final validation top-1 from ``OUTPUT/last.pth`` and print a table, the
   mean and standard deviation over seeds, the teacher's top-1 and the machine.

Every run is ``ImageNet/train.py`` as a user runs it: ``python -m torch.distributed.run
--standalone --nproc_per_node 2 ImageNet/train.py ...`` (``--nproc 1``: a plain
single-process run). Run directories are named by seed and epochs, so re-running the same
command reuses finished runs (train.py resumes from ``last.pth``) instead of retraining.

    python benchmarks/distillation_demo.py [--seeds 0 1] [--epochs 4] [--output output/distillation_demo]

This is a measurement, not a test: with a few epochs and two seeds the difference can be
within the noise, and the table says so by showing the spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = REPO / "configs" / "cpu_demo_teacher.yaml"
STUDENT_CONFIG = REPO / "configs" / "cpu_demo.yaml"
KD_CONFIG = REPO / "configs" / "cpu_demo_kd.yaml"


def _launcher(nproc: int) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def train_run(name: str, flags: Sequence[str], output: Path, nproc: int) -> float:
    """Run ImageNet/train.py with ``flags`` into ``output``; return its final validation top-1.

    The run's stdout and stderr go to ``output/run.log``; a failed run stops the benchmark
    with the tail of that log.
    """
    output.mkdir(parents=True, exist_ok=True)
    # One thread per process: two processes on two cores, without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [*_launcher(nproc), "ImageNet/train.py", *flags, "--output", str(output)]
    start = time.monotonic()
    with open(output / "run.log", "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (output / "run.log").read_text()[-3000:]
        raise SystemExit(f"{name} failed (exit code {result.returncode}); the end of {output / 'run.log'}:\n{tail}")
    top1 = final_top1(output / "last.pth")
    print(f"  {name}: val top-1 {top1:.2f}%  ({time.monotonic() - start:.0f} s)", flush=True)
    return top1


def final_top1(checkpoint: Path) -> float:
    """The validation top-1 of the last finished epoch of a training checkpoint."""
    return float(torch.load(checkpoint, map_location="cpu", weights_only=True)["history"][-1]["val_top1"])


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` (just the mean for one value)."""
    if len(values) < 2:
        return f"{statistics.mean(values):.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def machine_line() -> str:
    """CPU model, core count, Python and torch versions."""
    cpu = ""
    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            "",
        )
    except OSError:
        pass  # not Linux: fall back on platform's answer
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {cpu or platform.processor() or platform.machine()}, {cores} cores available, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def format_table(seeds: Sequence[int], without: Sequence[float], with_kd: Sequence[float]) -> str:
    """Per-seed top-1 without and with distillation, then mean ± std."""
    lines = [f"{'seed':>6} | {'top-1 without KD':>16} | {'top-1 with KD':>16}", f"{'-' * 6}-+-{'-' * 16}-+-{'-' * 16}"]
    lines += [f"{seed:>6} | {a:>16.2f} | {b:>16.2f}" for seed, a, b in zip(seeds, without, with_kd)]
    lines.append(f"{'-' * 6}-+-{'-' * 16}-+-{'-' * 16}")
    lines.append(f"{'mean':>6} | {mean_std(without):>16} | {mean_std(with_kd):>16}")
    return "\n".join(lines)


def teacher_name(config: Path) -> str:
    """The ``model`` of the teacher's YAML config (the ``teacher`` of the KD config must match it)."""
    import yaml

    teacher = yaml.safe_load(config.read_text())["model"]
    kd_teacher = yaml.safe_load(KD_CONFIG.read_text())["teacher"]
    if teacher != kd_teacher:
        raise SystemExit(f"{config} trains {teacher!r} but {KD_CONFIG} distils from {kd_teacher!r}; make them agree")
    return teacher


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="ImageNet-layout folder (default: the MNIST demo folder)")
    parser.add_argument("--output", default=str(REPO / "output" / "distillation_demo"), help="folder of all runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every student run (both losses)")
    parser.add_argument(
        "--teacher-checkpoint", default=None, help="a trained teacher's weights to reuse instead of training one"
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun when > 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or reuse) the teacher, then both students for every seed, and print the comparison."""
    args = build_parser().parse_args(argv)
    if args.data_dir is None:
        from ImageNet.demo_data import prepare_mnist_image_folder

        args.data_dir = str(prepare_mnist_image_folder(Path.home() / ".cache" / "bnext" / "mnist_png"))
    output = Path(args.output).resolve()
    teacher = teacher_name(TEACHER_CONFIG)
    data = ["--data-dir", str(Path(args.data_dir).resolve())]
    started = time.monotonic()

    if args.teacher_checkpoint:
        checkpoint = Path(args.teacher_checkpoint).resolve()
        if not checkpoint.is_file():
            raise SystemExit(f"--teacher-checkpoint {str(checkpoint)!r} does not exist")
        print(f"teacher {teacher}: reusing {checkpoint}", flush=True)
    else:
        print(f"teacher {teacher}: training ({TEACHER_CONFIG.name})", flush=True)
        teacher_dir = output / "teacher"
        train_run("teacher", ["-c", str(TEACHER_CONFIG), *data], teacher_dir, args.nproc)
        checkpoint = teacher_dir / "best.pth"
    # A training checkpoint records its top-1; a bare weights file does not.
    try:
        teacher_top1 = f"{final_top1(checkpoint):.2f}%"
    except (KeyError, TypeError, IndexError):
        teacher_top1 = "not recorded in the checkpoint"

    without, with_kd = [], []
    for seed in args.seeds:
        print(f"seed {seed}: {args.epochs} epochs each", flush=True)
        common = [*data, "--epochs", str(args.epochs), "--seed", str(seed)]
        run_dir = output / f"seed{seed}_epochs{args.epochs}"
        without.append(train_run("without KD", ["-c", str(STUDENT_CONFIG), *common], run_dir / "ce", args.nproc))
        kd_flags = ["-c", str(KD_CONFIG), *common, "--teacher-weights", f"{teacher}={checkpoint}"]
        with_kd.append(train_run("with KD", kd_flags, run_dir / "kd", args.nproc))

    print()
    print(f"BNext-T (width 0.25, cifar stem) on MNIST-5k, {args.epochs} epochs, {args.nproc} process(es) per run")
    print(format_table(args.seeds, without, with_kd))
    print(f"teacher {teacher} ({checkpoint}): val top-1 {teacher_top1}")
    print(machine_line())
    print(f"wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
