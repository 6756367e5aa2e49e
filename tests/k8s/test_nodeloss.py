"""Node loss without a grace period: claims on a deleted node are released, nothing else is touched, and a restart
finishes the job. The grace period, Retain, pending claims, capacities, snapshots and dry runs: test_nodeloss_grace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from localdisk.k8s import PROVISIONER_FINALIZER, RELEASE_ON_NODE_LOSS
from localdisk.k8s.nodeloss import NodeLossController, NodeLossSettings, keeps_claims, volume_node
from localdisk.k8s.watch import Pacer
from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio


def controller(api: Any, resync_period: float = 300.0) -> NodeLossController:
    return NodeLossController(
        api,
        NodeLossSettings(resync_period=resync_period, grace_period=0),
        registry=CollectorRegistry(),
        pacer=Pacer(0.05),
    )


async def bound_pair(fake: FakeKubernetes, node: str, name: str, namespace: str = "apps", **claim_kw: Any) -> None:
    """A PVC and the PV bound to it on `node`, as the provisioner and the PV controller leave them."""
    pvc = await fake.put("persistentvolumeclaims", objects.claim(namespace, name, volume=f"pv-{name}", **claim_kw))
    await fake.put("persistentvolumes", objects.volume(f"pv-{name}", node, bound_to=pvc))


async def release_protection(fake: FakeKubernetes) -> None:
    """What kube-controller-manager does once nothing uses them: drop pvc-/pv-protection from terminating objects."""
    for plural in ("persistentvolumeclaims", "persistentvolumes"):
        for obj in fake.items(plural):
            meta = obj["metadata"]
            if meta.get("deletionTimestamp"):
                kept = [f for f in meta.get("finalizers", []) if not f.startswith("kubernetes.io/")]
                await fake.update(plural, meta["name"], meta.get("namespace", ""), {"metadata": {"finalizers": kept}})


def finalizers(fake: FakeKubernetes, plural: str, name: str, namespace: str = "") -> list[str] | None:
    found = fake.get(plural, name, namespace)
    return None if found is None else list(found["metadata"].get("finalizers", []))


def events(fake: FakeKubernetes, reason: str) -> list[dict[str, Any]]:
    return [e for e in fake.items("events") if e["reason"] == reason]


async def cluster(fake: FakeKubernetes) -> None:
    """Two nodes with a bound claim each, plus a PV of another driver on n1; then n1 is deleted."""
    for name in ("n1", "n2"):
        await fake.put("nodes", objects.node(name))
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    await bound_pair(fake, "n1", "data-db-0")
    await bound_pair(fake, "n2", "data-db-1")
    await fake.put("persistentvolumes", objects.volume("pv-other", "n1", driver="other.csi.example.com"))
    await fake.remove("nodes", "n1")


async def test_resync_releases_the_claims_of_a_deleted_node_only(fake: FakeKubernetes, api: Any) -> None:
    await cluster(fake)
    registry = CollectorRegistry()
    loss = NodeLossController(api, NodeLossSettings(grace_period=0), registry=registry)
    assert await loss.resync() == 1
    pvc = fake.get("persistentvolumeclaims", "data-db-0", "apps")
    assert pvc is not None and pvc["metadata"]["deletionTimestamp"], "deleted (pvc-protection holds it for now)"
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and pv["metadata"]["deletionTimestamp"]
    assert pv["metadata"]["finalizers"] == ["kubernetes.io/pv-protection"], "the provisioner's finalizer is gone"
    await release_protection(fake)
    assert fake.get("persistentvolumeclaims", "data-db-0", "apps") is None
    assert fake.get("persistentvolumes", "pv-data-db-0") is None
    # untouched: the other node's claim, and the other driver's volume on the lost node
    assert fake.get("persistentvolumeclaims", "data-db-1", "apps") is not None
    assert fake.get("persistentvolumes", "pv-data-db-1") is not None
    other = fake.get("persistentvolumes", "pv-other")
    assert other is not None and not other["metadata"].get("deletionTimestamp")
    [event] = events(fake, "NodeLost")
    assert event["involvedObject"]["name"] == "data-db-0" and event["type"] == "Warning"
    assert registry.get_sample_value("localdisk_node_loss_released_volumes_total") == 1


async def test_a_second_pass_does_nothing_more(fake: FakeKubernetes, api: Any) -> None:
    await cluster(fake)
    loss = controller(api)
    assert await loss.resync() == 1
    writes = fake.count("DELETE") + fake.count("PATCH")
    assert await loss.resync() == 0
    assert fake.count("DELETE") + fake.count("PATCH") == writes
    assert len(events(fake, "NodeLost")) == 1


async def test_node_deleted_while_the_controller_was_down_is_caught_at_start(fake: FakeKubernetes, api: Any) -> None:
    await cluster(fake)  # n1 is already gone when the controller starts
    loss = controller(api)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(loss.run)
            while not (pv := fake.get("persistentvolumes", "pv-data-db-0")) or not pv["metadata"].get(
                "deletionTimestamp"
            ):
                await anyio.sleep(0.02)
            group.cancel_scope.cancel()


async def test_watched_node_deletion_is_acted_on_without_waiting_for_a_resync(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n1"))
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    await bound_pair(fake, "n1", "data-db-0")
    loss = controller(api, resync_period=3600)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(loss.run)
            while fake.count("GET", "watch=") == 0:
                await anyio.sleep(0.02)
            await fake.remove("nodes", "n1")
            while finalizers(fake, "persistentvolumes", "pv-data-db-0") != ["kubernetes.io/pv-protection"]:
                await anyio.sleep(0.02)
            group.cancel_scope.cancel()
    pvc = fake.get("persistentvolumeclaims", "data-db-0", "apps")
    assert pvc is not None and pvc["metadata"]["deletionTimestamp"]


async def test_a_node_that_answers_errors_is_not_taken_for_gone(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n2"))
    await bound_pair(fake, "n1", "data-db-0")  # n1 missing from the list ...
    fake.fail("GET", "/api/v1/nodes/n1", 500)  # ... but the GET that must confirm it fails
    assert await controller(api).resync() == 0
    pvc = fake.get("persistentvolumeclaims", "data-db-0", "apps")
    assert pvc is not None and not pvc["metadata"].get("deletionTimestamp")


@pytest.mark.parametrize(
    ("class_says", "claim_says", "released"),
    [(None, None, True), ("false", None, False), ("false", "true", True), (None, "false", False), ("true", None, True)],
)
async def test_opt_out_by_storage_class_or_claim_annotation(
    fake: FakeKubernetes, api: Any, class_says: str | None, claim_says: str | None, released: bool
) -> None:
    def annotation(value: str | None) -> dict[str, str]:
        return {RELEASE_ON_NODE_LOSS: value} if value is not None else {}

    await fake.put("storageclasses", objects.storage_class("localdisk-lvm", annotation(class_says)))
    await bound_pair(fake, "gone", "data-db-0", annotations=annotation(claim_says))
    loss = controller(api)
    assert await loss.resync() == int(released)
    pvc = fake.get("persistentvolumeclaims", "data-db-0", "apps")
    assert pvc is not None and bool(pvc["metadata"].get("deletionTimestamp")) is released
    if not released:
        assert await loss.resync() == 0
        assert len(events(fake, "NodeLostVolumeKept")) == 1, "said once, not on every pass"


async def test_restart_in_the_middle_of_a_clean_up(fake: FakeKubernetes, api_factory: Callable[[], Any]) -> None:
    """The first controller dies right after deleting the PVC; meanwhile the StatefulSet makes a new PVC of the same
    name. The second controller must finish (PV removed) and must not delete the new claim."""
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    await bound_pair(fake, "gone", "data-db-0")
    fake.freeze_after("DELETE", "/persistentvolumeclaims/data-db-0")
    first = controller(api_factory())
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(first.run)
            await fake.wait_frozen()
            group.cancel_scope.cancel()  # the process dies with the PV still in place
    await release_protection(fake)  # the old claim finishes terminating ...
    assert fake.get("persistentvolumeclaims", "data-db-0", "apps") is None
    new_claim = await fake.put("persistentvolumeclaims", objects.claim("apps", "data-db-0"))  # ... and is made again
    fake.thaw()
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and not pv["metadata"].get("deletionTimestamp"), "the first run did not get that far"

    assert await controller(api_factory()).resync() == 1
    await release_protection(fake)
    assert fake.get("persistentvolumes", "pv-data-db-0") is None
    survivor = fake.get("persistentvolumeclaims", "data-db-0", "apps")
    assert survivor is not None and survivor["metadata"]["uid"] == new_claim["metadata"]["uid"]
    assert not survivor["metadata"].get("deletionTimestamp")


async def test_restart_after_the_pv_was_deleted_but_kept_its_finalizer(
    fake: FakeKubernetes, api_factory: Callable[[], Any]
) -> None:
    await bound_pair(fake, "gone", "data-db-0")
    fake.freeze_after("DELETE", "/persistentvolumes/pv-data-db-0")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(controller(api_factory()).run)
            await fake.wait_frozen()
            group.cancel_scope.cancel()
    fake.thaw()
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and PROVISIONER_FINALIZER in pv["metadata"]["finalizers"]
    assert await controller(api_factory()).resync() == 1
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and PROVISIONER_FINALIZER not in pv["metadata"]["finalizers"]


async def test_conflicting_finalizer_update_is_retried(fake: FakeKubernetes, api: Any) -> None:
    await bound_pair(fake, "gone", "data-db-0")
    fake.fail("PATCH", "/persistentvolumes/pv-data-db-0", 409, times=2)
    assert await controller(api).resync() == 1
    assert fake.count("PATCH", "/persistentvolumes/pv-data-db-0") == 3
    pv = fake.get("persistentvolumes", "pv-data-db-0")
    assert pv is not None and PROVISIONER_FINALIZER not in pv["metadata"]["finalizers"]


async def test_volume_node_and_annotation_parsing(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("persistentvolumes", objects.volume("pv1", "n1"))
    from kubernetes_asyncio import client

    pv = await client.CoreV1Api(api).read_persistent_volume("pv1")
    assert volume_node(pv) == "n1"
    assert volume_node(pv, "some.other/key") is None
    assert keeps_claims({RELEASE_ON_NODE_LOSS: "False"}) is True
    assert keeps_claims({RELEASE_ON_NODE_LOSS: "true"}) is False
    assert keeps_claims({}) is None
