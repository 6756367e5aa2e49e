"""localdisk: turn a node's local disks into dynamically provisioned, size-isolated volumes.

The library surface, for other controllers that drive volumes without the CSI server:

    import anyio, localdisk

    async def main() -> None:
        config = localdisk.load_config("/etc/localdisk/config.toml")
        async with localdisk.VolumeManager.from_config(config).session() as volumes:
            vol = await volumes.create_volume(localdisk.CreateRequest(name="pvc-1", backend="thin",
                                                                      required_bytes=1 << 30))
            await volumes.expand_volume(vol.id, 2 << 30)
            await volumes.delete_volume(vol.id)

    anyio.run(main)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localdisk.backend import VolumeBackend
    from localdisk.config import NodeConfig, development_default
    from localdisk.config import load as load_config
    from localdisk.config import parse as parse_config
    from localdisk.errors import (
        AlreadyExists,
        BackendFailure,
        Busy,
        CommandFailed,
        ConfigError,
        FailedPrecondition,
        InsufficientCapacity,
        InvalidArgument,
        LocalDiskError,
        NotFound,
        OutOfRange,
        Unsupported,
    )
    from localdisk.manager import CreateRequest, VolumeManager
    from localdisk.model import Capacity, ContentSource, Features, ObjectRef, Snapshot, SourceKind, Volume, VolumeSpec
    from localdisk.runner import CommandRunner

_EXPORTS: dict[str, tuple[str, str]] = {
    "AlreadyExists": ("localdisk.errors", "AlreadyExists"),
    "BackendFailure": ("localdisk.errors", "BackendFailure"),
    "Busy": ("localdisk.errors", "Busy"),
    "Capacity": ("localdisk.model", "Capacity"),
    "CommandFailed": ("localdisk.errors", "CommandFailed"),
    "CommandRunner": ("localdisk.runner", "CommandRunner"),
    "ConfigError": ("localdisk.errors", "ConfigError"),
    "ContentSource": ("localdisk.model", "ContentSource"),
    "CreateRequest": ("localdisk.manager", "CreateRequest"),
    "FailedPrecondition": ("localdisk.errors", "FailedPrecondition"),
    "Features": ("localdisk.model", "Features"),
    "InsufficientCapacity": ("localdisk.errors", "InsufficientCapacity"),
    "InvalidArgument": ("localdisk.errors", "InvalidArgument"),
    "LocalDiskError": ("localdisk.errors", "LocalDiskError"),
    "NodeConfig": ("localdisk.config", "NodeConfig"),
    "NotFound": ("localdisk.errors", "NotFound"),
    "ObjectRef": ("localdisk.model", "ObjectRef"),
    "OutOfRange": ("localdisk.errors", "OutOfRange"),
    "Snapshot": ("localdisk.model", "Snapshot"),
    "SourceKind": ("localdisk.model", "SourceKind"),
    "Unsupported": ("localdisk.errors", "Unsupported"),
    "Volume": ("localdisk.model", "Volume"),
    "VolumeBackend": ("localdisk.backend", "VolumeBackend"),
    "VolumeManager": ("localdisk.manager", "VolumeManager"),
    "VolumeSpec": ("localdisk.model", "VolumeSpec"),
    "development_default": ("localdisk.config", "development_default"),
    "load_config": ("localdisk.config", "load"),
    "parse_config": ("localdisk.config", "parse"),
}

__all__ = [
    "AlreadyExists",
    "BackendFailure",
    "Busy",
    "Capacity",
    "CommandFailed",
    "CommandRunner",
    "ConfigError",
    "ContentSource",
    "CreateRequest",
    "FailedPrecondition",
    "Features",
    "InsufficientCapacity",
    "InvalidArgument",
    "LocalDiskError",
    "NodeConfig",
    "NotFound",
    "ObjectRef",
    "OutOfRange",
    "Snapshot",
    "SourceKind",
    "Unsupported",
    "Volume",
    "VolumeBackend",
    "VolumeManager",
    "VolumeSpec",
    "development_default",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    """Import the public names on first use, so `import localdisk` (and `localdisk --help`) stays fast."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'localdisk' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
