"""Domain values to CSI messages, and ListVolumes answers assembled from entries encoded once.

betterproto2 encodes in pure Python, field by field: a ListVolumes entry (volume, context map, topology, condition)
took about 0.25 ms to build and encode on the host, so a node's full listing of 1000 volumes cost a quarter of a
second of CPU on every call, nearly all of it encoding the same unchanged entries again (see bench/listbench.py).
`VolumeEntries` keeps each volume's entry and its wire bytes, keyed by the volume's value (a volume that changes is
a new key), and `EncodedListVolumesResponse` sends the bytes of a page joined, without encoding anything again.
The bytes of an entry not yet cached come from `encode_entry`, which writes exactly what betterproto2 writes for
`list_entry` (a test holds it to that) in a few microseconds instead of a quarter of a millisecond, so even the
first listing after a start costs little.
"""

from __future__ import annotations

from collections.abc import Sequence

from betterproto2 import encode_varint

from localdisk._proto.csi.v1 import (
    ListVolumesResponse,
    ListVolumesResponseEntry,
    ListVolumesResponseVolumeStatus,
    Topology,
    VolumeCondition,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
    VolumeContentSourceVolumeSource,
)
from localdisk._proto.csi.v1 import Snapshot as CsiSnapshot
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


def condition(vol: Volume) -> VolumeCondition:
    return VolumeCondition(abnormal=vol.abnormal is not None, message=vol.abnormal or "volume is healthy")


def list_entry(vol: Volume, node_id: str) -> ListVolumesResponseEntry:
    return ListVolumesResponseEntry(
        volume=volume(vol, node_id), status=ListVolumesResponseVolumeStatus(volume_condition=condition(vol))
    )


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, message, map entry)."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _string(number: int, value: str) -> bytes:
    return _field(number, value.encode()) if value else b""  # proto3: an empty string is not written


def _map(number: int, items: dict[str, str]) -> bytes:
    """A map<string, string>: one entry message per item, key and value always written (as betterproto2 does)."""
    return b"".join(_field(number, _field(1, k.encode()) + _field(2, v.encode())) for k, v in items.items())


def encode_entry(vol: Volume, node_id: str) -> bytes:
    """`bytes(list_entry(vol, node_id))`, written directly: Volume {capacity_bytes 1, volume_id 2, volume_context 3,
    content_source 4, accessible_topology 5}, VolumeStatus {volume_condition 2: {abnormal 1, message 2}}."""
    volume = encode_varint(1 << 3) + encode_varint(vol.size_bytes) if vol.size_bytes else b""
    volume += _string(2, vol.id)
    volume += _map(3, {"localdisk.csi.io/backend": vol.ref.backend, "localdisk.csi.io/pool": vol.ref.pool})
    if vol.source is not None:
        inner = 1 if vol.source.kind is SourceKind.SNAPSHOT else 2  # the oneof's snapshot or volume
        volume += _field(4, _field(inner, _string(1, vol.source.id)))
    volume += _field(5, _map(1, {TOPOLOGY_KEY: node_id}))
    state = (b"\x08\x01" if vol.abnormal is not None else b"") + _string(2, vol.abnormal or "volume is healthy")
    return _field(1, volume) + _field(2, _field(2, state))


class EncodedListVolumesResponse(ListVolumesResponse):
    """A ListVolumesResponse whose wire form was assembled from its entries' cached encodings (`VolumeEntries`):
    the same bytes betterproto2 would write, without encoding the entries again. Not to be changed once made."""

    _wire: bytes

    def __bytes__(self) -> bytes:
        return self._wire

    def SerializeToString(self) -> bytes:
        return self._wire


class VolumeEntries:
    """The ListVolumes entry of each volume and its encoding, made once per distinct volume value.

    Bounded: entries of volumes no longer listed are dropped once the cache holds twice as many as the last full
    listing (plus some slack), so it never holds much more than the node's volumes.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._cache: dict[Volume, tuple[ListVolumesResponseEntry, bytes]] = {}

    def _entry(self, vol: Volume) -> tuple[ListVolumesResponseEntry, bytes]:
        found = self._cache.get(vol)
        if found is None:
            encoded = encode_entry(vol, self.node_id)
            found = self._cache[vol] = (list_entry(vol, self.node_id), _field(1, encoded))
        return found

    def response(self, listed: Sequence[Volume], start: int, end: int, next_token: str) -> ListVolumesResponse:
        """The answer holding entries `listed[start:end]` and `next_token`."""
        page = [self._entry(v) for v in listed[start:end]]
        if len(self._cache) > 2 * len(listed) + 64:
            current = set(listed)
            self._cache = {v: e for v, e in self._cache.items() if v in current}
        response = EncodedListVolumesResponse(entries=[entry for entry, _ in page], next_token=next_token)
        # ListVolumesResponse: entries are field 1 (each cached as a whole field), next_token field 2
        response._wire = b"".join(encoded for _, encoded in page) + _string(2, next_token)
        return response
