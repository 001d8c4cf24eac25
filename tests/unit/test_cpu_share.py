"""Processor sharing of a CPU host's cores (bench.plan.cpu_share) and the overheads a profile adds."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest
from _sim_profile import make_profile

from pdserve.bench.plan.cpu_share import CpuShare
from pdserve.bench.plan.placement import Placement
from pdserve.bench.plan.profile_model import Overheads
from pdserve.bench.plan.simulator import HostCpu, PlannedShape, simulate
from pdserve.bench.serve.workloads import RequestShape


class Clock:
    """A minimal event loop: enough to drive CpuShare by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (t, next(self.order), fn))

    def run(self) -> None:
        while self.events:
            self.now, _, fn = heapq.heappop(self.events)
            fn()


def finish_times() -> dict[str, float]:
    return {}


def test_two_workers_on_one_core_take_twice_as_long() -> None:
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=1.0)
    cpu.run("a", 10.0, 1, lambda: done.setdefault("a", clock.now))
    cpu.run("b", 10.0, 1, lambda: done.setdefault("b", clock.now))
    clock.run()
    assert done == {"a": pytest.approx(0.020), "b": pytest.approx(0.020)}


def test_a_late_starter_slows_the_running_one_only_while_both_run() -> None:
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=1.0)
    cpu.run("a", 10.0, 1, lambda: done.setdefault("a", clock.now))
    clock.at(0.005, lambda: cpu.run("b", 10.0, 1, lambda: done.setdefault("b", clock.now)))
    clock.run()
    # a: 5 ms alone, its last 5 ms at half speed -> 15 ms; b: 5 ms done by then, 5 alone -> 20
    assert done == {"a": pytest.approx(0.015), "b": pytest.approx(0.020)}


def test_workers_on_separate_cores_slow_each_other_by_the_corun_term() -> None:
    """Two workers on two cores: no core sharing, but each runs 1 + corun times slower while
    the other computes; once one finishes the other is back at full speed."""
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=2.0, corun=0.25)
    cpu.run("a", 10.0, 1, lambda: done.setdefault("a", clock.now))
    cpu.run("b", 20.0, 1, lambda: done.setdefault("b", clock.now))
    clock.run()
    # both at 1/1.25 until a is done (10 ms of work: 12.5 ms); b has 10 ms left, alone: 22.5
    assert done == {"a": pytest.approx(0.0125), "b": pytest.approx(0.0225)}


def test_light_work_neither_suffers_nor_causes_corun() -> None:
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=2.0, corun=0.25)
    cpu.run("worker", 10.0, 1, lambda: done.setdefault("worker", clock.now))
    cpu.run("stream", 10.0, 1, lambda: done.setdefault("stream", clock.now), kind=None)
    clock.run()
    assert done == {"worker": pytest.approx(0.010), "stream": pytest.approx(0.010)}


def test_corun_counts_neighbours_up_to_the_cores_beside_it() -> None:
    """Three workers on two cores: core sharing (2/3 speed) and one neighbour's co-run term,
    not two: a worker only ever has cores - 1 others computing beside it at once."""
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=2.0, corun=0.5)
    for w in "abc":
        cpu.run(w, 10.0, 1, lambda w=w: done.setdefault(w, clock.now))
    clock.run()
    assert done == {w: pytest.approx(0.010 * 1.5 * 1.5) for w in "abc"}
    with pytest.raises(ValueError, match="co-run"):
        CpuShare(lambda: 0.0, clock.at, cores=2.0, corun=-0.1)


def test_corun_per_pair_of_kinds() -> None:
    """Measured slowdowns differ by pair (decode steps stream weights and suffer most beside
    each other): a decode beside a decode runs 1.2x slower, beside a prefill 1.05x; a kind
    pair the profile lacks gets the mean."""
    pairs = {"decode|decode": 0.2, "decode|prefill": 0.05, "prefill|decode": 0.0}
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=2.0, corun=pairs)
    cpu.run("d1", 12.0, 1, lambda: done.setdefault("d1", clock.now), kind="decode")
    cpu.run("d2", 12.0, 1, lambda: done.setdefault("d2", clock.now), kind="decode")
    clock.run()
    assert done == {"d1": pytest.approx(0.0144), "d2": pytest.approx(0.0144)}
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=2.0, corun=pairs)
    cpu.run("d", 10.0, 1, lambda: done.setdefault("d", clock.now), kind="decode")
    cpu.run("p", 30.0, 1, lambda: done.setdefault("p", clock.now), kind="prefill")
    clock.run()
    assert done["d"] == pytest.approx(0.0105)  # 10 ms of work at 1/1.05 speed
    assert done["p"] == pytest.approx(0.030)  # prefill|decode: 0
    assert cpu.slowdown("prefill", "prefill") == pytest.approx(0.25 / 3)


