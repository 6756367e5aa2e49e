"""CSI Controller service of `localdisk serve --role controller`: each call becomes a change to a custom resource.

The volume lives on one node's disks, so the controller cannot create it itself: CreateVolume picks the node from
the requested topology (the scheduler's choice comes first among the preferred segments), writes a LocalVolume for
it and waits for that node's agent to answer in the object's status (`localdisk.k8s.cluster`). The volume ID is the
object's name. ControllerExpandVolume asks the node the same way, so a PV is only resized once the space exists on
the disk; GetCapacity answers from the LocalNode objects the agents keep fresh.

LVM layouts and caches (StorageClass `stripes`, `mirrors`, `pvTags`, `cache`, ...) are checked here as the node's
backend checks them, travel in the LocalVolume's spec to the node, and are planned from the PVs each node reports
(`localdisk.backends.lvmspace`): GetCapacity answers what a volume of that layout can get, and a node is chosen only
if its PVs have room for it.
"""

from __future__ import annotations

import logging
from datetime import datetime

from localdisk._proto.csi.v1 import (
    ControllerBase,
    ControllerExpandVolumeRequest,
    ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest,
    ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest,
    ControllerGetVolumeResponse,
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
    ListVolumesResponseEntry,
    TopologyRequirement,
    ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse,
    ValidateVolumeCapabilitiesResponseConfirmed,
)
from localdisk._proto.csi.v1 import Snapshot as CsiSnapshot
from localdisk._proto.csi.v1 import Volume as CsiVolume
from localdisk.backends.lvmspace import LayoutRequest
from localdisk.config import NodeConfig
from localdisk.csi import TOPOLOGY_KEY, convert, validate
from localdisk.csi.controller import checked_create, modified_limits, page_bounds, requested_limits
from localdisk.csi.status import rpc
from localdisk.errors import InsufficientCapacity, InvalidArgument
from localdisk.k8s.cluster import ClusterVolumes, VolumeRequest
from localdisk.k8s.crd import SnapshotObject, VolumeObject
from localdisk.model import ContentSource, SourceKind
from localdisk.qos import IoLimits

Cap = ControllerServiceCapabilityRpcType
log = logging.getLogger(__name__)


def _nodes(requirement: TopologyRequirement | None) -> list[str]:
    """The nodes a volume may go to, the preferred ones first (the external-provisioner puts the scheduler's
    selected node first there), each once."""
    if requirement is None:
        return []
    found: list[str] = []
    for topology in [*requirement.preferred, *requirement.requisite]:
        node = topology.segments.get(TOPOLOGY_KEY)
        if node and node not in found:
            found.append(node)
    return found


