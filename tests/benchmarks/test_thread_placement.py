"""The thread-placement probe: the round trip between two threads, and timings grouped by it."""

from __future__ import annotations

import math
import os

import pytest
import torch

from benchmarks import thread_placement, train_step

# Skipped only where the probe cannot be built (no compiler); never in CI, where it must build.
needs_probe = pytest.mark.skipif(
    os.environ.get("CI") != "true" and isinstance(thread_placement._probe(), str),
    reason="the thread probe could not be built here (no C++ compiler or ninja)",
)
# Two threads need two CPUs to pass a cache line between them (on one they take turns).
needs_two_cpus = pytest.mark.skipif(thread_placement.usable_cpus() < 2, reason="one usable CPU here")


@pytest.fixture
def two_threads() -> None:
    # tests/conftest.py restores the thread count after every test.
    torch.set_num_threads(2)


@needs_probe
@needs_two_cpus
def test_round_trip_between_two_threads_is_measured(two_threads: None) -> None:
    assert thread_placement.unavailable_reason() is None, thread_placement.unavailable_reason()
    values = [thread_placement.round_trip_ns(rounds=64, bursts=4) for _ in range(3)]
    # A cache line goes to another core and back: more than a nanosecond, far less than a millisecond
    # (the budget stops a measurement after 20 ms whatever happens).
    assert all(value is not None and 1.0 < value < 1e6 for value in values)


@needs_probe
def test_one_thread_has_no_round_trip_to_measure() -> None:
    torch.set_num_threads(1)  # restored after the test by tests/conftest.py
    assert "1 thread" in thread_placement.unavailable_reason()
    assert thread_placement.round_trip_ns() is None
    with pytest.raises(ValueError, match="bursts"):
        thread_placement.round_trip_ns(bursts=0)


def test_round_trips_split_into_placements_at_the_largest_jump() -> None:
    values = [330.0, 61.0, None, 72.0, 318.0, 55.0, 341.0]
    near, far = thread_placement.group_by_round_trip(values)
    assert (near.low_ns, near.high_ns, near.indices) == (55.0, 72.0, (1, 3, 5))
    assert (far.low_ns, far.high_ns, far.indices) == (318.0, 341.0, (0, 4, 6))
    # Within a third of each other: one placement, whatever the order.
    (only,) = thread_placement.group_by_round_trip([70.0, 55.0, 80.0])
    assert only.indices == (0, 1, 2) and (only.low_ns, only.high_ns) == (55.0, 80.0)
    # Three levels: the cut is at the widest ratio (80 -> 330), not the first one above the gap.
    low, high = thread_placement.group_by_round_trip([40.0, 80.0, 330.0], gap=1.5)
    assert low.indices == (0, 1) and high.indices == (2,)
    assert thread_placement.group_by_round_trip([None, None]) == []
    with pytest.raises(ValueError, match="gap"):
        thread_placement.group_by_round_trip([1.0], gap=1.0)


def test_timings_are_summarised_per_placement() -> None:
    trips = [60.0, 320.0, 65.0, 330.0, 70.0]
    step = [800.0, 950.0, 810.0, 970.0, 820.0]
    floor = [700.0, 800.0, 700.0, 790.0, 705.0]
    near, far = thread_placement.placement_timings(trips, step, floor)
    assert near["pairs"] == 3 and near["step_ms"] == 810.0 and near["floor_ms"] == 700.0
    assert near["ratio"] == pytest.approx(810.0 / 700.0)
    assert far["pairs"] == 2 and far["step_ms"] == 960.0 and far["floor_ms"] == 795.0
    assert thread_placement.placement_timings([None, None], [1.0, 2.0], [1.0, 1.0]) == []
    with pytest.raises(ValueError, match="one round trip per pair"):
        thread_placement.placement_timings([1.0], [1.0, 2.0], [1.0, 1.0])


def test_measure_probes_before_every_timed_pair_only() -> None:
    log: list[str] = []

    def probe() -> float:
        log.append("probe")
        return 100.0 + len(log)

    result = train_step.measure(lambda: log.append("step"), lambda: log.append("floor"), 2, 3, None, probe)
    assert log == ["step", "floor"] * 2 + ["probe", "step", "floor"] * 3
    assert result["round_trip_ns"] == [105.0, 108.0, 111.0]
    assert train_step.measure(lambda: None, lambda: None, 0, 2)["round_trip_ns"] == []