def test_enough_cores_or_a_gpu_change_nothing() -> None:
    for cores in (2.0, None):
        clock, done = Clock(), finish_times()
        cpu = CpuShare(lambda: clock.now, clock.at, cores=cores)  # noqa: B023
        for w in "ab":
            cpu.run(w, 10.0, 1, lambda w=w: done.setdefault(w, clock.now))  # noqa: B023
        clock.run()
        assert done == {"a": pytest.approx(0.010), "b": pytest.approx(0.010)}


def test_background_load_takes_its_share() -> None:
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=2.0, background=2.0)
    cpu.run("a", 10.0, 2, lambda: done.setdefault("a", clock.now))  # 2 threads of 4 wanted
    clock.run()
    assert done["a"] == pytest.approx(0.020)


def test_two_colocated_instances_on_one_core_share_it() -> None:
    planned = [PlannedShape(0.0, RequestShape(100, 1)) for _ in range(2)]
    slos = {"ttft": 1e6}
    alone = simulate(make_profile(), Placement.colocated(2), planned, slos).records
    shared = simulate(make_profile(), Placement.colocated(2), planned, slos,
                      host=HostCpu(cores=1.0)).records  # fmt: skip
    # each prefills on its own instance: 3 + 20 + 1 ms; sharing one core: 3 + 40 + 1
    assert [round(r.ttft_s * 1e3, 6) for r in alone] == [24.0, 24.0]
    assert [round(r.ttft_s * 1e3, 6) for r in shared] == [44.0, 44.0]
    assert HostCpu.of(replace(make_profile(), hardware={"cpu_count": 2})) == HostCpu(2, 0.0)
    assert HostCpu.of(replace(make_profile(), device="cuda"), background=3.0) == HostCpu(None, 0)


def test_deployment_overheads_scale_prefill_and_add_the_measured_decode_excess() -> None:
    overheads = Overheads(
        step_ms=1.0, decode_excess_ms=((1, 1.0), (2, 9.0), (4, 13.0)), prefill_scale=1.5
    )
    p = make_profile(overheads=overheads)
    assert overheads.decode_excess(3) == pytest.approx(11.0)  # between 2 and 4
    assert overheads.decode_excess(16) == 13.0  # beyond: the last measured
    assert p.step_ms(2, 0, []) == pytest.approx(5 + 2 + 9)
    assert p.step_ms(0, 0, [(0, 100)]) == pytest.approx(1 + 20 * 1.5)  # prefill-only step
    (r,) = simulate(p, Placement("disaggregated", 1, 1, 1),
                    [PlannedShape(0.0, RequestShape(100, 2))], {"ttft": 1e6}).records  # fmt: skip
    assert r.ttft_s * 1e3 == pytest.approx(20 * 1.5)  # no dispatch or return cost here
    assert (r.e2el_s - r.ttft_s) * 1e3 == pytest.approx(2 + (5 + 1) + 1)  # land, step + excess


def test_a_workers_next_operation_is_not_ended_by_its_last_ones_stale_events() -> None:
    # a's first op is re-timed when b starts (leaving a stale event); a's second op must
    # still take its full time
    clock, done = Clock(), finish_times()
    cpu = CpuShare(lambda: clock.now, clock.at, cores=1.0)

    def second() -> None:
        cpu.run("a", 10.0, 1, lambda: done.setdefault("a2", clock.now))

    cpu.run("a", 10.0, 1, second)
    clock.at(0.002, lambda: cpu.run("b", 1.0, 1, lambda: done.setdefault("b", clock.now)))
    clock.at(0.012, lambda: cpu.run("c", 5.0, 1, lambda: done.setdefault("c", clock.now)))
    clock.run()
    # a1: 2 ms alone, 2 ms at half speed beside b, 7 alone: ends at 11 ms (its stale event from
    # b's start is due at 18 ms). a2 from 11 ms: 1 alone, 10 at half speed beside c (c's 5 ms),
    # 4 alone: it ends at 26 ms, not at 18.
    assert done == {
        "b": pytest.approx(0.004),
        "c": pytest.approx(0.022),
        "a2": pytest.approx(0.026),
    }
