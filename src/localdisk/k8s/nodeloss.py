"""Release what a deleted node leaves behind, so that StatefulSets can start their pods elsewhere with new volumes,
and only once the node has stayed gone for a grace period.

A localdisk volume lives on one node's disks and its PV is pinned there by node affinity. When that Node object is
deleted, the pod's PVC stays bound to a PV nobody can mount, and the pod stays Pending forever. But a Node object is
also deleted for maintenance (`kubectl delete node`, and the kubelet registers it again when it restarts), and then
nothing must be lost. So, for a node of our objects that no longer exists:

- a node is taken for gone only after a GET for it answers 404 (never because a list or a cache lacks it);
- claims still waiting for it (WaitForFirstConsumer, `volume.kubernetes.io/selected-node` naming it, not bound)
  lose that annotation at once, so the scheduler chooses again: what external-provisioner itself does when the
  selected node is not found, which the provisioner of a lost node can no longer do;
- everything else waits for the grace period (`grace_period`, 10 minutes by default), counted from when the
  controller first saw the node gone. That moment is written on the node's PVs (annotation
  `localdisk.csi.io/node-lost-since`), so a restart or a fail-over neither restarts nor shortens the wait; a node
  that comes back (a Node of that name is created again) cancels it, and the annotations are removed;
- after the grace period, for each PV of ours pinned to the node: with reclaim policy Delete, the bound PVC is
  deleted (UID precondition: a newer claim of the same name is never touched), then the PV, and the
  external-provisioner's finalizer is removed from it (only the lost node's provisioner could have). With Retain,
  the claim is released the same way, but the PV is never deleted and its data on the node's disks never touched:
  the PV turns Released and waits for an administrator. The opt-out annotation
  `localdisk.csi.io/release-on-node-loss: "false"` (StorageClass or PVC; the PVC's wins) keeps claim and PV both;
- then the node's CSIStorageCapacity objects of our driver are deleted; VolumeSnapshotContents of our driver pinned
  to the node (distributed snapshotting) that are being deleted lose the csi-snapshotter finalizer only that node
  could remove, the others are only reported (their data is gone, but the user's VolumeSnapshot is theirs to
  delete); and every `LostNodeExtension` is asked to release its objects of the node.

Every step is said in an Event. In a dry run nothing is written but Events: each would-be step is reported once
(Event `NodeLossDryRun`, a log line, `localdisk_node_loss_dry_run_actions_total`), and the grace period is kept in
memory only. The work is derived from the cluster alone, at start-up, after every relist, on every Node deletion
or creation, when a grace period ends and periodically; every step is idempotent, so a controller killed half-way
finishes the job on its next pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge

from localdisk.k8s import DRIVER_NAME, PROVISIONER_FINALIZER, RELEASE_ON_NODE_LOSS, TOPOLOGY_KEY
from localdisk.k8s.client import EventRecorder, reference, wire_time
from localdisk.k8s.nodeloss_objects import (
    SELECTED_NODE,
    SNAPSHOT_CONTENT_FINALIZER,
    LostNodeObjects,
    capacity_node,
    keeps_claims,
    lost_since,
    snapshot_node,
    volume_node,
)
from localdisk.k8s.watch import TRANSIENT, Pacer, list_and_watch

__all__ = ["LostNodeExtension", "NodeLossController", "NodeLossSettings", "keeps_claims", "volume_node"]

log = logging.getLogger(__name__)
RETRY_AFTER_FAILURE = 10.0
"""Seconds before a failed periodic pass is tried again (the watch's relist may try sooner)."""


@dataclass(frozen=True)
class NodeLossSettings:
    driver: str = DRIVER_NAME
    topology_key: str = TOPOLOGY_KEY
    resync_period: float = 300.0
    """Seconds between full passes; the Node watch and the end of a grace period act sooner."""
    grace_period: float = 600.0
    """Seconds a node must stay gone before anything of it is released (pending claims excepted)."""
    dry_run: bool = False
    """Report what would be done (Events, logs, a metric) and change nothing."""


class LostNodeExtension(Protocol):
    """Objects of some other kind that a lost node leaves behind (localdisk's own per-volume resources, say).

    `nodes` names every node it holds objects for, so that a node known only to it is found too; `release` is
    called once that node is confirmed gone and its grace period is over, on every pass while `nodes` names it.
    It must be idempotent, must only say (not do) what it would do when `dry_run` is set, and returns one short
    description per object it released (or would release). An API error it raises is retried on the next pass.
    """

    name: str
    """What the objects are, for logs and Events ("LocalVolume objects")."""

    async def nodes(self) -> set[str]: ...

    async def release(self, node: str, *, dry_run: bool) -> list[str]: ...


@dataclass
class Leftovers:
    """What one node holds, as listed at the start of a pass."""

    volumes: list[Any] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)
    capacities: list[Any] = field(default_factory=list)
    contents: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[LostNodeExtension] = field(default_factory=list)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _parse_wire_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _node_reference(node: str) -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1", "name": node}


