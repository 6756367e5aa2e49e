"""Request validation shared by the Controller and Node servicers: runs before any lock or command."""

from __future__ import annotations

from localdisk._proto.csi.v1 import (
    CapacityRange,
    VolumeCapability,
    VolumeCapabilityAccessModeMode,
    VolumeContentSource,
)
from localdisk.backend import BACKEND_PARAMETERS
from localdisk.errors import InvalidArgument
from localdisk.model import ContentSource, SourceKind
from localdisk.qos import PARAMETERS as IO_LIMIT_PARAMETERS

Mode = VolumeCapabilityAccessModeMode
SINGLE_NODE_MODES = {
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
}
FILESYSTEMS = ("ext4", "xfs", "btrfs")
MAX_NAME_BYTES = 128  # CSI names and IDs
KNOWN_PARAMETERS = {"backend", "pool", "encrypted", *IO_LIMIT_PARAMETERS} | BACKEND_PARAMETERS
PASSTHROUGH_PREFIXES = ("csi.storage.k8s.io/",)  # metadata the external-provisioner may add


def shown(value: str, limit: int = 64) -> str:
    """`value` as a message quotes it: its repr, cut after `limit` characters (a request can hold megabytes)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def require(value: object, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required")


def check_name(name: str, field: str = "name") -> None:
    require(name, field)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_NAME_BYTES} bytes")
    if any((ord(c) < 0x20 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F for c in name):
        raise InvalidArgument(f"{field} contains a control character, which CSI forbids")


def check_capability(cap: VolumeCapability, field: str = "volume_capabilities") -> None:
    if cap.block is None and cap.mount is None:
        raise InvalidArgument(f"{field}: access_type is required: set block or mount")
    if cap.block is not None and cap.mount is not None:
        raise InvalidArgument(f"{field}: access_type is one of block or mount, not both")
    if cap.access_mode is None:
        raise InvalidArgument(f"{field}: access_mode is required")
    mode = cap.access_mode.mode
    if mode not in SINGLE_NODE_MODES:
        name = getattr(mode, "name", str(mode))
        raise InvalidArgument(
            f"{field}: access mode {name} is not supported: local volumes are single-node"
            " (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER)"
        )
    if cap.mount is not None and cap.mount.fs_type and cap.mount.fs_type not in FILESYSTEMS:
        raise InvalidArgument(
            f"{field}: fs_type {shown(cap.mount.fs_type)} is not supported; use one of {', '.join(FILESYSTEMS)}"
        )


def check_capabilities(caps: list[VolumeCapability], field: str = "volume_capabilities") -> None:
    require(caps, field)
    for cap in caps:
        check_capability(cap, field)


def check_parameters(parameters: dict[str, str]) -> None:
    unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS and not k.startswith(PASSTHROUGH_PREFIXES))
    if unknown:
        listed = ", ".join(shown(key) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidArgument(
            f"unknown StorageClass parameter(s) [{listed}]{more}; localdisk accepts {sorted(KNOWN_PARAMETERS)}"
        )


def backend_parameters(parameters: dict[str, str]) -> dict[str, str]:
    """The StorageClass parameters that are the backend's own (an LVM layout), for `CreateRequest.parameters`."""
    return {key: value for key, value in parameters.items() if key in BACKEND_PARAMETERS}


def encrypted(parameters: dict[str, str]) -> bool:
    """The StorageClass parameter `encrypted`: "true" or "false" (the default), as Kubernetes booleans are spelled."""
    value = parameters.get("encrypted", "false")
    if value.lower() not in ("true", "false"):
        raise InvalidArgument(f'parameter \'encrypted\' is {shown(value)}; use "true" or "false"')
    return value.lower() == "true"


def capacity(rng: CapacityRange | None) -> tuple[int, int]:
    if rng is None:
        return 0, 0
    if rng.required_bytes < 0 or rng.limit_bytes < 0:
        raise InvalidArgument("capacity_range: sizes must not be negative")
    if rng.limit_bytes and rng.required_bytes > rng.limit_bytes:
        raise InvalidArgument("capacity_range: required_bytes is larger than limit_bytes")
    return rng.required_bytes, rng.limit_bytes


def content_source(source: VolumeContentSource | None) -> ContentSource | None:
    if source is None:
        return None
    if source.snapshot is not None:
        require(source.snapshot.snapshot_id, "volume_content_source.snapshot.snapshot_id")
        return ContentSource(SourceKind.SNAPSHOT, source.snapshot.snapshot_id)
    if source.volume is not None:
        require(source.volume.volume_id, "volume_content_source.volume.volume_id")
        return ContentSource(SourceKind.VOLUME, source.volume.volume_id)
    raise InvalidArgument("volume_content_source: set snapshot or volume")


def page(total: int, max_entries: int, starting_token: str) -> tuple[int, int]:
    """Start and end indices for a paginated list. A bad token is the caller's ABORTED per CSI; see users."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if starting_token:
        if not starting_token.isdigit() or int(starting_token) > total:
            raise ValueError(starting_token)
        start = int(starting_token)
    end = total if max_entries == 0 else min(total, start + max_entries)
    return start, end
