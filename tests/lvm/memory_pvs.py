"""A VG of several PVs held in memory, for host tests that make laid-out volumes with the real lvm backend.

`PvLvm` answers the `Lvm` calls a create and a delete of a thick volume make (lvcreate with stripes, mirrors and the
PVs the backend planned, the pending tag's removal, a cache LV attached and detached, lvremove), taking each leg's
extents from its PV as LVM would (a RAID image one extent more, for its metadata), so the next report's `pvs` shows
what is left. `MemoryLinear` is the lvm backend on it, with the zeroing of a new volume (a write to its device node)
left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import cast

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, PhysicalVolume, VgReport, VolumeGroup
from localdisk.backends.lvmlayout import Layout
from localdisk.errors import InsufficientCapacity, NotFound
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB

VG = "ldpvs"
EXTENT = 4 * MiB
RAID = "rwi-a-r---"
LINEAR = "-wi-a-----"
CACHED = "Cwi-a-C---"


@dataclass(frozen=True)
class Created:
    lv: str
    size: int
    stripes: int
    stripe_size: int
    mirrors: int
    pvs: tuple[str, ...]


class PvLvm:
    def __init__(self, pvs: Iterable[tuple[str, int, str]]) -> None:
        """`pvs`: (device, size, tag) of each PV."""
        self.physical = {d: PhysicalVolume(d, size, size, frozenset({tag}), "a--") for d, size, tag in pvs}
        self.lvs: dict[str, LogicalVolume] = {}
        self.taken: dict[str, dict[str, int]] = {}  # LV -> PV -> bytes
        self.created: list[Created] = []
        self.removed: list[str] = []

    async def report(self, vg: str) -> VgReport:
        pvs = tuple(self.physical.values())
        group = VolumeGroup(vg, "", sum(p.size for p in pvs), sum(p.free for p in pvs), EXTENT)
        return VgReport(group, dict(self.lvs), tuple(self.physical), pvs)

    async def aclose(self) -> None:
        pass

    async def activate_vg(self, vg: str) -> None:
        pass

    async def create_linear(
        self,
        vg: str,
        lv: str,
        size: int,
        tags: Iterable[str],
        *,
        wipe: bool,
        stripes: int = 1,
        stripe_size: int = 0,
        mirrors: int = 1,
        pvs: Sequence[str] = (),
        active: bool = True,
    ) -> None:
        self.created.append(Created(lv, size, stripes, stripe_size, mirrors, tuple(pvs)))
        layout = Layout(stripes, stripe_size, mirrors)
        taken: dict[str, int] = {}
        if layout.plain:  # LVM spreads it over the PVs it is given (any, if none), the freest first
            left = layout.rounded(size, EXTENT)
            for pv in sorted((self.physical[p] for p in pvs or self.physical), key=lambda p: -p.free):
                part = min(left, pv.free)
                taken[pv.name], left = part, left - part
            if left:
                raise InsufficientCapacity("lvcreate: Insufficient free space")
        else:
            leg = layout.leg_extents(size, EXTENT) * EXTENT
            if len(pvs) != layout.legs or any(self.physical[p].free < leg for p in pvs):
                raise InsufficientCapacity("lvcreate: Insufficient suitable allocatable extents")
            taken = dict.fromkeys(pvs, leg)
        for name, part in taken.items():
            pv = self.physical[name]
            self.physical[name] = replace(pv, free=pv.free - part)
        self.taken[lv] = taken
        attr = RAID if mirrors > 1 else LINEAR
        self.lvs[lv] = LogicalVolume(
            lv, "", layout.rounded(size, EXTENT), frozenset(tags), attr, "", "", None, None, None, f"/dev/{vg}/{lv}"
        )

    async def deactivate_lv(self, vg: str, name: str) -> None:
        old = self.lvs[name]
        self.lvs[name] = replace(old, attr=old.attr[:4] + "-" + old.attr[5:])

    async def attach_cache(self, vg: str, name: str, cachevol: str, mode: str) -> None:
        """The cache LV hidden inside its volume (`[ldc-..._cvol]`), which keeps the cache's extents."""
        hidden = f"[{cachevol}_cvol]"
        self.lvs[hidden] = replace(self.lvs.pop(cachevol), name=hidden)
        self.taken[hidden] = self.taken.pop(cachevol)
        self.lvs[name] = replace(self.lvs[name], attr=CACHED, pool=hidden)

    async def detach_cache(self, vg: str, name: str, *, keep: bool) -> None:
        volume = self.lvs[name]
        assert not keep, "not needed here"
        await self.remove(vg, volume.pool)
        self.lvs[name] = replace(volume, attr=LINEAR, pool="")

    async def drop_tag(self, vg: str, lvs: Sequence[str], tag: str) -> None:
        for name in lvs:
            old = self.lvs[name]
            self.lvs[name] = replace(old, tags=old.tags - {tag})

    async def remove(self, vg: str, name: str) -> None:
        self.removed.append(name)
        if name not in self.lvs:
            raise NotFound(f"logical volume {vg}/{name} not found")
        del self.lvs[name]
        for pv_name, part in self.taken.pop(name, {}).items():
            pv = self.physical[pv_name]
            self.physical[pv_name] = replace(pv, free=pv.free + part)


class MemoryLinear(LinearBackend):
    async def _zero(self, lv: str, encrypted: bool) -> None:
        pass  # no device node to write to


async def opened(lvm: PvLvm, pool: str = "dense", **config: object) -> MemoryLinear:
    settings = LinearPoolConfig.model_validate({"volume_group": VG, **config})
    backend = MemoryLinear(pool, settings, cast(Lvm, lvm), CommandRunner())
    await backend.open()
    return backend
