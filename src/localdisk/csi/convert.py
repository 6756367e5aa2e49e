"""Domain values to CSI messages."""

from __future__ import annotations

from localdisk._proto.csi.v1 import Snapshot as CsiSnapshot
from localdisk._proto.csi.v1 import (
    Topology,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
    VolumeContentSourceVolumeSource,
)
from localdisk._proto.csi.v1 import Volume as CsiVolume
from localdisk.csi import TOPOLOGY_KEY
from localdisk.model import ContentSource, Snapshot, SourceKind, Volume


def topology(node_id: str) -> Topology:
    return Topology(segments={TOPOLOGY_KEY: node_id})


def content_source(source: ContentSource | None) -> VolumeContentSource | None:
    if source is None:
        return None
    if source.kind is SourceKind.SNAPSHOT:
        return VolumeContentSource(snapshot=VolumeContentSourceSnapshotSource(snapshot_id=source.id))
    return VolumeContentSource(volume=VolumeContentSourceVolumeSource(volume_id=source.id))


def volume(vol: Volume, node_id: str) -> CsiVolume:
    return CsiVolume(
        capacity_bytes=vol.size_bytes,
        volume_id=vol.id,
        volume_context={"localdisk.csi.io/backend": vol.ref.backend, "localdisk.csi.io/pool": vol.ref.pool},
        content_source=content_source(vol.source),
        accessible_topology=[topology(node_id)],
    )


def snapshot(snap: Snapshot) -> CsiSnapshot:
    return CsiSnapshot(
        size_bytes=snap.size_bytes,
        snapshot_id=snap.id,
        source_volume_id=snap.source_volume_id,
        creation_time=snap.created_at,
        ready_to_use=snap.ready,
    )
