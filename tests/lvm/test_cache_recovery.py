"""What a SIGKILL leaves of a cached volume's cache changes, and how the lvm backend converges from it: on the host,
with an LVM stand-in that keeps a VG in memory and changes it as the real commands would (the states are those the
layout crash loop, `nox -s layout-crash`, met on real LVM: see `localdisk.backends.lvmcache`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, lv_name_for
from localdisk.backends.lvmbase import VOLUME
from localdisk.backends.lvmcache import FAST_TAG, CacheSpec, cache_name
from localdisk.backends.lvmcmd import Lvm, PhysicalVolume
from localdisk.backends.lvmlayout import eligible
from localdisk.discovery import DiskRules, Roots
from localdisk.errors import BackendFailure, InvalidArgument
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.lvm.memory import VG, MemoryLvm, detached_cache, lv, opened, volume_lv
from tests.test_discovery import _disk

pytestmark = pytest.mark.anyio


async def test_an_expansion_cut_after_the_growth_gets_its_cache_back_at_the_next_start() -> None:
    """The expansion took the cache off and grew the volume, then was killed: its retry finds the size reached and
    has nothing to do. The restart every kill implies attaches the cache again, grown as the expansion would have."""
    share = CacheSpec("writethrough", percent=10)
    volume = volume_lv("pvc-grown", 120 * MiB, share)
    lvm = MemoryLvm(volume, detached_cache(volume, 8 * MiB))
    backend = await opened(lvm)
    ldc = cache_name(volume.name)
    assert lvm.calls[-3:] == [
        ("deactivate", ldc),
        ("extend", ldc, str(12 * MiB)),
        ("attach", volume.name, ldc, "writethrough"),
    ]
    assert lvm.lvs[volume.name].cached and ldc not in lvm.lvs
    [listed] = await manager_for(backend).list_volumes()
    assert listed.ref.handle == volume.name and listed.size_bytes == 120 * MiB and listed.abnormal is None


async def test_a_cache_that_cannot_grow_goes_back_at_its_old_size() -> None:
    volume = volume_lv("pvc-full-ssd", 120 * MiB, CacheSpec("writecache", percent=10))
    lvm = MemoryLvm(volume, detached_cache(volume, 8 * MiB))
    lvm.no_room_to_extend.add(cache_name(volume.name))
    await opened(lvm)
    assert lvm.calls[-1] == ("attach", volume.name, cache_name(volume.name), "writecache")
    assert lvm.lvs[f"[{cache_name(volume.name)}_cvol]"].size == 8 * MiB


async def test_a_cache_lv_whose_volume_is_gone_is_removed_at_start_and_nothing_else_is() -> None:
    spec = CacheSpec("writethrough", size=8 * MiB)
    gone = volume_lv("pvc-deleted", 16 * MiB, spec)
    orphan = detached_cache(gone, 8 * MiB)
    creating = volume_lv("pvc-creating", 16 * MiB, spec, pending=True)  # its create's retry (or reclaim) decides
    creating_cache = detached_cache(creating, 8 * MiB)
    foreign = lv(cache_name(lv_name_for(VOLUME, "someone")), 8 * MiB, [], "-wi-a-----")  # no owner tag: not ours
    lvm = MemoryLvm(orphan, creating, creating_cache, foreign)
    backend = await opened(lvm)
    assert [call for call in lvm.calls if call[0] != "activate_vg"] == [("remove", orphan.name)]
    assert set(lvm.lvs) == {creating.name, creating_cache.name, foreign.name}
    assert await manager_for(backend).list_volumes() == []


async def test_a_delete_removes_a_detached_cache_before_its_volume() -> None:
    """So a kill between the two lvremoves leaves the volume, which the retried delete finds; the other way round
    it would leave a cache LV that no volume names."""
    volume = volume_lv("pvc-gone", 16 * MiB, CacheSpec("writethrough", size=8 * MiB))
    lvm = MemoryLvm(volume, detached_cache(volume, 8 * MiB))
    backend = await opened(lvm)
    await backend.lvm.detach_cache(VG, volume.name, keep=True)  # as a kill during an expansion leaves it
    backend.view.invalidate()
    lvm.calls.clear()
    await backend.delete_volume(volume.name)
    assert lvm.calls == [("remove", cache_name(volume.name)), ("remove", volume.name)]
    assert lvm.lvs == {}


async def test_capacity_with_a_fixed_size_cache_counts_the_caches_the_ssd_holds() -> None:
    """Four HDDs with room for two 2-way mirrors of 60 MiB, one SSD with 64 MiB free: caches of 24 MiB fit twice (both
    mirrors), of 40 MiB once (one mirror: capacity is one volume's), of 80 MiB never (nothing)."""
    lvm = MemoryLvm()
    hdds = [PhysicalVolume(f"/dev/ubd{d}", 128 * MiB, 64 * MiB, frozenset({"hdd"}), "a--") for d in "abcd"]
    lvm.physical = (*hdds, PhysicalVolume("/dev/ubde", 128 * MiB, 64 * MiB, frozenset({"ssd"}), "a--"))
    backend = await opened(lvm)
    plain = await backend.capacity_for({})
    # room for more than one mirror
    assert plain.maximum_volume_bytes > 0 and plain.available_bytes > plain.maximum_volume_bytes
    expected = {"24Mi": (plain.available_bytes, 2), "40Mi": (plain.maximum_volume_bytes, 1), "80Mi": (0, 0)}
    for size, (room, caches) in expected.items():
        capacity = await backend.capacity_for({"cache": "writethrough", "cacheSize": size})
        assert (capacity.available_bytes, capacity.details["caches_that_fit"]) == (room, caches), size
        assert capacity.maximum_volume_bytes == (plain.maximum_volume_bytes if caches else 0), size


async def test_an_expansion_whose_cache_failed_to_go_back_gets_it_back_on_its_retry() -> None:
    """The cache came off and the volume grew, then attaching the cache again failed: the expansion answers the error,
    and its retry (which finds the size reached) puts the cache back instead of leaving the volume uncached until
    the next start."""
    volume = volume_lv("pvc-retried", 40 * MiB, CacheSpec("writeback", size=8 * MiB))
    lvm = MemoryLvm(volume, detached_cache(volume, 8 * MiB))
    backend = await opened(lvm)
    assert lvm.lvs[volume.name].cached
    lvm.attach_failures = 1
    with pytest.raises(BackendFailure, match="cannot attach"):
        await backend.expand_volume(volume.name, 60 * MiB)
    assert lvm.lvs[volume.name].size == 60 * MiB and not lvm.lvs[volume.name].cached
    grown = await backend.expand_volume(volume.name, 60 * MiB)
    assert grown.size_bytes == 60 * MiB and lvm.lvs[volume.name].cached
    assert lvm.calls[-1] == ("attach", volume.name, cache_name(volume.name), "writeback")
    # a retry that has nothing left to do changes nothing
    calls = len(lvm.calls)
    await backend.expand_volume(volume.name, 60 * MiB)
    assert len(lvm.calls) == calls


async def test_fast_pvs_found_by_rules_on_their_disks_hold_the_caches(tmp_path: Path) -> None:
    """`cache_match` (rules on the disks beneath the PVs, here `rotational = false`) makes the SSD's PV a cache PV
    without any LVM tag: caches are planned on it alone, and counted on its free space."""
    for name, dev, rotational in (("ubda", "98:0", True), ("ubdb", "98:16", True), ("ubdc", "98:32", False)):
        _disk(tmp_path, name, f"virtual/ubd/{name}", size=128 * MiB, dev=dev, rotational=rotational)
    roots = Roots(sys=tmp_path / "sys", dev=tmp_path / "dev", udev_data=tmp_path / "udev", proc=tmp_path / "proc")
    lvm = MemoryLvm()
    lvm.physical = tuple(replace(pv, tags=frozenset()) for pv in lvm.physical)  # no tags at all
    config = LinearPoolConfig(volume_group=VG, cache_match=DiskRules(rotational=False))
    backend = LinearBackend("dense", config, cast(Lvm, lvm), CommandRunner(), roots=roots)
    await backend.open()
    report = await backend.view.get()
    assert [pv.name for pv in eligible(backend._pvs(report), backend._cache_layout())] == ["/dev/ubdc"]
    capacity = await backend.capacity_for({"cache": "writethrough", "cacheSize": "24Mi"})
    assert (capacity.details["cache_room_bytes"], capacity.details["caches_that_fit"]) == (64 * MiB, 2)
    assert (await backend.layout_space())["cachePvTags"] == [FAST_TAG]  # the cluster's controller plans alike
    # the same pool without the rules has no fast PVs: a cache is refused, not put anywhere
    plain = LinearBackend("dense", LinearPoolConfig(volume_group=VG), cast(Lvm, lvm), CommandRunner(), roots=roots)
    await plain.open()
    with pytest.raises(InvalidArgument, match="no fast PVs"):
        await plain.capacity_for({"cache": "writethrough"})
