"""The `thin` backend on real LVM, inside the UML sandbox (`nox -s e2e`); skipped elsewhere.

It passes the shared backend contract; the rest covers what thin pools add: snapshots and clones with their real
content, the overprovision ratio and the use threshold, a pool without zeroing refused, activation at open, foreign
LVs in the pool left alone, and crash leftovers finished on retry.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from localdisk import ContentSource, SourceKind, VolumeManager
from localdisk.backends.lvm import PENDING_TAG, SNAPSHOT, VOLUME, ThinBackend, identity_tags, lv_name_for
from localdisk.backends.lvmcmd import Lvm
from localdisk.errors import AlreadyExists, FailedPrecondition, InsufficientCapacity, NotFound
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import BackendContract, manager_for
from tests.lvm.conftest import THIN_POOL, THIN_VG, thin_backend
from tests.lvm.helpers import device_size, make, pattern, read, request, write

pytestmark = [pytest.mark.uml, pytest.mark.anyio]


class TestThinContract(BackendContract):
    @pytest.fixture
    def backend(self, thin: ThinBackend) -> ThinBackend:
        return thin


async def test_thin_new_volume_never_shows_old_data(thin: ThinBackend) -> None:
    manager = manager_for(thin)
    size = 16 * MiB
    old = await manager.get_volume(await make(manager, thin, "pvc-tenant-a", size))
    assert old.device_path
    write(old.device_path, pattern(size))
    await manager.delete_volume(old.id)
    new = await manager.get_volume(await make(manager, thin, "pvc-tenant-b", size))
    assert new.device_path
    write(new.device_path, b"x", 1000)  # provisions one block: the pool must zero the rest of it
    assert read(new.device_path, size) == bytes(1000) + b"x" + bytes(size - 1001)


async def test_open_refuses_a_pool_without_zeroing(runner: CommandRunner, lvm: Lvm, clean_thin: None) -> None:
    await lvm.create_thin_pool(THIN_VG, "nozero", 16 * MiB, zero=False)
    backend = thin_backend(runner, lvm, pool="nozero")
    with pytest.raises(FailedPrecondition, match="lvchange -Z y ldtest-thin/nozero") as refused:
        await backend.open()
    assert "old data" in refused.value.message
    await runner.run(["lvm", "lvchange", "-Z", "y", "--", f"{THIN_VG}/nozero"])  # the fix the message gives
    await backend.open()


async def test_a_pool_gets_the_metadata_size_asked_for(runner: CommandRunner, lvm: Lvm, clean_thin: None) -> None:
    await lvm.create_thin_pool(THIN_VG, "bigmeta", 16 * MiB, metadata=8 * MiB)  # LVM alone would give 4 MiB
    sizes = ["--noheadings", "--units", "b", "--nosuffix", "-o", "lv_metadata_size"]
    listed = await runner.run(["lvm", "lvs", *sizes, "--", f"{THIN_VG}/bigmeta"])
    assert int(listed.text.strip()) == 8 * MiB


async def test_snapshot_restore_and_clone_keep_their_content(thin: ThinBackend, lvm: Lvm) -> None:
    manager = manager_for(thin)
    size = 8 * MiB
    source = await manager.get_volume(await make(manager, thin, "pvc-src", size))
    assert source.device_path
    write(source.device_path, pattern(size, b"before "))
    snap = await manager.create_snapshot(source.id, "snap-1")
    assert snap.ready and snap.size_bytes == size and snap.source_volume_id == source.id
    assert abs(snap.created_at - datetime.now(UTC)) < timedelta(minutes=5)
    snap_lv = (await lvm.report(THIN_VG)).lvs[snap.ref.handle]
    assert snap_lv.skip_activation and not snap_lv.active and snap_lv.origin == source.ref.handle
    assert await thin.find_snapshot("snap-1") == snap == await manager.get_snapshot(snap.id)
    write(source.device_path, pattern(size, b"after "))

    restored = await manager.create_volume(
        request(thin, "pvc-restored", 2 * size, ContentSource(SourceKind.SNAPSHOT, snap.id))
    )
    assert restored.size_bytes == 2 * size and restored.source == ContentSource(SourceKind.SNAPSHOT, snap.id)
    assert restored.device_path and device_size(restored.device_path) == 2 * size
    assert read(restored.device_path, size) == pattern(size, b"before ")
    assert read(restored.device_path, size, size) == bytes(size)  # the grown part is new, zeroed space
    assert PENDING_TAG not in (await lvm.report(THIN_VG)).lvs[restored.ref.handle].tags

    clone = await manager.create_volume(request(thin, "pvc-clone", size, ContentSource(SourceKind.VOLUME, source.id)))
    assert clone.device_path and read(clone.device_path, size) == pattern(size, b"after ")
    assert await manager.get_volume(clone.id) == clone
    assert (
        await manager.create_volume(request(thin, "pvc-clone", size, ContentSource(SourceKind.VOLUME, source.id)))
        == clone
    )
    with pytest.raises(AlreadyExists, match="another content source"):
        await manager.create_volume(request(thin, "pvc-clone", size))

    await manager.delete_volume(source.id)  # thin snapshots outlive their source
    again = await manager.create_volume(request(thin, "pvc-again", size, ContentSource(SourceKind.SNAPSHOT, snap.id)))
    assert again.device_path and read(again.device_path, size) == pattern(size, b"before ")
    await manager.delete_snapshot(snap.id)
    assert await manager.list_snapshots() == []
    assert sorted(v.name for v in await manager.list_volumes()) == ["pvc-again", "pvc-clone", "pvc-restored"]


async def test_snapshot_names_are_their_own_namespace(thin: ThinBackend) -> None:
    manager = manager_for(thin)
    first = await make(manager, thin, "same-name")
    second = await make(manager, thin, "other")
    snap = await manager.create_snapshot(first, "same-name")  # a snapshot may share a volume's name
    assert snap.ref.handle == lv_name_for(SNAPSHOT, "same-name")
    with pytest.raises(AlreadyExists):
        await manager.create_snapshot(second, "same-name")
    await thin.delete_volume(snap.ref.handle)  # a snapshot handle is no volume: nothing happens
    await thin.delete_snapshot(first.split(":")[2])  # and the other way round
    assert [s.id for s in await manager.list_snapshots()] == [snap.id]
    assert len(await manager.list_volumes()) == 2


async def test_pending_restore_is_grown_on_retry(thin: ThinBackend, lvm: Lvm) -> None:
    manager = manager_for(thin)
    source_id = await make(manager, thin, "pvc-src")
    snap = await manager.create_snapshot(source_id, "snap")
    lv_name = lv_name_for(VOLUME, "pvc-restore")
    tags = [*identity_tags(VOLUME, "pvc-restore", ("snapshot", snap.ref.handle)), PENDING_TAG]
    await lvm.create_thin_snapshot(THIN_VG, snap.ref.handle, lv_name, tags, activate=True)  # then the crash
    assert await thin.find_volume("pvc-restore") is None
    source = ContentSource(SourceKind.SNAPSHOT, snap.id)
    volume = await manager.create_volume(request(thin, "pvc-restore", 16 * MiB, source))
    assert volume.size_bytes == 16 * MiB and await manager.get_volume(volume.id) == volume


async def test_thin_overprovision_ratio(runner: CommandRunner, lvm: Lvm, clean_thin: None) -> None:
    backend = thin_backend(runner, lvm, ratio=2.0)  # the pool has 256 MiB of data: 512 MiB may be promised
    await backend.open()
    manager = manager_for(backend)
    assert (await backend.capacity()).available_bytes == 256 * MiB  # real space binds first
    for name in ("a", "b"):
        await make(manager, backend, name, 200 * MiB)
    capacity = await backend.capacity()
    assert capacity.available_bytes == 112 * MiB == capacity.maximum_volume_bytes  # now the ratio binds
    assert capacity.details["virtual_bytes"] == 400 * MiB
    with pytest.raises(InsufficientCapacity, match="overprovision ratio 2"):
        await make(manager, backend, "c", 116 * MiB)
    volume_id = await make(manager, backend, "c", 112 * MiB)
    with pytest.raises(InsufficientCapacity):
        await manager.create_snapshot(volume_id, "snap-over")
    with pytest.raises(InsufficientCapacity):
        await manager.expand_volume(volume_id, 116 * MiB)


async def test_thin_threshold_refuses_once_real_use_passes_it(
    runner: CommandRunner, lvm: Lvm, clean_thin: None
) -> None:
    await lvm.create_thin_pool(THIN_VG, "small", 32 * MiB, zero=True)
    backend = thin_backend(runner, lvm, pool="small", ratio=10.0, threshold=50.0)
    await backend.open()
    manager = manager_for(backend)
    volume = await manager.get_volume(await make(manager, backend, "pvc-fill", 32 * MiB))
    assert volume.device_path
    write(volume.device_path, os.urandom(20 * MiB))  # about 62% of the pool's data
    capacity = await backend.capacity()
    assert capacity.available_bytes == 0 and capacity.details["data_percent_x100"] > 5000
    with pytest.raises(InsufficientCapacity, match="past the 50% threshold"):
        await make(manager, backend, "pvc-more", 4 * MiB)
    with pytest.raises(InsufficientCapacity, match="past the 50% threshold"):
        await manager.create_snapshot(volume.id, "snap-full")
    await manager.delete_volume(volume.id)
    assert (await backend.capacity()).available_bytes == 32 * MiB
    await make(manager, backend, "pvc-more", 4 * MiB)


async def test_alignment_is_the_extent_size(thin: ThinBackend) -> None:
    assert thin.features.alignment == thin.features.minimum_size == 4 * MiB
    volume = await manager_for(thin).create_volume(request(thin, "pvc-odd-size", 5 * MiB + 1))
    assert volume.size_bytes == 8 * MiB


async def test_foreign_lvs_in_the_pool_are_invisible_and_untouched(thin: ThinBackend, lvm: Lvm) -> None:
    squatter = lv_name_for(VOLUME, "pvc-squat")
    await lvm.create_thin(THIN_VG, THIN_POOL, "their-thin", 8 * MiB, [])
    await lvm.create_thin(THIN_VG, THIN_POOL, squatter, 8 * MiB, ["localdisk.csi.io/kind=volume"])
    await lvm.create_linear(THIN_VG, "their-linear", 8 * MiB, ["localdisk.csi.io/owned"], wipe=True)
    write(f"/dev/{THIN_VG}/{squatter}", pattern(4096, b"theirs "))
    before = (await lvm.report(THIN_VG)).lvs
    manager = manager_for(thin)
    assert await manager.list_volumes() == []
    assert await thin.find_volume("pvc-squat") is None
    with pytest.raises(NotFound):
        await thin.get_volume(squatter)
    with pytest.raises(NotFound):
        await manager.create_snapshot(f"thin:tp:{squatter}", "snap-of-theirs")
    await thin.delete_volume(squatter)
    with pytest.raises(AlreadyExists, match="will not touch it"):
        await manager.create_volume(request(thin, "pvc-squat", 8 * MiB))
    assert (await lvm.report(THIN_VG)).lvs == before
    assert read(f"/dev/{THIN_VG}/{squatter}", 4096) == pattern(4096, b"theirs ")
    assert (await thin.capacity()).details["virtual_bytes"] == 16 * MiB  # their promises count against the ratio


async def test_open_activates_pool_and_volumes(runner: CommandRunner, lvm: Lvm, thin: ThinBackend) -> None:
    volume = await manager_for(thin).create_volume(request(thin, "pvc-act", 8 * MiB))
    await runner.run(["lvm", "vgchange", "-a", "n", "--", THIN_VG])
    assert not any(lv.active for lv in (await lvm.report(THIN_VG)).lvs.values())
    reopened = thin_backend(runner, lvm)
    await reopened.open()
    assert await reopened.get_volume(volume.ref.handle) == volume
    assert volume.device_path and Path(volume.device_path).resolve().is_block_device()
    assert (await lvm.report(THIN_VG)).lvs[THIN_POOL].active


async def test_open_names_a_missing_pool(runner: CommandRunner, lvm: Lvm, clean_thin: None) -> None:
    with pytest.raises(FailedPrecondition, match="thin pool ldtest-thin/nopool not found"):
        await thin_backend(runner, lvm, pool="nopool").open()
    await lvm.create_linear(THIN_VG, "plain", 8 * MiB, [], wipe=True)
    with pytest.raises(FailedPrecondition, match="not a thin pool"):
        await thin_backend(runner, lvm, pool="plain").open()


async def test_a_pending_restore_left_behind_is_reclaimed_after_the_grace_period(thin: ThinBackend, lvm: Lvm) -> None:
    """A restore killed before it was grown leaves a pending thin LV, counted in the pool's virtual size; with
    nobody retrying it, the background pass removes it after the grace period and the capacity is back."""
    manager = VolumeManager({(thin.kind, thin.pool): thin}, {thin.kind: thin.pool}, pending_grace=1.0)
    source_id = await make(manager, thin, "pvc-src")
    snap = await manager.create_snapshot(source_id, "snap")
    free = (await thin.capacity()).available_bytes
    lv_name = lv_name_for(VOLUME, "pvc-restore-abandoned")
    tags = [*identity_tags(VOLUME, "pvc-restore-abandoned", ("snapshot", snap.ref.handle)), PENDING_TAG]
    await lvm.create_thin_snapshot(THIN_VG, snap.ref.handle, lv_name, tags, activate=True)  # then the crash
    assert (await thin.capacity()).available_bytes < free
    assert [(p.name, p.ref.handle) for p in await thin.pending_volumes()] == [("pvc-restore-abandoned", lv_name)]
    assert await manager.reclaim_pending() == 0, "first seen now: not old enough"
    started = anyio.current_time()
    with anyio.fail_after(60):
        while lv_name in (await lvm.report(THIN_VG)).lvs:
            await manager.reclaim_pending()
            await anyio.sleep(0.2)
    assert anyio.current_time() - started >= 0.9
    assert (await thin.capacity()).available_bytes == free
    assert manager.pending_reclaimed == {("thin", "tp"): 1}
    assert [v.id for v in await manager.list_volumes()] == [source_id]
    assert [s.id for s in await manager.list_snapshots()] == [snap.id], "the snapshot and its source are untouched"
