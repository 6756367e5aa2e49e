"""Pool state changes become Events on the Node (`localdisk.k8s.pools`): a pool first seen down, a changed reason,
the way back up; nothing for a pool that stays as it was."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.errors import FailedPrecondition
from localdisk.k8s.pools import PoolEvents
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.model import Volume
from localdisk.sizes import MiB

pytestmark = pytest.mark.anyio


@dataclass
class Recorded:
    events: list[tuple[str, str, str, bool]] = field(default_factory=list)

    async def record(self, involved: dict[str, str], reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((involved["name"], reason, message, warning))


class Flaky(FakeBackend):
    """A fake pool whose open fails with `problem` while it is set."""

    problem: str | None = None

    async def open(self) -> None:
        if self.problem:
            raise FailedPrecondition(self.problem)
        await super().open()


async def test_changes_of_pool_state_become_node_events() -> None:
    flaky, steady = Flaky("flaky", FakePoolConfig()), FakeBackend("steady", FakePoolConfig())
    manager = VolumeManager({("fake", "flaky"): flaky, ("fake", "steady"): steady}, {})
    recorded = Recorded()
    events = PoolEvents(manager, "node-1", recorded)
    flaky.problem = "disk /dev/disk/by-id/x is missing"
    await manager.open()
    await events.tick()
    await events.tick()  # nothing changed: no second event
    assert recorded.events == [
        ("node-1", "PoolUnavailable", "fake pool 'flaky' is unavailable: disk /dev/disk/by-id/x is missing", True)
    ]
    flaky.problem = "disk /dev/disk/by-id/x is not a block device"
    await manager.backends[("fake", "flaky")].open()
    await events.tick()
    assert recorded.events[-1][1:3] == ("PoolUnavailable", "fake pool 'flaky' is unavailable: " + flaky.problem)
    flaky.problem = None
    await manager.backends[("fake", "flaky")].open()
    await events.tick()
    assert recorded.events[-1] == ("node-1", "PoolAvailable", "fake pool 'flaky' is available again", False)
    assert len(recorded.events) == 3 and all("steady" not in e[2] for e in recorded.events)


class Mirrors(FakeBackend):
    """A fake pool whose volumes can be marked degraded, as a mirror that lost a copy is."""

    degraded: dict[str, str] = {}

    async def list_volumes(self) -> list[Volume]:
        return [replace(v, degraded=self.degraded.get(v.name)) for v in await super().list_volumes()]


async def test_a_degraded_volume_becomes_a_warning_on_the_node_and_its_repair_a_normal_event() -> None:
    mirrors = Mirrors("m", FakePoolConfig())
    mirrors.degraded = {}
    manager = VolumeManager({("fake", "m"): mirrors}, {})
    recorded = Recorded()
    events = PoolEvents(manager, "node-1", recorded)
    await manager.open()
    volume = await manager.create_volume(CreateRequest("pvc-mirror", "fake", "m", required_bytes=MiB))
    await manager.create_volume(CreateRequest("pvc-fine", "fake", "m", required_bytes=MiB))
    await events.tick()
    assert recorded.events == []
    mirrors.degraded = {"pvc-mirror": "mirror vg/x is degraded: a PV it uses is missing"}
    await events.tick()
    await events.tick()  # still degraded for the same reason: no second event
    assert recorded.events == [
        (
            "node-1",
            "VolumeDegraded",
            f"volume pvc-mirror ({volume.id}) is degraded: mirror vg/x is degraded: a PV it uses is missing",
            True,
        )
    ]
    mirrors.degraded = {}
    await events.tick()
    assert recorded.events[-1] == (
        "node-1",
        "VolumeRecovered",
        f"volume pvc-mirror ({volume.id}) is whole again",
        False,
    )
    mirrors.degraded = {"pvc-mirror": "mirror vg/x is degraded: a PV it uses is missing"}
    await events.tick()
    await manager.delete_volume(volume.id)
    await events.tick()  # deleted while degraded: forgotten without an event
    assert [e[1] for e in recorded.events] == ["VolumeDegraded", "VolumeRecovered", "VolumeDegraded"]
