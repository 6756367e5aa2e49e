"""`localdisk csi ...`: talk to a running CSI server over its socket, as the kubelet and sidecars do.

For debugging a node: is the driver up, what does it advertise, and can it create, expand and delete a volume.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, TypeVar

import anyio
import typer

from localdisk.commands.output import die, emit_json, table
from localdisk.sizes import human, parse_size

if TYPE_CHECKING:
    from grpclib.client import Channel

T = TypeVar("T")
csi_app = typer.Typer(help="Call a running localdisk CSI server over its unix socket.", no_args_is_help=True)

EndpointOption = Annotated[
    str, typer.Option("--endpoint", "-e", envvar="CSI_ENDPOINT", help="unix:///path/to/csi.sock")
]
GRPC_EXIT = {
    "INVALID_ARGUMENT": 2,
    "OUT_OF_RANGE": 2,
    "NOT_FOUND": 3,
    "ALREADY_EXISTS": 4,
    "RESOURCE_EXHAUSTED": 5,
    "ABORTED": 6,
    "INTERNAL": 7,
    "UNAVAILABLE": 7,
}


@asynccontextmanager
async def _channel(endpoint: str) -> AsyncIterator[Channel]:
    from grpclib.client import Channel

    from localdisk.csi.server import socket_path

    channel = Channel(path=str(socket_path(endpoint)))
    try:
        yield channel
    finally:
        channel.close()


def _call(endpoint: str, work: Callable[[Channel], Awaitable[T]]) -> T:
    from grpclib.exceptions import GRPCError

    from localdisk.errors import ConfigError

    async def main() -> T:
        async with _channel(endpoint) as channel:
            return await work(channel)

    try:
        return anyio.run(main)
    except GRPCError as exc:
        die(f"{exc.status.name}: {exc.message}", GRPC_EXIT.get(exc.status.name, 1))
    except ConfigError as exc:
        die(exc.message, 2)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        die(f"cannot reach the CSI server at {endpoint}: {exc.strerror or exc}", 7)


@csi_app.command()
def probe(endpoint: EndpointOption = "unix:///csi/csi.sock") -> None:
    """Probe: is the driver ready?"""
    from localdisk._proto.csi.v1 import IdentityStub, ProbeRequest

    async def work(channel: Channel) -> bool | None:
        return (await IdentityStub(channel).probe(ProbeRequest())).ready

    ready = _call(endpoint, work)
    typer.echo("ready" if ready in (True, None) else "not ready")
    if ready is False:
        raise typer.Exit(1)


@csi_app.command()
def info(
    endpoint: EndpointOption = "unix:///csi/csi.sock", as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Plugin name and version, and this node's id and topology."""
    from localdisk._proto.csi.v1 import GetPluginInfoRequest, IdentityStub, NodeGetInfoRequest, NodeStub

    async def work(channel: Channel) -> dict[str, object]:
        plugin = await IdentityStub(channel).get_plugin_info(GetPluginInfoRequest())
        node = await NodeStub(channel).node_get_info(NodeGetInfoRequest())
        topology = dict(node.accessible_topology.segments) if node.accessible_topology else {}
        return {"name": plugin.name, "version": plugin.vendor_version, "node_id": node.node_id, "topology": topology}

    found = _call(endpoint, work)
    if as_json:
        emit_json(found)
    else:
        typer.echo(table(("FIELD", "VALUE"), list(found.items())))


@csi_app.command()
def capabilities(endpoint: EndpointOption = "unix:///csi/csi.sock") -> None:
    """What the plugin, controller and node services advertise."""
    from localdisk._proto.csi.v1 import (
        ControllerGetCapabilitiesRequest,
        ControllerStub,
        GetPluginCapabilitiesRequest,
        IdentityStub,
        NodeGetCapabilitiesRequest,
        NodeStub,
    )

    async def work(channel: Channel) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        plugin = await IdentityStub(channel).get_plugin_capabilities(GetPluginCapabilitiesRequest())
        for cap in plugin.capabilities:
            if cap.service is not None:
                rows.append(("plugin", cap.service.type.name))
            if cap.volume_expansion is not None:
                rows.append(("plugin", f"VOLUME_EXPANSION_{cap.volume_expansion.type.name}"))
        ctrl = await ControllerStub(channel).controller_get_capabilities(ControllerGetCapabilitiesRequest())
        rows += [("controller", c.rpc.type.name) for c in ctrl.capabilities if c.rpc is not None]
        node = await NodeStub(channel).node_get_capabilities(NodeGetCapabilitiesRequest())
        rows += [("node", c.rpc.type.name) for c in node.capabilities if c.rpc is not None]
        return rows

    typer.echo(table(("SERVICE", "CAPABILITY"), _call(endpoint, work)))


