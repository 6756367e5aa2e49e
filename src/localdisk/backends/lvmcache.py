"""SSD caches in front of thick (HDD) volumes: dm-cache in writethrough or writeback mode, or dm-writecache.

A pool names its fast PVs by tag (`cache_pv_tags`), or by rules on the disks beneath them (`cache_match`, the rules of
disk discovery: `rotational = false`, `transport = "nvme"`, ...); a StorageClass asks for a cache with `cache`
(`writethrough`, `writeback`, `writecache`, or `none`) and `cacheSize` (bytes like `256Mi`, or a share of the volume
like `10%`). The cache is an LV of its own on the fast PVs, `ldc-` and the volume's hash, made inactive (dm-writecache
takes only an inactive one) and then attached with `lvconvert --type cache|writecache --cachevol`, which hides it inside
the volume.

Writethrough: every write reaches the HDD before it completes, so losing the SSD loses nothing (the cache is dropped
with `lvconvert --uncache`, which works with the SSD gone). Writeback and writecache: a write completes once it is on
the SSD, and blocks not yet copied to the HDD (dirty blocks, a metric) are lost with the SSD; the volume's data is
then inconsistent. Use them only where that is acceptable (scratch data, a replicated application).

The volume records its cache request in a tag, so a retried create or an expansion finds what to make or keep. The
cache LV carries the owner tag and names its volume, so a crash between making it and attaching it leaves nothing
that the volume's create, delete or reclaim does not find. An expansion takes the cache off, grows the volume and
puts the cache back: a crash after the growth leaves a volume of the new size, whose retried expansion has nothing
left to do, beside its cache LV. So each start puts back the cache of every finished volume found without it
(`cache_owner` names the volume of a cache LV found on its own), and removes a cache LV whose volume is gone (a
delete removes the cache LV before the volume, so only an older crash leaves that).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from localdisk.backends.lvmcmd import CACHE_MODES, LogicalVolume
from localdisk.backends.lvmlayout import Layout, PvSpace, same_layout
from localdisk.discovery import HOST, DiskRules, Roots, SysDisk, scan
from localdisk.errors import InvalidArgument
from localdisk.sizes import human

CACHE, CACHE_SIZE = "cache", "cacheSize"
CACHE_PARAMETERS = frozenset({CACHE, CACHE_SIZE})
CACHE_TAG = "localdisk.csi.io/cache="  # on the volume: what cache it has (mode.size)
CACHE_OF_TAG = "localdisk.csi.io/cache-of="  # on a cache LV: the volume it is for
CACHE_KIND = "cache"
CACHE_PREFIX = "ldc-"
FAST_TAG = "localdisk.csi.io/fast"  # never written to LVM: given in memory to the PVs `cache_match` finds fast
MIN_CACHE = 8 * 1024 * 1024  # dm-cache keeps its metadata in the cache LV too
DEFAULT_SHARE = 10  # percent of the volume, when cacheSize is not given

_UNITS = {"": 1, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class CacheSpec:
    mode: str  # writethrough | writeback | writecache
    size: int = 0  # bytes, or
    percent: int = 0  # a share of the volume's size

    def bytes_for(self, volume_size: int, extent: int) -> int:
        """The cache LV's size for a volume of `volume_size` bytes: whole extents, at least `MIN_CACHE`."""
        wanted = self.size or volume_size * self.percent // 100
        wanted = max(wanted, MIN_CACHE)
        return -(-wanted // extent) * extent

    def tag(self) -> str:
        return f"{CACHE_TAG}{self.mode}.{f'{self.percent}p' if self.percent else f'{self.size}b'}"

    @classmethod
    def from_tags(cls, tags: Iterable[str]) -> CacheSpec | None:
        for tag in tags:
            if tag.startswith(CACHE_TAG):
                mode, _, amount = tag[len(CACHE_TAG) :].partition(".")
                if mode not in CACHE_MODES or not amount[:-1].isdigit():
                    return None
                number = int(amount[:-1])
                return cls(mode, percent=number) if amount.endswith("p") else cls(mode, size=number)
        return None


def describe_cache(cache: CacheSpec | None) -> str:
    """`cache` in words, for a message: "no cache", "a writethrough cache of 256 MiB", "a writecache of 10%..."."""
    if cache is None:
        return "no cache"
    amount = f"{cache.percent}% of the volume" if cache.percent else human(cache.size)
    return f"a {cache.mode} cache of {amount}" if cache.mode != "writecache" else f"a writecache of {amount}"


def differs(tags: Iterable[str], layout: Layout, cache: CacheSpec | None) -> str | None:
    """How the volume whose LV carries `tags` differs from one of `layout` and `cache`, as the end of a sentence
    ("as a raid1 volume with 2 copies; this request asks for a linear volume"), or None if it does not. The tags
    record both (no layout tag: a plain volume anywhere; no cache tag: no cache)."""
    tags = list(tags)
    made, has = Layout.from_tag(tags) or Layout(), CacheSpec.from_tags(tags)
    if not same_layout(made, layout):
        return f"as a {made.describe()}; this request asks for a {layout.describe()}"
    if has != cache:
        return f"with {describe_cache(has)}; this request asks for {describe_cache(cache)}"
    return None


def _amount(text: str) -> tuple[int, int]:
    """(bytes, percent) from `256Mi` or `10%`."""
    value = text.strip()
    if value.endswith("%"):
        digits = value[:-1].strip()
        if not digits.isdigit() or not 1 <= int(digits) <= 100:
            raise InvalidArgument(f"parameter {CACHE_SIZE!r} is {text!r}; a share is 1% to 100%")
        return 0, int(digits)
    number = value.rstrip("Bb")
    digits = number.rstrip("KkMmGgTtIi")
    unit = number[len(digits) :].lower()
    if not digits.isdigit() or unit not in _UNITS or int(digits) == 0:
        raise InvalidArgument(f"parameter {CACHE_SIZE!r} is {text!r}; use a size like 256Mi or a share like 10%")
    return int(digits) * _UNITS[unit], 0


def parse_cache(parameters: Mapping[str, str], default_mode: str | None, default_size: str) -> CacheSpec | None:
    """The cache StorageClass `parameters` ask for on top of the pool's defaults, or None for no cache."""
    mode = parameters.get(CACHE, default_mode or "none").strip().lower()
    if mode == "none":
        if CACHE_SIZE in parameters and CACHE in parameters:
            raise InvalidArgument(f"parameter {CACHE_SIZE!r} needs {CACHE!r} set to a cache mode")
        return None
    if mode not in CACHE_MODES:
        raise InvalidArgument(f"parameter {CACHE!r} is {mode!r}; use one of {sorted(CACHE_MODES)} or none")
    size, percent = _amount(parameters.get(CACHE_SIZE, default_size))
    return CacheSpec(mode, size, percent)


def cache_name(volume_lv: str) -> str:
    """The cache LV of volume LV `ldv-<hash>`: `ldc-<hash>` (hidden as `[ldc-<hash>_cvol]` once attached)."""
    return CACHE_PREFIX + volume_lv[4:]


def cache_tags(volume_lv: str, owner_tag: str, kind_tag: str) -> list[str]:
    return [owner_tag, kind_tag + CACHE_KIND, CACHE_OF_TAG + volume_lv]


def cache_owner(lv: LogicalVolume, owner_tag: str, kind_tag: str) -> str | None:
    """The volume LV that `lv` is the detached cache LV of (by its name and its tags), or None if it is not one."""
    if lv.hidden or not lv.name.startswith(CACHE_PREFIX) or owner_tag not in lv.tags:
        return None
    if kind_tag + CACHE_KIND not in lv.tags:
        return None
    volume = next((tag[len(CACHE_OF_TAG) :] for tag in lv.tags if tag.startswith(CACHE_OF_TAG)), None)
    return volume if volume is not None and cache_name(volume) == lv.name else None


class FastPvs:
    """The PVs whose disks match a pool's `cache_match` rules, seen by the planner as tagged `FAST_TAG`.

    A PV on a partition counts as its disk; one on a device-mapper device (a crypt mapping) or a disk sysfs does not
    show matches nothing. What a PV's disk is never changes while it is a PV, so each PV is looked up once (sysfs
    only, no process) and remembered, also for when it goes missing (its cache is then known to be lost)."""

    def __init__(self, rules: DiskRules | None, roots: Roots = HOST) -> None:
        self.rules = rules
        self.roots = roots
        self._known: dict[str, bool] = {}

    def tags(self, configured: Sequence[str]) -> tuple[str, ...]:
        """The tags that make a PV a cache PV: the configured ones, and `FAST_TAG` when rules are given."""
        return (*configured, *((FAST_TAG,) if self.rules is not None else ()))

    def mark(self, pvs: Sequence[PvSpace]) -> list[PvSpace]:
        """`pvs` with `FAST_TAG` added to those on a matching disk."""
        if self.rules is None:
            return list(pvs)
        if unknown := [pv.name for pv in pvs if pv.name not in self._known]:
            self._learn(unknown)
        return [replace(pv, tags=pv.tags | {FAST_TAG}) if self._known[pv.name] else pv for pv in pvs]

    def fast(self, name: str) -> bool:
        return self._known.get(name, False)

    def _learn(self, names: Iterable[str]) -> None:
        assert self.rules is not None
        disks: dict[str, SysDisk] = {}
        for disk in scan(self.roots):
            disks.update({disk.name: disk, **dict.fromkeys(disk.partitions, disk)})
        for name in names:
            found = disks.get(Path(os.path.realpath(name)).name)
            self._known[name] = found is not None and self.rules.mismatch(found) is None
