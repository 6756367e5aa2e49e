"""Builders for CSI requests and an in-memory channel to the servicers, shared by the CSI-layer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from grpclib.testing import ChannelFor

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerStub,
    CreateVolumeRequest,
    IdentityStub,
    NodeStub,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityAccessModeMode,
    VolumeCapabilityBlockVolume,
    VolumeCapabilityMountVolume,
)
from localdisk.config import NodeConfig
from localdisk.csi.server import services
from localdisk.manager import VolumeManager

Mode = VolumeCapabilityAccessModeMode
MiB = 1024 * 1024


def mount_cap(
    fs_type: str = "ext4", mode: Mode = Mode.SINGLE_NODE_WRITER, flags: list[str] | None = None
) -> VolumeCapability:
    return VolumeCapability(
        mount=VolumeCapabilityMountVolume(fs_type=fs_type, mount_flags=flags or []),
        access_mode=VolumeCapabilityAccessMode(mode=mode),
    )


def block_cap(mode: Mode = Mode.SINGLE_NODE_WRITER) -> VolumeCapability:
    return VolumeCapability(block=VolumeCapabilityBlockVolume(), access_mode=VolumeCapabilityAccessMode(mode=mode))


def create_request(
    name: str, size: int = 16 * MiB, backend: str = "fake", pool: str | None = None, **extra: object
) -> CreateVolumeRequest:
    parameters = {"backend": backend} | ({"pool": pool} if pool else {})
    fields: dict[str, object] = {
        "name": name,
        "capacity_range": CapacityRange(required_bytes=size),
        "volume_capabilities": [mount_cap()],
        "parameters": parameters,
    }
    fields.update(extra)
    return CreateVolumeRequest(**fields)  # type: ignore[arg-type]


@dataclass
class Csi:
    identity: IdentityStub
    controller: ControllerStub
    node: NodeStub
    manager: VolumeManager


@asynccontextmanager
async def csi_for(
    manager: VolumeManager, node_id: str = "node-1", config: NodeConfig | None = None
) -> AsyncIterator[Csi]:
    async with manager.session(), ChannelFor(services(manager, node_id, config=config)) as channel:
        yield Csi(IdentityStub(channel), ControllerStub(channel), NodeStub(channel), manager)
