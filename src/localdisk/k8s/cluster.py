"""The controller's view of the cluster's volumes: custom resources written, node agents' answers awaited.

`ClusterVolumes` is what `localdisk serve --role controller` drives instead of a `VolumeManager`. It keeps a cache
of every LocalVolume, LocalSnapshot and LocalNode (one list-and-watch each), turns each request into a change to one
object, and waits for the node agent's answer in its status. It raises the domain errors the agent met (a full pool
is `InsufficientCapacity` here too), and `Busy` when the node has not answered in time, which the CSI layer answers
as ABORTED so the sidecar tries again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from kubernetes_asyncio import client

from localdisk.backends.lvmspace import LayoutRequest, PoolSpace
from localdisk.errors import AlreadyExists, Busy, FailedPrecondition, InvalidArgument, NotFound
from localdisk.k8s.client import REQUEST_TIMEOUT, is_status
from localdisk.k8s.crd import (
    API_VERSION,
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
    error_from_status,
    label_value,
    object_name,
)
from localdisk.k8s.watch import TRANSIENT, Pacer, list_and_watch

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ClusterSettings:
    answer_timeout: float = 50.0
    """Seconds a CSI call waits for the node's answer before it answers ABORTED (the sidecar retries; its own
    timeout is 60 s by default)."""
    stale_after: float = 60.0
    """A node whose LocalNode heartbeat is older than this offers no capacity."""
    poll: float = 2.0
    """Seconds a waiting call goes without a change from the watch before it reads its object itself."""


@dataclass(frozen=True)
class VolumeRequest:
    csi_name: str
    node: str
    backend: str
    pool: str | None
    required_bytes: int
    limit_bytes: int
    encrypted: bool = False
    source_kind: str | None = None
    source_name: str | None = None
    io_limits: dict[str, int] = field(default_factory=dict)  # `localdisk.qos` parameter names: readIOPS, ...
    layout: LayoutRequest = field(default_factory=LayoutRequest)  # the StorageClass's LVM layout and cache


@dataclass(frozen=True)
class NodeReport:
    name: str
    heartbeat: datetime | None
    pools: tuple[PoolReport, ...]

    def fresh(self, stale_after: float, now: datetime | None = None) -> bool:
        if self.heartbeat is None:
            return False
        return ((now or datetime.now(UTC)) - self.heartbeat).total_seconds() <= stale_after

    def pool(self, backend: str, pool: str | None) -> PoolReport | None:
        mine = [p for p in self.pools if p.backend == backend]
        if pool:
            return next((p for p in mine if p.pool == pool), None)
        marked = [p for p in mine if p.default]
        return marked[0] if marked else (mine[0] if len(mine) == 1 else None)

    @classmethod
    def of(cls, obj: dict[str, Any]) -> NodeReport:
        status = obj.get("status") or {}
        beat = status.get("heartbeat")
        heartbeat = datetime.fromisoformat(beat.replace("Z", "+00:00")) if beat else None
        return cls(obj["metadata"]["name"], heartbeat, tuple(PoolReport.of(p) for p in status.get("pools") or []))


class ClusterVolumes:
    def __init__(self, api: Any, settings: ClusterSettings | None = None) -> None:
        self.custom: Any = client.CustomObjectsApi(api)
        self.settings = settings or ClusterSettings()
        self.volumes: dict[str, VolumeObject] = {}
        self.snapshots: dict[str, SnapshotObject] = {}
        self.nodes: dict[str, NodeReport] = {}
        self.synced = anyio.Event()
        self._listed: set[str] = set()
        self._changed = anyio.Event()
        self._pacers: dict[str, Pacer] = {}
        self._relists = 0  # a relist replaces the cache with the newest state of every object
        self.changes = 0  # counts every change to the caches: what was derived from them at the same count holds
        self._recent: dict[tuple[str, str], deque[str]] = {}  # the last resourceVersions the watch showed, per object

    def _pacer(self, plural: str) -> Pacer:
        return self._pacers.setdefault(plural, Pacer())

    def healthy(self, grace: float = 60.0) -> bool:
        """False once a watch has failed for `grace` seconds in a row (the API server away, the rights gone)."""
        return all(p.failing_for() < grace for p in self._pacers.values())

    async def run(self) -> None:
        """Keep the cache up to date until cancelled."""
        async with anyio.create_task_group() as group:
            for plural in (VOLUMES, SNAPSHOTS, NODES):
                group.start_soon(self._watch, plural)

    async def _watch(self, plural: str) -> None:
        async def on_relist(items: list[Any]) -> None:
            cache = self._cache(plural)
            cache.clear()
            self.changes += 1
            self._recent = {key: seen for key, seen in self._recent.items() if key[0] != plural}
            self._relists += 1
            for item in items:
                self._store(plural, "ADDED", item)
            self._listed.add(plural)
            if len(self._listed) == 3:
                self.synced.set()
            self._notify()

        async def on_event(kind: str, item: Any) -> None:
            self._store(plural, kind, item)
            self._notify()

        await list_and_watch(
            self.custom.list_cluster_custom_object,
            on_relist=on_relist,
            on_event=on_event,
            pacer=self._pacer(plural),
            what=plural,
            group=GROUP,
            version=VERSION,
            plural=plural,
        )

    def _cache(self, plural: str) -> dict[str, Any]:
        caches: dict[str, dict[str, Any]] = {VOLUMES: self.volumes, SNAPSHOTS: self.snapshots, NODES: self.nodes}
        return caches[plural]

    def _store(self, plural: str, kind: str, item: dict[str, Any]) -> None:
        name = item["metadata"]["name"]
        cache = self._cache(plural)
        self.changes += 1
        recent = self._recent.setdefault((plural, name), deque(maxlen=32))
        recent.append(str(item["metadata"].get("resourceVersion", "")))
        if kind == "DELETED":
            cache.pop(name, None)
            del self._recent[(plural, name)]
        elif plural == VOLUMES:
            cache[name] = VolumeObject.of(item)
        elif plural == SNAPSHOTS:
            cache[name] = SnapshotObject.of(item)
        else:
            cache[name] = NodeReport.of(item)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _until(
        self, check: Callable[[], T | None], what: str, *, plural: str = "", name: str = "", since: str = ""
    ) -> T:
        """Wait for `check` to give an answer, re-checked on every change to the cache.

        With `since` (the resourceVersion our own write returned), the watch must first have delivered that write
        (or relisted since): until then the cache holds the state before it (the error we just cleared, say),
        which is no answer to this call. The node's answer may follow our write at once, so the last few versions
        of each object are remembered, not only the newest. Every `poll` seconds without a change, the object is
        read from the API server: a watch that lags (the first one on a new resource can, for tens of seconds)
        only slows the answer down to that."""
        relists = self._relists
        caught_up = not since
        with anyio.move_on_after(self.settings.answer_timeout):
            await self.synced.wait()
            while True:
                changed = self._changed
                if not caught_up:
                    caught_up = self._relists != relists or since in self._recent.get((plural, name), ())
                if caught_up:
                    result = check()
                    if result is not None:
                        return result
                with anyio.move_on_after(self.settings.poll):
                    await changed.wait()
                if not changed.is_set() and plural and await self._refresh(plural, name):
                    caught_up = True  # what the API server says now is newer than our write
        raise Busy(f"{what}: no answer within {self.settings.answer_timeout:.0f}s; retry")

    async def _refresh(self, plural: str, name: str) -> bool:
        """Read one object into the cache (or drop it there when it is gone); False when the API did not answer."""
        try:
            item = await self.custom.get_cluster_custom_object(
                GROUP, VERSION, plural, name, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404):
                return False
            self._cache(plural).pop(name, None)
            self.changes += 1
            return True
        self._store(plural, "MODIFIED", item)
        return True

    async def ready(self) -> None:
        with anyio.move_on_after(self.settings.answer_timeout):
            await self.synced.wait()
        if not self.synced.is_set():
            raise Busy("the controller has not read the cluster's volumes yet; retry")

    # -- volumes ----------------------------------------------------------------------------------------------------

    async def create_volume(self, request: VolumeRequest) -> VolumeObject:
        await self.ready()
        name = object_name(request.csi_name)
        existing = self.volumes.get(name) or await self._get(VOLUMES, name, VolumeObject.of)
        if existing is not None:
            if existing.csi_name != request.csi_name:
                raise AlreadyExists(f"object {name} holds volume {existing.csi_name!r}, not {request.csi_name!r}")
            if existing.deleting:
                raise Busy(f"volume {request.csi_name!r} is still being deleted; retry")
            if existing.node != request.node and existing.handle is None:
                # an earlier attempt on another node failed (no room there, say) and the scheduler chose again
                await self._delete(VOLUMES, name)
                raise Busy(f"volume {request.csi_name!r}: clearing the failed attempt on node {existing.node}; retry")
            self._same_or_conflict(existing, request)
            self._same_layout(existing, request)
            since = ""
            if existing.error is not None and existing.handle is None:
                since = await self._retry(VOLUMES, name)
        else:
            body = self._volume_body(name, request)
            if not request.layout.empty:
                await self._check_kept(body)
            since = await self._create(VOLUMES, body)
        settled = await self._until(
            lambda: self._settled_volume(name), f"volume {request.csi_name!r}", plural=VOLUMES, name=name, since=since
        )
        if settled.handle is None and settled.error is not None:
            raise error_from_status(settled.error, f"node {settled.node}")
        return settled

    def _settled_volume(self, name: str) -> VolumeObject | None:
        found = self.volumes.get(name)
        if found is None:
            raise NotFound(f"volume object {name} was deleted while it was being created")
        return found if found.settled else None

    @staticmethod
    def _same_or_conflict(existing: VolumeObject, request: VolumeRequest) -> None:
        asked = (request.backend, request.pool, request.encrypted, request.source_kind, request.source_name)
        has = (existing.backend, existing.pool, existing.encrypted, existing.source_kind, existing.source_name)
        if asked != has:
            raise AlreadyExists(f"volume {request.csi_name!r} already exists with other parameters")
        if existing.handle is not None:
            size = existing.size_bytes
            if size < request.required_bytes or (request.limit_bytes and size > request.limit_bytes):
                raise AlreadyExists(
                    f"volume {request.csi_name!r} already exists with {size} bytes, outside the requested range"
                )

    async def _check_kept(self, body: dict[str, Any]) -> None:
        """`FailedPrecondition` if the API server would drop the layout or cache from the object's spec (a
        LocalVolume CRD older than layouts prunes the fields it does not know): its node would make a plain volume.
        Asked with a dry run, so nothing is written before the answer."""
        try:
            made = await self.custom.create_cluster_custom_object(
                GROUP, VERSION, VOLUMES, body, dry_run="All", _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if is_status(exc, 409):
                return  # a concurrent attempt made it: that one was checked
            if is_status(exc, 422, 400):
                raise InvalidArgument(f"the API server refused the volume object: {getattr(exc, 'body', exc)}") from exc
            raise
        kept = {key: made.get("spec", {}).get(key) for key in ("layout", "cache")}
        if kept != {key: body["spec"].get(key) for key in ("layout", "cache")}:
            raise FailedPrecondition(
                "the LocalVolume CustomResourceDefinition of this cluster drops spec.layout and spec.cache (it is older"
                " than LVM layouts in the cluster shape), so the node would make a plain volume; apply"
                " examples/deploy/crds.yaml"
            )

    def _same_layout(self, existing: VolumeObject, request: VolumeRequest) -> None:
        """The layout and cache asked for against those the object holds: the same when spelled the same, or when
        they make the same volume in the pool as its node reports it (the pool's defaults for what one leaves out)."""
        if existing.layout == request.layout:
            return
        space = self._space(existing.node, existing.backend, existing.pool)
        if space is None or not space.same(existing.layout, request.layout):
            raise AlreadyExists(
                f"volume {request.csi_name!r} already exists with another layout or cache"
                f" ({existing.layout.parameters() or 'the pool defaults'}; this request asks for"
                f" {request.layout.parameters() or 'the pool defaults'})"
            )

    @staticmethod
    def _volume_body(name: str, request: VolumeRequest) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": request.csi_name,
            "node": request.node,
            "backend": request.backend,
            "requiredBytes": request.required_bytes,
            "limitBytes": request.limit_bytes,
            "encrypted": request.encrypted,
        }
        if request.pool:
            spec["pool"] = request.pool
        if request.source_kind and request.source_name:
            spec["source"] = {"kind": request.source_kind, "name": request.source_name}
        if request.io_limits:
            spec["ioLimits"] = dict(request.io_limits)
        spec.update(request.layout.spec())  # layout and cache: only when the StorageClass asks for one
        return {
            "apiVersion": API_VERSION,
            "kind": "LocalVolume",
            "metadata": {"name": name, "labels": {NODE_LABEL: label_value(request.node)}, "finalizers": [FINALIZER]},
            "spec": spec,
        }

    async def delete_volume(self, volume_id: str) -> None:
        await self.ready()
        if self.volumes.get(volume_id) is None and await self._get(VOLUMES, volume_id, VolumeObject.of) is None:
            return
        await self._delete(VOLUMES, volume_id)

        def gone() -> bool | None:
            found = self.volumes.get(volume_id)
            if found is None:
                return True
            if found.error is not None and found.deleting and found.phase == "Deleting":
                # the node's answer to the deletion; an error a failed create left (phase Failed) is none
                raise error_from_status(found.error, f"node {found.node}")
            return None

        await self._until(gone, f"deleting volume {volume_id}", plural=VOLUMES, name=volume_id)

    async def by_handle(self, volume_id: str) -> str:
        """The object name for a volume ID of the per-node shape (`<backend>:<pool>:<handle>`), found by the handle
        its adopted LocalVolume records; an ID that is already an object name is returned as it is."""
        return await self._by_handle(VOLUMES, VolumeObject.of, volume_id, "volume", "LocalVolume")

    async def snapshot_by_handle(self, snapshot_id: str) -> str:
        """`by_handle` for snapshots: the LocalSnapshot that records a snapshot ID of the per-node shape."""
        return await self._by_handle(SNAPSHOTS, SnapshotObject.of, snapshot_id, "snapshot", "LocalSnapshot")

    async def _by_handle(
        self,
        plural: str,
        parse: Callable[[dict[str, Any]], VolumeObject | SnapshotObject],
        object_id: str,
        what: str,
        kind: str,
    ) -> str:
        if ":" not in object_id:
            return object_id
        found: list[str] = sorted(o.name for o in self._cache(plural).values() if o.handle == object_id)
        if not found:  # the watch may lag behind the adoption that recorded it: ask the API server itself
            try:
                listed = await self.custom.list_cluster_custom_object(
                    GROUP, VERSION, plural, _request_timeout=REQUEST_TIMEOUT
                )
            except TRANSIENT as exc:
                raise Busy(f"cannot look {what} {object_id!r} up ({exc}); retry") from exc
            found = sorted(o.name for o in map(parse, listed.get("items") or []) if o.handle == object_id)
        if len(found) == 1:
            return found[0]
        if found:
            raise FailedPrecondition(f"{what} {object_id!r} is recorded by more than one {kind}: {found}")
        raise FailedPrecondition(
            f"{what} {object_id!r} has an ID of the per-node shape and no {kind} records it; run the node plugin of"
            " its node with --adopt once (docs/deploy.md, moving from the per-node shape)"
        )

    def volume(self, volume_id: str) -> VolumeObject:
        found = self.volumes.get(volume_id)
        if found is None or found.handle is None:
            raise NotFound(f"volume {volume_id!r} not found")
        return found

    async def expand_volume(self, volume_id: str, required: int, limit: int) -> VolumeObject:
        await self.ready()
        volume = self.volume(volume_id)
        if volume.size_bytes >= required and volume.required_bytes >= required:
            return volume
        return await self._change_spec(
            volume,
            {"requiredBytes": max(required, volume.required_bytes), "limitBytes": limit},
            f"growing volume {volume_id}",
            "it grew",
            lambda found: found.size_bytes >= required,
        )

    async def modify_volume(self, volume_id: str, limits: dict[str, int]) -> VolumeObject:
        """Record new I/O limits in the volume's spec and wait until its node agent has applied them (status)."""
        await self.ready()
        volume = self.volume(volume_id)
        if volume.io_limits == limits and volume.applied_io_limits == limits:
            return volume
        gone = {key: None for key in volume.io_limits if key not in limits}  # a merge patch removes with null
        return await self._change_spec(
            volume,
            {"ioLimits": {**gone, **limits}},
            f"changing the I/O limits of volume {volume_id}",
            "its I/O limits changed",
            lambda found: found.applied_io_limits == limits,
        )

    async def _change_spec(
        self,
        volume: VolumeObject,
        spec: dict[str, Any],
        what: str,
        meanwhile: str,
        done: Callable[[VolumeObject], bool],
    ) -> VolumeObject:
        """Patch the volume's spec (clearing an error a failed attempt left) and wait for its node's answer to that
        generation: the object once `done` holds of it, else the node's error raised."""
        name = volume.name
        if volume.error is not None:
            await self._retry(VOLUMES, name)
        patched = await self.custom.patch_cluster_custom_object(
            GROUP, VERSION, VOLUMES, name, {"spec": spec}, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
        )
        generation = int(patched["metadata"].get("generation") or 0)

        def answered() -> VolumeObject | None:
            found = self.volumes.get(name)
            if found is None:
                raise NotFound(f"volume {name!r} was deleted while {meanwhile}")
            if found.observed_generation >= generation and (found.error is not None or done(found)):
                return found
            return None

        since = str(patched["metadata"].get("resourceVersion", ""))
        answer = await self._until(answered, what, plural=VOLUMES, name=name, since=since)
        if answer.error is not None and not done(answer):
            raise error_from_status(answer.error, f"node {answer.node}")
        return answer

    # -- snapshots --------------------------------------------------------------------------------------------------

    async def create_snapshot(self, source_volume_id: str, csi_name: str) -> SnapshotObject:
        await self.ready()
        source = self.volume(source_volume_id)
        name = object_name(csi_name)
        existing = self.snapshots.get(name) or await self._get(SNAPSHOTS, name, SnapshotObject.of)
        if existing is not None:
            if existing.csi_name != csi_name or existing.source_volume != source_volume_id:
                raise AlreadyExists(f"snapshot {csi_name!r} already exists for another volume")
            if existing.deleting:
                raise Busy(f"snapshot {csi_name!r} is still being deleted; retry")
            since = ""
            if existing.error is not None and existing.handle is None:
                since = await self._retry(SNAPSHOTS, name)
        else:
            since = await self._create(
                SNAPSHOTS,
                {
                    "apiVersion": API_VERSION,
                    "kind": "LocalSnapshot",
                    "metadata": {
                        "name": name,
                        "labels": {NODE_LABEL: label_value(source.node)},
                        "finalizers": [FINALIZER],
                    },
                    "spec": {"name": csi_name, "node": source.node, "sourceVolume": source_volume_id},
                },
            )

        def settled() -> SnapshotObject | None:
            found = self.snapshots.get(name)
            if found is None:
                raise NotFound(f"snapshot object {name} was deleted while it was being created")
            return found if found.settled else None

        done = await self._until(settled, f"snapshot {csi_name!r}", plural=SNAPSHOTS, name=name, since=since)
        if done.handle is None and done.error is not None:
            raise error_from_status(done.error, f"node {done.node}")
        return done

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.ready()
        if (
            self.snapshots.get(snapshot_id) is None
            and await self._get(SNAPSHOTS, snapshot_id, SnapshotObject.of) is None
        ):
            return
        await self._delete(SNAPSHOTS, snapshot_id)

        def gone() -> bool | None:
            found = self.snapshots.get(snapshot_id)
            if found is None:
                return True
            if found.error is not None and found.deleting and found.phase == "Deleting":
                raise error_from_status(found.error, f"node {found.node}")
            return None

        await self._until(gone, f"deleting snapshot {snapshot_id}", plural=SNAPSHOTS, name=snapshot_id)

    def snapshot(self, snapshot_id: str) -> SnapshotObject:
        found = self.snapshots.get(snapshot_id)
        if found is None or found.handle is None:
            raise NotFound(f"snapshot {snapshot_id!r} not found")
        return found

    # -- capacity ---------------------------------------------------------------------------------------------------

    def _fresh(self, node: str) -> NodeReport | None:
        report = self.nodes.get(node)
        return report if report is not None and report.fresh(self.settings.stale_after) else None

    def _space(self, node: str, backend: str, pool: str | None) -> PoolSpace | None:
        report = self.nodes.get(node)
        found = report.pool(backend, pool) if report is not None else None
        return found.space() if found is not None else None

    def capacity(
        self, node: str, backend: str, pool: str | None, layout: LayoutRequest | None = None
    ) -> tuple[int, int]:
        """(available, largest volume) of `node` for a StorageClass: 0 when the node is unknown, silent for longer
        than `stale_after`, or lacks the pool. With a `layout`, what volumes of that layout get, planned from the
        pool's PVs as the node reports them (`PoolSpace.capacity`, the numbers the node itself would answer); 0 from
        a pool that reports no PVs (not a thick LVM pool) or cannot make that layout."""
        report = self._fresh(node)
        if report is None:
            return 0, 0
        laid_out = layout is not None and not layout.empty
        if not backend:
            up = [p for p in report.pools if p.up]
            if laid_out:
                answers = [self._layout_capacity(p, layout) for p in up]
                return sum(a for a, _ in answers), max((m for _, m in answers), default=0)
            return sum(p.available_bytes for p in up), max((p.maximum_volume_bytes for p in up), default=0)
        found = report.pool(backend, pool)
        if found is None or not found.up:
            return 0, 0
        if laid_out:
            return self._layout_capacity(found, layout)
        return found.available_bytes, found.maximum_volume_bytes

    @staticmethod
    def _layout_capacity(pool: PoolReport, layout: LayoutRequest | None) -> tuple[int, int]:
        space = pool.space()
        if space is None or layout is None:
            return 0, 0
        try:
            answer = space.capacity(layout)
        except InvalidArgument:  # what this pool cannot take (a cache without cache PVs): nothing here
            return 0, 0
        return answer.available, answer.largest

    def check_layout(self, node: str, backend: str, pool: str | None, layout: LayoutRequest) -> None:
        """Before a volume of `layout` is asked of `node`: `InvalidArgument` if its pool can never make it (too few
        PVs, no cache PVs, not a thick LVM pool), as the node's backend would answer; `Busy` while the node has not
        reported lately (only a report proves its agent carries layouts to its disks, not a plain volume). A pool
        that is unknown or down is left for the node to answer."""
        if layout.empty:
            return
        report = self._fresh(node)
        if report is None:
            raise Busy(f"node {node} has not reported its pools lately; a volume with a layout waits for that; retry")
        found = report.pool(backend, pool)
        if found is None or not found.up:
            return
        space = found.space()
        if space is None:
            raise InvalidArgument(
                f"{found.backend} pool {found.pool!r} on node {node} makes no LVM layouts or caches (parameters"
                f" {sorted(layout.parameters())}): it reports no PVs, being no thick LVM pool, or its node agent"
                " (or the LocalNode CRD, which would drop status.pools[].layoutSpace) is older than layouts in the"
                " cluster shape"
            )
        space.check(layout, f"{found.backend} pool {found.pool!r} on node {node}")

    def features(self) -> tuple[bool, bool]:
        """Whether any node offers snapshots, clones."""
        pools = [p for n in self.nodes.values() for p in n.pools]
        return any(p.snapshots for p in pools), any(p.clones for p in pools)

    # -- API plumbing -----------------------------------------------------------------------------------------------

    async def _get(self, plural: str, name: str, parse: Callable[[dict[str, Any]], T]) -> T | None:
        try:
            return parse(
                await self.custom.get_cluster_custom_object(
                    GROUP, VERSION, plural, name, _request_timeout=REQUEST_TIMEOUT
                )
            )
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return None
            raise

    async def _create(self, plural: str, body: dict[str, Any]) -> str:
        """Create an object; returns its resourceVersion ("" when a concurrent attempt made it first)."""
        try:
            made = await self.custom.create_cluster_custom_object(
                GROUP, VERSION, plural, body, _request_timeout=REQUEST_TIMEOUT
            )
            return str(made["metadata"].get("resourceVersion", ""))
        except TRANSIENT as exc:
            if is_status(exc, 409):
                return ""  # a concurrent attempt made it; waiting for its answer is the same
            if is_status(exc, 422, 400):
                raise InvalidArgument(
                    f"the API server refused the {plural} object: {getattr(exc, 'body', exc)}"
                ) from exc
            raise

    async def _delete(self, plural: str, name: str) -> None:
        try:
            await self.custom.delete_cluster_custom_object(
                GROUP, VERSION, plural, name, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404):
                raise

    async def _retry(self, plural: str, name: str) -> str:
        """Clear the node's last error, so its agent tries the object again; returns the new resourceVersion."""
        log.info("%s %s: asking its node to try again", plural, name)
        patched = await self.custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            plural,
            name,
            {"status": {"error": None, "observedGeneration": 0}},
            _content_type=MERGE,
            _request_timeout=REQUEST_TIMEOUT,
        )
        return str(patched["metadata"].get("resourceVersion", ""))