@csi_app.command()
def create(
    name: str,
    size: Annotated[str, typer.Option("--size", "-s")] = "1Gi",
    backend: Annotated[str, typer.Option("--backend", "-b")] = "fake",
    pool: Annotated[str | None, typer.Option("--pool", "-p")] = None,
    block: Annotated[bool, typer.Option(help="Ask for a raw block volume instead of a filesystem.")] = False,
    endpoint: EndpointOption = "unix:///csi/csi.sock",
) -> None:
    """CreateVolume, as the external-provisioner would call it."""
    from localdisk._proto.csi.v1 import (
        CapacityRange,
        ControllerStub,
        CreateVolumeRequest,
        VolumeCapability,
        VolumeCapabilityAccessMode,
        VolumeCapabilityAccessModeMode,
        VolumeCapabilityBlockVolume,
        VolumeCapabilityMountVolume,
    )

    required = _size(size)
    access = VolumeCapabilityAccessMode(mode=VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER)
    cap = (
        VolumeCapability(block=VolumeCapabilityBlockVolume(), access_mode=access)
        if block
        else VolumeCapability(mount=VolumeCapabilityMountVolume(), access_mode=access)
    )
    request = CreateVolumeRequest(
        name=name,
        capacity_range=CapacityRange(required_bytes=required),
        volume_capabilities=[cap],
        parameters={"backend": backend} | ({"pool": pool} if pool else {}),
    )

    async def work(channel: Channel) -> tuple[str, int]:
        volume = (await ControllerStub(channel).create_volume(request)).volume
        assert volume is not None
        return volume.volume_id, volume.capacity_bytes

    volume_id, capacity = _call(endpoint, work)
    typer.echo(f"created {volume_id} ({human(capacity)})")


@csi_app.command()
def delete(volume_id: str, endpoint: EndpointOption = "unix:///csi/csi.sock") -> None:
    """DeleteVolume."""
    from localdisk._proto.csi.v1 import ControllerStub, DeleteVolumeRequest

    async def work(channel: Channel) -> None:
        await ControllerStub(channel).delete_volume(DeleteVolumeRequest(volume_id=volume_id))

    _call(endpoint, work)
    typer.echo(f"deleted {volume_id}")


@csi_app.command()
def expand(volume_id: str, size: str, endpoint: EndpointOption = "unix:///csi/csi.sock") -> None:
    """ControllerExpandVolume."""
    from localdisk._proto.csi.v1 import CapacityRange, ControllerExpandVolumeRequest, ControllerStub

    required = _size(size)

    async def work(channel: Channel) -> int:
        request = ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=CapacityRange(required_bytes=required)
        )
        return (await ControllerStub(channel).controller_expand_volume(request)).capacity_bytes

    typer.echo(f"{volume_id} is {human(_call(endpoint, work))}")


@csi_app.command("list")
def list_volumes(endpoint: EndpointOption = "unix:///csi/csi.sock") -> None:
    """ListVolumes, every page."""
    from localdisk._proto.csi.v1 import ControllerStub, ListVolumesRequest

    async def work(channel: Channel) -> list[tuple[str, str, str]]:
        stub = ControllerStub(channel)
        rows: list[tuple[str, str, str]] = []
        token = ""
        while True:
            page = await stub.list_volumes(ListVolumesRequest(max_entries=100, starting_token=token))
            for entry in page.entries:
                if entry.volume is None:
                    continue
                condition = entry.status.volume_condition if entry.status else None
                state = "abnormal: " + condition.message if condition and condition.abnormal else "ok"
                rows.append((entry.volume.volume_id, human(entry.volume.capacity_bytes), state))
            token = page.next_token
            if not token:
                return rows

    rows = _call(endpoint, work)
    typer.echo(table(("VOLUME ID", "SIZE", "CONDITION"), rows) if rows else "no volumes")


@csi_app.command("capacity")
def get_capacity(
    backend: Annotated[str | None, typer.Option("--backend", "-b")] = None,
    pool: Annotated[str | None, typer.Option("--pool", "-p")] = None,
    endpoint: EndpointOption = "unix:///csi/csi.sock",
) -> None:
    """GetCapacity for a backend/pool (as for a StorageClass), or for the whole node."""
    from localdisk._proto.csi.v1 import ControllerStub, GetCapacityRequest

    parameters = ({"backend": backend} if backend else {}) | ({"pool": pool} if pool else {})

    async def work(channel: Channel) -> tuple[int, int]:
        answer = await ControllerStub(channel).get_capacity(GetCapacityRequest(parameters=parameters))
        return answer.available_capacity, answer.maximum_volume_size or 0

    available, largest = _call(endpoint, work)
    typer.echo(f"available {human(available)}, largest volume {human(largest)}")


def _size(text: str) -> int:
    from localdisk.errors import InvalidArgument

    try:
        return parse_size(text)
    except InvalidArgument as exc:
        die(exc.message, 2)
