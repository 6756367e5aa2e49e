"""The `VolumeBackend` protocol: what every storage backend offers the core.

Backends speak in handles (their own on-disk identifiers); the core turns handles into volume IDs and back. Every
method is idempotent where CSI needs it: deleting a missing volume succeeds, `find_volume` returns None rather than
raising. Snapshot methods raise `Unsupported` unless `features.snapshots` is true.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import anyio

from localdisk.model import Capacity, Features, PendingVolume, Snapshot, Volume, VolumeSpec

log = logging.getLogger(__name__)
# StorageClass parameters that belong to a backend rather than to the core (`TakesParameters`): the LVM layouts.
BACKEND_PARAMETERS = frozenset({"stripes", "stripeSize", "mirrors", "pvTags", "cache", "cacheSize"})
CANCELLED_CLEANUP_SECONDS = 10.0  # how long a cancelled create may spend removing what it left pending


@runtime_checkable
class VolumeBackend(Protocol):
    kind: str
    pool: str
    features: Features

    async def open(self) -> None:
        """Check the pool is usable and make it ready (activate VGs, say). Called once before use."""

    async def aclose(self) -> None:
        """Release what `open` acquired (processes, caches)."""

    async def create_volume(self, spec: VolumeSpec) -> Volume: ...

    async def delete_volume(self, handle: str) -> None: ...

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume: ...

    async def get_volume(self, handle: str) -> Volume:
        """The volume with that handle; `NotFound` if it does not exist or is not ours."""

    async def find_volume(self, name: str) -> Volume | None: ...

    async def list_volumes(self) -> list[Volume]: ...

    async def capacity(self) -> Capacity: ...

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot: ...

    async def delete_snapshot(self, handle: str) -> None: ...

    async def get_snapshot(self, handle: str) -> Snapshot: ...

    async def find_snapshot(self, name: str) -> Snapshot | None: ...

    async def list_snapshots(self) -> list[Snapshot]: ...


@runtime_checkable
class TakesParameters(Protocol):
    """A backend with StorageClass parameters of its own (the LVM backends' layouts: stripes, mirrors, PV tags,
    caches). The core passes them through in `VolumeSpec.parameters`; a backend without this protocol is given none.
    """

    @property
    def parameters(self) -> frozenset[str]:
        """The StorageClass parameters it reads."""

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        """`InvalidArgument` for values that are no valid request for this pool."""

    async def capacity_for(self, parameters: Mapping[str, str]) -> Capacity:
        """What volumes made with these parameters can get (GetCapacity of a StorageClass that sets them)."""

    async def check_same(self, volume: Volume, parameters: Mapping[str, str]) -> None:
        """`AlreadyExists` if existing `volume` was made otherwise than these parameters ask (a create of its name
        with another layout): CSI's same name with incompatible parameters, as for a size outside the range."""


@runtime_checkable
class DescribesLayouts(Protocol):
    """A backend whose layouts can be planned away from its node (the thick LVM backend): it describes its space
    (each PV's free space and tags, its defaults) in bounded JSON, which a node agent reports to the cluster's
    controller, and from which that controller answers GetCapacity and chooses nodes for a StorageClass's layout
    (`localdisk.backends.lvmspace`)."""

    async def layout_space(self) -> dict[str, Any]: ...


@runtime_checkable
class CachedState(Protocol):
    """A backend that answers reads from a cached view of its disks and wants it re-read in the background.

    `VolumeManager.keep_fresh` calls `refresh_state` every `refresh_interval` seconds, so reads (GetCapacity,
    ListVolumes) find a fresh view instead of paying for a re-read themselves. An interval of 0 means no cache.
    """

    @property
    def refresh_interval(self) -> float: ...

    async def refresh_state(self) -> None: ...


@runtime_checkable
class PendingVolumes(Protocol):
    """A backend whose creates go through a pending state on disk, which a cancelled or killed create can leave.

    A pending volume holds space (GetCapacity counts it) but is never found by name or handed out; a retried create
    of the same name finishes it. `VolumeManager.keep_fresh` removes those nobody retries once they have been
    pending for the manager's grace period.
    """

    async def pending_volumes(self) -> list[PendingVolume]:
        """The pending volumes of this pool (from the cached view where there is one)."""

    async def reclaim_pending(self, handle: str) -> bool:
        """Delete the pending volume `handle` as a delete would (wiping as the pool says) if it is still pending;
        True if it was removed. `Busy` while a create in this process is working on it."""


@runtime_checkable
class UsesDisks(Protocol):
    """A backend that can say which of the node's disks it uses (a node's LocalNode object lists them)."""

    async def disks(self) -> tuple[str, ...]:
        """The device paths of the disks this pool uses now (as its last view saw them; "[unknown]" for a missing
        LVM PV)."""


async def finish_despite_cancellation(cleanup: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `cleanup` to its end, for at most `CANCELLED_CLEANUP_SECONDS`, although the calling task is being
    cancelled; its failure is logged, not raised (the caller re-raises its cancellation).

    A shielded cancel scope is not enough on asyncio: grpclib cancels a handler's task natively (`Task.cancel`), once
    when the deadline passes and again when the client resets the stream, and a native cancel goes through anyio's
    shield. So the cleanup runs in a task of its own, which the caller waits for, swallowing further cancels.
    """

    async def bounded() -> None:
        with anyio.move_on_after(CANCELLED_CLEANUP_SECONDS) as scope:
            await cleanup()
        if scope.cancelled_caught:
            log.warning("%s: gave up after %ss; the background reclaim will finish it", what, CANCELLED_CLEANUP_SECONDS)

    task = asyncio.get_running_loop().create_task(bounded())
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue  # our own task cancelled again: keep waiting, the caller raises its cancellation after
            except Exception as exc:
                log.warning("%s failed: %s; the background reclaim will finish it", what, exc)
