"""CSI Controller service. Validates, then hands the work to the `VolumeManager`; never builds commands itself."""

from __future__ import annotations

import logging

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import qos
from localdisk._proto.csi.v1 import (
    ControllerBase,
    ControllerExpandVolumeRequest,
    ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest,
    ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest,
    ControllerGetVolumeResponse,
    ControllerGetVolumeResponseVolumeStatus,
    ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse,
    ControllerServiceCapability,
    ControllerServiceCapabilityRpc,
    ControllerServiceCapabilityRpcType,
    CreateSnapshotRequest,
    CreateSnapshotResponse,
    CreateVolumeRequest,
    CreateVolumeResponse,
    DeleteSnapshotRequest,
    DeleteSnapshotResponse,
    DeleteVolumeRequest,
    DeleteVolumeResponse,
    GetCapacityRequest,
    GetCapacityResponse,
    ListSnapshotsRequest,
    ListSnapshotsResponse,
    ListSnapshotsResponseEntry,
    ListVolumesRequest,
    ListVolumesResponse,
    TopologyRequirement,
    ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse,
    ValidateVolumeCapabilitiesResponseConfirmed,
)
from localdisk.config import NodeConfig
from localdisk.crypt import HEADER_BYTES
from localdisk.csi import TOPOLOGY_KEY, convert, validate
from localdisk.csi.status import rpc
from localdisk.errors import InsufficientCapacity, InvalidArgument, NotFound, OutOfRange
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.mounts import MIN_FS_BYTES
from localdisk.qos import IoLimits, VolumeQos

Cap = ControllerServiceCapabilityRpcType
log = logging.getLogger(__name__)


def filesystem(message: CreateVolumeRequest, config: NodeConfig) -> str | None:
    """The filesystem the volume will be formatted with when first staged; None for raw block only."""
    mounts = [c.mount for c in message.volume_capabilities if c.mount is not None]
    if not mounts:
        return None
    asked = next((m.fs_type for m in mounts if m.fs_type), "")
    if asked:
        return asked
    backend = message.parameters.get("backend", "")
    pool = message.parameters.get("pool") or config.default_pool(backend)
    entry = next((p for p in config.pools if p.backend == backend and p.name == pool), None)
    return (entry.config.fs_type if entry is not None else None) or config.node.default_fs


def at_least_filesystem_minimum(message: CreateVolumeRequest, config: NodeConfig, required: int, limit: int) -> int:
    """xfs and btrfs cannot be made on small devices: a smaller request is rounded up to the filesystem's minimum
    (CSI lets a volume be larger than required_bytes), or refused when limit_bytes forbids that."""
    fs = filesystem(message, config)
    minimum = MIN_FS_BYTES.get(fs or "", 0)
    if minimum and validate.encrypted(message.parameters):
        minimum += HEADER_BYTES  # the filesystem gets what the LUKS2 header leaves of the device
    if not minimum or required >= minimum:
        return required
    if limit and limit < minimum:
        raise OutOfRange(
            f"a {fs} volume needs at least {minimum} bytes (mkfs.{fs} refuses a smaller device), over"
            f" limit_bytes {limit}; ask for {minimum} bytes or more, or another filesystem"
        )
    return minimum


def checked_create(message: CreateVolumeRequest, config: NodeConfig) -> tuple[int, int]:
    """Validate a CreateVolume request as both controller shapes must; returns the (required, limit) to create."""
    validate.check_name(message.name)
    validate.check_capabilities(message.volume_capabilities)
    validate.check_parameters(message.parameters)
    requested_limits(message)
    required, limit = validate.capacity(message.capacity_range)
    return at_least_filesystem_minimum(message, config, required, limit), limit


def requested_limits(message: CreateVolumeRequest) -> IoLimits:
    """The I/O limits a CreateVolume asks for: the StorageClass parameters', then the VolumeAttributesClass's
    (`mutable_parameters`, which may hold nothing else) over them."""
    changes = qos.parse_parameters(message.mutable_parameters, only_limits=True)
    return qos.limits_of(message.parameters).changed(changes)


def modified_limits(message: ControllerModifyVolumeRequest) -> dict[str, int | None]:
    """The changes a ControllerModifyVolume asks for, checked before anything is looked up. None asked (no
    mutable_parameters) changes nothing: CSI modifies only what a key names."""
    validate.require(message.volume_id, "volume_id")
    return qos.parse_parameters(message.mutable_parameters, only_limits=True)


