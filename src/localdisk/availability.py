"""Pools that degrade instead of taking the node plugin down: a pool that cannot open is served as unavailable.

One node config serves many unlike nodes, and a disk can be missing, late or dead on any of them. If one pool's
failure stopped the server, kubelet could no longer unpublish or unstage the node's other volumes. So every pool
is wrapped in an `Available`: when its backend's `open` fails, the pool is *down* with the reason, and instead of
raising at start-up it answers

* capacity 0 (GetCapacity, hence CSIStorageCapacity: the scheduler looks elsewhere),
* `FailedPrecondition` naming the pool and the reason for anything that needs it (create, expand, delete, ...),
* nothing for listings and name lookups (a volume of a down pool is not offered, and not lost: it is still on its
  disks for when the pool comes back),

while every other pool and the Node service go on. `VolumeManager.retry_unavailable` opens down pools again in the
background, so a disk attached later comes up without a restart. A pool that is up goes down the same way when the
background re-read of its state (`refresh_state`) finds it gone (its VG vanished, its only disk died), or when any
call finds its storage gone (`PoolGone`: a disk died or was pulled under it): that call is refused with the reason,
and the listings and name lookups of every other pool's calls go on without it.

A pool can also be *retired*: the node no longer serves it to new volumes (its node labels stopped selecting it,
`VolumeManager.select`). It reports as down with that reason and capacity 0, and refuses creates, but keeps serving
the volumes it holds (stage, grow, snapshot, delete), which live on its disks and must not be stranded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from localdisk.backend import CachedState, PendingVolumes, UsesDisks, VolumeBackend
from localdisk.errors import FailedPrecondition, LocalDiskError, NotFound, PoolGone
from localdisk.model import Capacity, Features, PendingVolume, Snapshot, Volume, VolumeSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REASON = 400  # a reason is shown in statuses, metrics labels and events: keep it readable


@dataclass(frozen=True)
class PoolState:
    up: bool
    reason: str | None = None  # why the pool is down
    since: float = 0.0  # time.time() of the last change


class Available:
    """A `VolumeBackend` that stays usable as an object when the pool behind it is not."""

    def __init__(self, inner: VolumeBackend) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.pool = inner.pool
        self.state = PoolState(up=True, since=time.time())  # not known to be down until an open says so
        self.attempts = 0
        self._opened = False  # the inner pool opened once: it holds what `aclose` releases, down or not
        self.retired: PoolState | None = None  # set while the pool takes no new volumes: why, since when

    def retire(self, reason: str) -> None:
        """Take no new volumes from now on, for `reason`; the volumes the pool holds stay served."""
        if self.retired is None:
            log.warning("%s pool %r takes no new volumes: %s", self.kind, self.pool, reason)
            self.retired = PoolState(up=False, reason=reason[:MAX_REASON], since=time.time())

    def reinstate(self) -> None:
        if self.retired is not None:
            log.info("%s pool %r takes new volumes again", self.kind, self.pool)
            self.retired = None

    @property
    def reported(self) -> PoolState:
        """The state to show (metrics, LocalNode, Events, `localdisk capacity`): retired counts as down."""
        return self.retired or self.state

    @property
    def features(self) -> Features:
        return self.inner.features

    @features.setter
    def features(self, value: Features) -> None:
        self.inner.features = value

    @property
    def up(self) -> bool:
        return self.state.up

    async def open(self) -> None:
        """Open the pool; a failure marks it down with the reason instead of raising."""
        self.attempts += 1
        try:
            await self.inner.open()
        except (LocalDiskError, OSError) as exc:
            reason = (getattr(exc, "message", None) or str(exc))[:MAX_REASON]
            if self.state.up or self.state.reason != reason:
                log.warning("%s pool %r is unavailable: %s; retrying in the background", self.kind, self.pool, reason)
                self.state = PoolState(up=False, reason=reason, since=time.time())
            return
        self._opened = True
        if not self.state.up:
            if self.attempts > 1:
                log.info("%s pool %r is available again", self.kind, self.pool)
            self.state = PoolState(up=True, since=time.time())

    async def aclose(self) -> None:
        if self._opened or self.state.up:
            await self.inner.aclose()

    def _need(self) -> VolumeBackend:
        if not self.state.up:
            raise FailedPrecondition(
                f"{self.kind} pool {self.pool!r} is unavailable on this node: {self.state.reason};"
                " it is retried in the background"
            )
        return self.inner

    # -- CachedState, when the backend keeps one ----------------------------------------------------------------
    @property
    def refresh_interval(self) -> float:
        """The backend's own interval, also while the pool is down: `keep_fresh` picks its jobs once, and a pool
        that comes up later must be kept fresh too (`refresh_state` does nothing while it is down)."""
        inner = self.inner
        return inner.refresh_interval if isinstance(inner, CachedState) else 0.0

    async def refresh_state(self) -> None:
        """Re-read the pool's state; a pool found gone under the running server (its VG or disk vanished or died:
        `NotFound`, `FailedPrecondition`) goes down with the reason, and `retry_unavailable` opens it again."""
        if isinstance(self.inner, CachedState) and self.state.up:
            try:
                await self.inner.refresh_state()
            except (NotFound, FailedPrecondition) as exc:
                self.fail(exc.message)

    def fail(self, reason: str) -> None:
        """Mark the pool down while it runs (a dead disk, a vanished VG): capacity 0, calls that need it refused."""
        reason = reason[:MAX_REASON]
        if self.state.up or self.state.reason != reason:
            log.warning("%s pool %r went down: %s; retrying in the background", self.kind, self.pool, reason)
            self.state = PoolState(up=False, reason=reason, since=time.time())

    # -- PendingVolumes, when the backend has them: none while down ---------------------------------------------
    async def pending_volumes(self) -> list[PendingVolume]:
        inner = self.inner
        if not isinstance(inner, PendingVolumes):
            return []
        return await self._read(inner.pending_volumes, [])

    async def reclaim_pending(self, handle: str) -> bool:
        inner = self._need()
        return await self._call(inner.reclaim_pending, handle) if isinstance(inner, PendingVolumes) else False

    # -- reads that have an answer while down ---------------------------------------------------------------------
    async def disks(self) -> tuple[str, ...]:
        """The disks the pool uses, when it is up and its backend can say; none otherwise."""
        inner = self.inner
        return await self._read(inner.disks, ()) if isinstance(inner, UsesDisks) else ()

    async def capacity(self) -> Capacity:
        none = Capacity(total_bytes=0, available_bytes=0, maximum_volume_bytes=0)
        return none if self.retired is not None else await self._read(self.inner.capacity, none)

    async def find_volume(self, name: str) -> Volume | None:
        return await self._read(lambda: self.inner.find_volume(name), None)

    async def list_volumes(self) -> list[Volume]:
        return await self._read(self.inner.list_volumes, [])

    async def find_snapshot(self, name: str) -> Snapshot | None:
        return await self._read(lambda: self.inner.find_snapshot(name), None)

    async def list_snapshots(self) -> list[Snapshot]:
        return await self._read(self.inner.list_snapshots, [])

    async def _read(self, read: Callable[[], Awaitable[T]], down: T) -> T:
        """`read()` while the pool is up; `down` while it is down, or once the read found its storage gone."""
        if not self.state.up:
            return down
        try:
            return await read()
        except PoolGone as exc:
            self.fail(exc.message)
            return down

    # -- everything else needs the pool -----------------------------------------------------------------------
    async def create_volume(self, spec: VolumeSpec) -> Volume:
        backend = self._need()
        if self.retired is not None:
            existing = await self._call(backend.find_volume, spec.name)  # a retried create of a volume it holds
            if existing is None:
                raise FailedPrecondition(
                    f"{self.kind} pool {self.pool!r} takes no new volumes on this node: {self.retired.reason}"
                )
        return await self._call(backend.create_volume, spec)

    async def delete_volume(self, handle: str) -> None:
        await self._call(self._need().delete_volume, handle)

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        return await self._call(self._need().expand_volume, handle, size_bytes)

    async def get_volume(self, handle: str) -> Volume:
        return await self._call(self._need().get_volume, handle)

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        return await self._call(self._need().create_snapshot, source_handle, name)

    async def delete_snapshot(self, handle: str) -> None:
        await self._call(self._need().delete_snapshot, handle)

    async def get_snapshot(self, handle: str) -> Snapshot:
        return await self._call(self._need().get_snapshot, handle)

    async def _call(self, call: Callable[..., Awaitable[T]], *args: object) -> T:
        """`call(*args)`; if it finds the pool's storage gone, the pool goes down with that reason and the call is
        refused with it (FAILED_PRECONDITION)."""
        try:
            return await call(*args)
        except PoolGone as exc:
            self.fail(exc.message)
            raise
