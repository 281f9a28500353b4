"""How far apart the CPU threads run: the round trip of a cache line between two of them.

A virtual machine's two vCPUs may share a last-level cache for a while (a round trip of
50 to 100 ns on the AMD EPYC development machine) and then sit on different core
complexes (about 320 ns there), and back, without the guest being told. Every kernel
that reads what the other thread wrote pays for the distance: on that machine a BNext-T
training step took 10 to 13 % longer in the far placement and its convolution floor 7 to
11 %, so their ratio moves too (`benchmarks/TRAINING_SPEED.md`, *Thread placement*). This
module measures the round trip (``benchmarks/csrc/thread_probe.cpp``, built on first use like the
training kernels), so that timings can be grouped by placement;
``benchmarks/train_step.py`` records it before every timed pair.

Usage::

    python benchmarks/thread_placement.py                 # one round trip every 0.5 s for 30 s
    python benchmarks/thread_placement.py --seconds 120 --every 1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.extensions import compile_source, cpu_tag  # noqa: E402

SOURCE = Path(__file__).with_name("csrc") / "thread_probe.cpp"
#: A measurement: bursts of round trips (the median of their means), and the time after
#: which it stops early.
ROUNDS = 128
BURSTS = 16
BUDGET_MS = 20.0
#: Two round-trip times at least this far apart (as a ratio) belong to different placements.
PLACEMENT_GAP = 1.5


@lru_cache(maxsize=1)
def _probe() -> ModuleType | str:
    # The extension, or why it could not be built (a string).
    try:
        return compile_source(f"bnext_thread_probe_{cpu_tag()}", SOURCE)
    except Exception as error:  # no compiler or ninja: the callers report "not measured"
        return f"the thread probe could not be built ({type(error).__name__}: {error})"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def unavailable_reason() -> str | None:
    """Why :func:`round_trip_ns` cannot measure here (no C++ build, fewer than two threads or CPUs), or None."""
    probe = _probe()
    if isinstance(probe, str):
        return probe
    if torch.get_num_threads() < 2:
        return f"torch runs {torch.get_num_threads()} thread: nothing travels between threads"
    if usable_cpus() < 2:
        # Two threads on one CPU answer each other only when the scheduler switches them: that
        # measures the scheduler, not a cache.
        return "one usable CPU: the two threads would take turns on it"
    return None


def round_trip_ns(rounds: int = ROUNDS, bursts: int = BURSTS, budget_ms: float = BUDGET_MS) -> float | None:
    """The round trip of a cache line between two OpenMP threads in nanoseconds; None where it cannot be measured.

    The median over ``bursts`` bursts of ``rounds`` round trips each (their means): a
    burst during which the hypervisor paused one of the vCPUs takes ten times as long
    and must not pass for a placement. Stops early once ``budget_ms`` has passed (a
    measurement takes under a millisecond on the development machine). See
    :func:`unavailable_reason`.
    """
    if rounds < 1 or bursts < 1 or budget_ms <= 0:
        raise ValueError(f"need rounds, bursts >= 1 and budget_ms > 0, got {rounds}, {bursts}, {budget_ms}")
    if unavailable_reason() is not None:
        return None
    means = _probe().thread_round_trips_ns(rounds, bursts, budget_ms)
    return statistics.median(means) if means else None


def probe_if_available() -> Callable[[], float | None] | None:
    """:func:`round_trip_ns`, for a benchmark to call before each timed pair, where it can measure here; else None."""
    return round_trip_ns if unavailable_reason() is None else None


@dataclass(frozen=True)
class Placement:
    """The pairs of a run whose round trips lie in ``[low_ns, high_ns]``: their indices."""

    low_ns: float
    high_ns: float
    indices: tuple[int, ...]


def group_by_round_trip(values: Sequence[float | None], gap: float = PLACEMENT_GAP) -> list[Placement]:
    """Split measurements into placements: one group, or two where sorted values jump by ``gap`` times or more.

    Cut at the largest ratio between consecutive sorted values, when it is at least
    ``gap`` (the development machine's two placements differ by 2.5 times, and values
    within one vary by about a third). ``None`` values (not measured) belong to no group.
    Groups come in increasing round trip; empty input gives no group.
    """
    if gap <= 1:
        raise ValueError(f"gap must be > 1, got {gap}")
    measured = sorted((value, index) for index, value in enumerate(values) if value is not None)
    if not measured:
        return []
    cut, widest = None, gap
    for position in range(1, len(measured)):
        below, above = measured[position - 1][0], measured[position][0]
        ratio = above / below if below > 0 else math.inf
        if ratio >= widest:
            cut, widest = position, ratio
    parts = [measured] if cut is None else [measured[:cut], measured[cut:]]
    return [Placement(part[0][0], part[-1][0], tuple(sorted(index for _, index in part))) for part in parts]


def pair_medians(step_ms: Sequence[float], floor_ms: Sequence[float], indices: Sequence[int]) -> tuple[float, float]:
    """The medians of the step and of the floor times over the pairs ``indices``."""
    return statistics.median(step_ms[i] for i in indices), statistics.median(floor_ms[i] for i in indices)


def placement_timings(
    round_trips: Sequence[float | None], step_ms: Sequence[float], floor_ms: Sequence[float]
) -> list[dict[str, float | int]]:
    """Side-by-side timings grouped by the round trip measured before each pair (:func:`group_by_round_trip`).

    One dict per placement: its round-trip range (``low_ns``, ``high_ns``), ``pairs``, the
    medians ``step_ms`` and ``floor_ms`` of its pairs and ``ratio``, their quotient.
    """
    if not len(round_trips) == len(step_ms) == len(floor_ms):
        raise ValueError(f"one round trip per pair: got {len(round_trips)}, {len(step_ms)} and {len(floor_ms)}")
    groups = []
    for group in group_by_round_trip(round_trips):
        step, floor = pair_medians(step_ms, floor_ms, group.indices)
        groups.append(
            {
                "low_ns": group.low_ns,
                "high_ns": group.high_ns,
                "pairs": len(group.indices),
                "step_ms": step,
                "floor_ms": floor,
                "ratio": step / floor if floor > 0 else math.inf,
            }
        )
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    """Print a round trip every ``--every`` seconds for ``--seconds`` seconds, then the placements seen."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to watch (default: %(default)s)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between measurements (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.every <= 0 or args.threads < 1:
        parser.error("--seconds and --every must be > 0, --threads >= 1")
    torch.set_num_threads(args.threads)
    reason = unavailable_reason()
    if reason is not None:
        print(f"not measured: {reason}")
        return 1
    values: list[float | None] = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        values.append(round_trip_ns())
        print(f"{time.strftime('%H:%M:%S')} round trip {values[-1]:.0f} ns", flush=True)
        time.sleep(args.every)
    for group in group_by_round_trip(values):
        median = statistics.median(values[i] for i in group.indices)
        print(
            f"placement {group.low_ns:.0f} to {group.high_ns:.0f} ns: {len(group.indices)} of {len(values)} "
            f"measurements, median {median:.0f} ns"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
