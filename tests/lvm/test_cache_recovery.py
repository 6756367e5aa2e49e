"""What a SIGKILL leaves of a cached volume's cache changes, and how the lvm backend converges from it: on the host,
with an LVM stand-in that keeps a VG in memory and changes it as the real commands would (the states are those the
layout crash loop, `nox -s layout-crash`, met on real LVM: see `localdisk.backends.lvmcache`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import pytest

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, identity_tags, lv_name_for
from localdisk.backends.lvmbase import KIND_TAG, OWNER_TAG, PENDING_TAG, VOLUME
from localdisk.backends.lvmcache import CacheSpec, cache_name, cache_tags
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, PhysicalVolume, VgReport, VolumeGroup
from localdisk.backends.lvmlayout import Layout
from localdisk.errors import InsufficientCapacity, NotFound
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for

pytestmark = pytest.mark.anyio
VG = "ldvg"
EXTENT = 4 * MiB
RAID1 = "rwi-a-r---"
CACHED = "Cwi-a-C---"
INACTIVE = "-wi-------"


def lv(name: str, size: int, tags: Sequence[str], attr: str, pool: str = "") -> LogicalVolume:
    return LogicalVolume(name, "", size, frozenset(tags), attr, pool, "", None, None, None, f"/dev/{VG}/{name}")


class MemoryLvm:
    """The `Lvm` calls the lvm backend makes for cached volumes, on a VG held in memory; `calls` records them."""

    def __init__(self, *lvs: LogicalVolume) -> None:
        self.lvs = {v.name: v for v in lvs}
        self.calls: list[tuple[str, ...]] = []
        self.no_room_to_extend: set[str] = set()
        pvs = [("/dev/ubda", "hdd"), ("/dev/ubdb", "hdd"), ("/dev/ubdc", "ssd")]
        self.physical = tuple(PhysicalVolume(d, 128 * MiB, 64 * MiB, frozenset({t}), "a--") for d, t in pvs)

    async def report(self, vg: str) -> VgReport:
        group = VolumeGroup(vg, "", 384 * MiB, 192 * MiB, EXTENT)
        return VgReport(group, dict(self.lvs), tuple(pv.name for pv in self.physical), self.physical)

    async def aclose(self) -> None:
        pass

    def _get(self, name: str) -> LogicalVolume:
        if name not in self.lvs:
            raise NotFound(f"logical volume {VG}/{name} not found")
        return self.lvs[name]

    async def activate_vg(self, vg: str) -> None:
        self.calls.append(("activate_vg",))
        for name, old in self.lvs.items():
            self.lvs[name] = replace(old, attr=old.attr[:4] + "a" + old.attr[5:])

    async def deactivate_lv(self, vg: str, name: str) -> None:
        self.calls.append(("deactivate", name))
        old = self._get(name)
        self.lvs[name] = replace(old, attr=old.attr[:4] + "-" + old.attr[5:])

    async def extend(self, vg: str, name: str, size: int, pvs: Sequence[str] = ()) -> None:
        self.calls.append(("extend", name, str(size)))
        if name in self.no_room_to_extend:
            raise InsufficientCapacity("lvextend: Insufficient free space")
        self.lvs[name] = replace(self._get(name), size=size)

    async def attach_cache(self, vg: str, name: str, cachevol: str, mode: str) -> None:
        self.calls.append(("attach", name, cachevol, mode))
        cache = self.lvs.pop(cachevol)
        assert not cache.active, "dm-writecache takes only an inactive cache LV"
        hidden = f"[{cachevol}_cvol]"
        self.lvs[hidden] = replace(cache, name=hidden)
        self.lvs[name] = replace(self._get(name), attr=CACHED, pool=hidden)

    async def detach_cache(self, vg: str, name: str, *, keep: bool) -> None:
        self.calls.append(("detach", name, "keep" if keep else "remove"))
        volume = self._get(name)
        cache = self.lvs.pop(volume.pool)
        if keep:
            self.lvs[cache.name[1:-6]] = replace(cache, name=cache.name[1:-6], attr="-wi-a-----")
        self.lvs[name] = replace(volume, attr=RAID1, pool="")

    async def remove(self, vg: str, name: str) -> None:
        self.calls.append(("remove", name))
        self._get(name)
        del self.lvs[name]


def volume_lv(name: str, size: int, cache: CacheSpec, *, pending: bool = False) -> LogicalVolume:
    tags = [*identity_tags(VOLUME, name), Layout(mirrors=2, pv_tags=("hdd",)).tag(), cache.tag()]
    return lv(lv_name_for(VOLUME, name), size, tags + ([PENDING_TAG] if pending else []), RAID1)


def detached_cache(volume: LogicalVolume, size: int) -> LogicalVolume:
    # An activated VG activated it (`vgchange -a y` at start-up), as the real one would be.
    return lv(cache_name(volume.name), size, cache_tags(volume.name, OWNER_TAG, KIND_TAG), "-wi-a-----")


async def opened(lvm: MemoryLvm) -> LinearBackend:
    config = LinearPoolConfig(volume_group=VG, mirrors=2, pv_tags=("hdd",), cache_pv_tags=("ssd",))
    backend = LinearBackend("dense", config, cast(Lvm, lvm), CommandRunner())
    await backend.open()
    return backend


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
