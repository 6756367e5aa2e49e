"""An in-memory backend: for examples, CSI-layer tests and library users without root or disks.

It obeys the same contract suite as the real backends (sizes, idempotency, capacity accounting, snapshots and
clones), so code written against it behaves the same on LVM. Nothing survives the process, unless the pool names a
`state_file`: then its volumes and snapshots are kept there (rewritten whole, atomically, after every change), so a
restarted server finds them again, the way it would on a disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from localdisk.errors import FailedPrecondition, InsufficientCapacity, NotFound
from localdisk.model import Capacity, ContentSource, Features, ObjectRef, Snapshot, SourceKind, Volume, VolumeSpec
from localdisk.registry import BackendSpec, PoolConfig
from localdisk.runner import CommandRunner
from localdisk.sizes import GiB, MiB


class FakePoolConfig(PoolConfig):
    size_bytes: int = 100 * GiB
    """Capacity the pool pretends to have."""
    latency_seconds: float = 0.0
    """Delay added to every change, to make concurrency observable in tests."""
    state_file: Path | None = None
    """Where the pool keeps its volumes and snapshots across restarts; in memory only when unset."""


class FakeBackend:
    kind = "fake"

    def __init__(self, pool: str, config: FakePoolConfig) -> None:
        self.pool = pool
        self.config = config
        self.features = Features(snapshots=True, clones=True, alignment=MiB, minimum_size=MiB)
        self._volumes: dict[str, Volume] = {}
        self._snapshots: dict[str, Snapshot] = {}

    async def open(self) -> None:
        path = self.config.state_file
        if path is None or not path.exists():
            return
        try:
            state = json.loads(path.read_text())
            self._volumes = {v.ref.handle: v for v in map(_volume, state["volumes"])}
            self._snapshots = {s.ref.handle: s for s in map(_snapshot, state["snapshots"])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"fake pool {self.pool!r}: cannot read its state file {path}: {exc}") from exc

    def _save(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        state = {
            "volumes": [_volume_record(v) for v in self._volumes.values()],
            "snapshots": [_snapshot_record(s) for s in self._snapshots.values()],
        }
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(state))
        os.replace(partial, path)

    async def aclose(self) -> None:
        return None

    def _handle(self, prefix: str, name: str) -> str:
        return prefix + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:24]

    def _used(self) -> int:
        return sum(v.size_bytes for v in self._volumes.values()) + sum(s.size_bytes for s in self._snapshots.values())

    def _reserve(self, size: int) -> None:
        free = self.config.size_bytes - self._used()
        if size > free:
            raise InsufficientCapacity(f"fake pool {self.pool!r} has {free} bytes free, {size} requested")

    async def _pause(self) -> None:
        if self.config.latency_seconds:
            await anyio.sleep(self.config.latency_seconds)

    async def create_volume(self, spec: VolumeSpec) -> Volume:
        handle = self._handle("v", spec.name)
        if handle in self._volumes:
            return self._volumes[handle]
        self._reserve(spec.size_bytes)
        if spec.source_handle is not None and spec.source_handle not in self._volumes | self._snapshots:
            raise NotFound(f"{spec.source.kind.value if spec.source else 'source'} {spec.source_handle!r} not found")
        await self._pause()
        volume = Volume(ObjectRef(self.kind, self.pool, handle), spec.name, spec.size_bytes, spec.source)
        self._reserve(spec.size_bytes)  # re-check after the pause: another create may have taken the space
        self._volumes[handle] = volume
        self._save()
        return volume

    async def delete_volume(self, handle: str) -> None:
        await self._pause()
        self._volumes.pop(handle, None)
        self._save()

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        volume = await self.get_volume(handle)
        if size_bytes <= volume.size_bytes:
            return volume
        self._reserve(size_bytes - volume.size_bytes)
        await self._pause()
        grown = replace(volume, size_bytes=size_bytes)
        self._volumes[handle] = grown
        self._save()
        return grown

    async def get_volume(self, handle: str) -> Volume:
        try:
            return self._volumes[handle]
        except KeyError:
            raise NotFound(f"volume {handle!r} not found in fake pool {self.pool!r}") from None

    async def find_volume(self, name: str) -> Volume | None:
        return self._volumes.get(self._handle("v", name))

    async def list_volumes(self) -> list[Volume]:
        return list(self._volumes.values())

    async def capacity(self) -> Capacity:
        free = max(self.config.size_bytes - self._used(), 0)
        return Capacity(self.config.size_bytes, free, free)

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        handle = self._handle("s", name)
        if handle in self._snapshots:
            return self._snapshots[handle]
        source = await self.get_volume(source_handle)
        self._reserve(source.size_bytes)
        await self._pause()
        snapshot = Snapshot(
            ObjectRef(self.kind, self.pool, handle), name, source.id, source.size_bytes, datetime.now(UTC)
        )
        self._snapshots[handle] = snapshot
        self._save()
        return snapshot

    async def delete_snapshot(self, handle: str) -> None:
        self._snapshots.pop(handle, None)
        self._save()

    async def get_snapshot(self, handle: str) -> Snapshot:
        try:
            return self._snapshots[handle]
        except KeyError:
            raise NotFound(f"snapshot {handle!r} not found in fake pool {self.pool!r}") from None

    async def find_snapshot(self, name: str) -> Snapshot | None:
        return self._snapshots.get(self._handle("s", name))

    async def list_snapshots(self) -> list[Snapshot]:
        return list(self._snapshots.values())


def _ref(text: str) -> ObjectRef:
    backend, pool, handle = text.split(":", 2)
    return ObjectRef(backend, pool, handle)


def _volume_record(volume: Volume) -> dict[str, Any]:
    source = volume.source
    return {
        "ref": str(volume.ref),
        "name": volume.name,
        "size_bytes": volume.size_bytes,
        "source": None if source is None else {"kind": source.kind.value, "id": source.id},
        "encrypted": volume.encrypted,
    }


def _volume(record: dict[str, Any]) -> Volume:
    source = record["source"]
    content = None if source is None else ContentSource(SourceKind(source["kind"]), str(source["id"]))
    size = int(record["size_bytes"])
    return Volume(_ref(record["ref"]), str(record["name"]), size, content, encrypted=bool(record["encrypted"]))


def _snapshot_record(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "ref": str(snapshot.ref),
        "name": snapshot.name,
        "source": snapshot.source_volume_id,
        "size_bytes": snapshot.size_bytes,
        "created_at": snapshot.created_at.isoformat(),
    }


def _snapshot(record: dict[str, Any]) -> Snapshot:
    created = datetime.fromisoformat(record["created_at"])
    return Snapshot(_ref(record["ref"]), str(record["name"]), str(record["source"]), int(record["size_bytes"]), created)


def _factory(pool: str, config: PoolConfig, runner: CommandRunner) -> FakeBackend:
    assert isinstance(config, FakePoolConfig)
    return FakeBackend(pool, config)


BACKEND = BackendSpec("fake", FakePoolConfig, _factory, "in-memory volumes for development and tests")
