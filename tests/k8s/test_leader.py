"""Lease leader election: one leader at a time, hand-over on release, and a leader that cannot renew stops acting."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from localdisk.errors import ConfigError
from localdisk.k8s.leader import LeaderElector, LeadershipLost, LeaseSettings
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio

FAST = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1}


def settings(identity: str) -> LeaseSettings:
    return LeaseSettings("localdisk", "localdisk-controller", identity, **FAST)


class Timeline:
    """When each replica's work ran, to prove no two ever overlapped."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []

    def work(self, who: str, stop: anyio.Event, started: anyio.Event | None = None) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            begin = time.monotonic()
            if started is not None:
                started.set()
            try:
                await stop.wait()
            finally:
                self.spans.append((who, begin, time.monotonic()))

        return run

    def assert_no_overlap(self) -> None:
        spans = sorted(self.spans, key=lambda s: s[1])
        for (a, _, a_end), (b, b_begin, _) in itertools.pairwise(spans):
            assert a_end <= b_begin, f"{a} and {b} acted at the same time"


async def test_one_leader_then_handover_on_release(fake: FakeKubernetes, api_factory: Callable[[], Any]) -> None:
    timeline = Timeline()
    stop_a, stop_b = anyio.Event(), anyio.Event()
    a_started, b_started = anyio.Event(), anyio.Event()
    a = LeaderElector(api_factory(), settings("a"))
    b = LeaderElector(api_factory(), settings("b"))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(a.run, timeline.work("a", stop_a, a_started))
            await a_started.wait()
            group.start_soon(b.run, timeline.work("b", stop_b, b_started))
            await anyio.sleep(FAST["lease_duration"] * 2)  # well past a lease: a keeps renewing, b must keep waiting
            assert not b_started.is_set()
            released_at = time.monotonic()
            stop_a.set()
            await b_started.wait()
            handover = time.monotonic() - released_at
            stop_b.set()
    timeline.assert_no_overlap()
    assert handover < FAST["lease_duration"], "a released the lease: b need not wait for it to expire"
    lease = fake.get("leases", "localdisk-controller", "localdisk")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""
    assert lease["spec"]["leaseTransitions"] == 1


async def test_simultaneous_candidates_elect_exactly_one(fake: FakeKubernetes, api_factory: Callable[[], Any]) -> None:
    timeline = Timeline()
    stops = {name: anyio.Event() for name in "abc"}
    first = anyio.Event()
    electors = {name: LeaderElector(api_factory(), settings(name)) for name in "abc"}
    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            for name, elector in electors.items():
                group.start_soon(elector.run, timeline.work(name, stops[name], first))
            await first.wait()
            for _ in range(3):  # stop the leader, wait for the next one; never two that have not been stopped
                with anyio.fail_after(5):
                    while not (active := [n for n, e in electors.items() if e.is_leader and not stops[n].is_set()]):
                        await anyio.sleep(0.02)
                assert len(active) == 1
                stops[active[0]].set()
    assert sorted(who for who, _, _ in timeline.spans) == ["a", "b", "c"]
    timeline.assert_no_overlap()
    assert fake.count("POST", "/leases") >= 1


async def test_leader_that_cannot_renew_stops_before_another_takes_over(
    fake: FakeKubernetes, api_factory: Callable[[], Any]
) -> None:
    timeline = Timeline()
    a_started, b_started = anyio.Event(), anyio.Event()
    never = anyio.Event()
    a = LeaderElector(api_factory(), settings("a"))
    b = LeaderElector(api_factory(), settings("b"))
    lost: list[BaseException] = []

    async def run_a() -> None:
        try:
            await a.run(timeline.work("a", never, a_started))
        except LeadershipLost as exc:
            lost.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(run_a)
            await a_started.wait()
            group.start_soon(b.run, timeline.work("b", never, b_started))
            while fake.count("PUT", "/leases/") == 0:  # a has renewed once; every renewal from now on fails
                await anyio.sleep(0.02)
            fake.fail("PUT", "/leases/", 500, times=10_000)  # a (and b) can no longer write the Lease
            while not lost:  # a stops acting once it could not renew for renew_deadline (the margin is checked below)
                await anyio.sleep(0.02)
            assert not b_started.is_set(), "b cannot write the Lease either"
            fake.faults.clear()  # the API server recovers: b takes over once the lease has expired
            await b_started.wait()
            group.cancel_scope.cancel()
    timeline.assert_no_overlap()
    a_end = next(end for who, _, end in timeline.spans if who == "a")
    b_begin = next(begin for who, begin, _ in timeline.spans if who == "b")
    assert b_begin - a_end >= FAST["lease_duration"] - FAST["renew_deadline"] - 0.05


async def test_settings_refuse_a_deadline_past_the_lease() -> None:
    with pytest.raises(ConfigError):
        LeaseSettings("ns", "name", "me", lease_duration=5, renew_deadline=10, retry_period=2)


async def test_a_hanging_renewal_still_stops_the_leader_in_time(
    fake: FakeKubernetes, api_factory: Callable[[], Any]
) -> None:
    timeline = Timeline()
    started, never = anyio.Event(), anyio.Event()
    elector = LeaderElector(api_factory(), settings("a"))
    lost_at: list[float] = []

    async def run() -> None:
        try:
            await elector.run(timeline.work("a", never, started))
        except LeadershipLost:
            lost_at.append(time.monotonic())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await started.wait()
            fake.freeze_after("PUT", "/leases/")  # the next renewal is served, every later request hangs
            await fake.wait_frozen()
            frozen_at = time.monotonic()
            while not lost_at:
                await anyio.sleep(0.02)
            fake.thaw()
    assert lost_at[0] - frozen_at <= FAST["renew_deadline"] + 0.2, "stopped within renew_deadline of the last renewal"
    assert timeline.spans and timeline.spans[0][2] <= lost_at[0]
