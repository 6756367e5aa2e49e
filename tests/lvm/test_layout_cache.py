"""SSD caches in front of thick volumes on real LVM, in the UML sandbox: dm-cache (writethrough, writeback) and
dm-writecache, made with the volume on the SSD-tagged PV, kept through expansion, flushed and removed with it.

Needs `--vg ldtest-raid:128Mx3@hdd,64M@ssd` (see test_layout.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig
from localdisk.backends.lvmcache import CACHE_OF_TAG, cache_name
from localdisk.backends.lvmcmd import Lvm
from localdisk.discovery import DiskRules
from localdisk.errors import InsufficientCapacity, InvalidArgument
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.lvm.conftest import reset_vg
from tests.lvm.helpers import device_size, read, write
from tests.lvm.test_layout import RAID_SANDBOX_ARGS, RAID_VG, ask, pv_free, tagged

pytestmark = [pytest.mark.uml, pytest.mark.anyio]


@pytest.fixture(autouse=True)
def _needs_raid_vg() -> None:
    if f"{RAID_VG}:" not in os.environ.get("LOCALDISK_SANDBOX_VGS", ""):
        pytest.skip(f"the sandbox was started without VG {RAID_VG}: pass {' '.join(RAID_SANDBOX_ARGS)}")


@pytest.fixture
async def cached_pool(runner: CommandRunner, lvm: Lvm) -> AsyncIterator[LinearBackend]:
    config = LinearPoolConfig(volume_group=RAID_VG, pv_tags=("hdd",), cache_pv_tags=("ssd",))
    backend = LinearBackend("hybrid", config, lvm, runner)
    await backend.open()
    yield backend
    await backend.aclose()
    await reset_vg(lvm, RAID_VG)


@pytest.mark.parametrize("mode", ["writethrough", "writeback", "writecache"])
async def test_a_cached_volume_is_made_grown_and_removed_with_its_cache(
    cached_pool: LinearBackend, lvm: Lvm, mode: str
) -> None:
    manager = manager_for(cached_pool)
    before = await pv_free(lvm)
    [ssd] = await tagged(lvm, "ssd")
    volume = await manager.create_volume(ask(cached_pool, "pvc-cached", 40 * MiB, cache=mode, cacheSize="16Mi"))
    report = await lvm.report(RAID_VG)
    lv = report.lvs[volume.ref.handle]
    assert lv.cached and "cache" in lv.layout, lv
    assert f"[{cache_name(volume.ref.handle)}_cvol]" == lv.pool
    after = await pv_free(lvm)
    assert before[ssd] - after[ssd] == 16 * MiB  # the cache, on the SSD
    assert sum(before.values()) - sum(after.values()) == 56 * MiB
    path = volume.device_path or ""
    data = os.urandom(4 * MiB)
    write(path, data, 8 * MiB)
    assert read(path, 8 * MiB) == bytes(8 * MiB)  # zeroed before the cache went on
    assert read(path, 4 * MiB, 8 * MiB) == data
    grown = await manager.expand_volume(volume.id, 80 * MiB)
    assert device_size(grown.device_path or "") == 80 * MiB
    lv = (await lvm.report(RAID_VG)).lvs[volume.ref.handle]
    assert lv.cached
    assert read(path, 4 * MiB, 8 * MiB) == data  # a writeback cache was flushed before it was taken off
    # cacheSize in bytes keeps its size when the volume grows
    assert before[ssd] - (await pv_free(lvm))[ssd] == 16 * MiB
    details = (await cached_pool.capacity()).details
    assert details["cached_volumes"] == 1
    await manager.delete_volume(volume.id)
    assert await pv_free(lvm) == before
    assert not [name for name in (await lvm.report(RAID_VG)).lvs if name.startswith("ldc-")]


async def test_a_cache_share_grows_with_its_volume(cached_pool: LinearBackend, lvm: Lvm) -> None:
    manager = manager_for(cached_pool)
    [ssd] = await tagged(lvm, "ssd")
    before = await pv_free(lvm)
    volume = await manager.create_volume(ask(cached_pool, "pvc-share", 80 * MiB, cache="writethrough", cacheSize="25%"))
    assert before[ssd] - (await pv_free(lvm))[ssd] == 20 * MiB
    await manager.expand_volume(volume.id, 160 * MiB)
    assert before[ssd] - (await pv_free(lvm))[ssd] == 40 * MiB
    await manager.delete_volume(volume.id)
    assert await pv_free(lvm) == before


async def test_cache_requests_the_pool_cannot_meet_are_refused(
    cached_pool: LinearBackend, runner: CommandRunner, lvm: Lvm
) -> None:
    manager = manager_for(cached_pool)
    with pytest.raises(InvalidArgument, match="'cache' is 'fast'"):
        await manager.create_volume(ask(cached_pool, "pvc-x", 8 * MiB, cache="fast"))
    with pytest.raises(InvalidArgument, match="cacheSize"):
        await manager.create_volume(ask(cached_pool, "pvc-x", 8 * MiB, cache="writeback", cacheSize="200%"))
    with pytest.raises(InsufficientCapacity, match="cache PVs"):
        await manager.create_volume(ask(cached_pool, "pvc-x", 8 * MiB, cache="writeback", cacheSize="1Gi"))
    plain = LinearBackend("plain", LinearPoolConfig(volume_group=RAID_VG), lvm, runner)
    await plain.open()
    with pytest.raises(InvalidArgument, match="cache_pv_tags"):
        await manager_for(plain).create_volume(ask(plain, "pvc-x", 8 * MiB, cache="writeback"))
    assert await manager.list_volumes() == []
    assert not [lv for lv in (await lvm.report(RAID_VG)).lvs if not lv.startswith("[")]


async def test_a_cache_lv_left_by_a_crash_is_found_and_removed(cached_pool: LinearBackend, lvm: Lvm) -> None:
    """A create killed between making the cache LV and attaching it: the retried create attaches that one."""
    manager = manager_for(cached_pool)
    volume = await manager.create_volume(ask(cached_pool, "pvc-crash", 40 * MiB, cache="writethrough"))
    await lvm.detach_cache(RAID_VG, volume.ref.handle, keep=True)  # as a crash before the attach leaves it
    leftover = (await lvm.report(RAID_VG)).lvs[cache_name(volume.ref.handle)]
    assert CACHE_OF_TAG + volume.ref.handle in leftover.tags
    await manager.expand_volume(volume.id, 48 * MiB)  # finds its cache off and puts it back
    assert (await lvm.report(RAID_VG)).lvs[volume.ref.handle].cached
    await lvm.detach_cache(RAID_VG, volume.ref.handle, keep=True)
    await manager.delete_volume(volume.id)
    assert not [lv for lv in (await lvm.report(RAID_VG)).lvs if not lv.startswith("[")]


async def test_what_a_kill_leaves_of_a_cached_expansion_or_delete_is_mended_at_start(
    cached_pool: LinearBackend, runner: CommandRunner, lvm: Lvm
) -> None:
    """An expansion killed after growing the volume, before the cache went back: the retry has nothing left to do
    (the size is reached), so the next start attaches the cache again, grown with its share. A delete killed
    between removing the volume and its detached cache LV (the order before the fix): the next start removes the
    cache LV. The steps are the backend's own commands, run by hand up to where the kill would land."""
    manager = manager_for(cached_pool)
    [ssd] = await tagged(lvm, "ssd")
    before = await pv_free(lvm)
    volume = await manager.create_volume(ask(cached_pool, "pvc-cut", 40 * MiB, cache="writeback", cacheSize="25%"))
    path = volume.device_path or ""
    data = os.urandom(MiB)
    write(path, data, 4 * MiB)  # dirty in the writeback cache until the detach flushes it
    await lvm.detach_cache(RAID_VG, volume.ref.handle, keep=True)
    await lvm.extend(RAID_VG, volume.ref.handle, 80 * MiB)  # ... and here the kill
    assert (await manager.expand_volume(volume.id, 80 * MiB)).size_bytes == 80 * MiB  # the retry: nothing to do
    assert not (await lvm.report(RAID_VG)).lvs[volume.ref.handle].cached
    restarted = LinearBackend("hybrid", cached_pool.config, lvm, runner)
    await restarted.open()
    report = await lvm.report(RAID_VG)
    assert report.lvs[volume.ref.handle].cached and cache_name(volume.ref.handle) not in report.lvs
    assert before[ssd] - (await pv_free(lvm))[ssd] == 20 * MiB  # 25% of 80 MiB
    assert read(path, MiB, 4 * MiB) == data
    [listed] = await manager_for(restarted).list_volumes()
    assert listed.id == volume.id and listed.size_bytes == 80 * MiB and listed.abnormal is None

    await lvm.detach_cache(RAID_VG, volume.ref.handle, keep=True)
    await lvm.remove(RAID_VG, volume.ref.handle)  # ... and here the kill
    again = LinearBackend("hybrid", cached_pool.config, lvm, runner)
    await again.open()
    assert not [name for name in (await lvm.report(RAID_VG)).lvs if not name.startswith("[")]
    assert await pv_free(lvm) == before


