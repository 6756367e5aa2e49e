"""The `lvm` (linear) backend on real LVM, inside the UML sandbox (`nox -s e2e`); skipped elsewhere.

It passes the shared backend contract; the rest covers what linear LVs add: tags and device, extent alignment,
spare space, no snapshots, activation at open, foreign LVs left alone, and no data of a deleted volume in a new one
(including after a crash between creating and zeroing).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import anyio
import pytest

from localdisk import ContentSource, SourceKind, VolumeManager
from localdisk.backends.lvm import PENDING_TAG, VOLUME, LinearBackend, LinearPoolConfig, identity_tags, lv_name_for
from localdisk.backends.lvmcmd import Lvm, devices_dir
from localdisk.backends.lvmshell import ShellExecutor
from localdisk.errors import AlreadyExists, Busy, FailedPrecondition, InsufficientCapacity, NotFound, Unsupported
from localdisk.model import VolumeSpec
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import BackendContract, manager_for
from tests.lvm.conftest import LINEAR_VG, THIN_VG
from tests.lvm.helpers import device_size, make, pattern, read, request, write

pytestmark = [pytest.mark.uml, pytest.mark.anyio]


class TestLinearContract(BackendContract):
    @pytest.fixture
    def backend(self, linear: LinearBackend) -> LinearBackend:
        return linear


async def test_volume_is_a_tagged_lv_with_a_device(linear: LinearBackend, lvm: Lvm) -> None:
    manager = manager_for(linear)
    volume = await manager.create_volume(request(linear, "pvc-dev", 12 * MiB))
    lv_name = lv_name_for(VOLUME, "pvc-dev")
    assert volume.id == f"lvm:fast:{lv_name}"
    assert volume.device_path == f"/dev/{LINEAR_VG}/{lv_name}"
    assert Path(volume.device_path).resolve().is_block_device()
    assert device_size(volume.device_path) == volume.size_bytes == 12 * MiB
    lv = (await lvm.report(LINEAR_VG)).lvs[lv_name]
    assert set(identity_tags(VOLUME, "pvc-dev")) == lv.tags  # the pending tag is gone once it is zeroed


async def test_linear_refuses_snapshots_and_clones(linear: LinearBackend) -> None:
    manager = manager_for(linear)
    volume_id = await make(manager, linear, "pvc-lin")
    with pytest.raises(Unsupported):
        await manager.create_snapshot(volume_id, "snap")
    with pytest.raises(Unsupported):
        await manager.create_volume(request(linear, "pvc-clone", 8 * MiB, ContentSource(SourceKind.VOLUME, volume_id)))


async def test_expand_beyond_free_space_is_refused(linear: LinearBackend) -> None:
    manager = manager_for(linear)
    volume_id = await make(manager, linear, "pvc-grow")
    with pytest.raises(InsufficientCapacity, match=LINEAR_VG):
        await manager.expand_volume(volume_id, 1024 * MiB)
    assert (await manager.get_volume(volume_id)).size_bytes == 8 * MiB


async def test_spare_space_is_kept(runner: CommandRunner, lvm: Lvm, linear: LinearBackend) -> None:
    spared = LinearBackend("spared", LinearPoolConfig(volume_group=LINEAR_VG, spare_bytes=100 * MiB), lvm, runner)
    await spared.open()
    full, kept = await linear.capacity(), await spared.capacity()
    assert full.available_bytes - kept.available_bytes == 100 * MiB
    with pytest.raises(InsufficientCapacity, match="kept spare"):
        await spared.create_volume(VolumeSpec("pvc-spare", full.available_bytes))


async def test_delete_of_a_volume_in_use_is_busy(linear: LinearBackend) -> None:
    manager = manager_for(linear)
    volume = await manager.get_volume(await make(manager, linear, "pvc-busy"))
    assert volume.device_path
    with open(volume.device_path, "rb"), pytest.raises(Busy, match="in use"):
        await manager.delete_volume(volume.id)
    await manager.delete_volume(volume.id)
    assert await manager.list_volumes() == []


async def test_linear_new_volume_never_shows_old_data(linear: LinearBackend, lvm: Lvm) -> None:
    manager = manager_for(linear)
    size = 16 * MiB
    old = await manager.get_volume(await make(manager, linear, "pvc-tenant-a", size))
    assert old.device_path
    write(old.device_path, pattern(size))
    await manager.delete_volume(old.id)
    # The freed extents really still hold the data: an LV made without zeroing shows it...
    await lvm._run(["lvcreate", "-y", "-W", "n", "-Z", "n", "-L", f"{size}b", "-n", "raw", "--", LINEAR_VG])
    assert read(f"/dev/{LINEAR_VG}/raw", 4096, size - 4096) == pattern(size)[-4096:]
    await lvm.remove(LINEAR_VG, "raw")
    # ...and a volume of the backend over the same extents shows none of it, anywhere.
    new = await manager.get_volume(await make(manager, linear, "pvc-tenant-b", size))
    assert new.device_path
    assert read(new.device_path, size) == bytes(size)


async def test_pending_linear_volume_is_zeroed_on_retry(linear: LinearBackend, lvm: Lvm) -> None:
    """A crash between lvcreate and the zeroing leaves a pending LV: it is not handed out, a retry finishes it."""
    lv_name = lv_name_for(VOLUME, "pvc-crashed")
    await lvm.create_linear(
        LINEAR_VG, lv_name, 8 * MiB, [*identity_tags(VOLUME, "pvc-crashed"), PENDING_TAG], wipe=False
    )
    write(f"/dev/{LINEAR_VG}/{lv_name}", pattern(8 * MiB))  # stands for a previous tenant's data
    manager = manager_for(linear)
    assert await linear.find_volume("pvc-crashed") is None
    assert await manager.list_volumes() == []
    with pytest.raises(NotFound):
        await linear.get_volume(lv_name)
    volume = await manager.create_volume(request(linear, "pvc-crashed", 8 * MiB))
    assert volume.id.endswith(lv_name)
    assert read(f"/dev/{LINEAR_VG}/{lv_name}", 8 * MiB) == bytes(8 * MiB)
    assert PENDING_TAG not in (await lvm.report(LINEAR_VG)).lvs[lv_name].tags
    assert await manager.get_volume(volume.id) == volume


async def test_alignment_is_the_extent_size(linear: LinearBackend) -> None:
    assert linear.features.alignment == linear.features.minimum_size == 4 * MiB
    volume = await manager_for(linear).create_volume(request(linear, "pvc-odd-size", 5 * MiB + 1))
    assert volume.size_bytes == 8 * MiB


async def test_foreign_lvs_are_invisible_and_untouched(linear: LinearBackend, lvm: Lvm) -> None:
    squatter = lv_name_for(VOLUME, "pvc-squat")  # an LV that merely carries a name like ours
    await lvm.create_linear(LINEAR_VG, "someone-elses", 8 * MiB, ["their.tag"], wipe=True)
    await lvm.create_linear(LINEAR_VG, squatter, 8 * MiB, ["localdisk.csi.io/kind=volume"], wipe=True)
    write(f"/dev/{LINEAR_VG}/{squatter}", pattern(4096, b"theirs "))
    before = (await lvm.report(LINEAR_VG)).lvs
    manager = manager_for(linear)
    assert await manager.list_volumes() == []
    assert await linear.find_volume("pvc-squat") is None
    with pytest.raises(NotFound):
        await linear.get_volume(squatter)
    with pytest.raises(NotFound):
        await linear.expand_volume(squatter, 16 * MiB)
    await linear.delete_volume(squatter)  # not ours: deleting it is a no-op
    with pytest.raises(AlreadyExists, match="will not touch it"):
        await manager.create_volume(request(linear, "pvc-squat", 8 * MiB))
    report = await lvm.report(LINEAR_VG)
    assert report.lvs == before
    assert read(f"/dev/{LINEAR_VG}/{squatter}", 4096) == pattern(4096, b"theirs ")
    assert (await linear.capacity()).available_bytes == report.vg.free  # their space is not ours to promise


async def test_open_activates_the_volumes(runner: CommandRunner, lvm: Lvm, linear: LinearBackend) -> None:
    volume = await manager_for(linear).create_volume(request(linear, "pvc-act", 8 * MiB))
    await runner.run(["lvm", "vgchange", "-a", "n", "--", LINEAR_VG])
    inactive = await linear.get_volume(volume.ref.handle)
    assert inactive.abnormal == f"logical volume {LINEAR_VG}/{volume.ref.handle} is not active"
    reopened = LinearBackend("fast", LinearPoolConfig(volume_group=LINEAR_VG), lvm, runner)
    await reopened.open()
    assert await reopened.get_volume(volume.ref.handle) == volume
    assert volume.device_path and Path(volume.device_path).resolve().is_block_device()


async def test_open_names_a_missing_vg(runner: CommandRunner, lvm: Lvm) -> None:
    with pytest.raises(FailedPrecondition, match=r"'no-such-vg' not found.*pools\.lvm\.x\.volume_group"):
        await LinearBackend("x", LinearPoolConfig(volume_group="no-such-vg"), lvm, runner).open()


async def test_commands_scan_only_the_reported_vgs_pvs(runner: CommandRunner) -> None:
    """Once a VG is reported, the lvm shell's commands carry a devices file of its PVs; a VG outside it still works."""
    seen: list[list[str]] = []
    runner.observers.append(lambda argv, _s, _ok: seen.append(list(argv)))
    executor = ShellExecutor(runner)
    lvm = Lvm(runner, executor=executor, devices_file="ldtest.devices")
    path = devices_dir(executor.env) / "ldtest.devices"
    try:
        linear = await lvm.report(LINEAR_VG)
        assert lvm.pvs == {LINEAR_VG: frozenset(linear.pvs)}
        await lvm.create_linear(LINEAR_VG, "scoped", 8 * MiB, ["their.tag"], wipe=True)
        assert lvm.scoped and all(f"DEVNAME={pv} " in path.read_text() for pv in linear.pvs)
        assert seen[-2][1:2] == ["vgimportdevices"]
        assert seen[-1][1:4] == ["lvcreate", "--devicesfile", "ldtest.devices"]
        # The thin VG's PV is outside the file: it is read scanning everything, and joins the file.
        thin = await lvm.report(THIN_VG)
        assert not lvm.scoped and set(lvm.pvs) == {LINEAR_VG, THIN_VG}
        assert (await lvm.report(LINEAR_VG)).lv("scoped") is not None
        assert lvm.scoped and all(f"DEVNAME={pv} " in path.read_text() for pv in (*linear.pvs, *thin.pvs))
        assert (await lvm.report(THIN_VG)).pvs == thin.pvs
        await lvm.remove(LINEAR_VG, "scoped")
        assert seen[-1][1:4] == ["lvremove", "--devicesfile", "ldtest.devices"]
        assert executor.fallback_commands == 0 and executor.restarts == 0, "the shell must survive the devices file"
    finally:
        await lvm.aclose()
        path.unlink(missing_ok=True)
        with contextlib.suppress(NotFound):
            await Lvm(runner).remove(LINEAR_VG, "scoped")


