"""Capacity scoring against the real kube-scheduler, API server, controller-manager and external-provisioner.

Three storage nodes, no kubelet: n1, n2 and n4 with 1, 2 and 4 GiB in pool `a` (StorageClass `fast`), and 4, 4 and
1 GiB in pool `b` (StorageClass `slow`). Ten 256 MiB claims are placed one at a time (each pod bound and its
node's CSIStorageCapacity showing the new volume before the next), so "the node with the most room left at the
time" is well defined; the schedulers are configured from the files in examples/scheduler. Both ways:
- StorageCapacityScoring (VolumeBinding `shape`, feature gate on): spread and pack;
- `localdisk scheduler-extender` (feature gate off), run as the extender's own account under the RBAC rules of
  examples/scheduler/extender.yaml: spread and pack; pods still scheduled with the extender stopped.
Pods with one claim of each class are scored on both, either way. One control plane serves the module.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from localdisk.k8s import DRIVER_NAME, TOPOLOGY_KEY
from localdisk.sizes import GiB, MiB
from tests.k8s import controlplane
from tests.k8s.controlplane import NAMESPACE, ApiError, ControlPlane, Process, free_port, wait_for

pytestmark = [
    pytest.mark.controlplane,
    controlplane.skip_unless_available(),
    pytest.mark.timeout(300),
]
EXAMPLES = Path(__file__).parent.parent.parent / "examples"
POOLS = {"n1": {"a": 1 * GiB, "b": 4 * GiB}, "n2": {"a": 2 * GiB, "b": 4 * GiB}, "n4": {"a": 4 * GiB, "b": 1 * GiB}}
CLASSES = {"fast": "a", "slow": "b"}
CLAIM = 256 * MiB
PODS = 10
TEST_NAMESPACE = "default"
PROVISIONER_ARGS = [
    "--node-deployment=true",
    "--node-deployment-immediate-binding=false",
    "--strict-topology=true",
    "--immediate-topology=false",
    "--enable-capacity=true",
    "--capacity-ownerref-level=-1",  # no pod owns them here
    "--capacity-poll-interval=1s",  # 30s in the DaemonSet; here the next claim waits for the last one's volume
    "--timeout=30s",
]
Obj = dict[str, Any]
Free = dict[str, dict[str, int]]
"""class -> node -> bytes free, as the CSIStorageCapacity objects say."""


def load(name: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / "scheduler" / name).read_text()) if doc]


@dataclass
class Cluster:
    plane: ControlPlane
    placements: dict[str, list[str]] = field(default_factory=dict)

    @property
    def api(self) -> controlplane.Api:
        return self.plane.admin

    def free(self) -> Free:
        found: Free = {name: {} for name in CLASSES}
        listed = self.api.get(f"/apis/storage.k8s.io/v1/namespaces/{NAMESPACE}/csistoragecapacities")
        for item in listed["items"]:
            node = item["nodeTopology"]["matchLabels"][TOPOLOGY_KEY]
            if item["storageClassName"] in found and "capacity" in item:
                found[item["storageClassName"]][node] = _bytes(item["capacity"])
        return found

    def wait_free(self, expected: Free, timeout: float = 30.0) -> Free:
        def reached() -> Free | None:
            found = self.free()
            return found if found == expected else None

        return wait_for(f"capacities {expected}", reached, timeout)

    def full(self) -> Free:
        return {cls: {node: pools[pool] for node, pools in POOLS.items()} for cls, pool in CLASSES.items()}

    def place(self, name: str, claims: dict[str, int]) -> str:
        """A pod using one new claim per entry of `claims` (class -> bytes); waits until it is bound to a node and
        that node's capacities show the new volumes; returns the node."""
        before = self.free()
        volumes = []
        for index, (class_name, size) in enumerate(claims.items()):
            claim = f"{name}-{index}"
            self.api.create(
                f"/api/v1/namespaces/{TEST_NAMESPACE}/persistentvolumeclaims",
                {
                    "metadata": {"name": claim},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": class_name,
                        "resources": {"requests": {"storage": str(size)}},
                    },
                },
            )
            volumes.append({"name": f"v{index}", "persistentVolumeClaim": {"claimName": claim}})
        self.api.create(
            f"/api/v1/namespaces/{TEST_NAMESPACE}/pods",
            {
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "app", "image": "busybox"}], "volumes": volumes},
            },
        )
        node: str = wait_for(f"pod {name} to be scheduled", lambda: self._node_of(name), 60)
        after = copy.deepcopy(before)
        for class_name, size in claims.items():
            after[class_name][node] -= size
        self.wait_free(after)
        return node

    def _node_of(self, pod: str) -> str | None:
        found: str | None = self.api.get(f"/api/v1/namespaces/{TEST_NAMESPACE}/pods/{pod}")["spec"].get("nodeName")
        return found

    def place_in_a_row(self, label: str) -> list[tuple[str, Free]]:
        """Ten 256 MiB `fast` claims, one at a time; each placement with the free space the nodes had before it."""
        placed = []
        for number in range(PODS):
            before = self.free()
            placed.append((self.place(f"{label}-{number}", {"fast": CLAIM}), before))
        self.placements[label] = [node for node, _ in placed]
        return placed

    def clean(self) -> None:
        """Remove the test's pods (at once: no kubelet confirms) and claims; wait until the provisioners deleted
        the volumes and every capacity is back to the whole pool."""
        base = f"/api/v1/namespaces/{TEST_NAMESPACE}"
        for pod in self.api.get(f"{base}/pods")["items"]:
            self.api.delete(f"{base}/pods/{pod['metadata']['name']}", {"gracePeriodSeconds": 0})
        for claim in self.api.get(f"{base}/persistentvolumeclaims")["items"]:
            self.api.delete(f"{base}/persistentvolumeclaims/{claim['metadata']['name']}")
        wait_for("volumes deleted", lambda: not self.api.get("/api/v1/persistentvolumes")["items"], 60)
        self.wait_free(self.full())