def _content_reference(content: dict[str, Any]) -> dict[str, Any]:
    meta = content["metadata"]
    return {
        "kind": "VolumeSnapshotContent",
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "name": meta["name"],
        "uid": meta.get("uid"),
    }


class NodeLossController:
    def __init__(
        self,
        api: Any,
        settings: NodeLossSettings | None = None,
        *,
        events: EventRecorder | None = None,
        registry: CollectorRegistry | None = None,
        pacer: Pacer | None = None,
        extensions: Sequence[LostNodeExtension] = (),
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.settings = settings or NodeLossSettings()
        self.objects = LostNodeObjects(api, self.settings.driver, self.settings.topology_key)
        self.core: Any = self.objects.core
        self.events = events or EventRecorder(api)
        self.pacer = pacer or Pacer()
        self.extensions = list(extensions)
        self.clock = clock
        self._lock = anyio.Lock()  # one pass at a time: the watch and the periodic resync never race each other
        self._lost: dict[str, datetime] = {}  # node -> first seen gone (also on the PVs, outside a dry run)
        self._said: set[tuple[str, ...]] = set()  # Events said once per process (kept, dry run, grace)
        self._next_due: datetime | None = None
        self._dues: list[datetime] = []
        self._wake = anyio.Event()
        self.released = Counter(
            "localdisk_node_loss_released_volumes",
            "PVs of deleted nodes released (claim deleted, PV removed)",
            registry=registry,
        )
        self.kept = Counter(
            "localdisk_node_loss_kept_volumes",
            "PVs of deleted nodes kept past the grace period (reason: retain, opt-out)",
            ["reason"],
            registry=registry,
        )
        self.rescheduled = Counter(
            "localdisk_node_loss_rescheduled_claims",
            "Pending claims whose selected node was deleted, handed back to the scheduler",
            registry=registry,
        )
        self.dry_run_actions = Counter(
            "localdisk_node_loss_dry_run_actions",
            "Steps a dry run would have taken, each counted once (action: reschedule, release, release-claim,"
            " delete-capacity, release-snapshot, extension)",
            ["action"],
            registry=registry,
        )
        self.waiting = Gauge(
            "localdisk_node_loss_nodes_in_grace", "Deleted nodes whose grace period is running", registry=registry
        )

    # -- driving ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Watch Nodes and resync periodically (and when a grace period ends), until cancelled."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_nodes)
            group.start_soon(self._resync_periodically)

    async def _watch_nodes(self) -> None:
        async def on_relist(nodes: list[Any]) -> None:
            await self.resync()

        async def on_event(kind: str, node: Any) -> None:
            name = node.metadata.name
            if kind == "DELETED" or (kind == "ADDED" and name in self._lost):  # gone, or back; not heartbeats
                log.info("node %s was %s", name, "deleted" if kind == "DELETED" else "created again")
                await self.resync()

        await list_and_watch(
            self.core.list_node, on_relist=on_relist, on_event=on_event, pacer=self.pacer, what="nodes"
        )

    def _delay(self) -> float:
        delay = self.settings.resync_period
        if self._next_due is not None:
            delay = min(delay, max(0.0, (self._next_due - self.clock()).total_seconds()) + 0.05)
        return delay

    async def _resync_periodically(self) -> None:
        while True:
            self._wake = anyio.Event()
            with anyio.move_on_after(self._delay()):
                await self._wake.wait()
                continue  # a pass brought a grace period's end closer: wait again, for the new delay
            try:
                await self.resync()
            except TRANSIENT as exc:
                log.warning("node-loss pass failed (%s); trying again soon", exc)
                await anyio.sleep(min(self.settings.resync_period, RETRY_AFTER_FAILURE))
            except Exception:  # a bug or a surprising object: logged, and the next pass tries again
                log.exception("node-loss pass failed; trying again soon")
                await anyio.sleep(min(self.settings.resync_period, RETRY_AFTER_FAILURE))

    async def resync(self) -> int:
        """One full pass over every node our objects name. Returns how many PVs were released."""
        async with self._lock:
            earlier = self._next_due
            released = await self._pass()
            if self._next_due is not None and (earlier is None or self._next_due < earlier):
                self._wake.set()
            return released

    # -- one pass -----------------------------------------------------------------------------------------------
    async def _pass(self) -> int:
        now = self.clock()
        present = await self.objects.node_names()
        classes: dict[str, Any] = {}
        by_node: dict[str, Leftovers] = {}

        def of(node: str) -> Leftovers:
            return by_node.setdefault(node, Leftovers())

        for pv in await self.objects.volumes():
            node = volume_node(pv, self.settings.topology_key)
            if node is not None:
                of(node).volumes.append(pv)
        for claim in await self.objects.pending_claims(classes):
            of(claim.metadata.annotations[SELECTED_NODE]).pending.append(claim)
        for capacity in await self.objects.capacities():
            of(capacity_node(capacity, self.settings.driver, self.settings.topology_key) or "").capacities.append(
                capacity
            )
        for content in await self.objects.snapshot_contents():
            of(snapshot_node(content, self.settings.driver) or "").contents.append(content)
        for extension in self.extensions:
            for node in await extension.nodes():
                of(node).extensions.append(extension)

        for node in sorted(present & (set(by_node) | set(self._lost))):
            await self._cancel(node, by_node.get(node, Leftovers()))
        self._dues = []
        released = 0
        for node in sorted(set(by_node) - present):
            if await self.objects.node_is_gone(node):
                released += await self._handle(node, by_node[node], now, classes)
        self._next_due = min(self._dues, default=None)
        for node in set(self._lost) - set(by_node):
            del self._lost[node]  # nothing of it is left to release
        self.waiting.set(sum(1 for since in self._lost.values() if now < since + self._grace))
        return released

    @property
    def _grace(self) -> timedelta:
        return timedelta(seconds=self.settings.grace_period)

    async def _cancel(self, node: str, left: Leftovers) -> None:
        """The node exists (again): forget that it was gone, and say so where it was said."""
        since = self._lost.pop(node, None)
        for pv in left.volumes:
            mark = lost_since(pv)
            if mark is None or not await self.objects.mark_volume(pv, None):
                continue
            claim = await self.objects.bound_claim(pv)
            target = reference(claim, "PersistentVolumeClaim") if claim else reference(pv, "PersistentVolume")
            await self.events.record(
                target,
                "NodeLossCancelled",
                f"node {node} is back (a Node of that name exists again); the release of PV {pv.metadata.name}"
                f" planned after its loss at {mark} is cancelled",
            )
            since = since or _parse_wire_time(mark)
        if since is not None:
            self._said = {said for said in self._said if said[-1] != node}
            log.info("node %s is back; its release is cancelled", node)
            await self.events.record(
                _node_reference(node),
                "NodeLossCancelled",
                f"node {node}, gone since {wire_time(since)}, is back; nothing of it was released",
            )

    async def _handle(self, node: str, left: Leftovers, now: datetime, classes: dict[str, Any]) -> int:
        for claim in left.pending:
            await self._reschedule(node, claim)
        marks = [t for t in (_parse_wire_time(lost_since(pv)) for pv in left.volumes) if t is not None]
        known = self._lost.get(node)
        since = min([*marks, *([known] if known else [])], default=now.replace(microsecond=0))
        self._lost[node] = since
        due = since + self._grace
        if known is None and not marks:  # with marks, an earlier process (or pass) said it already
            await self._detected(node, left, since, due, now)
        if now < due:
            for pv in left.volumes:
                await self._note_grace(node, pv, since, due)
            self._dues.append(due)
            return 0
        released = 0
        for pv in sorted(left.volumes, key=lambda v: v.metadata.name):
            try:
                if await self._release_volume(node, pv, classes):
                    released += 1
                    self.released.inc()
            except TRANSIENT as exc:
                log.warning("releasing PV %s of lost node %s failed (%s); will retry", pv.metadata.name, node, exc)
        await self._release_capacities(node, left.capacities)
        for content in left.contents:
            await self._release_content(node, content)
        for extension in left.extensions:
            await self._release_extension(node, extension)
        if released:
            log.info("released %d volume(s) of lost node %s", released, node)
        return released

    async def _detected(self, node: str, left: Leftovers, since: datetime, due: datetime, now: datetime) -> None:
        when = "now" if now >= due else f"at {wire_time(due)} unless it comes back"
        what = f"{len(left.volumes)} volume(s), {len(left.capacities)} capacity object(s)"
        dry = " (dry run: nothing will be changed)" if self.settings.dry_run else ""
        log.info("node %s is gone (since %s); releasing its %s %s%s", node, wire_time(since), what, when, dry)
        await self.events.record(
            _node_reference(node),
            "NodeLossDetected",
            f"node {node} is gone (a GET answered 404) since {wire_time(since)}; its {what} are released {when}{dry}",
            warning=True,
        )

    async def _note_grace(self, node: str, pv: Any, since: datetime, due: datetime) -> None:
        """Write when the node was first seen gone on the PV, and tell the claim's owner when it will be released."""
        if lost_since(pv) is not None:
            return  # written (and said) by an earlier pass, maybe by another process
        if self.settings.dry_run:
            if not self._once("grace", pv.metadata.uid, node):
                return
        elif not await self.objects.mark_volume(pv, wire_time(since)):
            return
        claim = await self.objects.bound_claim(pv)
        target = reference(claim, "PersistentVolumeClaim") if claim else reference(pv, "PersistentVolume")
        dry = "dry run: " if self.settings.dry_run else ""
        await self.events.record(
            target,
            "NodeLossGracePeriod",
            f"{dry}node {node} holding PV {pv.metadata.name} is gone since {wire_time(since)}; it is released at"
            f" {wire_time(due)} unless the node comes back",
            warning=True,
        )

    def _once(self, *key: str) -> bool:
        """True the first time `key` is seen by this process (its last part is the node, for `_cancel`)."""
        if key in self._said:
            return False
        self._said.add(key)
        return True

    async def _would(self, action: str, target: dict[str, Any], node: str, message: str) -> None:
        """Report, once, a step a dry run does not take."""
        if not self._once("dry-run", action, message, node):
            return
        self.dry_run_actions.labels(action).inc()
        log.info("dry run: would %s", message)
        await self.events.record(target, "NodeLossDryRun", f"dry run: would {message}")

    # -- the steps ----------------------------------------------------------------------------------------------
    async def _reschedule(self, node: str, claim: Any) -> None:
        meta = claim.metadata
        target = reference(claim, "PersistentVolumeClaim")
        message = (
            f"remove {SELECTED_NODE}={node} from claim {meta.namespace}/{meta.name} so the scheduler chooses again"
        )
        if self.settings.dry_run:
            await self._would("reschedule", target, node, message)
            return
        if await self.objects.clear_selected_node(claim):
            self.rescheduled.inc()
            log.info(
                "claim %s/%s waited for lost node %s; handed back to the scheduler", meta.namespace, meta.name, node
            )
            await self.events.record(
                target,
                "NodeLostRescheduled",
                f"node {node} selected for this claim is gone; {SELECTED_NODE} removed so the scheduler chooses"
                " another node",
                warning=True,
            )

    async def _release_volume(self, node: str, pv: Any, classes: dict[str, Any]) -> bool:
        name = pv.metadata.name
        claim = await self.objects.bound_claim(pv)
        claim_going = claim is None or claim.metadata.deletion_timestamp is not None
        if claim_going and pv.metadata.deletion_timestamp and PROVISIONER_FINALIZER not in _finalizers(pv):
            return False  # released on an earlier pass; Kubernetes' protection controllers finish the deletion
        keep = keeps_claims(claim.metadata.annotations) if claim is not None else None
        if keep is None:
            storage_class = await self.objects.storage_class(pv.spec.storage_class_name, classes)
            keep = keeps_claims(storage_class.metadata.annotations) if storage_class is not None else None
        handle = pv.spec.csi.volume_handle
        if keep:
            await self._kept(
                node, pv, claim, "opt-out", f"the claim and PV are kept because {RELEASE_ON_NODE_LOSS} is false"
            )
            return False
        if pv.spec.persistent_volume_reclaim_policy == "Retain":
            await self._release_retained(node, pv, claim)
            return False
        if self.settings.dry_run:
            target = reference(claim, "PersistentVolumeClaim") if claim else reference(pv, "PersistentVolume")
            what = ""
            if claim is not None and claim.metadata.deletion_timestamp is None:
                what = f"claim {claim.metadata.namespace}/{claim.metadata.name} and "
            await self._would("release", target, node, f"delete {what}PV {name} ({handle}) of lost node {node}")
            return False
        if claim is not None and claim.metadata.deletion_timestamp is None:
            await self.events.record(
                reference(claim, "PersistentVolumeClaim"),
                "NodeLost",
                f"node {node} holding volume {handle} is gone; deleting this claim and PV {name} so that the"
                " workload can get a new volume on another node",
                warning=True,
            )
            await self.objects.delete_claim(claim)
        if pv.metadata.deletion_timestamp is None and not await self.objects.delete_volume(pv):
            return False  # gone, or a newer PV of the same name: nothing left to do here
        await self.objects.drop_provisioner_finalizer(name, pv.metadata.uid)
        log.info("released PV %s (%s) of lost node %s", name, handle, node)
        return True

    async def _release_retained(self, node: str, pv: Any, claim: Any | None) -> None:
        """Reclaim policy Retain: the claim may go (the workload starts elsewhere), the PV and its data stay."""
        name = pv.metadata.name
        if claim is not None and claim.metadata.deletion_timestamp is None:
            meta = claim.metadata
            if self.settings.dry_run:
                message = f"delete claim {meta.namespace}/{meta.name} of lost node {node}, keeping PV {name} (Retain)"
                await self._would("release-claim", reference(claim, "PersistentVolumeClaim"), node, message)
                return
            await self.events.record(
                reference(claim, "PersistentVolumeClaim"),
                "NodeLost",
                f"node {node} holding volume {pv.spec.csi.volume_handle} is gone; deleting this claim so that the"
                f" workload can get a new volume on another node. PV {name} has reclaim policy Retain: it is kept,"
                " with its data on the node's disks",
                warning=True,
            )
            await self.objects.delete_claim(claim)
        await self._kept(
            node,
            pv,
            None,
            "retain",
            "its reclaim policy is Retain: the PV is kept (Released once its claim is gone) and its data on the"
            " node's disks is never deleted; if the node comes back, an administrator can bind it again",
        )

    async def _kept(self, node: str, pv: Any, claim: Any | None, reason: str, why: str) -> None:
        if not self._once("kept", pv.metadata.uid, node):
            return
        dry = "dry run: " if self.settings.dry_run else ""
        if not self.settings.dry_run:
            self.kept.labels(reason).inc()
        log.info("%sPV %s of lost node %s is kept (%s)", dry, pv.metadata.name, node, reason)
        target = reference(claim, "PersistentVolumeClaim") if claim is not None else reference(pv, "PersistentVolume")
        await self.events.record(
            target,
            "NodeLostVolumeKept",
            f"{dry}node {node} holding PV {pv.metadata.name} ({pv.spec.csi.volume_handle}) is gone; {why}",
        )

    async def _release_capacities(self, node: str, capacities: list[Any]) -> None:
        removed = []
        for capacity in capacities:
            meta = capacity.metadata
            label = f"{meta.namespace}/{meta.name}"
            if self.settings.dry_run:
                await self._would(
                    "delete-capacity", _node_reference(node), node, f"delete CSIStorageCapacity {label} of lost node"
                )
            else:
                try:
                    if await self.objects.delete_capacity(capacity):
                        removed.append(label)
                except TRANSIENT as exc:
                    log.warning("deleting CSIStorageCapacity %s failed (%s); will retry", label, exc)
        if removed:
            log.info("deleted the CSIStorageCapacity objects of lost node %s: %s", node, ", ".join(removed))
            await self.events.record(
                _node_reference(node),
                "NodeLostCapacityRemoved",
                f"deleted the CSIStorageCapacity objects of lost node {node}: {', '.join(removed)}",
            )

    async def _release_content(self, node: str, content: dict[str, Any]) -> None:
        meta = content["metadata"]
        target = _content_reference(content)
        if not meta.get("deletionTimestamp"):
            if self._once("snapshot", str(meta.get("uid")), node):
                source = (content.get("spec") or {}).get("volumeSnapshotRef") or {}
                await self.events.record(
                    target,
                    "NodeLostSnapshot",
                    f"the data of this snapshot was on node {node}, which is gone: it cannot be restored any more."
                    f" Delete VolumeSnapshot {source.get('namespace')}/{source.get('name')} to clean up",
                    warning=True,
                )
            return
        if SNAPSHOT_CONTENT_FINALIZER not in (meta.get("finalizers") or []):
            return
        if self.settings.dry_run:
            message = f"remove the csi-snapshotter finalizer of VolumeSnapshotContent {meta['name']} (lost node)"
            await self._would("release-snapshot", target, node, message)
            return
        try:
            if await self.objects.drop_snapshot_finalizer(content):
                log.info("released VolumeSnapshotContent %s of lost node %s", meta["name"], node)
                await self.events.record(
                    target,
                    "NodeLost",
                    f"node {node} holding this snapshot is gone; removed {SNAPSHOT_CONTENT_FINALIZER} that only its"
                    " csi-snapshotter would have removed",
                )
        except TRANSIENT as exc:
            log.warning("releasing VolumeSnapshotContent %s failed (%s); will retry", meta["name"], exc)

    async def _release_extension(self, node: str, extension: LostNodeExtension) -> None:
        try:
            done = await extension.release(node, dry_run=self.settings.dry_run)
        except TRANSIENT as exc:
            log.warning("releasing the %s of lost node %s failed (%s); will retry", extension.name, node, exc)
            return
        if not done:
            return
        listed = ", ".join(done)
        if self.settings.dry_run:
            await self._would("extension", _node_reference(node), node, f"release {extension.name}: {listed}")
            return
        log.info("released the %s of lost node %s: %s", extension.name, node, listed)
        await self.events.record(
            _node_reference(node), "NodeLost", f"released {extension.name} of node {node}: {listed}"
        )


def _finalizers(obj: Any) -> list[str]:
    return list(obj.metadata.finalizers or [])