@pytest.mark.usefixtures("clean_linear")
async def test_the_view_is_kept_fresh_in_the_background(runner: CommandRunner, lvm: Lvm) -> None:
    """With `keep_fresh` running, reads never run an LVM command, yet a change made behind our back shows up."""
    backend = LinearBackend("fast", LinearPoolConfig(volume_group=LINEAR_VG), lvm, runner, view_max_age=1.0)
    await backend.open()
    manager = manager_for(backend)
    commands: list[str] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(manager.keep_fresh)
        await anyio.sleep(0.2)
        reads = backend.view.reads
        free = (await backend.capacity()).available_bytes
        await lvm.create_linear(LINEAR_VG, "someone-elses", 8 * MiB, ["their.tag"], wipe=True)
        runner.observers.append(lambda argv, _s, _ok: commands.append(" ".join(argv[:2])))
        with anyio.fail_after(30):
            while (await backend.capacity()).available_bytes == free:
                await anyio.sleep(0.05)
        tasks.cancel_scope.cancel()
    assert (await backend.capacity()).available_bytes == free - 8 * MiB
    assert backend.view.reads > reads
    assert commands and all(c == "lvm fullreport" for c in commands), commands  # only the background re-reads


async def test_a_burst_of_creates_drops_its_pending_tags_in_few_commands(
    runner: CommandRunner, linear: LinearBackend, lvm: Lvm
) -> None:
    commands: list[list[str]] = []
    runner.observers.append(lambda argv, _s, _ok: commands.append(list(argv)))
    manager = manager_for(linear)
    volumes: list[str] = []

    async def create(i: int) -> None:
        volumes.append((await manager.create_volume(request(linear, f"pvc-burst-{i}", 4 * MiB))).ref.handle)

    async with anyio.create_task_group() as tasks:
        for i in range(12):
            tasks.start_soon(create, i)
    lvchanges = [argv for argv in commands if argv[1:2] == ["lvchange"]]
    assert len([argv for argv in commands if argv[1:2] == ["lvcreate"]]) == 12
    assert 1 <= len(lvchanges) < 12, lvchanges  # the drops of the burst were batched
    assert linear._ready_tags.batches == len(lvchanges)
    report = await lvm.report(LINEAR_VG)
    for handle in volumes:
        assert PENDING_TAG not in report.lvs[handle].tags
        assert read(f"/dev/{LINEAR_VG}/{handle}", 4 * MiB) == bytes(4 * MiB)
    assert len(await manager.list_volumes()) == 12


