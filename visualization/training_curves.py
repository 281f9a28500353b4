"""Training curves of one or more runs, read from their TensorBoard logs.

``python -m visualization.training_curves RUN_DIR [RUN_DIR ...] --out FILE.png`` draws a
grid of panels: top-1 and top-5 accuracy (train dashed, val solid), loss (train and
val), learning rate and weight-binarization temperature (both on a log scale), and
the mean teacher weights of distillation (``kd/weight_*``) when a run logged them.
One colour per run; the legend names the run directories.

A run directory is what ``ImageNet/train.py`` writes: ``RUN_DIR/tensorboard/`` holds
the per-epoch scalars (tags ``train/loss``, ``val/top1``, ``train/lr``, ...). A run
without event files falls back to the ``history`` list of its ``last.pth`` (read with
``weights_only=True``), whose keys map to the same tags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ImageNet import checkpointing  # noqa: E402

#: A scalar series: epochs (the TensorBoard step, 0-based) and values.
Series = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Panel:
    """One subplot: its title, the tags it draws (with a line style each), and its y scale."""

    title: str
    tags: tuple[tuple[str, str, str], ...]  # (tag, legend suffix, line style)
    log_y: bool = False
    ylabel: str = ""


PANELS = (
    Panel("Top-1 accuracy", (("train/top1", "train", "--"), ("val/top1", "val", "-")), ylabel="%"),
    Panel("Top-5 accuracy", (("train/top5", "train", "--"), ("val/top5", "val", "-")), ylabel="%"),
    Panel("Loss", (("train/loss", "train", "--"), ("val/loss", "val", "-")), ylabel="cross-entropy / KD loss"),
    Panel("Learning rate", (("train/lr", "", "-"),), log_y=True),
    Panel("Weight-binarization temperature", (("train/temperature", "", "-"),), log_y=True, ylabel="T"),
)
#: Prefix of the per-teacher mean weights that distillation logs.
KD_WEIGHT_PREFIX = "kd/weight_"
_KD_STYLES = ("-", "--", ":", "-.")


def history_tag(key: str) -> str:
    """The TensorBoard tag the trainer logs a history key under (``val_top1`` -> ``val/top1``, ``lr`` -> ``train/lr``).

    Mirrors the trainer's own mapping so that a run read from ``last.pth`` draws
    exactly like one read from its event files.
    """
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in ("train", "val", "kd") and name else f"train/{key}"


def read_tensorboard(log_dir: str | Path) -> dict[str, Series]:
    """Every scalar series of the event files in ``log_dir``; ``{}`` when there are none.

    A resumed run logs some epochs twice: the last value logged for an epoch wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    log_dir = Path(log_dir)
    if not log_dir.is_dir() or not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    # size_guidance 0 keeps every event (the default samples 10,000 per tag).
    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    series: dict[str, Series] = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.float64)
        series[tag] = (steps, np.array([by_step[int(step)] for step in steps], dtype=np.float64))
    return series


def read_history(checkpoint: str | Path) -> dict[str, Series]:
    """The per-epoch ``history`` of a training checkpoint, as series under the TensorBoard tags."""
    state = checkpointing.load(checkpoint)
    history = state.get("history") if isinstance(state, Mapping) else None
    if not history:
        return {}
    columns: dict[str, dict[float, float]] = {}
    for index, row in enumerate(history):
        epoch = float(row.get("epoch", index))
        for key, value in row.items():
            if key != "epoch":
                columns.setdefault(history_tag(key), {})[epoch] = float(value)
    return {
        tag: (np.array(sorted(values)), np.array([values[epoch] for epoch in sorted(values)]))
        for tag, values in columns.items()
    }


def load_run(run_dir: str | Path) -> dict[str, Series]:
    """The scalars of a run directory: its TensorBoard events, else the history in ``last.pth``.

    Raises:
        FileNotFoundError: the directory has neither.
    """
    run_dir = Path(run_dir)
    series = read_tensorboard(run_dir / "tensorboard")
    if series:
        return series
    last = run_dir / "last.pth"
    if last.is_file():
        series = read_history(last)
        if series:
            return series
    raise FileNotFoundError(f"{run_dir} has no TensorBoard events in tensorboard/ and no history in last.pth")


def _kd_tags(runs: Mapping[str, Mapping[str, Series]]) -> list[str]:
    return sorted({tag for series in runs.values() for tag in series if tag.startswith(KD_WEIGHT_PREFIX)})


def plot_runs(runs: Mapping[str, Mapping[str, Series]], path: str | Path, title: str | None = None) -> None:
    """Draw the panels for the runs (name -> series) and save the figure to ``path``."""
    kd_tags = _kd_tags(runs)
    panels = list(PANELS)
    if kd_tags:
        styles = {tag: _KD_STYLES[i % len(_KD_STYLES)] for i, tag in enumerate(kd_tags)}
        panels.append(
            Panel(
                "Teacher weights (distillation)",
                tuple((tag, tag.removeprefix(KD_WEIGHT_PREFIX), styles[tag]) for tag in kd_tags),
                ylabel="mean weight",
            )
        )
    columns = 3
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5.0 * columns, 3.6 * rows), layout="constrained")
    colours = {name: f"C{index % 10}" for index, name in enumerate(runs)}
    for index, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        drawn = 0
        for name, series in runs.items():
            for tag, suffix, style in panel.tags:
                if tag not in series:
                    continue
                steps, values = series[tag]
                if panel.log_y:
                    # A log axis cannot show zeros or negatives: drop them rather than fail.
                    keep = values > 0
                    steps, values = steps[keep], values[keep]
                label = name if len(runs) > 1 or not suffix else suffix
                if len(runs) > 1 and suffix:
                    label = f"{name} ({suffix})"
                # Epochs are logged 0-based; plot them 1-based, as the training log prints them.
                ax.plot(steps + 1, values, style, color=colours[name], marker=".", markersize=4, label=label)
                drawn += 1
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("epoch")
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        if panel.log_y and drawn:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title or "Training curves: " + ", ".join(runs), fontsize=11)
    fig.savefig(path, dpi=100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m visualization.training_curves",
        description="Plot accuracy, loss, learning rate, temperature and teacher weights of training runs.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by ImageNet/train.py")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", help="figure title (default: the run names)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 2 when a run directory has nothing to plot."""
    args = _parser().parse_args(argv)
    runs: dict[str, dict[str, Series]] = {}
    try:
        for run_dir in args.run_dirs:
            name = Path(run_dir).resolve().name
            if name in runs:
                name = str(run_dir)  # two runs with the same leaf name: keep them apart
            runs[name] = load_run(run_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out, args.title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
