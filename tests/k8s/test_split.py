"""The split shape against the real thing: `serve --role controller` behind the real external-provisioner (central
mode, capacity tracking) and external-resizer, node agents (`serve --role node`) under the RBAC rules of
examples/deploy, the real kube-scheduler choosing nodes from the CSIStorageCapacity objects they lead to.

Two storage nodes without a kubelet: n1 with a 1 GiB pool, n2 with 2 GiB. One control plane serves the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk._proto.csi.v1 import (
    ControllerStub,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    ListSnapshotsRequest,
    Topology,
    TopologyRequirement,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
)
from localdisk.k8s import DRIVER_NAME, TOPOLOGY_KEY
from localdisk.k8s.crd import FINALIZER, GROUP, NODE_LABEL, VERSION
from localdisk.sizes import GiB, MiB
from tests.csi_helpers import create_request
from tests.k8s import controlplane
from tests.k8s.controlplane import NAMESPACE, ApiError, ControlPlane, localdisk_command, wait_for

pytestmark = [
    pytest.mark.controlplane,
    controlplane.skip_unless_available(),
    pytest.mark.timeout(600),
]
REPO = Path(__file__).parent.parent.parent
DEPLOY = REPO / "examples" / "deploy"
SNAPSHOT_CRDS = Path(os.environ.get("SNAPSHOT_CRD_DIR") or REPO.parent / "shared" / "k8s" / "crds")
"""The VolumeSnapshot CRDs of external-snapshotter; `../shared/k8s/crds` beside the repository by default."""
POOLS = {"n1": 1 * GiB, "n2": 2 * GiB}
CLASS = "split"
TEST_NAMESPACE = "default"
VOLUMES = f"/apis/{GROUP}/{VERSION}/localvolumes"
Obj = dict[str, Any]


def deploy(name: str, kinds: set[str] | None = None) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return [d for d in docs if kinds is None or d["kind"] in kinds]


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


@dataclass
class Split:
    plane: ControlPlane
    scheduler: contextlib.AbstractContextManager[controlplane.Process]

    @property
    def api(self) -> controlplane.Api:
        return self.plane.admin

    def free(self) -> dict[str, int]:
        """node -> bytes free for the StorageClass, as its CSIStorageCapacity objects say."""
        listed = self.api.get(f"/apis/storage.k8s.io/v1/namespaces/{NAMESPACE}/csistoragecapacities")
        return {
            item["nodeTopology"]["matchLabels"][TOPOLOGY_KEY]: _bytes(item["capacity"])
            for item in listed["items"]
            if item["storageClassName"] == CLASS and "capacity" in item
        }

    def wait_free(self, expected: dict[str, int], timeout: float = 120.0) -> None:
        wait_for(f"capacities {expected}", lambda: self.free() == expected or None, timeout)

    def claim(
        self,
        name: str,
        size: int,
        mode: str = "Filesystem",
        *,
        snapshot: str | None = None,
        node: str | None = None,
        attributes: str | None = None,
    ) -> None:
        """A claim of `size` bytes (restored from VolumeSnapshot `snapshot`, of VolumeAttributesClass `attributes`)
        and a pod using it (on `node`)."""
        base = f"/api/v1/namespaces/{TEST_NAMESPACE}"
        spec: Obj = {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": mode,
            "storageClassName": CLASS,
            "resources": {"requests": {"storage": str(size)}},
        }
        if attributes:
            spec["volumeAttributesClassName"] = attributes
        if snapshot:
            spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot}
        self.api.create(f"{base}/persistentvolumeclaims", {"metadata": {"name": name}, "spec": spec})
        pod: Obj = {
            "containers": [{"name": "app", "image": "busybox"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
        }
        if node:
            pod["nodeSelector"] = {"kubernetes.io/hostname": node}
        self.api.create(f"{base}/pods", {"metadata": {"name": name}, "spec": pod})

    def pvc(self, name: str) -> Obj:
        return self.api.get(f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims/{name}")

    def bound(self, name: str, timeout: float = 240.0) -> Obj:
        """The PV bound to claim `name`, once it is."""

        def volume() -> Obj | None:
            claim = self.pvc(name)
            if claim["status"].get("phase") != "Bound":
                return None
            return self.api.get(f"/api/v1/persistentvolumes/{claim['spec']['volumeName']}")

        return wait_for(f"claim {name} to be bound", volume, timeout)

    def local_volume(self, name: str) -> Obj | None:
        try:
            return self.api.get(f"{VOLUMES}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def remove(self, name: str) -> None:
        base = f"/api/v1/namespaces/{TEST_NAMESPACE}"
        self.api.delete(f"{base}/pods/{name}", {"gracePeriodSeconds": 0})
        self.api.delete(f"{base}/persistentvolumeclaims/{name}")


def _scheduler_config() -> Obj:
    return {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration"}


@pytest.fixture(scope="module")
def split() -> Iterator[Split]:
    controlplane.require()
    work = Path(tempfile.mkdtemp(prefix="localdisk-split-"))
    plane = ControlPlane(work, controlplane.kube_bin_dir())
    split: Split | None = None
    try:
        plane.start()
        split = _start(plane)
        yield split
    finally:
        if split is not None:
            split.scheduler.__exit__(None, None, None)
        plane.stop()
        if not os.environ.get("LOCALDISK_KEEP_LOGS"):  # set it to read the processes' logs after a failure
            shutil.rmtree(work, ignore_errors=True)


def _start(plane: ControlPlane) -> Split:
    api = plane.admin
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    snapshot_crds = [yaml.safe_load(p.read_text()) for p in sorted(SNAPSHOT_CRDS.glob("*.yaml"))]
    assert snapshot_crds, f"no VolumeSnapshot CRDs in {SNAPSHOT_CRDS} (set SNAPSHOT_CRD_DIR)"
    for crd in deploy("crds.yaml") + snapshot_crds:
        api.apply(crd)
    for crd in deploy("crds.yaml") + snapshot_crds:
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"

        def established(path: str = path) -> bool:
            conditions = api.get(path).get("status", {}).get("conditions", [])
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(f"{crd['metadata']['name']} established", lambda: established() or None, 30)
    rbac = ["clusterrole.yaml", "clusterrolebinding.yaml", "role.yaml", "rolebinding.yaml", "csidriver.yaml"]
    rbac += ["admissionpolicy.yaml", "admissionpolicybinding.yaml"]
    for doc in [d for name in rbac for d in deploy(name)]:
        api.apply(doc)
    api.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": CLASS},
            "provisioner": DRIVER_NAME,
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": True,
            "parameters": {"backend": "fake"},
        }
    )
    for name, size in POOLS.items():
        plane.register_node(name)
        cgroups = plane.work / name / "cgroup"  # a fake kubelet cgroup tree: the I/O limits of test_io_limits_...
        cgroups.mkdir(parents=True)
        (cgroups / "cgroup.controllers").write_text("cpu io memory\n")
        node_settings = f'cgroup_root = "{cgroups}"\n'
        kubeconfig = plane.node_agent_kubeconfig(name)  # a token bound to a pod on the node, as in the DaemonSet
        args = ("--role=node", f"--kubeconfig={kubeconfig}")
        plane.serve_node(name, {"a": size}, args, node_settings=node_settings)
    socket_path = plane.work / "controller.sock"
    controller = plane._start(
        "localdisk-controller",
        [
            localdisk_command(),
            "serve",
            "--role=controller",
            f"--kubeconfig={plane.controller_kubeconfig}",
            f"--endpoint=unix://{socket_path}",
            "--log-format=text",
        ],
    )
    plane._wait_up(controller, "localdisk serve --role controller", socket_path.exists, 60)
    sidecar_env = {"NAMESPACE": NAMESPACE, "POD_NAME": "localdisk-controller-0"}
    plane._start(
        "csi-provisioner",
        [
            str(plane.bin_dir / "csi-provisioner"),
            f"--kubeconfig={plane.controller_kubeconfig}",
            f"--csi-address={socket_path}",
            "--leader-election=false",
            "--strict-topology=true",
            "--immediate-topology=false",
            "--enable-capacity=true",
            "--capacity-ownerref-level=-1",
            "--capacity-poll-interval=1s",
            "--timeout=60s",
            "--retry-interval-max=10s",  # 5 min by default: a test of restarts would mostly wait for the backoff
        ],
        {**_environ(), **sidecar_env},
    )
    plane._start(
        "csi-resizer",
        [
            str(plane.bin_dir / "csi-resizer"),
            f"--kubeconfig={plane.controller_kubeconfig}",
            f"--csi-address={socket_path}",
            "--leader-election=false",
            "--handle-volume-inuse-error=false",  # online expansion: no pod informer (and no rights on pods)
            "--timeout=60s",
            "--retry-interval-max=10s",  # 5 min by default: a test of restarts would mostly wait for the backoff
        ],
        {**_environ(), **sidecar_env},
    )
    plane._start(
        "csi-snapshotter",
        [
            str(plane.bin_dir / "csi-snapshotter"),
            f"--kubeconfig={plane.controller_kubeconfig}",
            f"--csi-address={socket_path}",
            "--leader-election=false",
            "--timeout=60s",
            "--retry-interval-max=10s",  # 5 min by default: a test of restarts would mostly wait for the backoff
        ],
        {**_environ(), **sidecar_env},
    )
    plane._start(  # the cluster's own, as it comes: no --enable-distributed-snapshotting
        "snapshot-controller",
        [str(plane.bin_dir / "snapshot-controller"), f"--kubeconfig={plane.kubeconfig}", "--leader-election=false"],
    )
    for doc in deploy("volumesnapshotclass.yaml"):
        api.request("POST", "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses", doc)
    scheduler = plane.scheduler(_scheduler_config(), feature_gates=None)
    scheduler.__enter__()  # stopped with the plane's other processes
    split = Split(plane, scheduler)
    split.wait_free(dict(POOLS))
    return split


def _environ() -> dict[str, str]:
    return dict(os.environ)


def test_the_node_agent_has_no_rights_on_claims_or_volumes(split: Split) -> None:
    node = controlplane.Api(split.plane.url, _token(split.plane.node_kubeconfig))
    for path in ("/api/v1/persistentvolumes", f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims"):
        with pytest.raises(ApiError) as refused:
            node.get(path)
        assert refused.value.status == 403
    assert node.get(f"{VOLUMES}?labelSelector=localdisk.csi.io/node%3Dn1")["items"] == []


def test_a_node_agent_may_change_only_the_objects_of_its_own_node(split: Split) -> None:
    """The admission policy of examples/deploy, with the tokens the agents really use (bound to a pod on a node)."""
    api = split.api
    for name, node in (("own-n1", "n1"), ("own-n2", "n2")):
        api.create(
            VOLUMES,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LocalVolume",
                # a label no agent watches: this test plays the agent itself
                "metadata": {"name": name, "labels": {NODE_LABEL: "nobody"}},
                "spec": {"name": name, "node": node, "backend": "fake", "requiredBytes": MiB},
            },
        )
    try:
        n1 = controlplane.Api(split.plane.url, _token(split.plane.node_agent_kubeconfig("n1")))
        merge = "application/merge-patch+json"
        n1.request("PATCH", f"{VOLUMES}/own-n1/status", {"status": {"phase": "Ready"}}, merge)

        def refused(api: controlplane.Api, path: str, body: Obj, method: str = "PATCH") -> str:
            with pytest.raises(ApiError) as caught:
                api.request(method, path, body, merge if method == "PATCH" else "application/json")
            assert caught.value.status == 403, caught.value.body
            return caught.value.body

        assert "may not change an object of node n2" in refused(n1, f"{VOLUMES}/own-n2/status", {"status": {}})
        assert "may not change an object of node n2" in refused(
            n1, f"{VOLUMES}/own-n2", {"metadata": {"finalizers": None, "labels": {"x": "y"}}}
        )
        assert "does not change the spec" in refused(n1, f"{VOLUMES}/own-n1", {"spec": {"requiredBytes": 2 * MiB}})
        other: Obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalNode", "metadata": {"name": "n2"}}
        assert "may not change an object of node n2" in refused(
            n1, f"/apis/{GROUP}/{VERSION}/localnodes", other, method="POST"
        )
        # the same service account with a token that names no node (a legacy secret token, say)
        unbound = controlplane.Api(split.plane.url, _token(split.plane.node_kubeconfig))
        assert "must be bound to a pod on a node" in refused(unbound, f"{VOLUMES}/own-n1/status", {"status": {}})
    finally:
        for name in ("own-n1", "own-n2"):
            api.delete(f"{VOLUMES}/{name}")


def _token(kubeconfig: Path) -> str:
    token: str = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    return token


def test_a_claim_only_one_node_can_hold_lands_there_grows_and_is_deleted(split: Split) -> None:
    # raw block: growing it needs no NodeExpandVolume, which no kubelet would call here
    split.claim("big", 1536 * MiB, mode="Block")
    pv = split.bound("big")
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["n2"]
    handle = pv["spec"]["csi"]["volumeHandle"]
    volume = split.local_volume(handle)
    assert volume is not None
    assert volume["spec"]["node"] == "n2"
    assert volume["status"]["phase"] == "Ready"
    assert volume["status"]["sizeBytes"] == 1536 * MiB
    assert "localdisk.csi.io/on-disk" in volume["metadata"]["finalizers"]
    split.wait_free({"n1": 1 * GiB, "n2": 512 * MiB})

    # grows when the node has room: the PV's size follows the node's answer
    split.api.patch(
        f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims/big",
        {"spec": {"resources": {"requests": {"storage": str(2 * GiB)}}}},
    )
    wait_for(
        "the PV to be 2 GiB",
        lambda: (
            _bytes(split.api.get(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")["spec"]["capacity"]["storage"])
            == 2 * GiB
            or None
        ),
        180,
    )
    split.wait_free({"n1": 1 * GiB, "n2": 0})

    # and fails honestly when it has none: the PV keeps its size, the object says why
    split.api.patch(
        f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims/big",
        {"spec": {"resources": {"requests": {"storage": str(3 * GiB)}}}},
    )

    def refused() -> Obj | None:
        found = split.local_volume(handle)
        error = (found or {}).get("status", {}).get("error")
        return error if error else None

    error = wait_for("the node to refuse the growth", refused, 180)
    assert error["reason"] == "InsufficientCapacity"
    pv_now = split.api.get(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    assert _bytes(pv_now["spec"]["capacity"]["storage"]) == 2 * GiB

    split.remove("big")
    wait_for("the LocalVolume to go", lambda: split.local_volume(handle) is None or None, 180)
    wait_for(
        "the PV to go",
        lambda: (
            not any(
                p["metadata"]["name"] == pv["metadata"]["name"]
                for p in split.api.get("/api/v1/persistentvolumes")["items"]
            )
            or None
        ),
        180,
    )
    split.wait_free(dict(POOLS))


def test_a_claim_no_node_can_hold_leaves_its_pod_unschedulable_and_creates_nothing(split: Split) -> None:
    split.claim("huge", 3 * GiB)

    def unschedulable() -> bool | None:
        pod = split.api.get(f"/api/v1/namespaces/{TEST_NAMESPACE}/pods/huge")
        return (
            any(
                c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
                for c in pod["status"].get("conditions", [])
            )
            or None
        )

    wait_for("the pod to be unschedulable", unschedulable, 180)
    assert split.pvc("huge")["status"].get("phase") == "Pending"
    names = [v["spec"]["name"] for v in split.api.get(VOLUMES)["items"]]
    assert names == []
    split.remove("huge")


def test_a_volume_is_snapshotted_and_restored_on_its_node_without_distributed_snapshotting(split: Split) -> None:
    split.claim("origin", 256 * MiB, node="n1")
    origin = split.bound("origin")
    base = f"/apis/snapshot.storage.k8s.io/v1/namespaces/{TEST_NAMESPACE}/volumesnapshots"
    split.api.create(
        base,
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": "snap"},
            "spec": {"volumeSnapshotClassName": "localdisk", "source": {"persistentVolumeClaimName": "origin"}},
        },
    )

    def ready() -> Obj | None:
        status = split.api.get(f"{base}/snap").get("status") or {}
        return status if status.get("readyToUse") else None

    status = wait_for("the snapshot to be ready", ready, 180)
    content = split.api.get(
        f"/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/{status['boundVolumeSnapshotContentName']}"
    )
    snapshot_id = content["status"]["snapshotHandle"]
    local = split.api.get(f"/apis/{GROUP}/{VERSION}/localsnapshots/{snapshot_id}")
    assert local["spec"]["node"] == "n1"
    assert local["spec"]["sourceVolume"] == origin["spec"]["csi"]["volumeHandle"]
    assert local["status"]["phase"] == "Ready"

    split.claim("restored", 256 * MiB, snapshot="snap", node="n1")
    restored = split.bound("restored")
    volume = split.local_volume(restored["spec"]["csi"]["volumeHandle"])
    assert volume is not None
    assert volume["spec"]["source"] == {"kind": "snapshot", "name": snapshot_id}
    assert volume["spec"]["node"] == "n1"

    split.remove("restored")
    split.api.delete(f"{base}/snap")
    wait_for(
        "the LocalSnapshot to go",
        lambda: not split.api.get(f"/apis/{GROUP}/{VERSION}/localsnapshots")["items"] or None,
        180,
    )
    split.remove("origin")
    wait_for("every LocalVolume to go", lambda: not split.api.get(VOLUMES)["items"] or None, 180)
    split.wait_free(dict(POOLS))


def test_node_agent_controller_and_api_server_restarts_in_the_middle_of_operations(split: Split) -> None:
    plane = split.plane
    # a create while the only node with room is down: the object waits for its node, which carries it out on return
    plane.process("localdisk-n2").kill()
    split.claim("late", 1536 * MiB)
    uid = wait_for("the claim", lambda: split.pvc("late")["metadata"].get("uid"), 30)
    wait_for("its LocalVolume", lambda: split.local_volume(f"pvc-{uid}"), 180)
    assert (split.local_volume(f"pvc-{uid}") or {}).get("status", {}).get("handle") is None
    plane.restart("localdisk-n2")
    pv = split.bound("late")
    assert pv["spec"]["csi"]["volumeHandle"] == f"pvc-{uid}"

    # the controller killed right after a delete began, the node agent killed while it deletes: both converge
    split.remove("late")
    _restart_controller(plane)
    plane.restart("localdisk-n2", crash=True)
    wait_for("the LocalVolume to go", lambda: split.local_volume(f"pvc-{uid}") is None or None, 180)
    split.wait_free(dict(POOLS), 90)

    # the API server restarted under everything: watches resume, heartbeats go on, claims bind again
    plane.restart("kube-apiserver")
    wait_for("the API server", lambda: split.api.healthy() or None, 180)
    split.claim("after", 1536 * MiB)
    split.bound("after", 240)
    split.wait_free({"n1": 1 * GiB, "n2": 512 * MiB}, 90)
    split.remove("after")
    wait_for("every LocalVolume to go", lambda: not split.api.get(VOLUMES)["items"] or None, 180)
    split.wait_free(dict(POOLS), 90)


def test_growth_snapshot_restore_and_unsnapshot_survive_restarts_of_controller_and_node_agent(split: Split) -> None:
    plane = split.plane
    split.claim("mid", 128 * MiB, mode="Block", node="n1")  # n1 holds 1 GiB: 256 + a snapshot of 256 + 256
    pv = split.bound("mid")
    handle = pv["spec"]["csi"]["volumeHandle"]

    # the growth asked for while the node agent is down, the controller killed while it waits for the node
    plane.process("localdisk-n1").kill()
    split.api.patch(
        f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims/mid",
        {"spec": {"resources": {"requests": {"storage": str(256 * MiB)}}}},
    )
    wait_for(
        "the controller to ask n1 for 256 MiB",
        lambda: (split.local_volume(handle) or {}).get("spec", {}).get("requiredBytes") == 256 * MiB or None,
        120,
    )
    _restart_controller(plane)

    # the snapshot asked for while the node agent is still down, the controller killed again while it waits
    base = f"/apis/snapshot.storage.k8s.io/v1/namespaces/{TEST_NAMESPACE}/volumesnapshots"
    split.api.create(
        base,
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": "mid-snap"},
            "spec": {"volumeSnapshotClassName": "localdisk", "source": {"persistentVolumeClaimName": "mid"}},
        },
    )
    snapshots = f"/apis/{GROUP}/{VERSION}/localsnapshots"
    wait_for("the LocalSnapshot", lambda: split.api.get(snapshots)["items"] or None, 120)
    _restart_controller(plane)

    # the node agent returns, is killed once more straight away, and returns again: both operations converge
    plane.restart("localdisk-n1")
    plane.restart("localdisk-n1", crash=True)
    wait_for(
        "the PV to be 256 MiB",
        lambda: (
            _bytes(split.api.get(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")["spec"]["capacity"]["storage"])
            == 256 * MiB
            or None
        ),
        180,
    )
    volume = split.local_volume(handle)
    assert volume is not None and volume["status"]["sizeBytes"] == 256 * MiB

    def ready() -> Obj | None:
        status = split.api.get(f"{base}/mid-snap").get("status") or {}
        return status if status.get("readyToUse") else None

    wait_for("the snapshot to be ready", ready, 180)
    [local] = split.api.get(snapshots)["items"]
    assert local["status"]["phase"] == "Ready" and local["spec"]["sourceVolume"] == handle

    # a restore and then the snapshot's deletion, each asked for while the node agent is down and the controller
    # killed while it waits
    plane.process("localdisk-n1").kill()
    split.claim("mid-restored", 256 * MiB, mode="Block", snapshot="mid-snap", node="n1")
    uid = wait_for("the claim", lambda: split.pvc("mid-restored")["metadata"].get("uid"), 30)
    wait_for("its LocalVolume", lambda: split.local_volume(f"pvc-{uid}"), 180)
    _restart_controller(plane)
    plane.restart("localdisk-n1")
    restored = split.bound("mid-restored")
    assert (split.local_volume(restored["spec"]["csi"]["volumeHandle"]) or {})["spec"]["source"]["kind"] == "snapshot"
    plane.process("localdisk-n1").kill()
    split.api.delete(f"{base}/mid-snap")
    wait_for(
        "the LocalSnapshot to be deleting",
        lambda: all(s["metadata"].get("deletionTimestamp") for s in split.api.get(snapshots)["items"]) or None,
        180,
    )
    _restart_controller(plane)
    plane.restart("localdisk-n1")
    wait_for("the LocalSnapshot to go", lambda: not split.api.get(snapshots)["items"] or None, 180)
    split.remove("mid-restored")
    split.remove("mid")
    wait_for("every LocalVolume to go", lambda: not split.api.get(VOLUMES)["items"] or None, 180)
    split.wait_free(dict(POOLS), 90)


def _restart_controller(plane: ControlPlane) -> None:
    """Kill the controller and start it again, with the sidecars that exit when its socket goes (kubelet would start
    them again)."""
    plane.restart("localdisk-controller", crash=True)
    for sidecar in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
        plane.restart(sidecar)


def test_the_objects_of_a_lost_node_are_released_after_the_grace_period_except_retained_ones(split: Split) -> None:
    api = split.api
    for name in ("lost-kept", "lost-free"):
        api.create(
            VOLUMES,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LocalVolume",
                "metadata": {"name": name, "labels": {NODE_LABEL: "gone"}, "finalizers": [FINALIZER]},
                "spec": {"name": name, "node": "gone", "backend": "fake", "requiredBytes": MiB},
            },
        )
    api.create(
        f"/apis/{GROUP}/{VERSION}/localsnapshots",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LocalSnapshot",
            "metadata": {"name": "lost-snap", "labels": {NODE_LABEL: "gone"}, "finalizers": [FINALIZER]},
            "spec": {"name": "lost-snap", "node": "gone", "sourceVolume": "lost-free"},
        },
    )
    api.create(
        "/api/v1/persistentvolumes",
        {
            "metadata": {"name": "lost-kept"},
            "spec": {
                "capacity": {"storage": "1Mi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": CLASS,
                "csi": {"driver": DRIVER_NAME, "volumeHandle": "lost-kept"},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": TOPOLOGY_KEY, "operator": "In", "values": ["gone"]}]}
                        ]
                    }
                },
            },
        },
    )
    with split.plane.running(
        "localdisk-node-loss",
        [
            localdisk_command(),
            "controller",
            f"--kubeconfig={split.plane.controller_kubeconfig}",
            f"--namespace={NAMESPACE}",
            "--identity=test",
            "--http-port=0",
            "--node-loss-grace-period=2",
            "--resync-period=1",
            "--log-format=text",
        ],
    ):
        wait_for("the free volume's object to go", lambda: _gone(api, "localvolumes", "lost-free") or None, 120)
        wait_for("the snapshot's object to go", lambda: _gone(api, "localsnapshots", "lost-snap") or None, 120)
    kept = split.local_volume("lost-kept")
    assert kept is not None and FINALIZER in kept["metadata"]["finalizers"], "a Retain PV's object stays"
    api.delete("/api/v1/persistentvolumes/lost-kept")
    api.patch(f"{VOLUMES}/lost-kept", {"metadata": {"finalizers": None}})
    api.delete(f"{VOLUMES}/lost-kept")


def _gone(api: controlplane.Api, plural: str, name: str) -> bool:
    return not any(i["metadata"]["name"] == name for i in api.get(f"/apis/{GROUP}/{VERSION}/{plural}")["items"])


def _cli_json(*argv: str, config: Path) -> Any:
    done = subprocess.run(
        [localdisk_command(), *argv, f"--config={config}", "--json"], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout)


def test_volumes_and_snapshots_of_the_per_node_shape_are_adopted_and_deleted_through_the_controller(
    split: Split,
) -> None:
    plane = split.plane
    image = plane.work / "n3.img"
    with image.open("wb") as handle:
        handle.truncate(256 * MiB)
    disk = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", "--", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    config = plane.work / "n3-partition.toml"
    config.write_text(
        f'[node]\nkubelet_dir = "{plane.work / "n3" / "kubelet"}"\n'
        f'[pools.partition.default]\ndefault = true\ndisks = ["{disk}"]\nadopt = "never"\n'
        # a pool with snapshots, kept in a file as a disk would keep it
        f'[pools.fake.old]\ndefault = true\nsize_bytes = {GiB}\nstate_file = "{plane.work / "n3-fake.json"}"\n'
    )
    agent = None
    plane.admin.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n3"}})  # no CSINode: no capacity
    adopt_rbac = [d for d in yaml.safe_load_all((DEPLOY / "migration" / "adopt-rbac.yaml").read_text()) if d]
    for doc in adopt_rbac:
        plane.admin.apply(doc)
    try:
        # made by the per-node shape: a partition whose PV would carry its on-disk ID
        made = subprocess.run(
            [
                localdisk_command(),
                "volume",
                "create",
                "pvc-old",
                "--size=64Mi",
                "--backend=partition",
                f"--config={config}",
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        old_id = json.loads(made.stdout)["id"]
        assert old_id.startswith("partition:default:")
        # and a snapshot of the per-node shape, whose VolumeSnapshotContent would carry its on-disk ID
        source_id = _cli_json("volume", "create", "pvc-old-source", "--size=64Mi", "--backend=fake", config=config)[
            "id"
        ]
        old_snapshot = _cli_json("snapshot", "create", source_id, "snapshot-old", config=config)["id"]
        socket_path = plane.work / "n3.sock"
        agent = plane._start(
            "localdisk-n3",
            [
                localdisk_command(),
                "serve",
                "--role=node",
                "--adopt",
                f"--kubeconfig={plane.node_agent_kubeconfig('n3')}",
                f"--endpoint=unix://{socket_path}",
                "--node-id=n3",
                f"--config={config}",
                "--log-format=text",
                "--no-orphan-report",
            ],
        )

        # found by its on-disk ID (a partition keeps a hash of a long CSI name in its GPT label, not the name)
        def by_handle() -> Obj | None:
            items = split.api.get(VOLUMES)["items"]
            return next((v for v in items if (v.get("status") or {}).get("handle") == old_id), None)

        adopted = wait_for("the adopted LocalVolume", by_handle, 120)
        assert adopted["spec"]["node"] == "n3" and adopted["status"]["phase"] == "Ready"
        assert adopted["metadata"]["annotations"]["localdisk.csi.io/adopted"] == old_id

        # its LocalNode lists the disk the pool uses
        def pool_disks() -> list[str] | None:
            try:
                node = split.api.get(f"/apis/{GROUP}/{VERSION}/localnodes/n3")
            except ApiError:
                return None
            pools = (node.get("status") or {}).get("pools") or []
            return next((p.get("disks") for p in pools if p["backend"] == "partition"), None)

        assert wait_for("n3's LocalNode", pool_disks, 60) == [disk]

        def by_handle_of(on_disk: str) -> Obj | None:
            items = split.api.get(VOLUMES)["items"]
            return next((v for v in items if (v.get("status") or {}).get("handle") == on_disk), None)

        # the snapshot too, naming the adopted object of its source
        def snapshot_by_handle() -> Obj | None:
            items = split.api.get(f"/apis/{GROUP}/{VERSION}/localsnapshots")["items"]
            return next((s for s in items if (s.get("status") or {}).get("handle") == old_snapshot), None)

        snapshot = wait_for("the adopted LocalSnapshot", snapshot_by_handle, 120)
        assert snapshot["status"]["phase"] == "Ready" and snapshot["spec"]["node"] == "n3"
        source_object = wait_for("the adopted source volume", lambda: by_handle_of(source_id), 60)
        assert snapshot["spec"]["sourceVolume"] == source_object["metadata"]["name"]

        # the central controller restores and deletes by the old IDs, through their objects
        async def through_the_controller() -> None:
            async with Channel(path=str(plane.work / "controller.sock")) as channel:
                controller = ControllerStub(channel)
                listed = await controller.list_snapshots(ListSnapshotsRequest(snapshot_id=old_snapshot))
                assert [e.snapshot.snapshot_id for e in listed.entries if e.snapshot] == [old_snapshot]
                restore = create_request(
                    "pvc-restored-old",
                    64 * MiB,
                    "fake",
                    "old",
                    volume_content_source=VolumeContentSource(
                        snapshot=VolumeContentSourceSnapshotSource(snapshot_id=old_snapshot)
                    ),
                    accessibility_requirements=TopologyRequirement(preferred=[Topology(segments={TOPOLOGY_KEY: "n3"})]),
                )
                restored = (await controller.create_volume(restore)).volume
                assert restored is not None and restored.content_source is not None
                await controller.delete_volume(DeleteVolumeRequest(volume_id=restored.volume_id))
                await controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=old_snapshot))
                await controller.delete_volume(DeleteVolumeRequest(volume_id=source_id))
                await controller.delete_volume(DeleteVolumeRequest(volume_id=old_id))

        anyio.run(through_the_controller)
        assert split.local_volume(snapshot["metadata"]["name"]) is None
        assert _cli_json("snapshot", "list", config=config) == []
        assert split.local_volume(adopted["metadata"]["name"]) is None
        listed = subprocess.run(
            [localdisk_command(), "volume", "list", f"--config={config}", "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        assert json.loads(listed.stdout) == []
    finally:
        if agent is not None:
            agent.stop()
            plane.processes.remove(agent)
        subprocess.run(["losetup", "--detach", disk], check=False)
        plane.admin.delete("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/localdisk-node-adopt")
        plane.admin.delete("/api/v1/nodes/n3")


def test_pools_follow_the_labels_of_their_node_without_a_restart(split: Split) -> None:
    plane, api = split.plane, split.api
    api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n4"}})  # no CSINode: no capacity objects
    labelled = (
        '[pools.fake.fast]\nsize_bytes = 1073741824\n[pools.fake.fast.node_labels]\n"localdisk.test/disk" = "fast"\n'
    )
    agent = None
    try:
        plane.serve_node("n4", {}, ("--role=node", f"--kubeconfig={plane.node_agent_kubeconfig('n4')}"), labelled)
        agent = plane.process("localdisk-n4")

        def fast_pool() -> Obj | None:
            try:
                node = api.get(f"/apis/{GROUP}/{VERSION}/localnodes/n4")
            except ApiError:
                return None
            pools = (node.get("status") or {}).get("pools")
            if pools is None:
                return None
            return next((p for p in pools if p["pool"] == "fast"), {"absent": True})

        assert wait_for("n4's LocalNode", fast_pool, 60) == {"absent": True}

        async def create(name: str) -> str:
            async with Channel(path=str(plane.work / "controller.sock")) as channel:
                request = create_request(
                    name,
                    64 * MiB,
                    "fake",
                    "fast",
                    accessibility_requirements=TopologyRequirement(preferred=[Topology(segments={TOPOLOGY_KEY: "n4"})]),
                )
                made = (await ControllerStub(channel).create_volume(request)).volume
                assert made is not None
                return made.volume_id

        async def delete(volume_id: str) -> None:
            async with Channel(path=str(plane.work / "controller.sock")) as channel:
                await ControllerStub(channel).delete_volume(DeleteVolumeRequest(volume_id=volume_id))

        # labelled: the pool opens, without a restart
        api.patch("/api/v1/nodes/n4", {"metadata": {"labels": {"localdisk.test/disk": "fast"}}})
        wait_for("the fast pool to be up", lambda: fast_pool() if (fast_pool() or {}).get("up") else None, 60)
        kept = anyio.run(create, "pvc-fast-kept")

        async def create_mirrored() -> None:  # a layout a pool without PVs cannot make: refused, not dropped
            async with Channel(path=str(plane.work / "controller.sock")) as channel:
                request = create_request(
                    "pvc-fast-mirrored",
                    64 * MiB,
                    "fake",
                    "fast",
                    accessibility_requirements=TopologyRequirement(preferred=[Topology(segments={TOPOLOGY_KEY: "n4"})]),
                )
                request.parameters["mirrors"] = "2"
                await ControllerStub(channel).create_volume(request)

        with pytest.raises(GRPCError) as layout_refused:
            anyio.run(create_mirrored)
        assert layout_refused.value.status is Status.INVALID_ARGUMENT
        assert "fake pool 'fast' on node n4 makes no LVM layouts" in str(layout_refused.value.message)

        # unlabelled: it takes no new volumes, reports why, and keeps serving the one it holds
        api.patch("/api/v1/nodes/n4", {"metadata": {"labels": {"localdisk.test/disk": None}}})
        retired = wait_for(
            "the fast pool to be retired", lambda: fast_pool() if (fast_pool() or {}).get("up") is False else None, 60
        )
        assert "no longer select" in retired["reason"] and retired["availableBytes"] == 0
        with pytest.raises(GRPCError) as refused:
            anyio.run(create, "pvc-fast-new")
        assert refused.value.status is Status.FAILED_PRECONDITION
        assert "takes no new volumes" in str(refused.value.message)
        anyio.run(delete, kept)
        assert split.local_volume(kept) is None
        assert plane.process("localdisk-n4") is agent, "the same process all along"
    finally:
        if agent is not None:
            agent.stop()
            plane.processes.remove(agent)
        api.delete("/api/v1/nodes/n4")


def test_io_limits_of_a_bound_claim_change_with_its_volume_attributes_class(split: Split) -> None:
    for name, parameters in (("qos-slow", {"writeIOPS": "100"}), ("qos-fast", {"readBytesPerSecond": "50Mi"})):
        split.api.create(
            "/apis/storage.k8s.io/v1/volumeattributesclasses",
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "VolumeAttributesClass",
                "metadata": {"name": name},
                "driverName": DRIVER_NAME,
                "parameters": parameters,
            },
        )
    split.claim("limited", 64 * MiB, mode="Block", attributes="qos-slow")
    pv = split.bound("limited")
    handle = pv["spec"]["csi"]["volumeHandle"]

    def limits(expected: Obj) -> Obj | None:
        found = split.local_volume(handle) or {}
        return found if found.get("status", {}).get("ioLimits") == expected else None

    volume = wait_for("the node to apply the class's limits", lambda: limits({"writeIOPS": 100}), 120)
    assert volume["spec"]["ioLimits"] == {"writeIOPS": 100}

    split.api.patch(
        f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims/limited",
        {"spec": {"volumeAttributesClassName": "qos-fast"}},
    )
    # A class's keys change only what they name (CSI: nothing is changed for an absent key).
    wait_for(
        "the new class's limits on the node", lambda: limits({"writeIOPS": 100, "readBytesPerSecond": 50 * MiB}), 180
    )
    wait_for(
        "the claim to report the new class",
        lambda: split.pvc("limited").get("status", {}).get("currentVolumeAttributesClassName") == "qos-fast" or None,
        120,
    )
    node = volume["spec"]["node"]
    state = split.plane.work / node / "kubelet/plugins/localdisk.csi.io/state"
    records = [json.loads(p.read_text()) for p in state.glob("*.json")]
    assert [r["limits"] for r in records if r["volume"] == volume["status"]["handle"]] == [
        {"writeIOPS": 100, "readBytesPerSecond": 50 * MiB}
    ]

    split.remove("limited")
    wait_for("the LocalVolume to go", lambda: split.local_volume(handle) is None or None, 180)
    assert not any(json.loads(p.read_text())["volume"] == volume["status"]["handle"] for p in state.glob("*.json"))
