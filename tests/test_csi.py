"""Every CSI RPC of the foundation, through a real protobuf round trip in memory (grpclib.testing.ChannelFor)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import parse_config
from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerGetCapabilitiesRequest,
    ControllerGetVolumeRequest,
    ControllerServiceCapabilityRpcType,
    CreateSnapshotRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
    GetPluginCapabilitiesRequest,
    GetPluginInfoRequest,
    ListSnapshotsRequest,
    ListVolumesRequest,
    NodeGetCapabilitiesRequest,
    NodeGetInfoRequest,
    PluginCapabilityServiceType,
    PluginCapabilityVolumeExpansionType,
    ProbeRequest,
    Topology,
    TopologyRequirement,
    ValidateVolumeCapabilitiesRequest,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
)
from localdisk.csi import DRIVER_NAME, TOPOLOGY_KEY
from localdisk.manager import VolumeManager
from tests.csi_helpers import Csi, MiB, Mode, block_cap, create_request, csi_for, mount_cap

pytestmark = pytest.mark.anyio
GiB = 1024 * MiB


def two_pool_manager(latency: float = 0.0) -> VolumeManager:
    config = parse_config(
        {
            "pools": {
                "fake": {
                    "small": {"size_bytes": 1 * GiB, "default": True, "latency_seconds": latency},
                    "big": {"size_bytes": 4 * GiB},
                }
            }
        }
    )
    return VolumeManager.from_config(config)


@pytest.fixture
async def csi() -> AsyncIterator[Csi]:
    async with csi_for(two_pool_manager()) as channel:
        yield channel


async def expect(code: Status, call: object) -> GRPCError:
    with pytest.raises(GRPCError) as info:
        await call  # type: ignore[misc]
    assert info.value.status == code, info.value.message
    assert info.value.message
    return info.value


# -- Identity ---------------------------------------------------------------------------------------------------
async def test_identity(csi: Csi) -> None:
    info = await csi.identity.get_plugin_info(GetPluginInfoRequest())
    assert info.name == DRIVER_NAME
    assert info.vendor_version
    caps = await csi.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.service is not None}
    assert services == {
        PluginCapabilityServiceType.CONTROLLER_SERVICE,
        PluginCapabilityServiceType.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    expansion = [c.volume_expansion.type for c in caps.capabilities if c.volume_expansion is not None]
    assert expansion == [PluginCapabilityVolumeExpansionType.ONLINE]
    assert (await csi.identity.probe(ProbeRequest())).ready is True


# -- CreateVolume -----------------------------------------------------------------------------------------------
async def test_create_volume_and_idempotency(csi: Csi) -> None:
    created = (await csi.controller.create_volume(create_request("pvc-1", 10 * MiB))).volume
    assert created is not None
    assert created.capacity_bytes == 10 * MiB
    assert created.volume_id.startswith("fake:small:")
    assert [t.segments for t in created.accessible_topology] == [{TOPOLOGY_KEY: "node-1"}]
    again = (await csi.controller.create_volume(create_request("pvc-1", 10 * MiB))).volume
    assert again == created
    await expect(Status.ALREADY_EXISTS, csi.controller.create_volume(create_request("pvc-1", 20 * MiB)))
    await expect(Status.ALREADY_EXISTS, csi.controller.create_volume(create_request("pvc-1", 10 * MiB, pool="big")))


async def test_create_volume_rounds_up_to_alignment(csi: Csi) -> None:
    vol = (await csi.controller.create_volume(create_request("pvc-odd", 10 * MiB + 1))).volume
    assert vol is not None and vol.capacity_bytes == 11 * MiB
    await expect(
        Status.OUT_OF_RANGE,
        csi.controller.create_volume(
            create_request("pvc-no-fit", capacity_range=CapacityRange(required_bytes=MiB + 1, limit_bytes=MiB + 2))
        ),
    )


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"name": ""}, Status.INVALID_ARGUMENT, "name is required"),
        ({"name": "x" * 129}, Status.INVALID_ARGUMENT, "longer than"),
        ({"name": "bad\x01name"}, Status.INVALID_ARGUMENT, "control character"),
        ({"volume_capabilities": []}, Status.INVALID_ARGUMENT, "volume_capabilities is required"),
        (
            {"volume_capabilities": [mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]},
            Status.INVALID_ARGUMENT,
            "single-node",
        ),
        ({"volume_capabilities": [mount_cap(fs_type="ntfs")]}, Status.INVALID_ARGUMENT, "ntfs"),
        (
            {"volume_capabilities": [VolumeCapability(access_mode=VolumeCapabilityAccessMode(mode=Mode(1)))]},
            Status.INVALID_ARGUMENT,
            "access_type",
        ),
        ({"parameters": {"backend": "nope"}}, Status.INVALID_ARGUMENT, "not configured"),
        ({"parameters": {}}, Status.INVALID_ARGUMENT, "'backend' is required"),
        ({"parameters": {"backend": "fake", "pool": "nope"}}, Status.INVALID_ARGUMENT, "pool 'nope'"),
        ({"parameters": {"backend": "fake", "colour": "red"}}, Status.INVALID_ARGUMENT, "colour"),
        ({"capacity_range": CapacityRange(required_bytes=-1)}, Status.INVALID_ARGUMENT, "negative"),
        (
            {"capacity_range": CapacityRange(required_bytes=2 * MiB, limit_bytes=MiB)},
            Status.INVALID_ARGUMENT,
            "larger than limit_bytes",
        ),
        ({"capacity_range": CapacityRange(required_bytes=2 * GiB)}, Status.RESOURCE_EXHAUSTED, "bytes free"),
        (
            {
                "accessibility_requirements": TopologyRequirement(
                    requisite=[Topology(segments={TOPOLOGY_KEY: "other-node"})]
                )
            },
            Status.RESOURCE_EXHAUSTED,
            "topology",
        ),
        (
            {
                "volume_content_source": VolumeContentSource(
                    snapshot=VolumeContentSourceSnapshotSource(snapshot_id="fake:small:nothing")
                )
            },
            Status.NOT_FOUND,
            "not found",
        ),
    ],
)
async def test_create_volume_refuses_bad_requests(
    csi: Csi, request_fields: dict[str, object], code: Status, words: str
) -> None:
    fields: dict[str, Any] = {"name": "pvc-bad"} | request_fields
    name = str(fields.pop("name"))
    error = await expect(code, csi.controller.create_volume(create_request(name, **fields)))
    assert words in (error.message or "")
    assert await csi.manager.list_volumes() == []


async def test_block_volume_and_default_size(csi: Csi) -> None:
    req = create_request("pvc-block", volume_capabilities=[block_cap()], capacity_range=None)
    vol = (await csi.controller.create_volume(req)).volume
    assert vol is not None and vol.capacity_bytes == GiB


# -- DeleteVolume -----------------------------------------------------------------------------------------------
async def test_delete_volume(csi: Csi) -> None:
    vol = (await csi.controller.create_volume(create_request("pvc-del"))).volume
    assert vol is not None
    await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=vol.volume_id))
    await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=vol.volume_id))
    await csi.controller.delete_volume(DeleteVolumeRequest(volume_id="not-ours"))
    await expect(Status.INVALID_ARGUMENT, csi.controller.delete_volume(DeleteVolumeRequest(volume_id="")))
    assert await csi.manager.list_volumes() == []


# -- ValidateVolumeCapabilities ---------------------------------------------------------------------------------
async def test_validate_volume_capabilities(csi: Csi) -> None:
    vol = (await csi.controller.create_volume(create_request("pvc-val"))).volume
    assert vol is not None
    ok = await csi.controller.validate_volume_capabilities(
        ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[block_cap()])
    )
    assert ok.confirmed is not None and ok.confirmed.volume_capabilities == [block_cap()]
    refused = await csi.controller.validate_volume_capabilities(
        ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_READER_ONLY)]
        )
    )
    assert refused.confirmed is None and "single-node" in refused.message
    await expect(
        Status.NOT_FOUND,
        csi.controller.validate_volume_capabilities(
            ValidateVolumeCapabilitiesRequest(volume_id="fake:small:missing", volume_capabilities=[mount_cap()])
        ),
    )
    await expect(
        Status.INVALID_ARGUMENT,
        csi.controller.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id)),
    )


# -- ListVolumes ------------------------------------------------------------------------------------------------
async def test_list_volumes_paginates(csi: Csi) -> None:
    ids = set()
    for i in range(5):
        vol = (await csi.controller.create_volume(create_request(f"pvc-list-{i}", MiB))).volume
        assert vol is not None
        ids.add(vol.volume_id)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await csi.controller.list_volumes(ListVolumesRequest(max_entries=2, starting_token=token))
        pages += 1
        seen += [e.volume.volume_id for e in page.entries if e.volume is not None]
        assert all(e.status is not None and e.status.volume_condition is not None for e in page.entries)
        token = page.next_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids)
    everything = await csi.controller.list_volumes(ListVolumesRequest())
    assert len(everything.entries) == 5 and everything.next_token == ""
    await expect(Status.ABORTED, csi.controller.list_volumes(ListVolumesRequest(starting_token="bogus")))
    await expect(Status.ABORTED, csi.controller.list_volumes(ListVolumesRequest(starting_token="99")))
    await expect(Status.INVALID_ARGUMENT, csi.controller.list_volumes(ListVolumesRequest(max_entries=-1)))


# -- GetCapacity ------------------------------------------------------------------------------------------------
async def test_get_capacity(csi: Csi) -> None:
    small = await csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "fake"}))
    assert small.available_capacity == GiB and small.maximum_volume_size == GiB
    big = await csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "fake", "pool": "big"}))
    assert big.available_capacity == 4 * GiB
    node = await csi.controller.get_capacity(GetCapacityRequest())
    assert node.available_capacity == 5 * GiB and node.maximum_volume_size == 4 * GiB
    await csi.controller.create_volume(create_request("pvc-cap", 100 * MiB))
    after = await csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "fake"}))
    assert after.available_capacity == GiB - 100 * MiB
    elsewhere = await csi.controller.get_capacity(
        GetCapacityRequest(
            parameters={"backend": "fake"}, accessible_topology=Topology(segments={TOPOLOGY_KEY: "node-2"})
        )
    )
    assert elsewhere.available_capacity == 0
    # A class for disks this node does not have: capacity 0 here (an answer the scheduler uses), not an error the
    # external-provisioner would retry forever; a parameter localdisk does not know stays the caller's error.
    for parameters in ({"backend": "lvm"}, {"backend": "fake", "pool": "nosuchpool"}):
        other = await csi.controller.get_capacity(GetCapacityRequest(parameters=parameters))
        assert other.available_capacity == 0 and other.maximum_volume_size == 0
    await expect(
        Status.INVALID_ARGUMENT,
        csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "fake", "x": "y"})),
    )


# -- capabilities, GetVolume, Expand ----------------------------------------------------------------------------
async def test_controller_capabilities(csi: Csi) -> None:
    caps = await csi.controller.controller_get_capabilities(ControllerGetCapabilitiesRequest())
    types = {c.rpc.type for c in caps.capabilities if c.rpc is not None}
    Rpc = ControllerServiceCapabilityRpcType
    assert {Rpc.CREATE_DELETE_VOLUME, Rpc.LIST_VOLUMES, Rpc.GET_CAPACITY, Rpc.GET_VOLUME} <= types
    assert Rpc.EXPAND_VOLUME not in types  # expansion is node-side: see ControllerService
    assert {Rpc.CREATE_DELETE_SNAPSHOT, Rpc.LIST_SNAPSHOTS, Rpc.CLONE_VOLUME} <= types  # the fake has them
    assert Rpc.PUBLISH_UNPUBLISH_VOLUME not in types  # local volumes need no attach


async def test_controller_get_volume(csi: Csi) -> None:
    vol = (await csi.controller.create_volume(create_request("pvc-get"))).volume
    assert vol is not None
    got = await csi.controller.controller_get_volume(ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume == vol
    assert got.status is not None and got.status.volume_condition is not None
    assert got.status.volume_condition.abnormal is False
    await expect(
        Status.NOT_FOUND, csi.controller.controller_get_volume(ControllerGetVolumeRequest(volume_id="fake:small:x"))
    )
    await expect(Status.NOT_FOUND, csi.controller.controller_get_volume(ControllerGetVolumeRequest(volume_id="junk")))


async def test_controller_expand_volume(csi: Csi) -> None:
    vol = (await csi.controller.create_volume(create_request("pvc-expand", 16 * MiB))).volume
    assert vol is not None
    grown = await csi.controller.controller_expand_volume(
        ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=CapacityRange(required_bytes=32 * MiB))
    )
    assert grown.capacity_bytes == 32 * MiB and grown.node_expansion_required is True
    block = await csi.controller.controller_expand_volume(
        ControllerExpandVolumeRequest(
            volume_id=vol.volume_id,
            capacity_range=CapacityRange(required_bytes=48 * MiB),
            volume_capability=block_cap(),
        )
    )
    assert block.capacity_bytes == 48 * MiB and block.node_expansion_required is False
    again = await csi.controller.controller_expand_volume(
        ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=CapacityRange(required_bytes=20 * MiB))
    )
    assert again.capacity_bytes == 48 * MiB
    await expect(
        Status.OUT_OF_RANGE,
        csi.controller.controller_expand_volume(
            ControllerExpandVolumeRequest(
                volume_id=vol.volume_id, capacity_range=CapacityRange(required_bytes=MiB, limit_bytes=2 * MiB)
            )
        ),
    )
    await expect(
        Status.RESOURCE_EXHAUSTED,
        csi.controller.controller_expand_volume(
            ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=CapacityRange(required_bytes=8 * GiB))
        ),
    )
    await expect(
        Status.NOT_FOUND,
        csi.controller.controller_expand_volume(
            ControllerExpandVolumeRequest(volume_id="fake:small:gone", capacity_range=CapacityRange(required_bytes=MiB))
        ),
    )
    await expect(
        Status.INVALID_ARGUMENT,
        csi.controller.controller_expand_volume(ControllerExpandVolumeRequest(volume_id=vol.volume_id)),
    )


# -- snapshots --------------------------------------------------------------------------------------------------
async def test_snapshots(csi: Csi) -> None:
    vol = (await csi.controller.create_volume(create_request("pvc-snap", 16 * MiB))).volume
    assert vol is not None
    snap = (
        await csi.controller.create_snapshot(CreateSnapshotRequest(source_volume_id=vol.volume_id, name="s1"))
    ).snapshot
    assert snap is not None and snap.ready_to_use and snap.size_bytes == 16 * MiB and snap.creation_time is not None
    again = (
        await csi.controller.create_snapshot(CreateSnapshotRequest(source_volume_id=vol.volume_id, name="s1"))
    ).snapshot
    assert again == snap
    other = (await csi.controller.create_volume(create_request("pvc-other"))).volume
    assert other is not None
    await expect(
        Status.ALREADY_EXISTS,
        csi.controller.create_snapshot(CreateSnapshotRequest(source_volume_id=other.volume_id, name="s1")),
    )
    await expect(
        Status.NOT_FOUND,
        csi.controller.create_snapshot(CreateSnapshotRequest(source_volume_id="fake:small:none", name="s2")),
    )
    await expect(Status.INVALID_ARGUMENT, csi.controller.create_snapshot(CreateSnapshotRequest(name="s3")))
    listed = await csi.controller.list_snapshots(ListSnapshotsRequest(source_volume_id=vol.volume_id))
    assert [e.snapshot for e in listed.entries] == [snap]
    by_id = await csi.controller.list_snapshots(ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    assert len(by_id.entries) == 1
    none = await csi.controller.list_snapshots(ListSnapshotsRequest(snapshot_id="fake:small:nope"))
    assert none.entries == []
    restored = (
        await csi.controller.create_volume(
            create_request(
                "pvc-restored",
                8 * MiB,
                volume_content_source=VolumeContentSource(
                    snapshot=VolumeContentSourceSnapshotSource(snapshot_id=snap.snapshot_id)
                ),
            )
        )
    ).volume
    assert restored is not None and restored.capacity_bytes == 16 * MiB  # never smaller than the snapshot
    assert restored.content_source is not None and restored.content_source.snapshot is not None
    await csi.controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    await csi.controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    await expect(Status.INVALID_ARGUMENT, csi.controller.delete_snapshot(DeleteSnapshotRequest()))
    assert (await csi.controller.list_snapshots(ListSnapshotsRequest())).entries == []


# -- Node -------------------------------------------------------------------------------------------------------
async def test_node_info(csi: Csi) -> None:
    info = await csi.node.node_get_info(NodeGetInfoRequest())
    assert info.node_id == "node-1"
    assert info.accessible_topology is not None
    assert info.accessible_topology.segments == {TOPOLOGY_KEY: "node-1"}
    caps = await csi.node.node_get_capabilities(NodeGetCapabilitiesRequest())
    assert caps is not None


# -- concurrency ------------------------------------------------------------------------------------------------
async def test_concurrent_operations_on_one_volume_are_aborted() -> None:
    async with csi_for(two_pool_manager(latency=0.3)) as csi:
        codes: list[Status | None] = []

        async def create() -> None:
            try:
                await csi.controller.create_volume(create_request("pvc-race", 16 * MiB))
                codes.append(None)
            except GRPCError as exc:
                codes.append(exc.status)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(create)
        assert codes.count(None) == 1
        assert codes.count(Status.ABORTED) == 4
        assert len(await csi.manager.list_volumes()) == 1
