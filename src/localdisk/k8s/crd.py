"""localdisk's custom resources: where the controller and the node agents meet.

- `LocalVolume` (cluster-scoped): one per volume. The controller writes its spec (the CSI name, node, backend,
  pool, size asked, content source, encryption, LVM layout and cache) when CreateVolume or ControllerExpandVolume
  arrives; the agent of that node creates or grows the volume and writes the outcome into its status (phase, on-disk
  handle, size, or an error with a reason). The CSI volume ID is the object's name.
- `LocalSnapshot` (cluster-scoped): the same for snapshots; the snapshot ID is its name.
- `LocalNode` (cluster-scoped, named after the node): what one node agent has (pools, capacity, largest volume,
  health; for a thick LVM pool its PVs' free space and tags, from which layouts are planned) and a heartbeat;
  GetCapacity answers from it.

Objects are named after their CSI name (`object_name`), so a retried CreateVolume finds the object its first attempt
made. Each volume and snapshot carries the finalizer `FINALIZER`, removed by the node agent only once the volume is
gone from the disk: nothing on disk outlives its object, and no object vanishes while its volume is still there.

A failure is written as `status.error = {reason, message}`: the reason is the name of the domain error
(`localdisk.errors`), so the controller raises the very error the node met and the CSI layer maps it to its status.
The same outcome is not tried again until someone clears the error (`retry`): the controller does so when the CSI
call is retried, so the sidecar's own backoff paces the attempts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from localdisk import errors
from localdisk.backends.lvmspace import LayoutRequest, PoolSpace

GROUP = "localdisk.csi.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
VOLUMES = "localvolumes"
SNAPSHOTS = "localsnapshots"
NODES = "localnodes"
NODE_LABEL = f"{GROUP}/node"
"""On every volume and snapshot: the node that holds it, so each node agent watches only its own objects."""
ADOPTED = f"{GROUP}/adopted"
"""Annotation on a LocalVolume a node agent made for a volume of the per-node shape: the volume's on-disk ID."""
FINALIZER = f"{GROUP}/on-disk"
MERGE = "application/merge-patch+json"
"""The patch type every write of these objects uses (kubernetes-asyncio would pick JSON patch for a dict)."""
"""Removed by the node agent once nothing of the object is left on the disk."""

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def object_name(name: str) -> str:
    """The object name for a CSI name: the name itself when it is a valid one (`pvc-<uid>`, `snapshot-<uid>`, which
    is what the sidecars send), else `h-` and a hash of it. Never contains `:`, so it is never taken for a
    `<backend>:<pool>:<handle>` ID of the per-node shape."""
    if len(name) <= 63 and _LABEL.fullmatch(name) and not name.startswith("h-"):
        return name
    return "h-" + hashlib.sha256(name.encode()).hexdigest()[:56]


def label_value(node: str) -> str:
    """A node name as a label value (at most 63 characters; longer node names are hashed)."""
    return node if len(node) <= 63 and _LABEL.fullmatch(node) else object_name(node)


def node_selector(node: str) -> str:
    return f"{NODE_LABEL}={label_value(node)}"


# -- errors in status --------------------------------------------------------------------------------------------

_REASONS: dict[str, type[errors.LocalDiskError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.OutOfRange,
        errors.Unsupported,
        errors.FailedPrecondition,
        errors.InsufficientCapacity,
        errors.ConfigError,
        errors.Busy,
        errors.BackendFailure,
    )
}


def error_status(exc: errors.LocalDiskError) -> dict[str, str]:
    """`status.error` for a domain error: its nearest known class as the reason, and its message."""
    reason = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _REASONS), "BackendFailure")
    return {"reason": reason, "message": exc.message[:2048]}


def error_from_status(error: dict[str, Any], what: str) -> errors.LocalDiskError:
    """The domain error a `status.error` describes, its message prefixed with `what` (the node, say)."""
    cls = _REASONS.get(str(error.get("reason", "")), errors.BackendFailure)
    return cls(f"{what}: {error.get('message') or 'failed without a message'}")


