"""The node agent of `localdisk serve --role node`: it carries out what the controller asks of this node.

It watches the LocalVolume and LocalSnapshot objects labelled for its node only, and reconciles each through the
`VolumeManager` it shares with the Node service: create, grow, snapshot, delete, each outcome written into the
object's status. It keeps the LocalNode object of its node fresh (pools, capacity, largest volume, health, and the
PVs of its thick LVM pools, from which the controller plans layouts) with a heartbeat, which is what GetCapacity
answers from.

Reconciling is level-based: an object is looked at whenever it changes and every `resync` seconds, and what to do is
derived from the object alone (spec against status), so an agent killed half-way finishes the job after a restart
(creates are idempotent by CSI name, deletes by handle). One object is worked on by one worker at a time; a change
that arrives meanwhile runs it again afterwards.

The agent needs these rights and no others: its kinds (get, list, watch, update; status patch), Nodes get, Events
create. It never reads or writes a PV or a PVC.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from kubernetes_asyncio import client

from localdisk.errors import Busy, InvalidArgument, LocalDiskError, NotFound
from localdisk.k8s.client import REQUEST_TIMEOUT, is_status, micro_time
from localdisk.k8s.crd import (
    ADOPTED,
    FINALIZER,
    GROUP,
    MERGE,
    NODE_LABEL,
    NODES,
    SNAPSHOTS,
    VERSION,
    VOLUMES,
    PoolReport,
    SnapshotObject,
    VolumeObject,
    error_status,
    label_value,
    node_selector,
    object_name,
)
from localdisk.k8s.watch import TRANSIENT, Pacer, list_and_watch
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.model import ContentSource, SourceKind
from localdisk.qos import PARAMETERS, IoLimits, VolumeQos

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (plural, object name)
Known = TypeVar("Known", VolumeObject, SnapshotObject)


@dataclass(frozen=True)
class AgentSettings:
    node: str
    heartbeat: float = 10.0
    """Seconds between two LocalNode updates; the controller treats a node silent for 3 of them as gone."""
    resync: float = 15.0
    """Seconds between passes over every object of this node, listed afresh (a failed status write, a lagging
    watch)."""
    workers: int = 4
    """Objects reconciled at once."""
    busy_retry: float = 2.0
    """Seconds before an object whose volume is busy (another operation on it) is tried again."""
    adopt: bool = False
    """At start, make a LocalVolume for every volume on this node's disks that none points to (moving from the
    per-node shape, whose PVs hold `<backend>:<pool>:<handle>` IDs); see `adopt`."""


class NodeAgent:
    def __init__(self, api: Any, manager: VolumeManager, settings: AgentSettings, io: VolumeQos | None = None) -> None:
        self.custom: Any = client.CustomObjectsApi(api)
        self.core: Any = client.CoreV1Api(api)
        self.manager = manager
        self.settings = settings
        self.io = io
        """Where the I/O limits of this node's volumes are recorded and applied (the Node service shares it)."""
        self.volumes: dict[str, VolumeObject] = {}
        self.snapshots: dict[str, SnapshotObject] = {}
        self.synced = anyio.Event()
        """Set once both lists have been read: `resolve` answers from them from then on."""
        self._volumes_listed = False
        self._snapshots_listed = False
        self._pending: set[Key] = set()
        self._running: set[Key] = set()
        self._queue: MemoryObjectSendStream[Key] | None = None
        self._group: TaskGroup | None = None
        self._pacers: dict[str, Pacer] = {}

    # -- running --------------------------------------------------------------------------------------------------

    def _pacer(self, plural: str) -> Pacer:
        return self._pacers.setdefault(plural, Pacer())

    def healthy(self, grace: float = 60.0) -> bool:
        """False once a watch has failed for `grace` seconds in a row (the API server away, the rights gone)."""
        return all(p.failing_for() < grace for p in self._pacers.values())

    async def run(self) -> None:
        """Watch, reconcile and report until cancelled."""
        send, receive = anyio.create_memory_object_stream[Key](math.inf)  # bounded by this node's objects
        self._queue = send
        async with send, receive, anyio.create_task_group() as group:
            self._group = group
            for _ in range(self.settings.workers):
                group.start_soon(self._work, receive.clone())
            group.start_soon(self._watch, VOLUMES)
            group.start_soon(self._watch, SNAPSHOTS)
            group.start_soon(self._report_forever)
            group.start_soon(self._resync_forever)
            if self.settings.adopt:
                group.start_soon(self._adopt_when_synced)

    async def _watch(self, plural: str) -> None:
        async def on_relist(items: list[Any]) -> None:
            self._replace(plural, items)
            if plural == VOLUMES:
                self._volumes_listed = True
            else:
                self._snapshots_listed = True
            if self._volumes_listed and self._snapshots_listed:
                self.synced.set()

        async def on_event(kind: str, item: Any) -> None:
            if kind == "DELETED":
                (self.volumes if plural == VOLUMES else self.snapshots).pop(item["metadata"]["name"], None)
            else:
                self._store(plural, item)

        await list_and_watch(
            self.custom.list_cluster_custom_object,
            on_relist=on_relist,
            on_event=on_event,
            pacer=self._pacer(plural),
            what=plural,
            group=GROUP,
            version=VERSION,
            plural=plural,
            label_selector=node_selector(self.settings.node),
        )

    def _replace(self, plural: str, items: list[Any]) -> None:
        names = {item["metadata"]["name"] for item in items}
        cache: dict[str, Any] = self.volumes if plural == VOLUMES else self.snapshots
        for gone in set(cache) - names:
            del cache[gone]
        for item in items:
            self._store(plural, item)

    def _store(self, plural: str, item: dict[str, Any]) -> None:
        if plural == VOLUMES:
            volume = VolumeObject.of(item)
            self.volumes[volume.name] = volume
        else:
            snapshot = SnapshotObject.of(item)
            self.snapshots[snapshot.name] = snapshot
        self._enqueue((plural, item["metadata"]["name"]))

    def _enqueue(self, key: Key) -> None:
        if key in self._pending or self._queue is None:
            return
        self._pending.add(key)
        if key not in self._running:  # else the worker running it sends it again when done
            self._queue.send_nowait(key)

    async def _work(self, receive: Any) -> None:
        async with receive:
            async for key in receive:
                self._pending.discard(key)
                self._running.add(key)
                try:
                    await self._reconcile(key)
                except Busy as exc:
                    log.info("%s %s: %s; trying again in %.0fs", key[0], key[1], exc.message, self.settings.busy_retry)
                    self._later(key)
                except TRANSIENT as exc:
                    log.warning("%s %s: the API failed (%s); trying again at the next resync", *key, exc)
                except Exception:
                    log.exception("%s %s: reconciling failed; trying again at the next resync", *key)
                finally:
                    self._running.discard(key)
                    if key in self._pending and self._queue is not None:
                        self._queue.send_nowait(key)

    def _later(self, key: Key) -> None:
        async def requeue() -> None:
            await anyio.sleep(self.settings.busy_retry)
            self._enqueue(key)

        if self._group is not None:
            self._group.start_soon(requeue)

    async def _resync_forever(self) -> None:
        """Every `resync` seconds, list this node's objects afresh and look at each: a watch can lag (the first one
        on a new resource has, for tens of seconds), and a status write can have failed."""
        while True:
            await anyio.sleep(self.settings.resync)
            for plural in (VOLUMES, SNAPSHOTS):
                try:
                    listed = await self.custom.list_cluster_custom_object(
                        GROUP,
                        VERSION,
                        plural,
                        label_selector=node_selector(self.settings.node),
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                except TRANSIENT as exc:
                    log.warning("listing %s failed (%s); the watch and the next resync go on", plural, exc)
                    continue
                self._replace(plural, list(listed.get("items") or []))

    async def _adopt_when_synced(self) -> None:
        await self.synced.wait()
        try:
            adopted = await self.adopt()
        except (*TRANSIENT, LocalDiskError) as exc:
            log.warning("adopting this node's volumes failed (%s); restart with --adopt to try again", exc)
            return
        log.info("adopted %d volume(s) and snapshot(s) into objects", len(adopted))

    async def adopt(self) -> list[str]:
        """Make a Ready object for every volume and snapshot on this node's disks that no object points to (by
        handle or CSI name): a LocalVolume, then a LocalSnapshot naming the LocalVolume of its source. The handle is
        the on-disk ID, which is also the ID the per-node shape gave its PV or VolumeSnapshotContent: the controller
        finds the object by it (`ClusterVolumes.by_handle`, `snapshot_by_handle`). Returns the adopted IDs."""
        adopted = []
        objects = {v.handle: v.name for v in self.volumes.values() if v.handle}  # on-disk volume ID -> object
        known_names = {v.csi_name for v in self.volumes.values()}
        for volume in await self.manager.list_volumes():
            if volume.id in objects or volume.name in known_names:
                continue
            spec = {
                "name": volume.name,
                "node": self.settings.node,
                "backend": volume.ref.backend,
                "pool": volume.ref.pool,
                "requiredBytes": volume.size_bytes,
                "limitBytes": 0,
                "encrypted": volume.encrypted,
            }
            status = {"phase": "Ready", "handle": volume.id, "pool": volume.ref.pool, "sizeBytes": volume.size_bytes}
            name = await self._adopt_one(VOLUMES, "LocalVolume", volume.id, spec, status)
            if name is not None:
                objects[volume.id] = name
                adopted.append(volume.id)
        known_handles = {s.handle for s in self.snapshots.values() if s.handle}
        known_names = {s.csi_name for s in self.snapshots.values()}
        for snapshot in await self.manager.list_snapshots():
            if snapshot.id in known_handles or snapshot.name in known_names:
                continue
            # its source's object; the on-disk ID of a source that is gone (a snapshot outlives its volume)
            source = objects.get(snapshot.source_volume_id, snapshot.source_volume_id)
            spec = {"name": snapshot.name, "node": self.settings.node, "sourceVolume": source}
            status = {
                "phase": "Ready" if snapshot.ready else "Pending",
                "handle": snapshot.id,
                "sizeBytes": snapshot.size_bytes,
                "creationTime": micro_time(snapshot.created_at),
                "readyToUse": snapshot.ready,
            }
            if await self._adopt_one(SNAPSHOTS, "LocalSnapshot", snapshot.id, spec, status) is not None:
                adopted.append(snapshot.id)
        return adopted

    async def _adopt_one(
        self, plural: str, kind: str, on_disk: str, spec: dict[str, Any], status: dict[str, Any]
    ) -> str | None:
        """Create the object of an on-disk volume or snapshot and write its status; its name, or None when an
        object of that name exists for something else."""
        name = object_name(spec["name"])
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {
                "name": name,
                "labels": {NODE_LABEL: label_value(self.settings.node)},
                "annotations": {ADOPTED: on_disk},
                "finalizers": [FINALIZER],
            },
            "spec": spec,
        }
        try:
            made = await self.custom.create_cluster_custom_object(
                GROUP, VERSION, plural, body, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if is_status(exc, 409):
                log.warning("%s: object %s exists for another one; not adopted", on_disk, name)
                return None
            raise
        generation = int(made["metadata"].get("generation") or 1)
        await self._status(plural, name, {**status, "observedGeneration": generation, "error": None})
        log.info("adopted %s (%s) as %s %s", on_disk, spec["name"], kind, name)
        return name

    # -- what the Node service asks ---------------------------------------------------------------------------------

    async def resolve(self, volume_id: str, wait: float = 10.0) -> str | None:
        """The on-disk volume ID (`<backend>:<pool>:<handle>`) of the object `volume_id`, or None when this node
        has no such volume. An ID with `:` is already one (a volume of the per-node shape) and is returned as is."""
        if ":" in volume_id:
            return volume_id
        with anyio.move_on_after(wait):
            await self.synced.wait()
        found = await self._known(self.volumes, VOLUMES, volume_id, VolumeObject.of)
        if found is None or found.node != self.settings.node:
            return None
        return found.handle or (await self._handle_by_name(found))

    async def _known(
        self, cache: dict[str, Known], plural: str, name: str, parse: Callable[[Any], Known]
    ) -> Known | None:
        """The object `name` as the watch brought it, or as the API server has it when the watch has not brought
        its status yet (None when there is no such object)."""
        found = cache.get(name)
        if found is not None and found.handle is not None:
            return found
        try:
            item = await self.custom.get_cluster_custom_object(
                GROUP, VERSION, plural, name, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return None
            raise
        return parse(item)

    async def _handle_by_name(self, volume: VolumeObject) -> str | None:
        existing = await self.manager.find_volume_by_name(volume.csi_name)
        return existing.id if existing is not None else None

    # -- reconciling ------------------------------------------------------------------------------------------------

    async def _reconcile(self, key: Key) -> None:
        plural, name = key
        if plural == VOLUMES:
            volume = self.volumes.get(name)
            if volume is not None and volume.node == self.settings.node:
                await self._reconcile_volume(volume)
        else:
            snapshot = self.snapshots.get(name)
            if snapshot is not None and snapshot.node == self.settings.node:
                await self._reconcile_snapshot(snapshot)

    async def _reconcile_volume(self, volume: VolumeObject) -> None:
        if volume.deleting:
            if FINALIZER in volume.finalizers:
                handle = volume.handle or await self._handle_by_name(volume)
                await self._remove_from_disk(VOLUMES, volume.name, volume.finalizers, handle, self._delete_volume)
            return
        if volume.error is not None and volume.observed_generation >= volume.generation:
            return  # answered; tried again when the controller clears the error
        if volume.handle is not None and volume.observed_generation >= volume.generation:
            await self._keep_io_limits(volume, volume.handle)
            return
        try:
            limits = IoLimits.from_json(volume.io_limits)
            if self.io is not None:
                self.io.check(limits)  # a volume whose limits this node cannot enforce is not made
            if volume.handle is None:
                created = await self.manager.create_volume(
                    CreateRequest(
                        name=volume.csi_name,
                        backend=volume.backend,
                        pool=volume.pool,
                        required_bytes=volume.required_bytes,
                        limit_bytes=volume.limit_bytes,
                        source=await self._source(volume),
                        encrypted=volume.encrypted,
                        parameters=volume.layout.parameters(),  # the LVM layout and cache, as the StorageClass said
                    )
                )
                log.info("volume %s created as %s (%d bytes)", volume.name, created.id, created.size_bytes)
            else:
                created = await self.manager.expand_volume(volume.handle, volume.required_bytes, volume.limit_bytes)
                log.info("volume %s (%s) is %d bytes", volume.name, created.id, created.size_bytes)
            self._set_io_limits(volume, created.id, limits)
        except Busy:
            raise
        except LocalDiskError as exc:
            log.info("volume %s: %s", volume.name, exc.message)
            await self._status(
                VOLUMES,
                volume.name,
                {
                    "phase": "Ready" if volume.handle else "Failed",
                    "error": error_status(exc),
                    "observedGeneration": volume.generation,
                },
            )
            return
        await self._status(
            VOLUMES,
            volume.name,
            {
                "phase": "Ready",
                "handle": created.id,
                "pool": created.ref.pool,
                "sizeBytes": created.size_bytes,
                "error": None,
                "observedGeneration": volume.generation,
                **({"ioLimits": _limits_patch(limits)} if self.io is not None else {}),
            },
        )

    async def _delete_volume(self, handle: str) -> None:
        await self.manager.delete_volume(handle)
        if self.io is not None:
            self.io.forget(handle)

    def _set_io_limits(self, volume: VolumeObject, handle: str, limits: IoLimits) -> None:
        """Record the volume's limits on this node and apply them to the pods using it; a pod the limits could not
        reach (its cgroup gone) is logged, the record holds."""
        if self.io is None:
            return
        if self.io.limits(handle) == limits:
            return
        for problem in self.io.set_limits(handle, limits):
            log.warning("volume %s: I/O limits %s recorded; applying them to a pod: %s", volume.name, limits, problem)
        log.info("volume %s (%s): I/O limits %s", volume.name, handle, limits)

    async def _keep_io_limits(self, volume: VolumeObject, handle: str) -> None:
        """A settled volume: the record on this node follows its spec (a state directory lost or restored from an
        older copy), and its status says what is applied."""
        if self.io is None:
            return
        limits = IoLimits.from_json(volume.io_limits)
        try:
            self._set_io_limits(volume, handle, limits)
        except LocalDiskError as exc:
            log.warning("volume %s: I/O limits %s: %s", volume.name, limits, exc.message)
            return
        if volume.applied_io_limits != limits.to_json():
            await self._status(VOLUMES, volume.name, {"ioLimits": _limits_patch(limits)})

    async def _source(self, volume: VolumeObject) -> ContentSource | None:
        if volume.source_kind is None or volume.source_name is None:
            return None
        found: VolumeObject | SnapshotObject | None
        if volume.source_kind == SourceKind.SNAPSHOT.value:
            kind = SourceKind.SNAPSHOT
            found = await self._known(self.snapshots, SNAPSHOTS, volume.source_name, SnapshotObject.of)
        elif volume.source_kind == SourceKind.VOLUME.value:
            kind = SourceKind.VOLUME
            found = await self._known(self.volumes, VOLUMES, volume.source_name, VolumeObject.of)
        else:
            raise InvalidArgument(f"content source kind {volume.source_kind!r} is neither snapshot nor volume")
        if found is None or found.node != self.settings.node or found.deleting or found.handle is None:
            raise NotFound(f"{volume.source_kind} {volume.source_name!r} is not on node {self.settings.node}")
        return ContentSource(kind, found.handle)

    async def _reconcile_snapshot(self, snapshot: SnapshotObject) -> None:
        if snapshot.deleting:
            if FINALIZER in snapshot.finalizers:
                handle = snapshot.handle or await self._snapshot_by_name(snapshot.csi_name)
                await self._remove_from_disk(
                    SNAPSHOTS, snapshot.name, snapshot.finalizers, handle, self.manager.delete_snapshot
                )
            return
        if snapshot.observed_generation >= snapshot.generation and (
            snapshot.error is not None or snapshot.handle is not None
        ):
            return
        try:
            if snapshot.handle is not None:  # adopted, its status not written yet: it is on disk already
                made = await self.manager.get_snapshot(snapshot.handle)
            else:
                source = self.volumes.get(snapshot.source_volume)
                if source is None or source.handle is None:
                    raise NotFound(f"volume {snapshot.source_volume!r} is not on node {self.settings.node}")
                made = await self.manager.create_snapshot(source.handle, snapshot.csi_name)
        except Busy:
            raise
        except LocalDiskError as exc:
            log.info("snapshot %s: %s", snapshot.name, exc.message)
            await self._status(
                SNAPSHOTS,
                snapshot.name,
                {"phase": "Failed", "error": error_status(exc), "observedGeneration": snapshot.generation},
            )
            return
        log.info("snapshot %s created as %s", snapshot.name, made.id)
        await self._status(
            SNAPSHOTS,
            snapshot.name,
            {
                "phase": "Ready" if made.ready else "Pending",
                "handle": made.id,
                "sizeBytes": made.size_bytes,
                "creationTime": micro_time(made.created_at),
                "readyToUse": made.ready,
                "error": None,
                "observedGeneration": snapshot.generation,
            },
        )

    async def _remove_from_disk(
        self,
        plural: str,
        name: str,
        finalizers: tuple[str, ...],
        handle: str | None,
        delete: Callable[[str], Awaitable[None]],
    ) -> None:
        """Delete what an object being deleted holds on disk (nothing when it never got a handle), then remove our
        finalizer; a failure is written into its status and the finalizer stays. `Busy` is raised for a retry."""
        if handle is not None:
            try:
                await delete(handle)
            except Busy:
                raise
            except LocalDiskError as exc:
                await self._status(plural, name, {"phase": "Deleting", "error": error_status(exc)})
                return
            log.info("%s %s (%s) deleted", plural, name, handle)
        await self._release(plural, name, finalizers)

    async def _snapshot_by_name(self, name: str) -> str | None:
        return next((s.id for s in await self.manager.list_snapshots() if s.name == name), None)

    async def _status(self, plural: str, name: str, status: dict[str, Any]) -> None:
        try:
            await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, plural, name, {"status": status}, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404):
                raise

    async def _release(self, plural: str, name: str, finalizers: tuple[str, ...]) -> None:
        """Remove our finalizer; the API server then deletes the object."""
        try:
            await self.custom.patch_cluster_custom_object(
                GROUP,
                VERSION,
                plural,
                name,
                {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER] or None}},
                _content_type=MERGE,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404):
                raise

    # -- the LocalNode object -----------------------------------------------------------------------------------------

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.report()
            except TRANSIENT as exc:
                log.warning(
                    "updating LocalNode %s failed (%s); next try in %.0fs",
                    self.settings.node,
                    exc,
                    self.settings.heartbeat,
                )
            except Exception:
                log.exception("updating LocalNode %s failed", self.settings.node)
            await anyio.sleep(self.settings.heartbeat)

    async def pools(self) -> list[PoolReport]:
        reports = []
        states = self.manager.pool_states()
        for (kind, pool), backend in sorted(self.manager.backends.items()):
            state = states[(kind, pool)]
            available = largest = 0
            space = None
            if state.up:
                try:
                    capacity = await self.manager.capacity(kind, pool)
                    available, largest = capacity.available_bytes, capacity.maximum_volume_bytes
                    space = await self.manager.layout_space(kind, pool)
                except LocalDiskError as exc:
                    log.warning("capacity of %s pool %r: %s", kind, pool, exc.message)
            reports.append(
                PoolReport(
                    backend=kind,
                    pool=pool,
                    default=self.manager.defaults.get(kind) == pool,
                    up=state.up,
                    reason=state.reason or "",
                    available_bytes=available,
                    maximum_volume_bytes=largest,
                    snapshots=backend.features.snapshots,
                    clones=backend.features.clones,
                    disks=await backend.disks(),
                    layout_space=space,
                )
            )
        return reports

    async def report(self) -> None:
        """Write this node's pools and a fresh heartbeat into its LocalNode, creating it first if needed."""
        node = self.settings.node
        status = {"heartbeat": micro_time(), "pools": [p.to_json() for p in await self.pools()]}
        try:
            await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, NODES, node, {"status": status}, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
            )
            return
        except TRANSIENT as exc:
            if not is_status(exc, 404):
                raise
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LocalNode",
            "metadata": {"name": node, "labels": {NODE_LABEL: label_value(node)}},
            "spec": {"node": node},
        }
        owner = await self._node_owner()
        if owner is not None:
            body["metadata"]["ownerReferences"] = [owner]  # gone with its Node
        try:
            await self.custom.create_cluster_custom_object(
                GROUP, VERSION, NODES, body, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if not is_status(exc, 409):
                raise
        await self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, NODES, node, {"status": status}, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
        )

    async def _node_owner(self) -> dict[str, Any] | None:
        try:
            found = await self.core.read_node(self.settings.node, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            log.info("Node %s not readable (%s); its LocalNode has no owner", self.settings.node, exc)
            return None
        return {"apiVersion": "v1", "kind": "Node", "name": found.metadata.name, "uid": found.metadata.uid}


def _limits_patch(limits: IoLimits) -> dict[str, int | None]:
    """status.ioLimits as a merge patch: every known key, null for no limit (a merge patch keeps absent keys)."""
    return {key: limits.to_json().get(key) for key in PARAMETERS}