class CentralControllerService(ControllerBase):
    def __init__(self, cluster: ClusterVolumes, config: NodeConfig | None = None) -> None:
        self.cluster = cluster
        self._listed: tuple[int, list[VolumeObject]] = (-1, [])  # `_listing` at a count of the cluster's changes
        self.config = config or NodeConfig()

    def _volume(self, volume: VolumeObject) -> CsiVolume:
        source = None
        if volume.source_kind and volume.source_name:
            source = ContentSource(SourceKind(volume.source_kind), volume.source_name)
        return CsiVolume(
            capacity_bytes=volume.size_bytes,
            volume_id=volume.name,
            volume_context={
                "localdisk.csi.io/backend": volume.backend,
                "localdisk.csi.io/pool": volume.pool or "",
            },
            content_source=convert.content_source(source),
            accessible_topology=[convert.topology(volume.node)],
        )

    def _place(
        self, message: CreateVolumeRequest, required: int, source: ContentSource | None, layout: LayoutRequest
    ) -> str:
        """The node for a new volume: the source's node for a clone or a restore, else the first node of the
        topology whose pool reports room for it in its layout (the selected node, normally), else the first one (its
        agent then answers with the truth: no room). `InvalidArgument` if the chosen node's pool can never make the
        layout."""
        backend, pool = message.parameters.get("backend", ""), message.parameters.get("pool") or None
        node = self._choose(message, required, source, layout)
        self.cluster.check_layout(node, backend, pool, layout)
        return node

    def _choose(
        self, message: CreateVolumeRequest, required: int, source: ContentSource | None, layout: LayoutRequest
    ) -> str:
        allowed = _nodes(message.accessibility_requirements)
        if source is not None:
            if source.kind is SourceKind.SNAPSHOT:
                node = self.cluster.snapshot(source.id).node
            else:
                node = self.cluster.volume(source.id).node
            if allowed and node not in allowed:
                raise InsufficientCapacity(
                    f"{source.kind.value} {source.id!r} is on node {node}, outside the requested topology; a volume"
                    " made from it can only be created on that node"
                )
            return node
        if not allowed:
            raise InvalidArgument(
                f"CreateVolume needs accessibility_requirements naming a node ({TOPOLOGY_KEY}); localdisk volumes are"
                " local to one node, so the StorageClass must use volumeBindingMode WaitForFirstConsumer"
            )
        backend, pool = message.parameters.get("backend", ""), message.parameters.get("pool") or None
        for node in allowed:
            _, largest = self.cluster.capacity(node, backend, pool, layout)
            if largest >= required:
                return node
        return allowed[0]

    @rpc
    async def create_volume(self, message: CreateVolumeRequest) -> CreateVolumeResponse:
        required, limit = checked_create(message, self.config)
        layout = LayoutRequest.from_parameters(validate.backend_parameters(message.parameters))
        source = validate.content_source(message.volume_content_source)
        await self.cluster.ready()
        if source is not None and source.kind is SourceKind.SNAPSHOT:
            source = ContentSource(source.kind, await self.cluster.snapshot_by_handle(source.id))
        elif source is not None:
            source = ContentSource(source.kind, await self.cluster.by_handle(source.id))
        node = self._place(message, required, source, layout)
        volume = await self.cluster.create_volume(
            VolumeRequest(
                csi_name=message.name,
                node=node,
                backend=message.parameters.get("backend", ""),
                pool=message.parameters.get("pool") or None,
                required_bytes=required,
                limit_bytes=limit,
                encrypted=validate.encrypted(message.parameters),
                source_kind=source.kind.value if source else None,
                source_name=source.id if source else None,
                io_limits=requested_limits(message).to_json(),
                layout=layout,
            )
        )
        return CreateVolumeResponse(volume=self._volume(volume))

    @rpc
    async def delete_volume(self, message: DeleteVolumeRequest) -> DeleteVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        await self.cluster.ready()
        await self.cluster.delete_volume(await self.cluster.by_handle(message.volume_id))
        return DeleteVolumeResponse()

    @rpc
    async def validate_volume_capabilities(
        self, message: ValidateVolumeCapabilitiesRequest
    ) -> ValidateVolumeCapabilitiesResponse:
        validate.require(message.volume_id, "volume_id")
        validate.require(message.volume_capabilities, "volume_capabilities")
        await self.cluster.ready()
        self.cluster.volume(await self.cluster.by_handle(message.volume_id))
        try:
            validate.check_capabilities(message.volume_capabilities)
            validate.check_parameters(message.parameters)
        except InvalidArgument as exc:
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
        await self.cluster.ready()
        volumes = self._listing()
        start, end = page_bounds(len(volumes), message.max_entries, message.starting_token)
        return ListVolumesResponse(
            entries=[ListVolumesResponseEntry(volume=self._volume(v)) for v in volumes[start:end]],
            next_token=str(end) if end < len(volumes) else "",
        )

    def _listing(self) -> list[VolumeObject]:
        """The volumes with a handle, by name: sorted again only after the cache changed, not for every page."""
        if self._listed[0] != self.cluster.changes:
            volumes = sorted((v for v in self.cluster.volumes.values() if v.handle is not None), key=lambda v: v.name)
            self._listed = (self.cluster.changes, volumes)
        return self._listed[1]

    @rpc
    async def get_capacity(self, message: GetCapacityRequest) -> GetCapacityResponse:
        for cap in message.volume_capabilities:
            validate.check_capability(cap)
        validate.check_parameters(message.parameters)
        layout = LayoutRequest.from_parameters(validate.backend_parameters(message.parameters))
        await self.cluster.ready()
        backend, pool = message.parameters.get("backend", ""), message.parameters.get("pool") or None
        topology = message.accessible_topology
        node = topology.segments.get(TOPOLOGY_KEY) if topology is not None else None
        nodes = [node] if node else sorted(self.cluster.nodes)
        answers = [self.cluster.capacity(n, backend, pool, layout) for n in nodes]
        return GetCapacityResponse(
            available_capacity=sum(a for a, _ in answers), maximum_volume_size=max((m for _, m in answers), default=0)
        )

    @rpc
    async def controller_get_capabilities(
        self, message: ControllerGetCapabilitiesRequest
    ) -> ControllerGetCapabilitiesResponse:
        # Snapshots and clones are offered whatever the nodes have reported so far: the sidecars ask once, at start;
        # a pool that cannot snapshot answers a clear INVALID_ARGUMENT from its node.
        caps = [
            Cap.CREATE_DELETE_VOLUME,
            Cap.LIST_VOLUMES,
            Cap.GET_CAPACITY,
            Cap.GET_VOLUME,
            Cap.EXPAND_VOLUME,
            Cap.SINGLE_NODE_MULTI_WRITER,
            Cap.CREATE_DELETE_SNAPSHOT,
            Cap.LIST_SNAPSHOTS,
            Cap.CLONE_VOLUME,
            Cap.MODIFY_VOLUME,
        ]
        return ControllerGetCapabilitiesResponse(
            capabilities=[ControllerServiceCapability(rpc=ControllerServiceCapabilityRpc(type=c)) for c in caps]
        )

    @rpc
    async def controller_get_volume(self, message: ControllerGetVolumeRequest) -> ControllerGetVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        await self.cluster.ready()
        volume = self.cluster.volume(await self.cluster.by_handle(message.volume_id))
        return ControllerGetVolumeResponse(volume=self._volume(volume))

    @rpc
    async def controller_expand_volume(self, message: ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        validate.require(message.capacity_range, "capacity_range")
        required, limit = validate.capacity(message.capacity_range)
        validate.require(required, "capacity_range.required_bytes")
        if message.volume_capability is not None:
            validate.check_capability(message.volume_capability, "volume_capability")
        await self.cluster.ready()
        volume = await self.cluster.expand_volume(await self.cluster.by_handle(message.volume_id), required, limit)
        is_block = message.volume_capability is not None and message.volume_capability.block is not None
        return ControllerExpandVolumeResponse(capacity_bytes=volume.size_bytes, node_expansion_required=not is_block)

    @rpc
    async def controller_modify_volume(self, message: ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse:
        """New I/O limits: recorded in the LocalVolume's spec, applied by its node agent (to the volume's record on
        the node and to the pods using it), answered once the agent reports them applied in the status."""
        changes = modified_limits(message)
        await self.cluster.ready()
        name = await self.cluster.by_handle(message.volume_id)
        volume = self.cluster.volume(name)
        if not changes:
            return ControllerModifyVolumeResponse()
        limits = IoLimits.from_json(volume.io_limits).changed(changes)
        await self.cluster.modify_volume(name, limits.to_json())
        return ControllerModifyVolumeResponse()

    @staticmethod
    def _snapshot(snapshot: SnapshotObject, snapshot_id: str = "") -> CsiSnapshot:
        created = (
            datetime.fromisoformat(snapshot.creation_time.replace("Z", "+00:00")) if snapshot.creation_time else None
        )
        return CsiSnapshot(
            size_bytes=snapshot.size_bytes,
            snapshot_id=snapshot_id or snapshot.name,
            source_volume_id=snapshot.source_volume,
            creation_time=created,
            ready_to_use=snapshot.phase == "Ready",
        )

    @rpc
    async def create_snapshot(self, message: CreateSnapshotRequest) -> CreateSnapshotResponse:
        validate.require(message.source_volume_id, "source_volume_id")
        validate.check_name(message.name)
        await self.cluster.ready()
        source = await self.cluster.by_handle(message.source_volume_id)
        snapshot = await self.cluster.create_snapshot(source, message.name)
        return CreateSnapshotResponse(snapshot=self._snapshot(snapshot))

    @rpc
    async def delete_snapshot(self, message: DeleteSnapshotRequest) -> DeleteSnapshotResponse:
        validate.require(message.snapshot_id, "snapshot_id")
        await self.cluster.ready()
        await self.cluster.delete_snapshot(await self.cluster.snapshot_by_handle(message.snapshot_id))
        return DeleteSnapshotResponse()

    @rpc
    async def list_snapshots(self, message: ListSnapshotsRequest) -> ListSnapshotsResponse:
        await self.cluster.ready()
        snapshots = sorted((s for s in self.cluster.snapshots.values() if s.handle), key=lambda s: s.name)
        asked = message.snapshot_id
        if asked:  # by object name, or by the ID of the per-node shape an adopted snapshot still goes by
            snapshots = [s for s in snapshots if asked in (s.name, s.handle)]
        if message.source_volume_id:
            source = message.source_volume_id
            names = {source} | {v.name for v in self.cluster.volumes.values() if ":" in source and v.handle == source}
            snapshots = [s for s in snapshots if s.source_volume in names]
        start, end = page_bounds(len(snapshots), message.max_entries, message.starting_token)
        found = [self._snapshot(s, asked) for s in snapshots[start:end]]  # under the ID asked for
        return ListSnapshotsResponse(
            entries=[ListSnapshotsResponseEntry(snapshot=f) for f in found],
            next_token=str(end) if end < len(snapshots) else "",
        )
