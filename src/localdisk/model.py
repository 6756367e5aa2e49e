"""Value types exchanged between the core, the backends and the adapters: frozen, comparable, printable.

A volume ID is `<backend>:<pool>:<handle>`: DeleteVolume gets nothing but the ID, so it must name the backend and
the pool that hold the volume, and the backend's own on-disk identifier (an LV name, a PARTUUID).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from localdisk.errors import NotFound

MAX_ID_LENGTH = 128  # CSI: volume and snapshot IDs are at most 128 bytes
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")  # backend and pool names


@dataclass(frozen=True)
class ObjectRef:
    """Where a volume or snapshot lives: backend kind, pool name, backend-specific handle."""

    backend: str
    pool: str
    handle: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.pool}:{self.handle}"

    @classmethod
    def parse(cls, object_id: str, what: str = "volume") -> ObjectRef:
        parts = object_id.split(":", 2)
        if (
            len(object_id.encode()) > MAX_ID_LENGTH
            or len(parts) != 3
            or not NAME_PATTERN.match(parts[0])
            or not NAME_PATTERN.match(parts[1])
            or not parts[2]
        ):
            raise NotFound(f"{what} id {object_id!r} is not a localdisk {what} id (<backend>:<pool>:<handle>)")
        return cls(parts[0], parts[1], parts[2])


class SourceKind(Enum):
    SNAPSHOT = "snapshot"
    VOLUME = "volume"


@dataclass(frozen=True)
class ContentSource:
    kind: SourceKind
    id: str


@dataclass(frozen=True)
class Volume:
    ref: ObjectRef
    name: str
    size_bytes: int
    source: ContentSource | None = None
    device_path: str | None = None
    abnormal: str | None = None  # why the volume is unhealthy, or None when it is fine
    degraded: str | None = None  # still serving, but needs care (a mirror that lost a copy); unlike `abnormal`, usable
    encrypted: bool = False  # a LUKS2 container per volume (recorded with the volume by its backend)

    @property
    def id(self) -> str:
        return str(self.ref)


@dataclass(frozen=True)
class PendingVolume:
    """A volume a create began and did not finish (cancelled, failed, killed): it holds space but is never handed
    out. `name` is its CSI name when the backend knows it (the guard a reclaim holds against a create of that name)."""

    ref: ObjectRef
    name: str | None
    size_bytes: int

    @property
    def id(self) -> str:
        return str(self.ref)


@dataclass(frozen=True)
class Snapshot:
    ref: ObjectRef
    name: str
    source_volume_id: str
    size_bytes: int
    created_at: datetime
    ready: bool = True

    @property
    def id(self) -> str:
        return str(self.ref)


@dataclass(frozen=True)
class Capacity:
    """What a pool can still give: `available_bytes` in total, at most `maximum_volume_bytes` in one volume."""

    total_bytes: int
    available_bytes: int
    maximum_volume_bytes: int
    details: dict[str, int] = field(default_factory=dict)  # backend-specific figures (thin data use, ...)


@dataclass(frozen=True)
class Features:
    """What a backend supports and how it sizes volumes."""

    snapshots: bool = False
    clones: bool = False
    expansion: bool = True
    alignment: int = 1024 * 1024
    minimum_size: int = 1024 * 1024
    default_size: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class VolumeSpec:
    """A create request as a backend sees it: the size is already resolved and aligned."""

    name: str
    size_bytes: int
    source: ContentSource | None = None
    source_handle: str | None = None  # the handle of the source, in this same backend and pool
    encrypted: bool = False  # record the volume as encrypted (LUKS2, formatted by the node on first stage)
    parameters: Mapping[str, str] = field(default_factory=dict)  # backend-specific StorageClass parameters (layout)
