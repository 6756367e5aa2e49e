"""Release the claims of a deleted node, so that StatefulSets can start their pods elsewhere with new volumes.

A localdisk volume lives on one node's disks and its PV is pinned there by node affinity. When that Node object is
deleted, the pod's PVC stays bound to a PV nobody can mount, and the pod stays Pending forever. So, for every PV of
our driver pinned to a node that no longer exists:

1. the PVC bound to it is deleted, with a precondition on its UID (a newer claim of the same name, made by the
   StatefulSet in the meantime, is never touched); the StatefulSet controller then creates a fresh PVC, which
   WaitForFirstConsumer provisions on a node that exists;
2. the PV is deleted, and the external-provisioner's finalizer is removed from it: only the provisioner running on
   the lost node could have removed it, after a DeleteVolume that can no longer happen.

Nothing is missed while the controller is down: the work is derived from the state of the cluster alone (PVs whose
node is gone), at start-up, after every relist, periodically, and right away when a Node deletion is watched. Every
step is idempotent, so a controller killed half-way finishes the job on its next pass. A node is only treated as gone
after a GET for it answers 404, never because a list or a cache lacks it.

Opt-out: annotate the StorageClass or the PVC with `localdisk.csi.io/release-on-node-loss: "false"` (the PVC's
annotation wins); such claims are kept, and an Event says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
from kubernetes_asyncio import client
from prometheus_client import CollectorRegistry, Counter

from localdisk.k8s import DRIVER_NAME, PROVISIONER_FINALIZER, RELEASE_ON_NODE_LOSS, TOPOLOGY_KEY
from localdisk.k8s.client import REQUEST_TIMEOUT, EventRecorder, is_status, reference
from localdisk.k8s.watch import TRANSIENT, Pacer, list_and_watch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeLossSettings:
    driver: str = DRIVER_NAME
    topology_key: str = TOPOLOGY_KEY
    resync_period: float = 300.0
    """Seconds between full passes; the Node watch acts sooner, this catches whatever it could not."""


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


class NodeLossController:
    def __init__(
        self,
        api: Any,
        settings: NodeLossSettings | None = None,
        *,
        events: EventRecorder | None = None,
        registry: CollectorRegistry | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.storage: Any = client.StorageV1Api(api)
        self.settings = settings or NodeLossSettings()
        self.events = events or EventRecorder(api)
        self.pacer = pacer or Pacer()
        self._lock = anyio.Lock()  # one pass at a time: the watch and the periodic resync never race each other
        self._reported_kept: set[str] = set()
        self.released = Counter(
            "localdisk_node_loss_released_volumes",
            "PVs of deleted nodes released (claim deleted, PV removed)",
            registry=registry,
        )

    async def run(self) -> None:
        """Watch Nodes and resync periodically, until cancelled."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_nodes)
            group.start_soon(self._resync_periodically)

    async def _watch_nodes(self) -> None:
        async def on_relist(nodes: list[Any]) -> None:
            await self.resync()

        async def on_event(kind: str, node: Any) -> None:
            if kind == "DELETED":
                log.info("node %s was deleted", node.metadata.name)
                await self.release_node(node.metadata.name)

        await list_and_watch(
            self.core.list_node, on_relist=on_relist, on_event=on_event, pacer=self.pacer, what="nodes"
        )

    async def _resync_periodically(self) -> None:
        while True:
            await anyio.sleep(self.settings.resync_period)
            try:
                await self.resync()
            except TRANSIENT as exc:
                log.warning("periodic resync failed (%s); next one in %.0fs", exc, self.settings.resync_period)
            except Exception:  # a bug or a surprising object: logged, and the next pass tries again
                log.exception("periodic resync failed; next one in %.0fs", self.settings.resync_period)

    async def resync(self) -> int:
        """One full pass: release the volumes of every node that is gone. Returns how many were released."""
        async with self._lock:
            nodes = {n.metadata.name for n in (await self.core.list_node(_request_timeout=REQUEST_TIMEOUT)).items or []}
            by_node: dict[str, list[Any]] = {}
            for pv in await self._our_volumes():
                node = volume_node(pv, self.settings.topology_key)
                if node is not None and node not in nodes:
                    by_node.setdefault(node, []).append(pv)
            released = 0
            for node, volumes in sorted(by_node.items()):
                if await self._node_is_gone(node):
                    released += await self._release(node, volumes)
            return released

    async def release_node(self, node: str) -> int:
        """Release the volumes of one node, if it is really gone. Returns how many were released."""
        async with self._lock:
            if not await self._node_is_gone(node):
                return 0
            volumes = [pv for pv in await self._our_volumes() if volume_node(pv, self.settings.topology_key) == node]
            return await self._release(node, volumes)

    async def _our_volumes(self) -> list[Any]:
        volumes = (await self.core.list_persistent_volume(_request_timeout=REQUEST_TIMEOUT)).items or []
        return [pv for pv in volumes if pv.spec.csi is not None and pv.spec.csi.driver == self.settings.driver]

    async def _node_is_gone(self, node: str) -> bool:
        try:
            await self.core.read_node(node, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return True
            log.warning("cannot tell whether node %s exists (%s); not releasing its volumes now", node, exc)
            return False
        return False

    async def _release(self, node: str, volumes: list[Any]) -> int:
        classes: dict[str, bool | None] = {}
        released = 0
        for pv in sorted(volumes, key=lambda v: v.metadata.name):
            try:
                if await self._release_volume(node, pv, classes):
                    released += 1
                    self.released.inc()
            except TRANSIENT as exc:
                log.warning("releasing PV %s of lost node %s failed (%s); will retry", pv.metadata.name, node, exc)
        if released:
            log.info("released %d volume(s) of lost node %s", released, node)
        return released

    async def _release_volume(self, node: str, pv: Any, classes: dict[str, bool | None]) -> bool:
        name = pv.metadata.name
        claim = await self._bound_claim(pv)
        claim_going = claim is None or claim.metadata.deletion_timestamp is not None
        if claim_going and pv.metadata.deletion_timestamp and PROVISIONER_FINALIZER not in _finalizers(pv):
            return False  # released on an earlier pass; Kubernetes' protection controllers finish the deletion
        keep = keeps_claims(claim.metadata.annotations) if claim is not None else None
        if keep is None:
            keep = await self._class_keeps(pv.spec.storage_class_name, classes)
        if keep:
            if pv.metadata.uid not in self._reported_kept:
                self._reported_kept.add(pv.metadata.uid)
                log.info("PV %s of lost node %s is kept (%s=false)", name, node, RELEASE_ON_NODE_LOSS)
                target = (
                    reference(claim, "PersistentVolumeClaim")
                    if claim is not None
                    else reference(pv, "PersistentVolume")
                )
                await self.events.record(
                    target,
                    "NodeLostVolumeKept",
                    f"node {node} holding volume {pv.spec.csi.volume_handle} was deleted; the claim is kept because"
                    f" {RELEASE_ON_NODE_LOSS} is false",
                )
            return False
        if claim is not None and claim.metadata.deletion_timestamp is None:
            await self.events.record(
                reference(claim, "PersistentVolumeClaim"),
                "NodeLost",
                f"node {node} holding volume {pv.spec.csi.volume_handle} was deleted; deleting this claim and PV"
                f" {name} so that the workload can get a new volume on another node",
                warning=True,
            )
            await self._delete_claim(claim)
        if pv.metadata.deletion_timestamp is None:
            try:
                await self.core.delete_persistent_volume(
                    name, body={"preconditions": {"uid": pv.metadata.uid}}, _request_timeout=REQUEST_TIMEOUT
                )
            except TRANSIENT as exc:
                if not is_status(exc, 404, 409):  # gone, or a newer PV of the same name: nothing left to do here
                    raise
                return False
        await self._drop_provisioner_finalizer(name, pv.metadata.uid)
        log.info("released PV %s (%s) of lost node %s", name, pv.spec.csi.volume_handle, node)
        return True

    async def _bound_claim(self, pv: Any) -> Any | None:
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

    async def _delete_claim(self, claim: Any) -> None:
        meta = claim.metadata
        try:
            await self.core.delete_namespaced_persistent_volume_claim(
                meta.name, meta.namespace, body={"preconditions": {"uid": meta.uid}}, _request_timeout=REQUEST_TIMEOUT
            )
            log.info("deleted PVC %s/%s", meta.namespace, meta.name)
        except TRANSIENT as exc:
            if not is_status(exc, 404, 409):  # already gone, or replaced by a newer claim of the same name
                raise

    async def _class_keeps(self, name: str | None, cache: dict[str, bool | None]) -> bool | None:
        if not name:
            return None
        if name not in cache:
            try:
                storage_class = await self.storage.read_storage_class(name, _request_timeout=REQUEST_TIMEOUT)
                cache[name] = keeps_claims(storage_class.metadata.annotations)
            except TRANSIENT as exc:
                if not is_status(exc, 404):
                    raise
                cache[name] = None
        return cache[name]

    async def _drop_provisioner_finalizer(self, name: str, uid: str) -> None:
        """Remove the external-provisioner's finalizer; the PV's resourceVersion guards against lost updates."""
        for _ in range(5):
            try:
                pv = await self.core.read_persistent_volume(name, _request_timeout=REQUEST_TIMEOUT)
            except TRANSIENT as exc:
                if is_status(exc, 404):
                    return
                raise
            finalizers = _finalizers(pv)
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


def _finalizers(obj: Any) -> list[str]:
    return list(obj.metadata.finalizers or [])
