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