# -- reading objects ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeObject:
    """What the controller and the agents read from a LocalVolume."""

    name: str
    csi_name: str
    node: str
    backend: str
    pool: str | None
    required_bytes: int
    limit_bytes: int
    encrypted: bool
    source_kind: str | None
    source_name: str | None
    generation: int
    deleting: bool
    phase: str
    handle: str | None
    size_bytes: int
    observed_generation: int
    error: dict[str, Any] | None
    resource_version: str
    finalizers: tuple[str, ...]
    io_limits: dict[str, int] = field(default_factory=dict)
    """spec.ioLimits: the I/O limits asked for (`localdisk.qos` parameter names: readIOPS, ...)."""
    applied_io_limits: dict[str, int] | None = None
    """status.ioLimits: the limits the node agent has recorded and applied (None before it has answered)."""
    layout: LayoutRequest = field(default_factory=LayoutRequest)
    """spec.layout and spec.cache: the LVM layout and cache asked for (empty: the pool's defaults; also what an object
    written before layouts travelled reads as)."""

    @classmethod
    def of(cls, obj: dict[str, Any]) -> VolumeObject:
        meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
        source = spec.get("source") or {}
        return cls(
            name=meta["name"],
            csi_name=spec.get("name", ""),
            node=spec.get("node", ""),
            backend=spec.get("backend", ""),
            pool=spec.get("pool") or None,
            required_bytes=int(spec.get("requiredBytes") or 0),
            limit_bytes=int(spec.get("limitBytes") or 0),
            encrypted=bool(spec.get("encrypted")),
            source_kind=source.get("kind") or None,
            source_name=source.get("name") or None,
            generation=int(meta.get("generation") or 0),
            deleting=bool(meta.get("deletionTimestamp")),
            phase=status.get("phase") or "Pending",
            # an adopted object knows its on-disk ID from the start, before its node writes the status
            handle=status.get("handle") or (meta.get("annotations") or {}).get(ADOPTED) or None,
            size_bytes=int(status.get("sizeBytes") or 0),
            observed_generation=int(status.get("observedGeneration") or 0),
            error=status.get("error") or None,
            resource_version=str(meta.get("resourceVersion", "")),
            finalizers=tuple(meta.get("finalizers") or ()),
            io_limits=_limits(spec.get("ioLimits")) or {},
            applied_io_limits=_limits(status.get("ioLimits")),
            layout=LayoutRequest.from_spec(spec.get("layout"), spec.get("cache")),
        )

    @property
    def settled(self) -> bool:
        """The node has answered the current spec: with the volume (ready) or with an error."""
        return self.observed_generation >= self.generation and (self.error is not None or self.phase == "Ready")


def _limits(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): int(v) for k, v in value.items() if v is not None}


@dataclass(frozen=True)
class SnapshotObject:
    name: str
    csi_name: str
    node: str
    source_volume: str
    generation: int
    deleting: bool
    phase: str
    handle: str | None
    size_bytes: int
    creation_time: str | None
    observed_generation: int
    error: dict[str, Any] | None
    resource_version: str
    finalizers: tuple[str, ...]

    @classmethod
    def of(cls, obj: dict[str, Any]) -> SnapshotObject:
        meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
        return cls(
            name=meta["name"],
            csi_name=spec.get("name", ""),
            node=spec.get("node", ""),
            source_volume=spec.get("sourceVolume", ""),
            generation=int(meta.get("generation") or 0),
            deleting=bool(meta.get("deletionTimestamp")),
            phase=status.get("phase") or "Pending",
            # an adopted object knows its on-disk ID from the start, before its node writes the status
            handle=status.get("handle") or (meta.get("annotations") or {}).get(ADOPTED) or None,
            size_bytes=int(status.get("sizeBytes") or 0),
            creation_time=status.get("creationTime") or None,
            observed_generation=int(status.get("observedGeneration") or 0),
            error=status.get("error") or None,
            resource_version=str(meta.get("resourceVersion", "")),
            finalizers=tuple(meta.get("finalizers") or ()),
        )

    @property
    def settled(self) -> bool:
        return self.observed_generation >= self.generation and (self.error is not None or self.phase == "Ready")


@dataclass(frozen=True)
class PoolReport:
    backend: str
    pool: str
    default: bool
    up: bool
    reason: str
    available_bytes: int
    maximum_volume_bytes: int
    snapshots: bool
    clones: bool
    disks: tuple[str, ...] = ()
    layout_space: dict[str, Any] | None = None
    """A thick LVM pool's PVs and defaults (`lvmspace.PoolSpace`, JSON), from which the controller plans layouts."""

    def space(self) -> PoolSpace | None:
        return PoolSpace.from_json(self.layout_space, self.pool) if self.layout_space is not None else None

    def to_json(self) -> dict[str, Any]:
        extra = {"layoutSpace": self.layout_space} if self.layout_space is not None else {}
        return {
            "backend": self.backend,
            "pool": self.pool,
            "default": self.default,
            "up": self.up,
            "reason": self.reason,
            "availableBytes": self.available_bytes,
            "maximumVolumeBytes": self.maximum_volume_bytes,
            "snapshots": self.snapshots,
            "clones": self.clones,
            "disks": list(self.disks),
            **extra,
        }

    @classmethod
    def of(cls, item: dict[str, Any]) -> PoolReport:
        return cls(
            backend=str(item.get("backend", "")),
            pool=str(item.get("pool", "")),
            default=bool(item.get("default")),
            up=bool(item.get("up")),
            reason=str(item.get("reason") or ""),
            available_bytes=int(item.get("availableBytes") or 0),
            maximum_volume_bytes=int(item.get("maximumVolumeBytes") or 0),
            snapshots=bool(item.get("snapshots")),
            clones=bool(item.get("clones")),
            disks=tuple(str(d) for d in item.get("disks") or ()),
            layout_space=item.get("layoutSpace") or None,
        )
