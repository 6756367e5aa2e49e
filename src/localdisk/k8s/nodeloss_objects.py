"""The objects a lost node leaves behind, how to tell which are ours, and the one write that releases each.

`nodeloss` decides *when* (the Node is confirmed gone, the grace period is over, no dry run); this module knows
*what*: which PVs, pending claims, CSIStorageCapacity objects and VolumeSnapshotContents belong to our driver and to a
given node, and the single idempotent step that lets each go. Every write carries a precondition (the UID, or the
resourceVersion read just before), so an object made again under the same name in the meantime is never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from localdisk.k8s import DRIVER_NAME, NODE_LOST_SINCE, PROVISIONER_FINALIZER, RELEASE_ON_NODE_LOSS, TOPOLOGY_KEY
from localdisk.k8s.client import REQUEST_TIMEOUT, is_status
from localdisk.k8s.watch import TRANSIENT

log = logging.getLogger(__name__)

SELECTED_NODE = "volume.kubernetes.io/selected-node"
"""Set on a WaitForFirstConsumer claim by kube-scheduler; only that node's provisioner acts on the claim then."""
STORAGE_PROVISIONER = ("volume.kubernetes.io/storage-provisioner", "volume.beta.kubernetes.io/storage-provisioner")
"""Set on a claim by the PV controller: the driver that is to provision it."""
CAPACITY_DRIVER_LABEL = "csi.storage.k8s.io/drivername"
"""The external-provisioner labels the CSIStorageCapacity objects it makes with its driver's name."""
SNAPSHOT_NODE_LABEL = "snapshot.storage.kubernetes.io/managed-by"
"""With distributed snapshotting, the snapshot-controller names the node whose csi-snapshotter owns the content."""
SNAPSHOT_CONTENT_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"
"""Removed by the csi-snapshotter of the content's node once the snapshot is deleted (or kept, for Retain)."""
SNAPSHOTS = ("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents")


def volume_node(pv: Any, topology_key: str = TOPOLOGY_KEY) -> str | None:
    """The node a PV is pinned to through `topology_key`, or None when it is not pinned to exactly one."""
    affinity = pv.spec.node_affinity
    if affinity is None or affinity.required is None:
        return None
    nodes = {
        value
        for term in affinity.required.node_selector_terms or []
        for expression in term.match_expressions or []
        if expression.key == topology_key and expression.operator == "In"
        for value in expression.values or []
    }
    return nodes.pop() if len(nodes) == 1 else None


def keeps_claims(annotations: dict[str, str] | None) -> bool | None:
    """What an object's opt-out annotation says: True (keep), False (release), None (not set)."""
    value = (annotations or {}).get(RELEASE_ON_NODE_LOSS)
    if value is None:
        return None
    return value.strip().lower() in ("false", "no", "0", "off")


def capacity_node(capacity: Any, driver: str = DRIVER_NAME, topology_key: str = TOPOLOGY_KEY) -> str | None:
    """The node a CSIStorageCapacity of `driver` describes, or None when it is not ours or not exactly one node's
    (a topology with more labels or with expressions describes something else; it is left alone)."""
    if (capacity.metadata.labels or {}).get(CAPACITY_DRIVER_LABEL) != driver:
        return None
    topology = capacity.node_topology
    if topology is None or topology.match_expressions:
        return None
    labels = topology.match_labels or {}
    return labels.get(topology_key) if set(labels) == {topology_key} else None


def snapshot_node(content: dict[str, Any], driver: str = DRIVER_NAME) -> str | None:
    """The node a VolumeSnapshotContent of `driver` is pinned to (distributed snapshotting), or None."""
    if (content.get("spec") or {}).get("driver") != driver:
        return None
    node = ((content.get("metadata") or {}).get("labels") or {}).get(SNAPSHOT_NODE_LABEL)
    return node or None


def lost_since(obj: Any) -> str | None:
    """The wire time recorded on an object when its node was first seen gone, if any."""
    return (obj.metadata.annotations or {}).get(NODE_LOST_SINCE)


