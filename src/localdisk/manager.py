"""`VolumeManager`: the library's entry point, and what the CSI server drives.

It owns the opened backends of a node, routes volume and snapshot IDs to them, resolves CSI capacity ranges into
sizes, enforces name idempotency across every pool, and refuses a second concurrent operation on the same volume
or name with `Busy` (ABORTED on the wire) instead of queueing it behind the first. Beside the CSI server it keeps
the backends' cached views fresh and removes the pending volumes that cancelled or killed creates left behind.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import anyio

from localdisk import registry
from localdisk.availability import Available, PoolState
from localdisk.backend import CachedState, DescribesLayouts, PendingVolumes, TakesParameters, VolumeBackend
from localdisk.config import PENDING_GRACE, NodeConfig
from localdisk.discovery import Discovers
from localdisk.errors import AlreadyExists, Busy, InvalidArgument, NotFound, OutOfRange, Unsupported
from localdisk.model import Capacity, ContentSource, ObjectRef, Snapshot, SourceKind, Volume, VolumeSpec
from localdisk.runner import CommandRunner
from localdisk.sizes import fits_range, resolve_size

log = logging.getLogger(__name__)
RETRY_INTERVAL = 30.0  # seconds between attempts to open a pool that is down


class KeyedGuard:
    """Marks keys as in use; a second holder is refused at once (CSI wants ABORTED, not a queue)."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        busy = [k for k in keys if k in self._held]
        if busy:
            raise Busy(f"an operation on {busy[0]} is already in progress; retry later")
        self._held.update(keys)
        try:
            yield
        finally:
            self._held.difference_update(keys)

    def __contains__(self, key: str) -> bool:
        return key in self._held


@dataclass(frozen=True)
class CreateRequest:
    name: str
    backend: str
    pool: str | None = None
    required_bytes: int = 0
    limit_bytes: int = 0
    source: ContentSource | None = None
    encrypted: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)  # the backend's own (`BACKEND_PARAMETERS`)


_HANDLE = attrgetter("ref.handle")


