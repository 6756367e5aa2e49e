"""The backend contract: one suite every backend passes (fake everywhere, LVM under UML, partitions on loops).

Subclass `BackendContract` in a test module and provide a `backend` fixture yielding an opened `VolumeBackend`
whose pool is empty and has room for at least four volumes of `small` bytes.
"""

from __future__ import annotations

import pytest

from localdisk import (
    AlreadyExists,
    ContentSource,
    CreateRequest,
    InsufficientCapacity,
    NotFound,
    SourceKind,
    VolumeBackend,
    VolumeManager,
)
from localdisk.errors import Unsupported

ODD_NAMES = [
    "pvc-0b1e2c3d-4f5a-6b7c-8d9e-0f1a2b3c4d5e",
    "with space/and slash:colon",
    "ünïcødé-名前-🙂",
    "$(rm -rf /);`id`|&>x",
    "--force",
    "-a",
    "x" * 128,
]


def manager_for(backend: VolumeBackend) -> VolumeManager:
    return VolumeManager({(backend.kind, backend.pool): backend}, {backend.kind: backend.pool})


@pytest.mark.anyio
class BackendContract:
    @pytest.fixture
    def manager(self, backend: VolumeBackend) -> VolumeManager:
        return manager_for(backend)

    @pytest.fixture
    def small(self, backend: VolumeBackend) -> int:
        return max(backend.features.minimum_size, backend.features.alignment, 8 * 1024 * 1024)

    def request(self, backend: VolumeBackend, name: str, size: int, limit: int = 0) -> CreateRequest:
        return CreateRequest(name=name, backend=backend.kind, pool=backend.pool, required_bytes=size, limit_bytes=limit)

    async def test_create_get_list_delete(self, manager: VolumeManager, backend: VolumeBackend, small: int) -> None:
        volume = await manager.create_volume(self.request(backend, "pvc-contract-1", small))
        assert volume.size_bytes >= small
        assert volume.size_bytes % backend.features.alignment == 0
        assert volume.name == "pvc-contract-1"
        assert (await manager.get_volume(volume.id)) == volume
        assert [v.id for v in await manager.list_volumes()] == [volume.id]
        await manager.delete_volume(volume.id)
        with pytest.raises(NotFound):
            await manager.get_volume(volume.id)
        assert await manager.list_volumes() == []
        assert await backend.find_volume("pvc-contract-1") is None

    async def test_create_is_idempotent(self, manager: VolumeManager, backend: VolumeBackend, small: int) -> None:
        first = await manager.create_volume(self.request(backend, "pvc-idem", small))
        again = await manager.create_volume(self.request(backend, "pvc-idem", small))
        assert again == first
        assert len(await manager.list_volumes()) == 1
        with pytest.raises(AlreadyExists):
            await manager.create_volume(self.request(backend, "pvc-idem", first.size_bytes * 2))
        await manager.delete_volume(first.id)

    async def test_delete_missing_succeeds(self, manager: VolumeManager, backend: VolumeBackend, small: int) -> None:
        volume = await manager.create_volume(self.request(backend, "pvc-del", small))
        await manager.delete_volume(volume.id)
        await manager.delete_volume(volume.id)
        await backend.delete_volume(volume.ref.handle)

    async def test_expand(self, manager: VolumeManager, backend: VolumeBackend, small: int) -> None:
        volume = await manager.create_volume(self.request(backend, "pvc-grow", small))
        grown = await manager.expand_volume(volume.id, volume.size_bytes * 2)
        assert grown.size_bytes >= volume.size_bytes * 2
        assert (await manager.get_volume(volume.id)).size_bytes == grown.size_bytes
        same = await manager.expand_volume(volume.id, volume.size_bytes)  # smaller than now: nothing to do
        assert same.size_bytes == grown.size_bytes
        await manager.delete_volume(volume.id)

    async def test_capacity_accounting(self, manager: VolumeManager, backend: VolumeBackend, small: int) -> None:
        before = await backend.capacity()
        assert before.available_bytes > 0
        assert 0 < before.maximum_volume_bytes <= max(before.available_bytes, before.total_bytes)
        volume = await manager.create_volume(self.request(backend, "pvc-cap", small))
        during = await backend.capacity()
        assert during.available_bytes < before.available_bytes
        await manager.delete_volume(volume.id)
        after = await backend.capacity()
        assert after.available_bytes == before.available_bytes

    async def test_insufficient_capacity(self, manager: VolumeManager, backend: VolumeBackend) -> None:
        cap = await backend.capacity()
        too_big = cap.maximum_volume_bytes + backend.features.alignment
        with pytest.raises(InsufficientCapacity):
            await manager.create_volume(self.request(backend, "pvc-huge", too_big))
        assert await manager.list_volumes() == []
        assert (await backend.capacity()).available_bytes == cap.available_bytes

    @pytest.mark.parametrize("name", ODD_NAMES)
    async def test_any_csi_name_works(
        self, manager: VolumeManager, backend: VolumeBackend, small: int, name: str
    ) -> None:
        volume = await manager.create_volume(self.request(backend, name, small))
        assert volume.name == name
        assert await backend.find_volume(name) == volume
        assert await manager.create_volume(self.request(backend, name, small)) == volume
        await manager.delete_volume(volume.id)
        assert await backend.find_volume(name) is None

    async def test_snapshots_or_clear_refusal(self, manager: VolumeManager, backend: VolumeBackend, small: int) -> None:
        volume = await manager.create_volume(self.request(backend, "pvc-snap-src", small))
        if not backend.features.snapshots:
            with pytest.raises(Unsupported):
                await manager.create_snapshot(volume.id, "snap-1")
            await manager.delete_volume(volume.id)
            return
        snap = await manager.create_snapshot(volume.id, "snap-1")
        assert snap.source_volume_id == volume.id
        assert snap.size_bytes == volume.size_bytes
        assert await manager.create_snapshot(volume.id, "snap-1") == snap
        assert [s.id for s in await manager.list_snapshots()] == [snap.id]
        restored = await manager.create_volume(
            CreateRequest(
                name="pvc-from-snap",
                backend=backend.kind,
                pool=backend.pool,
                required_bytes=volume.size_bytes,
                source=ContentSource(SourceKind.SNAPSHOT, snap.id),
            )
        )
        assert restored.size_bytes >= snap.size_bytes
        await manager.delete_snapshot(snap.id)
        await manager.delete_snapshot(snap.id)
        assert await manager.list_snapshots() == []
        for vol in (restored, volume):
            await manager.delete_volume(vol.id)