async def test_fast_pvs_found_by_rules_hold_the_cache_without_any_tag(runner: CommandRunner, lvm: Lvm) -> None:
    """`cache_match` on real disks: the only PV under 100 MiB is the SSD's (the sandbox's disks are sized so), and the
    cache lands there although the pool names no cache tag."""
    config = LinearPoolConfig(volume_group=RAID_VG, pv_tags=("hdd",), cache_match=DiskRules(max_size=100 * MiB))
    backend = LinearBackend("hybrid", config, lvm, runner)
    await backend.open()
    try:
        before = await pv_free(lvm)
        [ssd] = await tagged(lvm, "ssd")
        volume = await manager_for(backend).create_volume(ask(backend, "pvc-ruled", 24 * MiB, cache="writethrough"))
        assert (await lvm.report(RAID_VG)).lvs[volume.ref.handle].cached
        after = await pv_free(lvm)
        assert before[ssd] - after[ssd] == 8 * MiB  # the cache (10% of 24 MiB, at least 8 MiB), on the SSD
        assert sum(before.values()) - sum(after.values()) == 32 * MiB
        await manager_for(backend).delete_volume(volume.id)
        assert await pv_free(lvm) == before
    finally:
        await backend.aclose()
        await reset_vg(lvm, RAID_VG)
