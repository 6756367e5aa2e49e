"""The `VolumeBackend` protocol: what every storage backend offers the core.

Backends speak in handles (their own on-disk identifiers); the core turns handles into volume IDs and back. Every
method is idempotent where CSI needs it: deleting a missing volume succeeds, `find_volume` returns None rather than
raising. Snapshot methods raise `Unsupported` unless `features.snapshots` is true.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from localdisk.model import Capacity, Features, Snapshot, Volume, VolumeSpec


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
class CachedState(Protocol):
    """A backend that answers reads from a cached view of its disks and wants it re-read in the background.

    `VolumeManager.keep_fresh` calls `refresh_state` every `refresh_interval` seconds, so reads (GetCapacity,
    ListVolumes) find a fresh view instead of paying for a re-read themselves. An interval of 0 means no cache.
    """

    @property
    def refresh_interval(self) -> float: ...

    async def refresh_state(self) -> None: ...