@dataclass(frozen=True)
class Outcome:
    """What one release step did: `done` when it changed something (or, in a dry run, would have)."""

    done: bool
    what: str = ""


class LostNodeObjects:
    """Reads and writes the objects of lost nodes; one instance per controller (it holds the API clients)."""

    def __init__(self, api: Any, driver: str = DRIVER_NAME, topology_key: str = TOPOLOGY_KEY) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.storage: Any = client.StorageV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.driver = driver
        self.topology_key = topology_key

    # -- finding ------------------------------------------------------------------------------------------------
    async def node_names(self) -> set[str]:
        listed = await self.core.list_node(_request_timeout=REQUEST_TIMEOUT)
        return {n.metadata.name for n in listed.items or []}

    async def node_is_gone(self, node: str) -> bool:
        """True only on a 404 for a GET of the node: a list or a cache that lacks it proves nothing."""
        try:
            await self.core.read_node(node, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return True
            log.warning("cannot tell whether node %s exists (%s); leaving its objects alone for now", node, exc)
            return False
        return False

    async def volumes(self) -> list[Any]:
        listed = (await self.core.list_persistent_volume(_request_timeout=REQUEST_TIMEOUT)).items or []
        return [pv for pv in listed if pv.spec.csi is not None and pv.spec.csi.driver == self.driver]

    async def pending_claims(self, classes: dict[str, Any]) -> list[Any]:
        """Unbound claims of our driver that a node was selected for (WaitForFirstConsumer)."""
        listed = await self.core.list_persistent_volume_claim_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT)
        found = []
        for claim in listed.items or []:
            annotations = claim.metadata.annotations or {}
            if not annotations.get(SELECTED_NODE) or claim.spec.volume_name:
                continue
            if claim.metadata.deletion_timestamp is not None:
                continue
            provisioner = next((annotations[k] for k in STORAGE_PROVISIONER if annotations.get(k)), None)
            if provisioner is None:
                provisioner = getattr(
                    await self.storage_class(claim.spec.storage_class_name, classes), "provisioner", None
                )
            if provisioner == self.driver:
                found.append(claim)
        return found

    async def capacities(self) -> list[Any]:
        listed = await self.storage.list_csi_storage_capacity_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT)
        return [c for c in listed.items or [] if capacity_node(c, self.driver, self.topology_key) is not None]

    async def snapshot_contents(self) -> list[dict[str, Any]]:
        """Our VolumeSnapshotContents pinned to a node; none when the snapshot CRDs are not installed."""
        try:
            listed = await self.custom.list_cluster_custom_object(*SNAPSHOTS, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return []  # no such resource: the CRD is not installed
            raise
        return [c for c in listed.get("items") or [] if snapshot_node(c, self.driver) is not None]

    async def storage_class(self, name: str | None, cache: dict[str, Any]) -> Any | None:
        if not name:
            return None
        if name not in cache:
            try:
                cache[name] = await self.storage.read_storage_class(name, _request_timeout=REQUEST_TIMEOUT)
            except TRANSIENT as exc:
                if not is_status(exc, 404):
                    raise
                cache[name] = None
        return cache[name]

    async def bound_claim(self, pv: Any) -> Any | None:
        """The PVC this PV is bound to, if it still exists and is the very claim the PV was bound to (same UID)."""
        ref = pv.spec.claim_ref
        if ref is None or not ref.name or not ref.namespace:
            return None
        try:
            claim = await self.core.read_namespaced_persistent_volume_claim(
                ref.name, ref.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return None
            raise
        if ref.uid and claim.metadata.uid != ref.uid:
            return None  # a newer claim of the same name (a StatefulSet made it again): not bound to this PV
        return claim

    # -- writing ------------------------------------------------------------------------------------------------
    async def mark_volume(self, pv: Any, since: str | None) -> bool:
        """Record on the PV when its node was first seen gone (None removes the record). False if the PV changed
        or went away meanwhile (the next pass looks again)."""
        patch = {"metadata": {"annotations": {NODE_LOST_SINCE: since}, "resourceVersion": pv.metadata.resource_version}}
        try:
            await self.core.patch_persistent_volume(
                pv.metadata.name, patch, _content_type="application/merge-patch+json", _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if is_status(exc, 404, 409):
                return False
            raise
        return True

    async def clear_selected_node(self, claim: Any) -> bool:
        """Remove the selected-node annotation so the scheduler chooses again; False if the claim changed."""
        meta = claim.metadata
        patch = {"metadata": {"annotations": {SELECTED_NODE: None}, "resourceVersion": meta.resource_version}}
        try:
            await self.core.patch_namespaced_persistent_volume_claim(
                meta.name,
                meta.namespace,
                patch,
                _content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
            )
        except TRANSIENT as exc:
            if is_status(exc, 404, 409):
                return False
            raise
        return True

    async def delete_claim(self, claim: Any) -> None:
        meta = claim.metadata
        try:
            await self.core.delete_namespaced_persistent_volume_claim(
                meta.name, meta.namespace, body={"preconditions": {"uid": meta.uid}}, _request_timeout=REQUEST_TIMEOUT
            )
            log.info("deleted PVC %s/%s", meta.namespace, meta.name)
        except TRANSIENT as exc:
            if not is_status(exc, 404, 409):  # already gone, or replaced by a newer claim of the same name
                raise

    async def delete_volume(self, pv: Any) -> bool:
        """Delete the PV (UID precondition); False if it is gone or is a newer PV of the same name."""
        try:
            await self.core.delete_persistent_volume(
                pv.metadata.name, body={"preconditions": {"uid": pv.metadata.uid}}, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404, 409):
                raise
            return False
        return True

    async def drop_provisioner_finalizer(self, name: str, uid: str) -> None:
        """Remove the external-provisioner's finalizer; the PV's resourceVersion guards against lost updates."""
        for _ in range(5):
            try:
                pv = await self.core.read_persistent_volume(name, _request_timeout=REQUEST_TIMEOUT)
            except TRANSIENT as exc:
                if is_status(exc, 404):
                    return
                raise
            finalizers = list(pv.metadata.finalizers or [])
            if pv.metadata.uid != uid or PROVISIONER_FINALIZER not in finalizers:
                return
            finalizers.remove(PROVISIONER_FINALIZER)
            patch = {"metadata": {"finalizers": finalizers, "resourceVersion": pv.metadata.resource_version}}
            try:
                await self.core.patch_persistent_volume(
                    name, patch, _content_type="application/merge-patch+json", _request_timeout=REQUEST_TIMEOUT
                )
                return
            except TRANSIENT as exc:
                if is_status(exc, 404):
                    return
                if not is_status(exc, 409):
                    raise
                log.debug("PV %s changed while removing its finalizer; retrying", name)
        log.warning("PV %s kept changing; its finalizer will be removed on the next pass", name)

    async def delete_capacity(self, capacity: Any) -> bool:
        meta = capacity.metadata
        try:
            await self.storage.delete_namespaced_csi_storage_capacity(
                meta.name, meta.namespace, body={"preconditions": {"uid": meta.uid}}, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404, 409):
                raise
            return False
        return True

    async def drop_snapshot_finalizer(self, content: dict[str, Any]) -> bool:
        """Remove the csi-snapshotter's finalizer from a content being deleted; False if it changed meanwhile."""
        meta = content["metadata"]
        finalizers = [f for f in meta.get("finalizers") or [] if f != SNAPSHOT_CONTENT_FINALIZER]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        try:
            await self.custom.patch_cluster_custom_object(
                *SNAPSHOTS,
                meta["name"],
                patch,
                _content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
            )
        except TRANSIENT as exc:
            if is_status(exc, 404, 409):
                return False
            raise
        return True