# -- pending leftovers (issue 20, item 6) ----------------------------------------------------------------------------
async def _reclaim_until_gone(manager: VolumeManager, lvm: Lvm, vg: str, lv_name: str, timeout: float) -> float:
    """Run reclaim passes (as `keep_fresh` does) until `lv_name` is gone from LVM's report; the seconds it took."""
    started = anyio.current_time()
    with anyio.fail_after(timeout):
        while lv_name in (await lvm.report(vg)).lvs:
            await manager.reclaim_pending()
            await anyio.sleep(0.2)
    return anyio.current_time() - started


async def test_a_pending_leftover_is_reclaimed_after_the_grace_period(linear: LinearBackend, lvm: Lvm) -> None:
    """A crash between lvcreate and the zeroing leaves a pending LV holding space; nobody retries its name (the
    claim was deleted): after the grace period the background pass removes it and the space is back."""
    free = (await linear.capacity()).available_bytes
    lv_name = lv_name_for(VOLUME, "pvc-abandoned")
    await lvm.create_linear(
        LINEAR_VG, lv_name, 8 * MiB, [*identity_tags(VOLUME, "pvc-abandoned"), PENDING_TAG], wipe=False
    )
    assert (await linear.capacity()).available_bytes == free - 8 * MiB
    [leftover] = await linear.pending_volumes()
    assert (leftover.name, leftover.size_bytes, leftover.ref.handle) == ("pvc-abandoned", 8 * MiB, lv_name)
    manager = VolumeManager({(linear.kind, linear.pool): linear}, {linear.kind: linear.pool}, pending_grace=1.0)
    assert await manager.reclaim_pending() == 0, "first seen now: not old enough"
    took = await _reclaim_until_gone(manager, lvm, LINEAR_VG, lv_name, timeout=60)
    assert took >= 0.9
    assert (await linear.capacity()).available_bytes == free
    assert manager.pending_reclaimed == {("lvm", "fast"): 1}
    assert await linear.pending_volumes() == [] and await manager.list_volumes() == []


