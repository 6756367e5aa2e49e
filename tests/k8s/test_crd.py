"""The pure parts of the split shape: object names, errors carried in status, node reports, node choice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from localdisk import errors
from localdisk._proto.csi.v1 import ListVolumesRequest, Topology, TopologyRequirement
from localdisk.csi.central import CentralControllerService, _nodes
from localdisk.k8s.cluster import ClusterVolumes, NodeReport, VolumeRequest
from localdisk.k8s.crd import (
    ADOPTED,
    FINALIZER,
    NODE_LABEL,
    PoolReport,
    SnapshotObject,
    VolumeObject,
    error_from_status,
    error_status,
    label_value,
    object_name,
)

KEY = "topology.localdisk.io/node"


def test_sidecar_names_are_kept_and_anything_else_is_hashed_stably() -> None:
    assert object_name("pvc-2d3aa8ab-3ac2-4e24-a920-2cafcf6f04e5") == "pvc-2d3aa8ab-3ac2-4e24-a920-2cafcf6f04e5"
    odd = object_name("Volume With Spaces/and:colons")
    assert odd.startswith("h-") and len(odd) <= 63 and ":" not in odd
    assert odd == object_name("Volume With Spaces/and:colons")
    assert object_name("x" * 64) != object_name("x" * 65)
    # a name that looks like a hashed one is hashed too, so no CSI name can take another's object
    assert object_name(odd) != odd


def test_long_node_names_become_valid_label_values() -> None:
    assert label_value("n1") == "n1"
    long = "node-" + "a" * 70
    assert len(label_value(long)) <= 63 and label_value(long) == label_value(long)


@pytest.mark.parametrize(
    "error",
    [
        errors.InsufficientCapacity("no room"),
        errors.InvalidArgument("bad"),
        errors.FailedPrecondition("state"),
        errors.CommandFailed(["lvcreate"], 5, "boom"),  # a subclass travels as its nearest known class
    ],
)
def test_errors_travel_through_status_as_their_domain_class(error: errors.LocalDiskError) -> None:
    status = error_status(error)
    back = error_from_status(status, "node n1")
    expected = errors.BackendFailure if isinstance(error, errors.CommandFailed) else type(error)
    assert type(back) is expected
    assert back.message.startswith("node n1: ")


def test_an_unknown_reason_is_a_backend_failure_not_a_crash() -> None:
    assert type(error_from_status({"reason": "Whatever", "message": "x"}, "n")) is errors.BackendFailure
    assert "without a message" in error_from_status({}, "n").message


def _volume(**status: object) -> dict[str, object]:
    return {
        "metadata": {
            "name": "pvc-1",
            "generation": 2,
            "resourceVersion": "7",
            "finalizers": [FINALIZER],
            "labels": {NODE_LABEL: "n1"},
        },
        "spec": {"name": "pvc-1", "node": "n1", "backend": "lvm", "requiredBytes": 10, "limitBytes": 0},
        "status": status,
    }


def test_a_volume_is_settled_only_when_the_node_answered_its_current_spec() -> None:
    assert not VolumeObject.of(_volume()).settled
    assert not VolumeObject.of(_volume(phase="Ready", handle="lvm:a:b", observedGeneration=1)).settled
    assert VolumeObject.of(_volume(phase="Ready", handle="lvm:a:b", observedGeneration=2)).settled
    assert VolumeObject.of(_volume(phase="Failed", error={"reason": "X"}, observedGeneration=2)).settled


def _report(age: float, *pools: PoolReport) -> NodeReport:
    return NodeReport("n1", datetime.now(UTC) - timedelta(seconds=age), pools)


def _pool(name: str, default: bool = False, up: bool = True, available: int = 100) -> PoolReport:
    return PoolReport("lvm", name, default, up, "", available, available // 2, False, False)


@pytest.mark.anyio
async def test_capacity_comes_from_fresh_reports_and_the_class_pool_only() -> None:
    cluster = ClusterVolumes(api=None)
    cluster.nodes["n1"] = _report(5, _pool("ssd", default=True, available=100), _pool("hdd", available=1000))
    assert cluster.capacity("n1", "lvm", None) == (100, 50)  # the default pool
    assert cluster.capacity("n1", "lvm", "hdd") == (1000, 500)
    assert cluster.capacity("n1", "thin", None) == (0, 0)  # a class this node does not have
    assert cluster.capacity("n2", "lvm", None) == (0, 0)  # a node that never reported
    cluster.nodes["n1"] = _report(600, _pool("ssd", default=True))
    assert cluster.capacity("n1", "lvm", None) == (0, 0)  # silent for too long
    cluster.nodes["n1"] = _report(1, _pool("ssd", default=True, up=False))
    assert cluster.capacity("n1", "lvm", None) == (0, 0)  # a pool that is down


def test_the_preferred_node_comes_first_and_each_once() -> None:
    requirement = TopologyRequirement(
        requisite=[Topology(segments={KEY: "n2"}), Topology(segments={KEY: "n1"})],
        preferred=[Topology(segments={KEY: "n1"}), Topology(segments={KEY: "n2"})],
    )
    assert _nodes(requirement) == ["n1", "n2"]
    assert _nodes(None) == []


def test_a_retried_create_with_other_parameters_is_already_exists() -> None:
    existing = VolumeObject.of(_volume(phase="Ready", handle="lvm:a:b", sizeBytes=10, observedGeneration=2))
    same = VolumeRequest("pvc-1", "n1", "lvm", None, 10, 0)
    ClusterVolumes._same_or_conflict(existing, same)
    with pytest.raises(errors.AlreadyExists):
        ClusterVolumes._same_or_conflict(existing, VolumeRequest("pvc-1", "n1", "thin", None, 10, 0))
    with pytest.raises(errors.AlreadyExists):
        ClusterVolumes._same_or_conflict(existing, VolumeRequest("pvc-1", "n1", "lvm", None, 20, 0))


class _Listing:
    """The one call `ClusterVolumes._by_handle` makes when its cache does not know an ID: a list of the kind."""

    def __init__(self, items: list[dict[str, object]]) -> None:
        self.items = items
        self.calls = 0

    async def list_cluster_custom_object(self, *args: object, **kwargs: object) -> dict[str, object]:
        self.calls += 1
        return {"items": self.items}


@pytest.mark.anyio
async def test_an_old_id_the_cache_lacks_is_looked_up_on_the_api_server() -> None:
    cluster = ClusterVolumes(api=None)
    listing = _Listing([_volume(phase="Ready", handle="lvm:a:b", observedGeneration=1)])
    cluster.custom = listing
    assert await cluster.by_handle("pvc-1") == "pvc-1"  # an object name: no lookup
    assert listing.calls == 0
    assert await cluster.by_handle("lvm:a:b") == "pvc-1"  # the watch has not brought it yet
    assert listing.calls == 1
    with pytest.raises(errors.FailedPrecondition, match="no LocalVolume records it"):
        await cluster.by_handle("lvm:a:other")


def test_an_adopted_object_knows_its_on_disk_id_before_its_status_is_written() -> None:
    """Else its node, seeing the object before the status, would make a second volume for it (a partition keeps
    only a hash of the name, so a lookup by name cannot find the adopted one)."""
    adopted = _volume()
    adopted["metadata"]["annotations"] = {ADOPTED: "partition:default:1234"}  # type: ignore[index]
    assert VolumeObject.of(adopted).handle == "partition:default:1234"
    assert not VolumeObject.of(adopted).settled
    assert VolumeObject.of(_volume(handle="lvm:a:b")).handle == "lvm:a:b"
    snapshot = {
        "metadata": {"name": "s", "annotations": {ADOPTED: "thin:p:s1"}},
        "spec": {"name": "s", "node": "n1", "sourceVolume": "pvc-1"},
    }
    assert SnapshotObject.of(snapshot).handle == "thin:p:s1"


@pytest.mark.anyio
async def test_list_pages_follow_the_watch_without_sorting_every_page() -> None:
    """The central controller's ListVolumes pages by name; the order is made again only after the cache changed."""
    cluster = ClusterVolumes(api=None)
    cluster.synced.set()

    def watched(name: str, handle: str | None) -> None:
        status = {"handle": handle, "phase": "Ready"} if handle else {}
        cluster._store("localvolumes", "ADDED", {"metadata": {"name": name}, "spec": {}, "status": status})

    async def walk() -> list[str]:
        found, token = [], ""
        while True:
            page = await central.list_volumes(ListVolumesRequest(max_entries=2, starting_token=token))
            found += [e.volume.volume_id for e in page.entries if e.volume is not None]
            if not (token := page.next_token):
                return found

    for name in ("v3", "v1", "v5", "v2"):
        watched(name, f"h-{name}")
    watched("v4", None)  # not made yet: not listed
    central = CentralControllerService(cluster)
    assert await walk() == ["v1", "v2", "v3", "v5"]
    first = central._listing()
    assert central._listing() is first  # unchanged: the same order, not sorted again
    watched("v4", "h-v4")
    assert await walk() == ["v1", "v2", "v3", "v4", "v5"]
    cluster._store("localvolumes", "DELETED", {"metadata": {"name": "v2"}})
    assert await walk() == ["v1", "v3", "v4", "v5"]