class LostNodeObjects:
    """The LocalVolumes and LocalSnapshots of a lost node, for the node-loss clean-up (`LostNodeExtension`).

    No agent will ever remove their finalizers, so after the grace period this does: snapshots go, and so does
    every volume whose PV is gone (the clean-up deletes Delete-policy PVs first, so such a volume goes on the pass
    after). A volume whose PV has the Retain policy keeps its object, the record of what was on the lost disks.
    """

    name = "LocalVolume and LocalSnapshot objects"

    def __init__(self, api: Any) -> None:
        self.custom: Any = client.CustomObjectsApi(api)
        self.core: Any = client.CoreV1Api(api)

    async def _list(self, plural: str, node: str | None = None) -> list[dict[str, Any]]:
        selector = {"label_selector": f"{NODE_LABEL}={label_value(node)}"} if node else {}
        listed = await self.custom.list_cluster_custom_object(
            GROUP, VERSION, plural, _request_timeout=REQUEST_TIMEOUT, **selector
        )
        return list(listed.get("items") or [])

    async def nodes(self) -> set[str]:
        found: set[str] = set()
        for plural in (VOLUMES, SNAPSHOTS):
            try:
                items = await self._list(plural)
            except TRANSIENT as exc:
                if is_status(exc, 404):  # the custom resources are not installed: nothing of ours to clean
                    return set()
                raise
            found.update(str((item.get("spec") or {}).get("node", "")) for item in items)
        return found - {""}

    async def release(self, node: str, *, dry_run: bool) -> list[str]:
        pvs = (await self.core.list_persistent_volume(_request_timeout=REQUEST_TIMEOUT)).items or []
        claimed = {
            pv.spec.csi.volume_handle: pv.spec.persistent_volume_reclaim_policy
            for pv in pvs
            if pv.spec is not None and pv.spec.csi is not None
        }
        done = []
        for item in await self._list(SNAPSHOTS, node):
            snapshot = SnapshotObject.of(item)
            if snapshot.node == node:
                done.append(f"LocalSnapshot {snapshot.name}")
                if not dry_run:
                    await self._remove(SNAPSHOTS, snapshot.name)
        for item in await self._list(VOLUMES, node):
            volume = VolumeObject.of(item)
            if volume.node != node or volume.name in claimed:
                continue  # Retain: kept for good; any other PV: released first, this object on the next pass
            done.append(f"LocalVolume {volume.name}")
            if not dry_run:
                await self._remove(VOLUMES, volume.name)
        return done

    async def _remove(self, plural: str, name: str) -> None:
        try:
            await self.custom.delete_cluster_custom_object(
                GROUP, VERSION, plural, name, _request_timeout=REQUEST_TIMEOUT
            )
            await self.custom.patch_cluster_custom_object(
                GROUP,
                VERSION,
                plural,
                name,
                {"metadata": {"finalizers": None}},
                _content_type=MERGE,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except TRANSIENT as exc:
            if not is_status(exc, 404):
                raise