async def test_an_in_flight_create_is_never_reclaimed_and_a_cancelled_one_removes_its_lv(
    linear: LinearBackend, lvm: Lvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create held in its zeroing (outside the pool's lock, its LV pending) is left alone by the reclaim however
    old; cancelled natively, twice (as grpclib cancels a handler), it removes its pending LV before it ends."""
    zeroing, release = anyio.Event(), anyio.Event()
    real_zero = linear._zero

    async def held_zero(lv: str, encrypted: bool) -> None:
        zeroing.set()
        await release.wait()
        await real_zero(lv, encrypted)

    monkeypatch.setattr(linear, "_zero", held_zero)
    manager = VolumeManager({(linear.kind, linear.pool): linear}, {linear.kind: linear.pool}, pending_grace=0.01)
    free = (await linear.capacity()).available_bytes
    lv_name = lv_name_for(VOLUME, "pvc-held")
    task = asyncio.get_running_loop().create_task(manager.create_volume(request(linear, "pvc-held", 8 * MiB)))
    with anyio.fail_after(60):
        await zeroing.wait()
    for _ in range(3):
        assert await manager.reclaim_pending() == 0
        await anyio.sleep(0.05)
    with pytest.raises(Busy):
        await linear.reclaim_pending(lv_name)
    assert PENDING_TAG in (await lvm.report(LINEAR_VG)).lvs[lv_name].tags
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError), anyio.fail_after(60):
        await task
    assert lv_name not in (await lvm.report(LINEAR_VG)).lvs
    assert (await linear.capacity()).available_bytes == free
    assert not manager.pending_reclaimed, "the cancelled create removed it itself"

    release.set()  # an in-flight create released finishes, and nothing reclaims it
    with anyio.fail_after(60):
        volume = await manager.create_volume(request(linear, "pvc-held", 8 * MiB))
    assert await manager.reclaim_pending() == 0 and await manager.list_volumes() == [volume]
