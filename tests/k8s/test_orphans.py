"""Orphans: volumes on a node without a PV are found, reported after a delay, and deleted only when opted in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from kubernetes_asyncio import client
from prometheus_client import CollectorRegistry

from localdisk import config
from localdisk.errors import ConfigError
from localdisk.k8s.orphans import OrphanReporter, OrphanSettings, find_orphans, report_orphans
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.model import ObjectRef, Volume
from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def manager() -> AsyncIterator[VolumeManager]:
    async with VolumeManager.from_config(config.development_default()).session() as opened:
        yield opened


async def pv_list(fake: FakeKubernetes, api: Any) -> list[Any]:
    return list((await client.CoreV1Api(api).list_persistent_volume()).items)


def vol(handle: str, name: str) -> Volume:
    return Volume(ObjectRef("lvm", "ssd", handle), name, 1 << 30)


async def test_find_orphans_matches_by_handle_and_by_name(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("persistentvolumes", objects.volume("pvc-a", "n1", handle="lvm:ssd:a"))
    await fake.put("persistentvolumes", objects.volume("pvc-b-renamed", "n1", handle="lvm:ssd:b"))
    await fake.put("persistentvolumes", objects.volume("pvc-c", "n1", handle="lvm:ssd:zzz"))
    await fake.put("persistentvolumes", objects.volume("x", "n1", handle="lvm:ssd:d", driver="other.csi.example.com"))
    volumes = [vol("a", "pvc-a"), vol("b", "pvc-b"), vol("c", "pvc-c"), vol("d", "pvc-d"), vol("e", "pvc-e")]
    first = find_orphans(volumes, await pv_list(fake, api), {}, T0)
    assert [o.volume.name for o in first.orphans] == ["pvc-d", "pvc-e"], "d's handle is another driver's"
    assert all(o.first_seen == T0 for o in first.orphans)

    later = T0 + timedelta(minutes=5)
    await fake.put("persistentvolumes", objects.volume("pvc-e", "n1", handle="lvm:ssd:e"))
    second = find_orphans(volumes, await pv_list(fake, api), first.first_seen, later)
    assert [(o.volume.name, o.first_seen) for o in second.orphans] == [("pvc-d", T0)], "first-seen carried over"
    assert second.first_seen == {"lvm:ssd:d": T0}, "a volume that got its PV is forgotten"
    assert second.orphans[0].age(later) == 300


async def test_reporter_reports_after_the_delay_and_deletes_nothing_by_default(
    fake: FakeKubernetes, api: Any, manager: VolumeManager
) -> None:
    kept = await manager.create_volume(CreateRequest("pvc-kept", "fake", required_bytes=1 << 20))
    orphan = await manager.create_volume(CreateRequest("pvc-orphan", "fake", required_bytes=1 << 20))
    await fake.put("persistentvolumes", objects.volume("pvc-kept", "n1", handle=kept.id))
    clock, registry = Clock(), CollectorRegistry()
    reporter = OrphanReporter(api, manager, OrphanSettings("n1", report_after=600), registry=registry, clock=clock)
    assert await reporter.scan() == []
    assert registry.get_sample_value("localdisk_orphan_volumes", {"backend": "fake", "pool": "default"}) == 0
    clock.advance(601)
    [reported] = await reporter.scan()
    assert reported.volume.id == orphan.id and reported.first_seen == T0
    assert registry.get_sample_value("localdisk_orphan_volumes", {"backend": "fake", "pool": "default"}) == 1
    clock.advance(10 * 86400)
    await reporter.scan()
    events = [e for e in fake.items("events") if e["reason"] == "OrphanVolume"]
    assert len(events) == 1, "one event per orphan, not one per scan"
    assert events[0]["involvedObject"]["kind"] == "Node" and events[0]["involvedObject"]["name"] == "n1"
    assert events[0]["metadata"]["namespace"] == "default"
    assert orphan.id in events[0]["message"]
    assert {v.id for v in await manager.list_volumes()} == {kept.id, orphan.id}, "deleting is opt-in"


async def test_opted_in_deletion_after_the_grace_period(fake: FakeKubernetes, api: Any, manager: VolumeManager) -> None:
    orphan = await manager.create_volume(CreateRequest("pvc-orphan", "fake", required_bytes=1 << 20))
    late = await manager.create_volume(CreateRequest("pvc-late", "fake", required_bytes=1 << 20))
    clock = Clock()
    settings = OrphanSettings("n1", report_after=60, delete_after=3600)
    reporter = OrphanReporter(api, manager, settings, registry=CollectorRegistry(), clock=clock)
    await reporter.scan()
    clock.advance(3599)
    await reporter.scan()
    assert len(await manager.list_volumes()) == 2, "not before the grace period"
    clock.advance(2)
    # the PV of pvc-late appears between the scan's PV list and the deletion: the last-moment check must see it
    real_list = reporter.core.list_persistent_volume
    calls = 0

    async def list_then_provision(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            await fake.put("persistentvolumes", objects.volume("pvc-late", "n1", handle=late.id))
        return await real_list(*args, **kwargs)

    reporter.core.list_persistent_volume = list_then_provision
    await reporter.scan()
    assert [v.id for v in await manager.list_volumes()] == [late.id]
    deleted = [e for e in fake.items("events") if e["reason"] == "OrphanVolumeDeleted"]
    assert len(deleted) == 1 and orphan.id in deleted[0]["message"]
    assert orphan.id not in reporter.first_seen


async def test_deletion_grace_shorter_than_the_report_delay_is_refused(api: Any, manager: VolumeManager) -> None:
    with pytest.raises(ConfigError):
        OrphanReporter(api, manager, OrphanSettings("n1", report_after=600, delete_after=60), registry=None)


async def test_report_orphans_runs_beside_the_server(
    fake: FakeKubernetes, kubeconfig: str, manager: VolumeManager
) -> None:
    """The entry point `localdisk serve` would start: connects by itself and scans periodically until cancelled."""
    orphan = await manager.create_volume(CreateRequest("pvc-orphan", "fake", required_bytes=1 << 20))
    settings = OrphanSettings("n1", interval=0.05, report_after=0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(report_orphans, manager, settings, kubeconfig, CollectorRegistry())
            while not [e for e in fake.items("events") if e["reason"] == "OrphanVolume"]:
                await anyio.sleep(0.02)
            while fake.count("GET", "/persistentvolumes") < 3:  # it keeps scanning
                await anyio.sleep(0.02)
            group.cancel_scope.cancel()
    [event] = [e for e in fake.items("events") if e["reason"] == "OrphanVolume"]
    assert orphan.id in event["message"]