class IdOrder:
    """The volumes of every pool in the order of their IDs, cheaply when a pool lists the same handles as last time.

    ListVolumes pages are slices of the whole listing in ID order, so every page sorted every volume again, making
    each ID (`backend:pool:handle`) in a Python call: about 1.2 ms at 1000 volumes. A pool's volumes all share its ID
    prefix (the backend names its volumes' refs after itself; IDs are routed back to it by them), so within a pool
    ID order is handle order. Each pool's handles are read in C and compared with the last listing's; when they are
    the same (no volume came or went: the usual case between pages) the order found then is applied again to the
    volumes just listed, else the handles are sorted. The pools are joined in the order of their prefixes
    `backend:pool:`, which is the order of the IDs because no prefix begins another: names hold no colon (if one
    did, every ID is sorted). Holds one list of handles and one permutation per pool, for the pools last listed.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[list[str], list[int]]] = {}

    def arrange(self, listed: Mapping[tuple[str, str], list[Volume]]) -> list[Volume]:
        if any(":" in backend or ":" in pool for backend, pool in listed):
            return sorted((v for volumes in listed.values() for v in volumes), key=lambda v: v.id)
        known: dict[tuple[str, str], tuple[list[str], list[int]]] = {}
        arranged: list[Volume] = []
        for key in sorted(listed, key=lambda k: f"{k[0]}:{k[1]}:"):
            volumes = listed[key]
            handles = list(map(_HANDLE, volumes))
            order = self._known.get(key)
            if order is None or order[0] != handles:
                order = (handles, sorted(range(len(handles)), key=handles.__getitem__))
            known[key] = order
            arranged += map(volumes.__getitem__, order[1])
        self._known = known
        return arranged


class VolumeManager:
    def __init__(
        self,
        backends: Mapping[tuple[str, str], VolumeBackend],
        defaults: Mapping[str, str],
        *,
        pending_grace: float = PENDING_GRACE,
    ) -> None:
        # Every pool degrades on its own: one that cannot open is served as unavailable (`localdisk.availability`).
        self.backends: dict[tuple[str, str], Available] = {
            key: b if isinstance(b, Available) else Available(b) for key, b in backends.items()
        }
        self.defaults = dict(defaults)
        self.pending_grace = pending_grace
        self.pending_reclaimed: Counter[tuple[str, str]] = Counter()  # (backend, pool): leftovers removed
        self._pending_since: dict[str, float] = {}  # volume ID: when `reclaim_pending` first saw it pending
        self._guard = KeyedGuard()
        self._id_order = IdOrder()
        self._runner: CommandRunner | None = None  # what `select` builds new pools with (set by from_config)
        self.pools_may_change = False  # `select` may add pools later: `keep_fresh` then waits for them
        self._sleepers: set[anyio.Event] = set()  # the background loops' pauses, cut short by `disks_changed`

    @classmethod
    def from_config(cls, config: NodeConfig, runner: CommandRunner | None = None) -> VolumeManager:
        runner = runner or CommandRunner()
        backends: dict[tuple[str, str], VolumeBackend] = {}
        for entry in config.pools:
            spec = registry.get(entry.backend)
            backends[(entry.backend, entry.name)] = spec.factory(entry.name, entry.config, runner)
        manager = cls(backends, config.default_pools(), pending_grace=config.node.pending_grace_seconds)
        manager._runner = runner
        return manager

    async def select(self, config: NodeConfig, why: str) -> None:
        """Serve the pools of `config` from now on (the pools a node's labels select changed, `why`): a pool new to
        it is built and opened, one it lacks is retired (no new volumes; its volumes stay served), a retired one it
        has again is reinstated, and its default pools become the defaults."""
        wanted = {(entry.backend, entry.name): entry for entry in config.pools}
        for key, backend in self.backends.items():
            if key in wanted:
                backend.reinstate()
            else:
                backend.retire(why)
        for key, entry in wanted.items():
            if key not in self.backends:
                made = registry.get(entry.backend).factory(entry.name, entry.config, self._runner or CommandRunner())
                added = Available(made)
                await added.open()
                self.backends = {**self.backends, key: added}  # a new dict: loops over the old one go on unharmed
                log.info("%s pool %r is served from now on (%s)", entry.backend, entry.name, why)
        self.defaults = config.default_pools()

    async def open(self) -> None:
        """Open every pool. A pool that cannot open does not stop the others: it is down, with its reason
        (`pool_states`), until `retry_unavailable` opens it."""
        for backend in list(self.backends.values()):
            await backend.open()

    def pool_states(self) -> dict[tuple[str, str], PoolState]:
        return {key: backend.reported for key, backend in sorted(self.backends.items())}

    async def retry_unavailable(self, interval: float = RETRY_INTERVAL) -> None:
        """Open the pools that are down again every `interval` seconds, until cancelled: a disk attached or a VG
        made after start-up comes up without a restart."""
        while True:
            await self._pause(interval)
            for backend in list(self.backends.values()):
                if not backend.up:
                    await backend.open()

    def disks_changed(self, why: str) -> None:
        """A disk appeared, went or changed (`localdisk.diskevents`, `why`): every pool that finds its disks by rules
        discovers again and every pool that is down is tried again now, not at their next interval."""
        finding = self._finding_disks()
        for pool in finding.values():
            pool.discover_soon()
        log.info("%s: discovering again in %d pool(s), retrying those that are down", why, len(finding))
        for sleeper in self._sleepers:
            sleeper.set()

    def _finding_disks(self) -> dict[Available, Discovers]:
        """The pools that find their disks by rules: each served pool, and the backend in it that discovers."""
        return {b: b.inner for b in self.backends.values() if isinstance(b.inner, Discovers) and b.inner.finds_disks}

    async def _pause(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if `disks_changed` is called meanwhile; whether it was."""
        woken = anyio.Event()
        self._sleepers.add(woken)
        try:
            with anyio.move_on_after(seconds):
                await woken.wait()
        finally:
            self._sleepers.discard(woken)
        return woken.is_set()

    async def aclose(self) -> None:
        for backend in list(self.backends.values()):
            await backend.aclose()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[VolumeManager]:
        await self.open()
        try:
            yield self
        finally:
            await self.aclose()

    # -- routing ------------------------------------------------------------------------------------------------
    def pools(self) -> list[tuple[str, str]]:
        return sorted(self.backends)

    def backend(self, backend: str, pool: str | None = None) -> VolumeBackend:
        if not backend:
            raise InvalidArgument("parameter 'backend' is required (one of: " + ", ".join(self._kinds()) + ")")
        if backend not in self._kinds():
            raise InvalidArgument(
                f"backend {backend!r} is not configured on this node; configured: {', '.join(self._kinds()) or 'none'}"
            )
        if not pool:
            pool = self.defaults.get(backend)
            if pool is None:
                names = sorted(p for b, p in self.backends if b == backend)
                raise InvalidArgument(
                    f"backend {backend!r} has several pools ({', '.join(names)}) and none is the default;"
                    " set parameter 'pool'"
                )
        found = self.backends.get((backend, pool))
        if found is None:
            names = sorted(p for b, p in self.backends if b == backend)
            raise InvalidArgument(f"pool {pool!r} of backend {backend!r} is not configured; configured: {names}")
        return found

    def _kinds(self) -> list[str]:
        return sorted({b for b, _ in self.backends})

    def _locate(self, object_id: str, what: str = "volume") -> tuple[VolumeBackend, ObjectRef]:
        ref = ObjectRef.parse(object_id, what)
        found = self.backends.get((ref.backend, ref.pool))
        if found is None:
            raise NotFound(f"{what} {object_id!r}: pool {ref.pool!r} of backend {ref.backend!r} is not on this node")
        return found, ref

    # -- volumes ------------------------------------------------------------------------------------------------
    async def find_volume_by_name(self, name: str) -> Volume | None:
        for backend in self.backends.values():
            volume = await backend.find_volume(name)
            if volume is not None:
                return volume
        return None

    async def create_volume(self, request: CreateRequest) -> Volume:
        if not request.name:
            raise InvalidArgument("name is required")
        backend = self.backend(request.backend, request.pool)
        if request.parameters:
            self._check_parameters(backend, request.parameters)
        features = backend.features
        size = resolve_size(
            request.required_bytes,
            request.limit_bytes,
            alignment=features.alignment,
            default=features.default_size,
            minimum=features.minimum_size,
        )
        with self._guard.hold(f"name:{request.name}"):
            existing = await self.find_volume_by_name(request.name)
            if existing is not None:
                volume = self._same_or_conflict(existing, backend, request)
                inner = backend.inner if isinstance(backend, Available) else backend
                if isinstance(inner, TakesParameters):
                    await inner.check_same(volume, request.parameters)
                return volume
            source_handle = None
            if request.source is not None:
                source_handle, size = await self._check_source(backend, request.source, size, request.limit_bytes)
            return await backend.create_volume(
                VolumeSpec(request.name, size, request.source, source_handle, request.encrypted, request.parameters)
            )

    @staticmethod
    def _same_or_conflict(existing: Volume, backend: VolumeBackend, request: CreateRequest) -> Volume:
        where = (existing.ref.backend, existing.ref.pool)
        if where != (backend.kind, backend.pool):
            raise AlreadyExists(
                f"volume {request.name!r} already exists in {where[0]} pool {where[1]!r}, not in"
                f" {backend.kind} pool {backend.pool!r}"
            )
        if not fits_range(existing.size_bytes, request.required_bytes, request.limit_bytes):
            raise AlreadyExists(
                f"volume {request.name!r} already exists with {existing.size_bytes} bytes, outside the requested range"
            )
        if existing.source != request.source:
            raise AlreadyExists(f"volume {request.name!r} already exists with another content source")
        if existing.encrypted != request.encrypted and not (existing.encrypted and request.source):
            raise AlreadyExists(
                f"volume {request.name!r} already exists {'with' if existing.encrypted else 'without'} encryption"
            )
        return existing

    async def _check_source(
        self, backend: VolumeBackend, source: ContentSource, size: int, limit: int
    ) -> tuple[str, int]:
        what = source.kind.value
        if source.kind is SourceKind.SNAPSHOT and not backend.features.snapshots:
            raise Unsupported(f"backend {backend.kind!r} cannot create volumes from snapshots")
        if source.kind is SourceKind.VOLUME and not backend.features.clones:
            raise Unsupported(f"backend {backend.kind!r} cannot clone volumes")
        source_backend, ref = self._locate(source.id, what)
        if source_backend is not backend:
            raise InvalidArgument(
                f"{what} {source.id!r} is in {ref.backend} pool {ref.pool!r}; a volume made from it must be created"
                " in the same pool"
            )
        if source.kind is SourceKind.SNAPSHOT:
            source_size = (await backend.get_snapshot(ref.handle)).size_bytes
        else:
            source_size = (await backend.get_volume(ref.handle)).size_bytes
        if limit and source_size > limit:
            raise OutOfRange(f"{what} {source.id!r} has {source_size} bytes, more than limit_bytes {limit}")
        return ref.handle, max(size, source_size)

    async def delete_volume(self, volume_id: str) -> None:
        """Delete a volume; a volume that does not exist (or an ID that is not ours) is already deleted."""
        try:
            backend, ref = self._locate(volume_id)
        except NotFound:
            return
        with self._guard.hold(f"volume:{volume_id}"):
            await backend.delete_volume(ref.handle)

    async def get_volume(self, volume_id: str) -> Volume:
        backend, ref = self._locate(volume_id)
        return await backend.get_volume(ref.handle)

    async def expand_volume(self, volume_id: str, required_bytes: int, limit_bytes: int = 0) -> Volume:
        backend, ref = self._locate(volume_id)
        features = backend.features
        if not features.expansion:
            raise Unsupported(f"backend {backend.kind!r} cannot expand volumes")
        size = resolve_size(
            required_bytes, limit_bytes, alignment=features.alignment, default=0, minimum=features.minimum_size
        )
        with self._guard.hold(f"volume:{volume_id}"):
            volume = await backend.get_volume(ref.handle)
            if volume.size_bytes >= required_bytes:
                if limit_bytes and volume.size_bytes > limit_bytes:
                    raise OutOfRange(f"volume is already {volume.size_bytes} bytes, above limit_bytes {limit_bytes}")
                return volume
            return await backend.expand_volume(ref.handle, size)

    async def list_volumes(self) -> list[Volume]:
        """Every volume of every pool, in the order of their IDs (see `IdOrder`)."""
        listed = {key: await self.backends[key].list_volumes() for key in sorted(self.backends)}
        return self._id_order.arrange(listed)

    async def keep_fresh(self) -> None:
        """Until cancelled: re-read the cached state of every backend that keeps one, each at its own interval, and
        remove pending leftovers (`reclaim_pending`) every quarter of the grace period.

        Runs beside the CSI server: without it a read that finds the cache too old re-reads it inline, which at a
        thousand LVs costs a GetCapacity about a second, and the space of creates cancelled half-way stays taken
        until the same name is retried or the server restarts. A failed pass is logged; the next tick tries again.
        """
        due: dict[str, float] = {}  # job -> when it runs next
        while True:
            jobs = self._fresh_jobs()  # again each round: `select` may have added pools
            if not jobs and not self.pools_may_change:
                return
            now = anyio.current_time()
            for what, (interval, job) in jobs.items():
                if now >= due.get(what, 0.0):
                    due[what] = now + interval
                    try:
                        await job()
                    except Exception as exc:  # a cache stays as it was (reads fall back to reading themselves)
                        log.warning("%s failed: %s", what, exc)
            next_due = min((due[what] for what in jobs), default=anyio.current_time() + RETRY_INTERVAL)
            if await self._pause(max(next_due - anyio.current_time(), 0.05)):  # a disk event: discover now
                for backend in self._finding_disks():
                    due.pop(_refresh_job(backend), None)

    def _fresh_jobs(self) -> dict[str, tuple[float, Callable[[], Awaitable[object]]]]:
        jobs: dict[str, tuple[float, Callable[[], Awaitable[object]]]] = {
            _refresh_job(b): (b.refresh_interval, b.refresh_state)
            for b in self.backends.values()
            if isinstance(b, CachedState) and b.refresh_interval > 0
        }
        if any(isinstance(b.inner, PendingVolumes) for b in self.backends.values()):
            jobs["reclaiming pending volumes"] = (self.pending_grace / 4, self.reclaim_pending)
        return jobs

    async def reclaim_pending(self) -> int:
        """One pass over the pending volumes of every pool: remove those seen pending for the grace period; the
        number removed.

        Age is counted from the first pass that saw a volume pending (GPT tables keep no times), so after a restart
        a leftover gets a full grace period again. A volume is removed under the same guards as a create of its
        name and a delete of its ID, and the backend refuses (`Busy`) one a create of this process is working on,
        so an in-flight create, however slow, is never raced: its clock starts again once it is left alone.
        """
        now = anyio.current_time()
        since: dict[str, float] = {}
        removed = 0
        for key in sorted(self.backends):
            backend = self.backends[key]
            if not isinstance(backend.inner, PendingVolumes) or not backend.up:
                continue
            try:
                leftovers = await backend.pending_volumes()
            except Exception as exc:
                log.warning("listing the pending volumes of %s pool %r failed: %s", key[0], key[1], exc)
                prefix = f"{key[0]}:{key[1]}:"
                since.update({v: t for v, t in self._pending_since.items() if v.startswith(prefix)})
                continue
            for leftover in leftovers:
                since[leftover.id] = first = self._pending_since.get(leftover.id, now)
                if now - first < self.pending_grace:
                    continue
                guards = [f"volume:{leftover.id}"] + ([f"name:{leftover.name}"] if leftover.name is not None else [])
                try:
                    with self._guard.hold(*guards):
                        gone = await backend.reclaim_pending(leftover.ref.handle)
                except Busy:
                    since[leftover.id] = now  # being worked on: a full grace period again once it is left alone
                    continue
                except Exception as exc:
                    log.warning("reclaiming pending volume %s failed: %s; next pass retries", leftover.id, exc)
                    continue
                del since[leftover.id]
                if gone:
                    removed += 1
                    self.pending_reclaimed[key] += 1
                    log.info(
                        "reclaimed pending volume %s (%s, %d bytes): a create left it unfinished %.0f s ago or more",
                        leftover.id,
                        f"name {leftover.name!r}" if leftover.name is not None else "name unknown",
                        leftover.size_bytes,
                        now - first,
                        extra={"fields": {"volume": leftover.id, "backend": key[0], "pool": key[1]}},
                    )
        self._pending_since = since
        return removed

    async def capacity(
        self, backend: str, pool: str | None = None, parameters: Mapping[str, str] | None = None
    ) -> Capacity:
        """What the pool can give; with backend `parameters` (a layout), what volumes made with them can get."""
        found = self.backend(backend, pool)
        if not parameters:
            return await found.capacity()
        inner = self._check_parameters(found, parameters)
        if isinstance(found, Available) and not found.up:
            return Capacity(total_bytes=0, available_bytes=0, maximum_volume_bytes=0)
        return await inner.capacity_for(parameters)

    async def layout_space(self, backend: str, pool: str | None = None) -> dict[str, Any] | None:
        """The pool's space for planning layouts elsewhere (`DescribesLayouts`), or None: a pool that has none (not a
        thick LVM pool) or is down or takes no new volumes."""
        found = self.backend(backend, pool)
        if isinstance(found, Available) and (not found.up or found.retired is not None):
            return None
        inner = found.inner if isinstance(found, Available) else found
        return await inner.layout_space() if isinstance(inner, DescribesLayouts) else None

    @staticmethod
    def _check_parameters(backend: VolumeBackend, parameters: Mapping[str, str]) -> TakesParameters:
        """The backend that takes these StorageClass parameters; `InvalidArgument` if it takes none of them."""
        inner = backend.inner if isinstance(backend, Available) else backend
        if not isinstance(inner, TakesParameters):
            raise InvalidArgument(
                f"parameters {sorted(parameters)} are for LVM pools; backend {backend.kind!r} takes none of them"
            )
        unknown = sorted(set(parameters) - inner.parameters)
        if unknown:
            raise InvalidArgument(
                f"{backend.kind} pool {backend.pool!r} does not take parameters {unknown};"
                f" it takes {sorted(inner.parameters)}"
            )
        inner.check_parameters(parameters)
        return inner

    # -- snapshots ----------------------------------------------------------------------------------------------
    async def create_snapshot(self, source_volume_id: str, name: str) -> Snapshot:
        if not name:
            raise InvalidArgument("snapshot name is required")
        backend, ref = self._locate(source_volume_id)
        if not backend.features.snapshots:
            raise Unsupported(f"backend {backend.kind!r} does not support snapshots")
        with self._guard.hold(f"snapshot-name:{name}", f"volume:{source_volume_id}"):
            for other in self.backends.values():
                if other.features.snapshots and (existing := await other.find_snapshot(name)) is not None:
                    if existing.source_volume_id != source_volume_id:
                        raise AlreadyExists(f"snapshot {name!r} already exists for another volume")
                    return existing
            return await backend.create_snapshot(ref.handle, name)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        try:
            backend, ref = self._locate(snapshot_id, "snapshot")
        except NotFound:
            return
        if not backend.features.snapshots:
            return
        with self._guard.hold(f"snapshot:{snapshot_id}"):
            await backend.delete_snapshot(ref.handle)

    async def get_snapshot(self, snapshot_id: str) -> Snapshot:
        backend, ref = self._locate(snapshot_id, "snapshot")
        if not backend.features.snapshots:
            raise NotFound(f"snapshot {snapshot_id!r} not found: backend {backend.kind!r} has no snapshots")
        return await backend.get_snapshot(ref.handle)

    async def list_snapshots(self) -> list[Snapshot]:
        snapshots: list[Snapshot] = []
        for key in sorted(self.backends):
            if self.backends[key].features.snapshots:
                snapshots.extend(await self.backends[key].list_snapshots())
        return sorted(snapshots, key=lambda s: s.id)


def _refresh_job(backend: Available) -> str:
    return f"re-reading the state of {backend.kind} pool {backend.pool!r}"