def test_the_benchmark_reports_step_and_floor_per_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    trips, step, floor = [60.0, 320.0, 70.0], [800.0, 950.0, 820.0], [700.0, 800.0, 710.0]
    two = {"mode": "eager", "placements": thread_placement.placement_timings(trips, step, floor)}
    one = {"mode": "compile", "placements": thread_placement.placement_timings([60.0], [800.0], [700.0])}
    monkeypatch.setattr(thread_placement, "unavailable_reason", lambda: None)
    lines = train_step.placement_lines([two, one], cpu)
    assert lines[0] == (
        "eager: threads' round trip 60 to 70 ns in 2 pairs: step 810.0, floor 705.0 ms, step/floor 1.15; "
        "320 to 320 ns in 1 pair: step 950.0, floor 800.0 ms, step/floor 1.19 (two placements)"
    )
    assert lines[1] == "compile: threads' round trip 60 to 60 ns in its only pair (one placement)"
    assert train_step.placement_lines([two], torch.device("meta")) == []  # CPU threads only
    monkeypatch.setattr(thread_placement, "unavailable_reason", lambda: "no compiler")
    assert train_step.placement_lines([two, one], cpu) == ["threads' round trip: not measured (no compiler)"]


@needs_probe
@needs_two_cpus
def test_watching_prints_a_round_trip_per_measurement(capsys: pytest.CaptureFixture[str], two_threads: None) -> None:
    assert thread_placement.main(["--seconds", "0.3", "--every", "0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    measured = [line for line in lines if " round trip " in line]
    assert len(measured) >= 2 and all(line.endswith(" ns") for line in measured)
    assert lines[-1].startswith("placement ") and "measurements, median" in lines[-1]
    assert not any(math.isnan(float(line.split()[-2])) for line in measured)


def test_benchmarks_get_the_probe_only_where_it_can_measure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_placement, "unavailable_reason", lambda: None)
    assert thread_placement.probe_if_available() is thread_placement.round_trip_ns
    assert train_step._placement_probe(torch.device("cpu")) is thread_placement.round_trip_ns
    assert train_step._placement_probe(torch.device("meta")) is None  # not the CPU's threads
    monkeypatch.setattr(thread_placement, "unavailable_reason", lambda: "one usable CPU")
    assert thread_placement.probe_if_available() is None
    assert train_step._placement_probe(torch.device("cpu")) is None


def test_one_cpu_has_no_placement_to_measure(monkeypatch: pytest.MonkeyPatch, two_threads: None) -> None:
    monkeypatch.setattr(thread_placement, "usable_cpus", lambda: 1)
    if isinstance(thread_placement._probe(), str):  # no build: that reason comes first
        assert thread_placement.unavailable_reason() == thread_placement._probe()
        return
    assert thread_placement.unavailable_reason() == "one usable CPU: the two threads would take turns on it"
    assert thread_placement.round_trip_ns() is None


def test_modes_in_different_placements_are_compared_within_each() -> None:
    eager = {"mode": "eager", "round_trip_ns": [60.0, 65.0, 320.0], "step_ms": [800.0, 820.0, 900.0]}
    eager["floor_ms"] = [700.0, 700.0, 750.0]
    compiled = {"mode": "compile", "round_trip_ns": [330.0, 310.0], "step_ms": [960.0, 940.0]}
    compiled["floor_ms"] = [800.0, 800.0]
    lines = train_step.modes_by_placement([eager, compiled])
    assert lines == [
        "placement 60 to 65 ns, step/floor (pairs): eager 1.16 (2)",
        "placement 310 to 330 ns, step/floor (pairs): eager 1.20 (1), compile 1.19 (2)",
        "the modes ran in two placements: compare them within a placement line, not by 'vs eager'",
    ]
    # One placement for all, one mode, or nothing measured: the table's 'vs eager' stands alone.
    same = {**compiled, "round_trip_ns": [70.0, 62.0]}
    assert train_step.modes_by_placement([eager | {"round_trip_ns": [60.0, 65.0, 66.0]}, same]) == []
    assert train_step.modes_by_placement([eager]) == []
    assert train_step.modes_by_placement([{**eager, "round_trip_ns": []}, {**compiled, "round_trip_ns": []}]) == []