def page_bounds(total: int, max_entries: int, starting_token: str) -> tuple[int, int]:
    try:
        return validate.page(total, max_entries, starting_token)
    except ValueError:
        raise GRPCError(Status.ABORTED, f"starting_token {starting_token!r} is not valid") from None


_condition = convert.condition


class ControllerService(ControllerBase):
    def __init__(
        self, manager: VolumeManager, node_id: str, config: NodeConfig | None = None, io: VolumeQos | None = None
    ) -> None:
        self.manager = manager
        self.node_id = node_id
        self.config = config or NodeConfig()
        self.io = io or qos.for_node(self.config.node)
        self._entries = convert.VolumeEntries(node_id)  # ListVolumes entries, encoded once per volume

    def _on_this_node(self, requirement: TopologyRequirement | None) -> bool:
        if requirement is None or not requirement.requisite:
            return True
        return any(t.segments.get(TOPOLOGY_KEY, self.node_id) == self.node_id for t in requirement.requisite)

    @rpc
    async def create_volume(self, message: CreateVolumeRequest) -> CreateVolumeResponse:
        required, limit = checked_create(message, self.config)
        encrypted = validate.encrypted(message.parameters)
        source = validate.content_source(message.volume_content_source)
        limits = requested_limits(message)
        if not self._on_this_node(message.accessibility_requirements):
            raise InsufficientCapacity(
                f"this node ({self.node_id}) is not in the requisite topology; volumes here are reachable only"
                f" from {TOPOLOGY_KEY}={self.node_id}"
            )
        self.io.check(limits)  # never a volume whose limits this node cannot enforce
        volume = await self.manager.create_volume(
            CreateRequest(
                name=message.name,
                backend=message.parameters.get("backend", ""),
                pool=message.parameters.get("pool") or None,
                required_bytes=required,
                limit_bytes=limit,
                source=source,
                encrypted=encrypted,
                parameters=validate.backend_parameters(message.parameters),
            )
        )
        self.io.set_limits(volume.id, limits)
        return CreateVolumeResponse(volume=convert.volume(volume, self.node_id))

    @rpc
    async def delete_volume(self, message: DeleteVolumeRequest) -> DeleteVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        await self.manager.delete_volume(message.volume_id)
        self.io.forget(message.volume_id)
        return DeleteVolumeResponse()

    @rpc
    async def validate_volume_capabilities(
        self, message: ValidateVolumeCapabilitiesRequest
    ) -> ValidateVolumeCapabilitiesResponse:
        validate.require(message.volume_id, "volume_id")
        validate.require(message.volume_capabilities, "volume_capabilities")
        await self.manager.get_volume(message.volume_id)
        try:
            validate.check_capabilities(message.volume_capabilities)
            validate.check_parameters(message.parameters)
        except InvalidArgument as exc:  # an unsupported capability is an answer here, not an error
            return ValidateVolumeCapabilitiesResponse(message=str(exc))
        return ValidateVolumeCapabilitiesResponse(
            confirmed=ValidateVolumeCapabilitiesResponseConfirmed(
                volume_context=message.volume_context,
                volume_capabilities=message.volume_capabilities,
                parameters=message.parameters,
            )
        )

    @rpc
    async def list_volumes(self, message: ListVolumesRequest) -> ListVolumesResponse:
        volumes = await self.manager.list_volumes()
        start, end = page_bounds(len(volumes), message.max_entries, message.starting_token)
        return self._entries.response(volumes, start, end, str(end) if end < len(volumes) else "")

    @rpc
    async def get_capacity(self, message: GetCapacityRequest) -> GetCapacityResponse:
        for cap in message.volume_capabilities:
            validate.check_capability(cap)
        validate.check_parameters(message.parameters)
        topology = message.accessible_topology
        if topology is not None and topology.segments.get(TOPOLOGY_KEY, self.node_id) != self.node_id:
            return GetCapacityResponse(available_capacity=0, maximum_volume_size=0)
        backend = message.parameters.get("backend", "")
        pool = message.parameters.get("pool") or None
        if backend:
            try:
                self.manager.backend(backend, pool)
            except InvalidArgument as exc:
                # A StorageClass for disks this node does not have: nothing to offer here, which is an answer
                # (capacity 0, so the scheduler looks elsewhere), not an error the external-provisioner retries.
                log.debug("GetCapacity: %s; answering 0", exc.message)
                return GetCapacityResponse(available_capacity=0, maximum_volume_size=0)
            capacities = [await self.manager.capacity(backend, pool, validate.backend_parameters(message.parameters))]
        else:  # no StorageClass parameters: what the whole node has
            capacities = [await self.manager.capacity(b, p) for b, p in self.manager.pools()]
        return GetCapacityResponse(
            available_capacity=sum(c.available_bytes for c in capacities),
            maximum_volume_size=max((c.maximum_volume_bytes for c in capacities), default=0),
        )

    # EXPAND_VOLUME is deliberately not advertised: each node serves only its own volumes and the external-resizer
    # has no per-node mode, so with it advertised a single leader would send every ControllerExpandVolume to its own
    # node. Without it the resizer only records the new size and kubelet calls NodeExpandVolume on the right node,
    # which grows the volume and then the filesystem. ControllerExpandVolume stays served for direct callers.
    @rpc
    async def controller_get_capabilities(
        self, message: ControllerGetCapabilitiesRequest
    ) -> ControllerGetCapabilitiesResponse:
        caps = [
            Cap.CREATE_DELETE_VOLUME,
            Cap.LIST_VOLUMES,
            Cap.GET_CAPACITY,
            Cap.GET_VOLUME,
            Cap.VOLUME_CONDITION,
            Cap.SINGLE_NODE_MULTI_WRITER,
            Cap.MODIFY_VOLUME,
        ]
        backends = self.manager.backends.values()
        if any(b.features.snapshots for b in backends):
            caps += [Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS]
        if any(b.features.clones for b in backends):
            caps.append(Cap.CLONE_VOLUME)
        return ControllerGetCapabilitiesResponse(
            capabilities=[ControllerServiceCapability(rpc=ControllerServiceCapabilityRpc(type=c)) for c in caps]
        )

    @rpc
    async def controller_get_volume(self, message: ControllerGetVolumeRequest) -> ControllerGetVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        volume = await self.manager.get_volume(message.volume_id)
        return ControllerGetVolumeResponse(
            volume=convert.volume(volume, self.node_id),
            status=ControllerGetVolumeResponseVolumeStatus(volume_condition=_condition(volume)),
        )

    @rpc
    async def controller_expand_volume(self, message: ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        validate.require(message.capacity_range, "capacity_range")
        required, limit = validate.capacity(message.capacity_range)
        validate.require(required, "capacity_range.required_bytes")
        if message.volume_capability is not None:
            validate.check_capability(message.volume_capability, "volume_capability")
        volume = await self.manager.expand_volume(message.volume_id, required, limit)
        is_block = message.volume_capability is not None and message.volume_capability.block is not None
        return ControllerExpandVolumeResponse(capacity_bytes=volume.size_bytes, node_expansion_required=not is_block)

    @rpc
    async def controller_modify_volume(self, message: ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse:
        changes = modified_limits(message)
        volume = await self.manager.get_volume(message.volume_id)
        if not changes:
            return ControllerModifyVolumeResponse()
        limits = self.io.limits(volume.id).changed(changes)
        for problem in self.io.set_limits(volume.id, limits):
            log.warning("volume %s: I/O limits %s recorded; applying them to a pod: %s", volume.id, limits, problem)
        log.info("volume %s: I/O limits now %s", volume.id, limits)
        return ControllerModifyVolumeResponse()

    @rpc
    async def create_snapshot(self, message: CreateSnapshotRequest) -> CreateSnapshotResponse:
        validate.require(message.source_volume_id, "source_volume_id")
        validate.check_name(message.name)
        snapshot = await self.manager.create_snapshot(message.source_volume_id, message.name)
        return CreateSnapshotResponse(snapshot=convert.snapshot(snapshot))

    @rpc
    async def delete_snapshot(self, message: DeleteSnapshotRequest) -> DeleteSnapshotResponse:
        validate.require(message.snapshot_id, "snapshot_id")
        await self.manager.delete_snapshot(message.snapshot_id)
        return DeleteSnapshotResponse()

    @rpc
    async def list_snapshots(self, message: ListSnapshotsRequest) -> ListSnapshotsResponse:
        if message.snapshot_id:
            try:
                snapshots = [await self.manager.get_snapshot(message.snapshot_id)]
            except NotFound:
                snapshots = []
        else:
            snapshots = await self.manager.list_snapshots()
        if message.source_volume_id:
            snapshots = [s for s in snapshots if s.source_volume_id == message.source_volume_id]
        start, end = page_bounds(len(snapshots), message.max_entries, message.starting_token)
        return ListSnapshotsResponse(
            entries=[ListSnapshotsResponseEntry(snapshot=convert.snapshot(s)) for s in snapshots[start:end]],
            next_token=str(end) if end < len(snapshots) else "",
        )
