"""Node loss made safe, against the fake API with a clock the test moves: the grace period (kept across restarts,
cancelled by a node that comes back), Retain, claims waiting for a lost node, CSIStorageCapacity objects, snapshot
contents, the extension hook, and dry runs. The same behaviour against a real API server: test_nodeloss_real."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from localdisk.k8s import DRIVER_NAME, NODE_LOST_SINCE, PROVISIONER_FINALIZER, RELEASE_ON_NODE_LOSS
from localdisk.k8s.nodeloss import NodeLossController, NodeLossSettings
from localdisk.k8s.nodeloss_objects import SELECTED_NODE, SNAPSHOT_CONTENT_FINALIZER
from localdisk.k8s.watch import Pacer
from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio
GRACE = 600.0
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Recorder:
    """A `LostNodeExtension` that holds objects on some nodes and records how it was asked to release them."""

    held: dict[str, list[str]]
    name: str = "test objects"
    calls: list[tuple[str, bool]] = field(default_factory=list)

    async def nodes(self) -> set[str]:
        return {node for node, names in self.held.items() if names}

    async def release(self, node: str, *, dry_run: bool) -> list[str]:
        self.calls.append((node, dry_run))
        names = list(self.held.get(node, []))
        if not dry_run:
            self.held[node] = []
        return names


def controller(
    api: Any,
    clock: Clock,
    *,
    grace: float = GRACE,
    dry_run: bool = False,
    registry: CollectorRegistry | None = None,
    extensions: list[Recorder] | None = None,
    resync_period: float = 300.0,
) -> NodeLossController:
    return NodeLossController(
        api,
        NodeLossSettings(grace_period=grace, dry_run=dry_run, resync_period=resync_period),
        registry=registry or CollectorRegistry(),
        pacer=Pacer(0.05),
        extensions=extensions or [],
        clock=clock,
    )


async def bound_pair(fake: FakeKubernetes, node: str, name: str, **volume_kw: Any) -> None:
    pvc = await fake.put("persistentvolumeclaims", objects.claim("apps", name, volume=f"pv-{name}"))
    await fake.put("persistentvolumes", objects.volume(f"pv-{name}", node, bound_to=pvc, **volume_kw))


def events(fake: FakeKubernetes, reason: str) -> list[dict[str, Any]]:
    return [e for e in fake.items("events") if e["reason"] == reason]


def terminating(fake: FakeKubernetes, plural: str, name: str, namespace: str = "") -> bool:
    found = fake.get(plural, name, namespace)
    return found is None or bool(found["metadata"].get("deletionTimestamp"))


def writes(fake: FakeKubernetes) -> int:
    """Requests that change something other than Events."""
    return sum(1 for m, p in fake.requests if m in ("DELETE", "PATCH", "PUT", "POST") and "/events" not in p)


async def lost_node_with_a_claim(fake: FakeKubernetes) -> None:
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    await fake.put("nodes", objects.node("n1"))
    await bound_pair(fake, "n1", "data-db-0")
    await fake.remove("nodes", "n1")


async def test_nothing_is_released_before_the_grace_period_ends(fake: FakeKubernetes, api: Any) -> None:
    await lost_node_with_a_claim(fake)
    clock = Clock()
    loss = controller(api, clock)
    assert await loss.resync() == 0
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and pv["metadata"]["annotations"][NODE_LOST_SINCE] == "2026-06-01T12:00:00Z"
    assert not terminating(fake, "persistentvolumeclaims", "data-db-0", "apps")
    [detected] = events(fake, "NodeLossDetected")
    assert detected["involvedObject"]["kind"] == "Node" and "2026-06-01T12:10:00Z" in detected["message"]
    [grace] = events(fake, "NodeLossGracePeriod")
    assert grace["involvedObject"]["name"] == "data-db-0" and "released at 2026-06-01T12:10:00Z" in grace["message"]

    clock.advance(GRACE - 1)
    assert await loss.resync() == 0
    assert not terminating(fake, "persistentvolumeclaims", "data-db-0", "apps")
    assert len(events(fake, "NodeLossGracePeriod")) == 1, "said once"
    clock.advance(1)
    assert await loss.resync() == 1
    assert terminating(fake, "persistentvolumeclaims", "data-db-0", "apps")
    assert terminating(fake, "persistentvolumes", "pv-data-db-0")


async def test_a_restart_keeps_the_time_the_node_was_first_seen_gone(
    fake: FakeKubernetes, api_factory: Callable[[], Any]
) -> None:
    await lost_node_with_a_claim(fake)
    clock = Clock()
    assert await controller(api_factory(), clock).resync() == 0
    clock.advance(GRACE / 2)
    successor = controller(api_factory(), clock)  # a fail-over: a fresh process, nothing in memory
    assert await successor.resync() == 0
    clock.advance(GRACE / 2)
    assert await successor.resync() == 1, "due at the first sighting plus the grace, not at the restart plus it"


async def test_a_node_that_comes_back_cancels_the_release(fake: FakeKubernetes, api: Any) -> None:
    await lost_node_with_a_claim(fake)
    clock = Clock()
    loss = controller(api, clock)
    await loss.resync()
    clock.advance(60)
    await fake.put("nodes", objects.node("n1"))  # the kubelet registers it again
    await loss.resync()
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and NODE_LOST_SINCE not in (pv["metadata"].get("annotations") or {})
    cancelled = events(fake, "NodeLossCancelled")
    assert {e["involvedObject"]["kind"] for e in cancelled} == {"Node", "PersistentVolumeClaim"}
    clock.advance(GRACE * 2)
    assert await loss.resync() == 0
    assert not terminating(fake, "persistentvolumeclaims", "data-db-0", "apps")

    await fake.remove("nodes", "n1")  # gone again: the grace period starts over
    await loss.resync()
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and pv["metadata"]["annotations"][NODE_LOST_SINCE] == "2026-06-01T12:21:00Z"
    clock.advance(GRACE)
    assert await loss.resync() == 1


async def test_a_retain_volume_is_kept_with_its_data_and_its_claim_released(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    await bound_pair(fake, "gone", "data-db-0", reclaim_policy="Retain")
    registry = CollectorRegistry()
    loss = controller(api, Clock(), grace=0, registry=registry)
    assert await loss.resync() == 0, "not counted as released: the volume stays"
    assert terminating(fake, "persistentvolumeclaims", "data-db-0", "apps")
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and not pv["metadata"].get("deletionTimestamp")
    assert PROVISIONER_FINALIZER in pv["metadata"]["finalizers"]
    [kept] = events(fake, "NodeLostVolumeKept")
    assert kept["involvedObject"]["kind"] == "PersistentVolume" and "Retain" in kept["message"]
    [released] = events(fake, "NodeLost")
    assert "Retain" in released["message"] and released["involvedObject"]["name"] == "data-db-0"
    assert registry.get_sample_value("localdisk_node_loss_kept_volumes_total", {"reason": "retain"}) == 1
    before = writes(fake)
    await loss.resync()
    assert writes(fake) == before and len(events(fake, "NodeLostVolumeKept")) == 1


async def test_a_retain_volume_that_opted_out_keeps_its_claim_too(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm", {RELEASE_ON_NODE_LOSS: "false"}))
    await bound_pair(fake, "gone", "data-db-0", reclaim_policy="Retain")
    assert await controller(api, Clock(), grace=0).resync() == 0
    assert not terminating(fake, "persistentvolumeclaims", "data-db-0", "apps")
    assert not terminating(fake, "persistentvolumes", "pv-data-db-0")
    [kept] = events(fake, "NodeLostVolumeKept")
    assert RELEASE_ON_NODE_LOSS in kept["message"]


async def test_claims_waiting_for_a_lost_node_go_back_to_the_scheduler_at_once(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n2"))
    await fake.put("persistentvolumeclaims", objects.pending_claim("apps", "waiting", "gone"))
    await fake.put("persistentvolumeclaims", objects.pending_claim("apps", "on-n2", "n2"))
    await fake.put("persistentvolumeclaims", objects.pending_claim("apps", "theirs", "gone", "other.csi.example.com"))
    bound = objects.pending_claim("apps", "bound", "gone")
    bound["spec"]["volumeName"] = "pv-bound"
    await fake.put("persistentvolumeclaims", bound)
    registry = CollectorRegistry()
    assert await controller(api, Clock(), registry=registry).resync() == 0  # in the grace period: still done

    def selected(name: str) -> str | None:
        found = fake.get("persistentvolumeclaims", name, "apps")
        assert found is not None
        annotations: dict[str, str] = found["metadata"].get("annotations") or {}
        return annotations.get(SELECTED_NODE)

    assert selected("waiting") is None
    assert (selected("on-n2"), selected("theirs"), selected("bound")) == ("n2", "gone", "gone")
    [event] = events(fake, "NodeLostRescheduled")
    assert event["involvedObject"]["name"] == "waiting"
    assert registry.get_sample_value("localdisk_node_loss_rescheduled_claims_total") == 1


async def test_capacities_of_a_lost_node_go_after_the_grace_period_only_ours(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n2"))
    await fake.put("csistoragecapacities", objects.capacity("ours-gone", "gone"))
    await fake.put("csistoragecapacities", objects.capacity("ours-n2", "n2"))
    await fake.put("csistoragecapacities", objects.capacity("theirs-gone", "gone", driver="other.csi.example.com"))
    wider = objects.capacity("ours-wider", "gone")
    wider["nodeTopology"]["matchLabels"]["topology.kubernetes.io/zone"] = "a"
    await fake.put("csistoragecapacities", wider)
    clock = Clock()
    loss = controller(api, clock)
    await loss.resync()
    assert fake.get("csistoragecapacities", "ours-gone", "localdisk") is not None, "not during the grace period"
    clock.advance(GRACE)
    await loss.resync()
    assert fake.get("csistoragecapacities", "ours-gone", "localdisk") is None
    for kept in ("ours-n2", "theirs-gone", "ours-wider"):
        assert fake.get("csistoragecapacities", kept, "localdisk") is not None, kept
    [event] = events(fake, "NodeLostCapacityRemoved")
    assert "localdisk/ours-gone" in event["message"]


async def test_snapshot_contents_without_the_crd_are_no_error(fake: FakeKubernetes, api: Any) -> None:
    await bound_pair(fake, "gone", "data-db-0")
    assert await controller(api, Clock(), grace=0).resync() == 1


async def test_snapshot_contents_of_a_lost_node(fake: FakeKubernetes, api: Any) -> None:
    fake.install("volumesnapshotcontents")
    for name, driver in (("deleted", DRIVER_NAME), ("live", DRIVER_NAME), ("theirs", "other.csi")):
        await fake.put("volumesnapshotcontents", objects.snapshot_content(name, "gone", driver=driver))
    await fake.remove("volumesnapshotcontents", "deleted")  # its VolumeSnapshot was deleted; the finalizer holds it
    await fake.remove("volumesnapshotcontents", "theirs")
    clock = Clock()
    loss = controller(api, clock)
    await loss.resync()
    assert fake.get("volumesnapshotcontents", "deleted") is not None, "not during the grace period"
    clock.advance(GRACE)
    await loss.resync()
    assert fake.get("volumesnapshotcontents", "deleted") is None, "its finalizer was removed, so it is gone"
    live = fake.get("volumesnapshotcontents", "live")
    assert live is not None and live["metadata"]["finalizers"] == [SNAPSHOT_CONTENT_FINALIZER], "left to the user"
    theirs = fake.get("volumesnapshotcontents", "theirs")
    assert theirs is not None and theirs["metadata"]["finalizers"] == [SNAPSHOT_CONTENT_FINALIZER]
    [warned] = events(fake, "NodeLostSnapshot")
    assert warned["involvedObject"]["name"] == "live" and "apps/snap-live" in warned["message"]
    await loss.resync()
    assert len(events(fake, "NodeLostSnapshot")) == 1


async def test_extensions_are_called_after_the_grace_period(fake: FakeKubernetes, api: Any) -> None:
    await bound_pair(fake, "gone", "data-db-0")
    extension = Recorder({"gone": ["lv-1"], "only-here": ["lv-2"]})  # `only-here` has no PV: found through it
    clock = Clock()
    loss = controller(api, clock, extensions=[extension])
    await loss.resync()
    assert extension.calls == []
    clock.advance(GRACE)
    await loss.resync()
    assert sorted(extension.calls) == [("gone", False), ("only-here", False)]
    assert extension.held == {"gone": [], "only-here": []}
    assert any("lv-2" in e["message"] for e in events(fake, "NodeLost"))


async def test_dry_run_changes_nothing_and_reports_each_step_once(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    await bound_pair(fake, "gone", "data-db-0")
    await bound_pair(fake, "gone", "data-db-1", reclaim_policy="Retain")
    await fake.put("persistentvolumeclaims", objects.pending_claim("apps", "waiting", "gone"))
    await fake.put("csistoragecapacities", objects.capacity("ours-gone", "gone"))
    fake.install("volumesnapshotcontents")
    await fake.put("volumesnapshotcontents", objects.snapshot_content("deleted", "gone"))
    await fake.remove("volumesnapshotcontents", "deleted")
    extension = Recorder({"gone": ["lv-1"]})
    registry = CollectorRegistry()
    clock = Clock()
    loss = controller(api, clock, dry_run=True, registry=registry, extensions=[extension])
    fake.requests.clear()
    assert await loss.resync() == 0
    assert len(events(fake, "NodeLossGracePeriod")) == 2 and "dry run" in events(fake, "NodeLossDetected")[0]["message"]
    clock.advance(GRACE)
    for _ in range(2):
        assert await loss.resync() == 0
    assert writes(fake) == 0 and fake.count("POST", "/events") > 0, "nothing but Events"
    assert extension.calls == [("gone", True), ("gone", True)] and extension.held["gone"] == ["lv-1"]
    said = [e["message"] for e in events(fake, "NodeLossDryRun")]
    for step in (
        f"would remove {SELECTED_NODE}=gone from claim apps/waiting",
        "would delete claim apps/data-db-0 and PV pv-data-db-0",
        "would delete claim apps/data-db-1 of lost node gone, keeping PV pv-data-db-1 (Retain)",
        "would delete CSIStorageCapacity localdisk/ours-gone",
        "would remove the csi-snapshotter finalizer of VolumeSnapshotContent deleted",
        "would release test objects: lv-1",
    ):
        assert sum(step in message for message in said) == 1, (step, said)
    assert len(said) == 6, said
    actions = ("reschedule", "release", "release-claim", "delete-capacity", "release-snapshot", "extension")
    for action in actions:
        value = registry.get_sample_value("localdisk_node_loss_dry_run_actions_total", {"action": action})
        assert value == 1, action
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and NODE_LOST_SINCE not in (pv["metadata"].get("annotations") or {})


async def test_the_end_of_a_grace_period_wakes_the_controller(fake: FakeKubernetes, api: Any) -> None:
    """With a resync period of an hour, the release still happens when the (short) grace period ends, and a node
    re-created meanwhile is noticed through the watch (5 s: long enough that a slow machine cannot miss it)."""
    await fake.put("nodes", objects.node("n1"))
    await fake.put("nodes", objects.node("n2"))
    await bound_pair(fake, "n1", "data-db-0")
    await bound_pair(fake, "n2", "data-db-1")
    loss = NodeLossController(
        api, NodeLossSettings(grace_period=5.0, resync_period=3600), registry=CollectorRegistry(), pacer=Pacer(0.05)
    )
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(loss.run)
            while fake.count("GET", "watch=") == 0:
                await anyio.sleep(0.02)
            await fake.remove("nodes", "n1")
            await fake.remove("nodes", "n2")
            while not all(
                NODE_LOST_SINCE
                in ((fake.get("persistentvolumes", f"pv-data-db-{i}") or {})["metadata"].get("annotations") or {})
                for i in (0, 1)
            ):
                await anyio.sleep(0.02)
            await fake.put("nodes", objects.node("n2"))
            while not terminating(fake, "persistentvolumes", "pv-data-db-0"):
                await anyio.sleep(0.02)
            group.cancel_scope.cancel()
    assert not terminating(fake, "persistentvolumeclaims", "data-db-1", "apps"), "n2 came back"
    assert events(fake, "NodeLossCancelled")
