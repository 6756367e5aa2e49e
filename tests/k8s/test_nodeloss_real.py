"""Node loss against a real kube-apiserver and kube-controller-manager (its PV controller binds the claims, its
protection controllers finish the deletions), with `localdisk controller` run as its own process.

No kubelet and no provisioner are needed: Nodes, bound PV/PVC pairs shaped as the external-provisioner leaves them,
claims waiting for a selected node and CSIStorageCapacity objects are made through the API. Grace periods are a
few seconds; every wait polls with a deadline. One control plane serves the module.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from localdisk.k8s import DRIVER_NAME, NODE_LOST_SINCE, PROVISIONER_FINALIZER, TOPOLOGY_KEY
from localdisk.k8s.nodeloss_objects import SELECTED_NODE, SNAPSHOT_CONTENT_FINALIZER
from tests.k8s import controlplane
from tests.k8s.controlplane import NAMESPACE, ApiError, ControlPlane, Process, free_port, wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(300)]
Obj = dict[str, Any]
APPS = "default"
GRACE = 10
"""Seconds: long enough that the checks made during it cannot be overtaken by a slow machine."""
SNAPSHOT_CRDS = Path(__file__).parents[3] / "shared" / "k8s" / "crds"
"""The snapshot CRDs beside the project (../shared/k8s/crds), or $SNAPSHOT_CRD_DIR."""


def require(missing: str | None) -> None:
    """Skip without what the test needs; with CI=true that is a failure."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {missing}")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    require(controlplane.missing())
    with tempfile.TemporaryDirectory(prefix="localdisk-nodeloss-") as work:
        found = ControlPlane(Path(work), controlplane.kube_bin_dir())
        try:
            found.start()
            api = found.admin
            api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
            for name, policy in (("ld-delete", "Delete"), ("ld-retain", "Retain")):
                api.apply(
                    {
                        "apiVersion": "storage.k8s.io/v1",
                        "kind": "StorageClass",
                        "metadata": {"name": name},
                        "provisioner": DRIVER_NAME,
                        "volumeBindingMode": "WaitForFirstConsumer",
                        "reclaimPolicy": policy,
                    }
                )
            yield found
        finally:
            found.stop()


# -- the objects a cluster holds --------------------------------------------------------------------------------------


def add_node(api: controlplane.Api, name: str) -> None:
    api.create(
        "/api/v1/nodes",
        {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, TOPOLOGY_KEY: name}}},
    )


def bound_pair(api: controlplane.Api, node: str, name: str, policy: str = "Delete") -> None:
    """A PV on `node` and its claim, as the external-provisioner leaves them; waits until the PV controller bound
    them (the PV first: the claim's arrival then binds at once, not at the controller's next 15 s resync)."""
    claim_class = "ld-retain" if policy == "Retain" else "ld-delete"
    api.create(
        "/api/v1/persistentvolumes",
        {
            "metadata": {
                "name": f"pv-{name}",
                "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER_NAME},
                "finalizers": [PROVISIONER_FINALIZER] if policy == "Delete" else [],
            },
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": policy,
                "storageClassName": claim_class,
                "claimRef": {"namespace": APPS, "name": name},
                "csi": {"driver": DRIVER_NAME, "volumeHandle": f"fake:a:{name}"},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": TOPOLOGY_KEY, "operator": "In", "values": [node]}]}
                        ]
                    }
                },
            },
        },
    )
    api.create(
        f"/api/v1/namespaces/{APPS}/persistentvolumeclaims",
        {
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": claim_class,
                "resources": {"requests": {"storage": "1Gi"}},
                "volumeName": f"pv-{name}",
            },
        },
    )
    wait_for(f"claim {name} bound", lambda: claim(api, name)["status"].get("phase") == "Bound", 30)


