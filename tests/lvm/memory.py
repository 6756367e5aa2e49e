"""An LVM stand-in for host tests of the lvm backend: one VG held in memory (three PVs: two tagged hdd, one ssd),
changed by the `Lvm` calls the backend makes for laid-out and cached volumes as the real commands would."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, identity_tags, lv_name_for
from localdisk.backends.lvmbase import KIND_TAG, OWNER_TAG, PENDING_TAG, VOLUME
from localdisk.backends.lvmcache import CacheSpec, cache_name, cache_tags
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, PhysicalVolume, VgReport, VolumeGroup
from localdisk.backends.lvmlayout import Layout
from localdisk.errors import BackendFailure, InsufficientCapacity, NotFound
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB

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
        self.attach_failures = 0  # attaches that fail (as lvconvert exiting 5) before one succeeds
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
        if self.attach_failures:
            self.attach_failures -= 1
            raise BackendFailure(f"lvconvert: cannot attach {cachevol} to {name}")
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