def _bytes(quantity: str) -> int:
    from localdisk.k8s.extender import parse_quantity

    return parse_quantity(quantity)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    controlplane.require()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="localdisk-controlplane-") as work:
        plane = ControlPlane(Path(work), controlplane.kube_bin_dir())
        try:
            plane.start()
            api = plane.admin
            api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
            api.apply(yaml.safe_load((EXAMPLES / "deploy" / "csidriver.yaml").read_text()))
            for doc in load("extender.yaml"):
                if doc["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
                    api.apply(doc)
            for class_name, pool in CLASSES.items():
                api.apply(
                    {
                        "apiVersion": "storage.k8s.io/v1",
                        "kind": "StorageClass",
                        "metadata": {"name": class_name},
                        "provisioner": DRIVER_NAME,
                        "parameters": {"backend": "fake", "pool": pool},
                        "volumeBindingMode": "WaitForFirstConsumer",
                        "reclaimPolicy": "Delete",
                    }
                )
            for node, pools in POOLS.items():
                plane.add_node(node, pools, PROVISIONER_ARGS)
            found = Cluster(plane)
            found.wait_free(found.full(), 60)
            print(f"\ncontrol plane and three storage nodes up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            yield found
            for label, nodes in found.placements.items():
                print(f"{label}: {' '.join(nodes)}", file=sys.stderr)
        finally:
            plane.stop()


@pytest.fixture
def clean(cluster: Cluster) -> Iterator[Cluster]:
    cluster.wait_free(cluster.full())
    try:
        yield cluster
    finally:
        cluster.clean()


def scoring_config(name: str) -> Obj:
    (config,) = load(name)
    return config


def extender_config(port: int) -> Obj:
    (config,) = load("extender-config.yaml")
    for extender in config["extenders"]:
        extender["urlPrefix"] = f"http://127.0.0.1:{port}"
    return config


def start_extender(plane: ControlPlane, policy: str, port: int) -> Any:
    argv = [
        str(Path(sys.executable).parent / "localdisk"),
        "scheduler-extender",
        f"--policy={policy}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--kubeconfig={plane.extender_kubeconfig}",
        "--log-format=text",
        "--log-level=debug",
    ]
    return plane.running(f"extender-{policy}", argv)


def wait_ready(process: Process, port: int) -> None:
    def ready() -> bool:
        assert process.alive(), f"the extender exited:\n{process.tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_for("the extender to sync", ready, 30)


def most_room(before: Free) -> set[str]:
    fitting = {node: free for node, free in before["fast"].items() if free >= CLAIM}
    return {node for node, free in fitting.items() if free == max(fitting.values())}


def least_room(before: Free) -> set[str]:
    fitting = {node: free for node, free in before["fast"].items() if free >= CLAIM}
    return {node for node, free in fitting.items() if free == min(fitting.values())}


def check_spread(placed: list[tuple[str, Free]]) -> None:
    for number, (node, before) in enumerate(placed):
        assert node in most_room(before), f"claim {number} went to {node}; free before: {before['fast']}"
    counts = {node: [n for n, _ in placed].count(node) for node in POOLS}
    assert counts == {"n1": 0, "n2": 1, "n4": 9}  # n4 down to n2's 2 GiB, then the two take turns


def check_pack(placed: list[tuple[str, Free]]) -> None:
    for number, (node, before) in enumerate(placed):
        assert node in least_room(before), f"claim {number} went to {node}; free before: {before['fast']}"
    assert [n for n, _ in placed] == ["n1"] * 4 + ["n2"] * 6  # n1 until full, then n2; n4 stays empty


@pytest.mark.parametrize(("policy", "check"), [("spread", check_spread), ("pack", check_pack)])
def test_storage_capacity_scoring(clean: Cluster, policy: str, check: Any) -> None:
    with clean.plane.scheduler(scoring_config(f"capacity-scoring-{policy}.yaml")):
        check(clean.place_in_a_row(f"scoring-{policy}"))


@pytest.mark.parametrize(("policy", "check"), [("spread", check_spread), ("pack", check_pack)])
def test_extender(clean: Cluster, policy: str, check: Any) -> None:
    port = free_port()
    with start_extender(clean.plane, policy, port) as extender:
        wait_ready(extender, port)
        with clean.plane.scheduler(extender_config(port), feature_gates=None):
            placed = clean.place_in_a_row(f"extender-{policy}")
        try:
            check(placed)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe extender's log:\n{extender.tail(60)}") from None
    assert "prioritize" in extender.log.read_text(), "the scheduler never asked the extender"


def test_pods_are_scheduled_with_the_extender_stopped(clean: Cluster) -> None:
    port = free_port()
    with clean.plane.scheduler(extender_config(port), feature_gates=None):
        with start_extender(clean.plane, "pack", port) as extender:
            wait_ready(extender, port)
            first = clean.place("up-0", {"fast": CLAIM})
            assert first == "n1", f"packed on {first}, not n1; the extender's log:\n{extender.tail(20)}"
        placed = [clean.place(f"down-{number}", {"fast": CLAIM}) for number in range(3)]
    clean.placements["extender-stopped"] = [first, *placed]
    assert all(node in POOLS for node in placed)


@pytest.mark.parametrize("way", ["scoring", "extender"])
def test_two_classes_are_scored_on_both(clean: Cluster, way: str) -> None:
    """fast alone would choose n4 (most room), slow alone n1 or n2; both together: n2, spread on each."""
    port = free_port()
    if way == "scoring":
        with clean.plane.scheduler(scoring_config("capacity-scoring-spread.yaml")):
            node = clean.place("two-scoring", {"fast": CLAIM, "slow": CLAIM})
    else:
        with start_extender(clean.plane, "spread", port) as extender:
            wait_ready(extender, port)
            with clean.plane.scheduler(extender_config(port), feature_gates=None):
                node = clean.place("two-extender", {"fast": CLAIM, "slow": CLAIM})
    clean.placements[f"two-classes-{way}"] = [node]
    assert node == "n2"


def test_the_extender_is_refused_what_its_role_does_not_allow(cluster: Cluster) -> None:
    """Its account reads what it watches and nothing more: the RBAC rules are the real ones."""
    token = cluster.plane.extender_token
    as_extender = controlplane.Api(cluster.plane.url, token)
    assert as_extender.get("/apis/storage.k8s.io/v1/csistoragecapacities")["kind"] == "CSIStorageCapacityList"
    with pytest.raises(ApiError) as refused:
        as_extender.get("/api/v1/pods")
    assert refused.value.status == 403