def pending_claim(api: controlplane.Api, name: str, node: str) -> None:
    """A WaitForFirstConsumer claim kube-scheduler chose `node` for (the annotation is what it writes)."""
    api.create(
        f"/api/v1/namespaces/{APPS}/persistentvolumeclaims",
        {
            "metadata": {"name": name, "annotations": {SELECTED_NODE: node}},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "ld-delete",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


def capacity(api: controlplane.Api, name: str, node: str, driver: str = DRIVER_NAME) -> None:
    """A CSIStorageCapacity as the external-provisioner publishes it."""
    api.create(
        f"/apis/storage.k8s.io/v1/namespaces/{NAMESPACE}/csistoragecapacities",
        {
            "metadata": {"name": name, "labels": {"csi.storage.k8s.io/drivername": driver}},
            "nodeTopology": {"matchLabels": {TOPOLOGY_KEY: node}},
            "storageClassName": "ld-delete",
            "capacity": "4Gi",
        },
    )


def claim(api: controlplane.Api, name: str) -> Obj:
    return api.get(f"/api/v1/namespaces/{APPS}/persistentvolumeclaims/{name}")


def maybe(api: controlplane.Api, path: str) -> Obj | None:
    try:
        return api.get(path)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def volume(api: controlplane.Api, name: str) -> Obj | None:
    return maybe(api, f"/api/v1/persistentvolumes/pv-{name}")


def annotations_of(obj: Obj | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


def marked(api: controlplane.Api, name: str) -> Callable[[], bool]:
    """A check: the PV of claim `name` carries the time its node was first seen gone."""
    return lambda: NODE_LOST_SINCE in annotations_of(volume(api, name))


def claim_gone(api: controlplane.Api, name: str) -> Callable[[], bool]:
    return lambda: maybe(api, f"/api/v1/namespaces/{APPS}/persistentvolumeclaims/{name}") is None


def event_time(api: controlplane.Api, name: str, reason: str) -> float:
    """When localdisk first recorded `reason` about objects called `name`."""
    times = [
        seconds(e["firstTimestamp"])
        for e in api.get("/api/v1/events")["items"]
        if e["involvedObject"].get("name") == name and e["reason"] == reason
    ]
    assert times, f"no {reason} event about {name}"
    return min(times)


def capacity_exists(api: controlplane.Api, name: str) -> bool:
    return maybe(api, f"/apis/storage.k8s.io/v1/namespaces/{NAMESPACE}/csistoragecapacities/{name}") is not None


def reasons(api: controlplane.Api, name: str) -> set[str]:
    """The reasons of localdisk's Events about objects called `name` (in any namespace), selected as docs/deploy.md
    tells users to (`kubectl get events -A --field-selector reportingComponent=localdisk-controller`)."""
    listed = api.get("/api/v1/events?fieldSelector=reportingComponent%3Dlocaldisk-controller")["items"]
    assert all(e["reportingComponent"] == "localdisk-controller" for e in listed)
    return {e["reason"] for e in listed if e["involvedObject"].get("name") == name}


def has_events(api: controlplane.Api, name: str, wanted: set[str], timeout: float = 30.0) -> None:
    """Wait until localdisk's Events about `name` include every reason of `wanted` (an Event is written after the
    change it reports)."""
    wait_for(f"Events {sorted(wanted)} about {name}", lambda: wanted <= reasons(api, name) or None, timeout)


def seconds(wire: str) -> float:
    return datetime.strptime(wire, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


# -- the controller -------------------------------------------------------------------------------------------------


class Controller:
    def __init__(self, plane: ControlPlane, name: str, *options: str) -> None:
        self.plane, self.name, self.options = plane, name, options
        self.port = free_port()
        self.process: Process | None = None

    def start(self) -> None:
        argv = [
            str(Path(sys.executable).parent / "localdisk"),
            "controller",
            f"--kubeconfig={self.plane.kubeconfig}",
            f"--namespace={NAMESPACE}",
            f"--lease-name={self.name}",
            f"--identity={self.name}",
            f"--http-port={self.port}",
            "--resync-period=60",
            "--log-format=text",
            *self.options,
        ]
        self.process = controlplane.start(self.name, argv, self.plane.logs)
        wait_for(f"{self.name} to lead", lambda: "localdisk_controller_leader 1.0" in self.metrics(), 60)

    def metrics(self) -> str:
        assert self.process is not None and self.process.alive(), f"{self.name} exited:\n{self.tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def tail(self) -> str:
        return self.process.tail(40) if self.process is not None else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> Controller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the tests ------------------------------------------------------------------------------------------------------


def test_node_loss_waits_for_the_grace_period_and_a_returning_node_cancels_it(plane: ControlPlane) -> None:
    api = plane.admin
    for node in ("lost", "back"):
        add_node(api, node)
    bound_pair(api, "lost", "data-a")
    bound_pair(api, "lost", "data-b", policy="Retain")
    bound_pair(api, "back", "data-c")
    pending_claim(api, "wait-a", "lost")
    capacity(api, "csisc-lost", "lost")
    capacity(api, "csisc-other-driver", "lost", driver="other.csi.example.com")
    capacity(api, "csisc-back", "back")

    controller = Controller(plane, "nodeloss-grace", f"--node-loss-grace-period={GRACE}")
    with controller:
        api.delete("/api/v1/nodes/lost")
        api.delete("/api/v1/nodes/back")
        # Seen gone: the time is written on every PV of both nodes, and the waiting claim goes back at once.
        for name in ("data-a", "data-b", "data-c"):
            wait_for(f"{name} marked", marked(api, name), 30)
        since = seconds(annotations_of(volume(api, "data-a"))[NODE_LOST_SINCE])
        wait_for("wait-a rescheduled", lambda: SELECTED_NODE not in annotations_of(claim(api, "wait-a")), 30)
        # Nothing released during the grace period (checked while it provably still runs).
        for name in ("data-a", "data-b", "data-c"):
            assert not claim(api, name)["metadata"].get("deletionTimestamp"), name
        assert capacity_exists(api, "csisc-lost")
        assert time.time() < since + GRACE, "the checks above ran inside the grace period"
        has_events(api, "lost", {"NodeLossDetected"})
        has_events(api, "data-a", {"NodeLossGracePeriod"})
        has_events(api, "wait-a", {"NodeLostRescheduled"})

        add_node(api, "back")  # the kubelet registered it again
        wait_for("back's mark removed", lambda: NODE_LOST_SINCE not in annotations_of(volume(api, "data-c")), 30)
        has_events(api, "back", {"NodeLossCancelled"})  # the Events follow the mark's removal
        has_events(api, "data-c", {"NodeLossCancelled"})

        # A fail-over in the middle of the grace period: the successor keeps the time written on the PVs.
        controller.stop()
        controller.start()

        wait_for("data-a's claim gone", claim_gone(api, "data-a"), 60)
        released_at = event_time(api, "data-a", "NodeLost")  # recorded just before the claim is deleted
        assert released_at >= since + GRACE, f"released {released_at - since:.0f}s after the node was seen gone"
        wait_for("data-a's PV gone", lambda: volume(api, "data-a") is None, 60)
        wait_for("csisc-lost deleted", lambda: not capacity_exists(api, "csisc-lost"), 30)
        wait_for("data-b's claim gone", claim_gone(api, "data-b"), 60)
        retained = volume(api, "data-b")
        assert retained is not None and not retained["metadata"].get("deletionTimestamp"), "Retain: the PV stays"
        wait_for("data-b's PV Released", lambda: (volume(api, "data-b") or {})["status"].get("phase") == "Released", 30)
        has_events(api, "pv-data-b", {"NodeLostVolumeKept"})
        has_events(api, "data-a", {"NodeLost"})
        has_events(api, "lost", {"NodeLostCapacityRemoved"})
        assert "localdisk_node_loss_released_volumes_total 1.0" in controller.metrics()

    # untouched: the node that came back, and what is not ours
    assert not claim(api, "data-c")["metadata"].get("deletionTimestamp")
    assert claim(api, "data-c")["status"]["phase"] == "Bound"
    assert capacity_exists(api, "csisc-back") and capacity_exists(api, "csisc-other-driver")


def test_dry_run_reports_and_changes_nothing(plane: ControlPlane) -> None:
    api = plane.admin
    add_node(api, "dry")
    bound_pair(api, "dry", "data-d")
    pending_claim(api, "wait-d", "dry")
    capacity(api, "csisc-dry", "dry")
    with Controller(plane, "nodeloss-dry-run", "--node-loss-grace-period=2", "--node-loss-dry-run") as controller:
        api.delete("/api/v1/nodes/dry")
        wanted = [
            'localdisk_node_loss_dry_run_actions_total{action="release"} 1.0',
            'localdisk_node_loss_dry_run_actions_total{action="reschedule"}',
            'localdisk_node_loss_dry_run_actions_total{action="delete-capacity"}',
        ]
        wait_for("the dry run's report", lambda: all(line in controller.metrics() for line in wanted), 60)
        has_events(api, "data-d", {"NodeLossDryRun", "NodeLossGracePeriod"})
        has_events(api, "wait-d", {"NodeLossDryRun"})
        has_events(api, "dry", {"NodeLossDryRun"})
    assert not claim(api, "data-d")["metadata"].get("deletionTimestamp")
    assert NODE_LOST_SINCE not in annotations_of(volume(api, "data-d")), "not even the grace period's record"
    assert annotations_of(claim(api, "wait-d"))[SELECTED_NODE] == "dry"
    assert capacity_exists(api, "csisc-dry")


def test_snapshot_contents_of_a_lost_node(plane: ControlPlane) -> None:
    """With the snapshot CRDs installed: a content being deleted loses the finalizer only its node's csi-snapshotter
    would have removed; a live one is only reported."""
    crds = Path(os.environ.get("SNAPSHOT_CRD_DIR") or SNAPSHOT_CRDS)
    crd = crds / "snapshot.storage.k8s.io_volumesnapshotcontents.yaml"
    require(None if crd.is_file() else f"no snapshot CRD at {crd}: set SNAPSHOT_CRD_DIR")
    api = plane.admin
    try:
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(crd.read_text()))
    except ApiError as exc:
        if exc.status != 409:
            raise
    path = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents"
    wait_for("the VolumeSnapshotContent CRD served", lambda: api.get(path), 60)
    add_node(api, "snapped")
    for name in ("content-deleted", "content-live"):
        api.create(
            path,
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshotContent",
                "metadata": {
                    "name": name,
                    "labels": {"snapshot.storage.kubernetes.io/managed-by": "snapped"},
                    "finalizers": [SNAPSHOT_CONTENT_FINALIZER],
                },
                "spec": {
                    "driver": DRIVER_NAME,
                    "deletionPolicy": "Delete",
                    "source": {"snapshotHandle": f"thin:a:{name}"},
                    "volumeSnapshotRef": {"namespace": APPS, "name": f"snap-{name}"},
                },
            },
        )
    api.delete(f"{path}/content-deleted")
    with Controller(plane, "nodeloss-snapshots", "--node-loss-grace-period=2"):
        api.delete("/api/v1/nodes/snapped")
        wait_for("content-deleted gone", lambda: maybe(api, f"{path}/content-deleted") is None, 60)
        wait_for("content-live reported", lambda: "NodeLostSnapshot" in reasons(api, "content-live"), 30)
    live = api.get(f"{path}/content-live")
    assert live["metadata"]["finalizers"] == [SNAPSHOT_CONTENT_FINALIZER] and not live["metadata"].get(
        "deletionTimestamp"
    )


def schedulable_node(api: controlplane.Api, name: str) -> None:
    """A Node kube-scheduler will place pods on: Ready, roomy, untainted (no kubelet reports it here)."""
    add_node(api, name)
    roomy = {"cpu": "100", "memory": "100Gi", "pods": "100"}
    ready = [{"type": "Ready", "status": "True", "reason": "Test", "message": "no kubelet here"}]
    api.patch(
        f"/api/v1/nodes/{name}/status", {"status": {"capacity": roomy, "allocatable": roomy, "conditions": ready}}
    )
    api.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": None}})


def test_the_scheduler_chooses_again_for_a_claim_whose_node_was_deleted(plane: ControlPlane) -> None:
    """kube-scheduler picks a node for a WaitForFirstConsumer claim and waits (up to its 10 minute bind timeout) for
    the volume; nothing provisions it, that node is deleted; once the selected-node annotation is removed, the
    scheduler gives up on that node and picks the other one. (Without `localdisk controller`, the claim still named
    the deleted node 90 s later: measured by hand, not asserted here, as a "not yet" would make a slow test.)"""
    api = plane.admin
    for node in ("pick-1", "pick-2"):
        schedulable_node(api, node)
    pending = "wait-pick"
    api.create(
        f"/api/v1/namespaces/{APPS}/persistentvolumeclaims",
        {
            "metadata": {"name": pending},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "ld-delete",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    api.create(
        f"/api/v1/namespaces/{APPS}/pods",
        {
            "metadata": {"name": "app-pick"},
            "spec": {
                "containers": [{"name": "app", "image": "busybox"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pending}}],
            },
        },
    )
    config = {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration"}
    with plane.scheduler(config, feature_gates=None), Controller(plane, "nodeloss-pick", "--node-loss-grace-period=60"):

        def selected() -> str | None:
            return annotations_of(claim(api, pending)).get(SELECTED_NODE)

        first = wait_for("the scheduler's first choice", selected, 60)
        api.delete(f"/api/v1/nodes/{first}")
        second = wait_for("a second choice", lambda: (s := selected()) not in (None, first) and s, 60)
        assert {first, second} == {"pick-1", "pick-2"}
        has_events(api, pending, {"NodeLostRescheduled"})
    api.delete(f"/api/v1/namespaces/{APPS}/pods/app-pick", {"gracePeriodSeconds": 0})
