"""The `lvm` and `thin` backends: one logical volume per CSI volume, in a configured VG or thin pool.

This module holds the thick backend (`LinearBackend`) and both pools' factories; the thin backend is in
`localdisk.backends.lvmthin`, what both share in `lvmbase`, the cached VG view in `lvmview`, layouts in `lvmlayout`
and `lvmspace`, caches in `lvmcache`.

Everything localdisk knows about a volume is on the disk, in LV tags, so a restarted or reinstalled node finds its
volumes again and nothing is lost with a side database:

- `localdisk.csi.io/owned` marks an LV as ours. LVs without it are invisible: never listed, changed or removed, even
  when they sit in the same VG or thin pool, or carry a name that looks like ours.
- `localdisk.csi.io/kind=volume|snapshot`, `localdisk.csi.io/name.<i>=<base32>` (the CSI name, any Unicode, in
  chunks: LVM tags allow only [A-Za-z0-9_+.-/=!:&#]) and `localdisk.csi.io/source=<kind>:<lv>` (what a snapshot was
  taken of, what a volume was restored or cloned from).
- `localdisk.csi.io/encrypted` marks a volume that holds a LUKS2 container (`localdisk.crypt`): the node opens it
  with the passphrase of its node-stage secret, and deleting it is a crypto-erase. A thick encrypted LV is therefore
  not zeroed in full when created (only its signature areas are): nothing but ciphertext under a new key is seen
  through its mapping. Clones, restores and snapshots of an encrypted thin volume inherit the tag, and deleting
  them is a crypto-erase too: a snapshot is marked pending (no longer found, so nothing is restored from a
  half-erased one), activated, erased and removed. A thin LV's header area is discarded rather than zeroed (see
  `localdisk.crypt.erase`): its blocks may be shared with the origin, which copy-on-write keeps as they are.
- `localdisk.csi.io/pending` marks a volume that exists but is not ready to hand out (a thick LV not yet zeroed, a
  restored volume not yet grown to its size). Pending volumes are not found by name, so a retried CreateVolume
  finishes them instead of returning them half made. A create cancelled half-way removes its own; what a crash
  leaves, the server removes once it has been pending for the grace period (`VolumeManager.reclaim_pending`).

The LV name is derived from the CSI name (`ldv-` or `lds-` and 32 hex digits of its SHA-256), so any CSI name works,
none reaches a command line, and a lookup by name is one report. The volume ID is `lvm:<pool>:<lv>` or
`thin:<pool>:<lv>`.

A new thick LV would show whatever the disk held before (`lvcreate -Z y` clears only its first 4 KiB), so it is
zeroed in full (BLKZEROOUT, as `blkdiscard -z` does, made in-process by `localdisk.blockdev`: WRITE ZEROES where
the device offers it, written zeros otherwise) before it is handed out, under the pending tag, outside the pool's
lock. Its cost is the device's; on a disk without WRITE ZEROES it is a full write of the volume. Thin volumes need
no wipe: unprovisioned blocks read as zeros and a pool with zeroing on (checked at open) zeroes each block it
provisions.

Reads come from a cached view of the VG (`VgView`), so GetCapacity, ListVolumes and lookups run no LVM command at all.
The view is one `lvm fullreport`; after each of our own changes it is updated in memory with what the change did,
and the report is read again once the writers queued on the pool's lock have all gone (one read per burst of
creates, not one per create), after any failed change, and in the background every half `VIEW_MAX_AGE` (the
server's `VolumeManager.keep_fresh`; changes made by someone else, an administrator's lvcreate, show up within that
time), so a read never waits for a re-read unless the view is older than `VIEW_MAX_AGE`. Writes are serialized per
pool by that lock, which is where concurrent creates queue: LVM would serialize them on its VG lock anyway.
GetVolume and GetSnapshot always read LVM (their health must be current). The server's pools cache for
`view_max_age_seconds` (30 s by default); a backend constructed directly (tests, tools) reads LVM on every call
unless given `view_max_age`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from localdisk.backend import VolumeBackend
from localdisk.backends.lvmbase import (
    ENCRYPTED_TAG,
    HANDLE,
    KIND_TAG,
    OWNER_TAG,
    PENDING_TAG,
    SNAPSHOT,
    VOLUME,
    LvmBackend,
    decode_name,
    identity_tags,
    lv_name_for,
    lvm_name,
    lvm_tags,
    name_tags,
    source_of,
)
from localdisk.backends.lvmcache import (
    CACHE_PARAMETERS,
    DEFAULT_SHARE,
    CacheSpec,
    FastPvs,
    cache_name,
    cache_owner,
    cache_tags,
    differs,
    parse_cache,
)
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, VgReport
from localdisk.backends.lvmlayout import (
    LAYOUT_PARAMETERS,
    MAX_MIRRORS,
    MAX_STRIPES,
    Layout,
    PvSpace,
    check_layout,
    eligible,
    parse_layout,
    plan,
    pv_space,
)
from localdisk.backends.lvmsetup import VgRulesConfig, with_rules
from localdisk.backends.lvmshell import ShellExecutor
from localdisk.backends.lvmspace import PoolSpace
from localdisk.backends.lvmthin import ThinBackend, ThinPoolConfig
from localdisk.backends.lvmview import (
    LINEAR_ACTIVE,
    VIEW_MAX_AGE,
    new_lv,
    with_lv,
)
from localdisk.blockdev import erase_signatures, zero_out
from localdisk.discovery import HOST, DiskRules, Roots
from localdisk.errors import (
    AlreadyExists,
    Busy,
    InsufficientCapacity,
    InvalidArgument,
    LocalDiskError,
    NotFound,
)
from localdisk.model import (
    Capacity,
    Features,
    Volume,
    VolumeSpec,
)
from localdisk.registry import BackendSpec, PoolConfig
from localdisk.runner import CommandRunner
from localdisk.sizes import align_up, human

log = logging.getLogger(__name__)

__all__ = [  # the identity helpers live in lvmbase; tools and tests reach them here, next to the backends
    "ENCRYPTED_TAG",
    "HANDLE",
    "PENDING_TAG",
    "SNAPSHOT",
    "VOLUME",
    "LinearBackend",
    "LinearPoolConfig",
    "ThinBackend",
    "ThinPoolConfig",
    "decode_name",
    "identity_tags",
    "lv_name_for",
    "name_tags",
    "shared_lvm",
    "source_of",
]
SHELL_ENV = "LOCALDISK_LVM_SHELL"  # "0": one lvm process per command instead of the persistent shell


# -- configuration ---------------------------------------------------------------------------------------------------
class LinearPoolConfig(VgRulesConfig):
    volume_group: str
    """The VG whose free extents become volumes."""
    spare_bytes: Annotated[int, Field(ge=0)] = 0
    """Free space in the VG that volumes never take (for snapshots an administrator takes by hand, say)."""
    view_max_age_seconds: Annotated[float, Field(ge=0)] = VIEW_MAX_AGE
    """How long GetCapacity and ListVolumes may answer from the cached VG report (0: read LVM on every call)."""
    stripes: Annotated[int, Field(ge=1, le=MAX_STRIPES)] = 1
    """Default layout of the pool's volumes (StorageClass parameter `stripes` overrides): striped over this many PVs."""
    stripe_size_bytes: Annotated[int, Field(ge=0)] = 0
    """Default stripe size (`stripeSize`); 0: LVM's (64 KiB)."""
    mirrors: Annotated[int, Field(ge=1, le=MAX_MIRRORS)] = 1
    """Default number of copies (`mirrors`): 2 or more makes raid1 volumes (raid10 with stripes)."""
    pv_tags: tuple[str, ...] = ()
    """Default PV tags (`pvTags`): volumes go only on PVs carrying one of them (`pvchange --addtag hdd /dev/sdb`)."""

    _check_vg = field_validator("volume_group")(lvm_name)

    _check_tags = field_validator("pv_tags", "cache_pv_tags")(lvm_tags)

    @model_validator(mode="after")
    def _check_layout(self) -> LinearPoolConfig:
        try:
            check_layout(self.layout)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return self

    cache_pv_tags: tuple[str, ...] = ()
    """The fast PVs (by tag) that hold SSD caches of volumes that ask for one (`cache` parameter)."""
    cache_match: DiskRules | None = None
    """The fast PVs by rules on their disks (the rules of disk discovery, e.g. `rotational = false`), besides those
    tagged `cache_pv_tags`: no `pvchange --addtag` needed, also for PVs a zero-touch pool adds itself."""
    cache: Literal["writethrough", "writeback", "writecache"] | None = None
    """Default cache of the pool's volumes (StorageClass `cache` overrides; `none` for none)."""
    cache_size: str = f"{DEFAULT_SHARE}%"
    """Default cache size (`cacheSize`): bytes like 256Mi, or a share of the volume like 10%."""
    cache_on_expand: Literal["grow", "keep"] = "grow"
    """When a cached volume grows: its cache grows too (a share keeps its share) or keeps its size."""

    @model_validator(mode="after")
    def _check_cache(self) -> LinearPoolConfig:
        try:
            parse_cache({}, self.cache, self.cache_size)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        if self.cache and not self.cache_pv_tags and self.cache_match is None:
            raise ValueError(
                "a default cache needs cache_pv_tags or cache_match: the tags of, or rules for, the fast PVs that hold"
                " caches"
            )
        return self

    @property
    def layout(self) -> Layout:
        """The layout a volume gets when its StorageClass sets none."""
        return Layout(self.stripes, self.stripe_size_bytes if self.stripes > 1 else 0, self.mirrors, self.pv_tags)


class LinearBackend(LvmBackend):
    """Thick (linear) LVs in one volume group: fixed space per volume, zeroed before first use."""

    kind = "lvm"
    _takes_extents = True

    def __init__(
        self,
        pool: str,
        config: LinearPoolConfig,
        lvm: Lvm,
        runner: CommandRunner,
        *,
        view_max_age: float = 0.0,
        roots: Roots = HOST,
    ) -> None:
        features = Features(snapshots=False, clones=False)
        super().__init__(pool, config.volume_group, lvm, runner, features, view_max_age)
        self.config = config
        self.fast = FastPvs(config.cache_match, roots)

    def _belongs(self, lv: LogicalVolume) -> bool:
        # A cached volume names its cache in pool_lv; a thin LV its thin pool.
        return (not lv.pool or lv.cached) and not lv.is_thin and not lv.is_thin_pool and not lv.hidden

    async def _activate(self, report: VgReport) -> None:
        if any(self._ours(lv, VOLUME) and not lv.active for lv in report.lvs.values()):
            await self.lvm.activate_vg(self.vg)

    def _abnormal(self, report: VgReport, lv: LogicalVolume) -> str | None:
        if lv.partial and self._cache_lost(report, lv):
            cache = CacheSpec.from_tags(lv.tags)
            whole = cache is not None and cache.mode == "writethrough"
            return (
                f"the cache of volume {self.vg}/{lv.name} is on a missing PV ({self._missing(report)}); "
                + (
                    "in writethrough mode its data is whole on the volume's own PVs:"
                    if whole
                    else "writes it held and had not yet copied back are lost:"
                )
                + f" drop the cache with `localdisk lvm repair lvm:{self.pool}:{lv.name}`"
            )
        if lv.partial and not self._mirrored(lv):
            return f"logical volume {self.vg}/{lv.name} lost a PV ({self._missing(report)}): part of its data is gone"
        return super()._abnormal(report, lv)

    def _degraded(self, report: VgReport, lv: LogicalVolume) -> str | None:
        if lv.partial and self._mirrored(lv):
            return (
                f"mirror {self.vg}/{lv.name} is degraded: a PV it uses is missing ({self._missing(report)}); it"
                f" serves from its remaining copies; rebuild the copy on another PV with"
                f" `localdisk lvm repair lvm:{self.pool}:{lv.name} <PV>`"
            )
        return None

    def _cache_lost(self, report: VgReport, lv: LogicalVolume) -> bool:
        """A cached volume whose missing PVs are all cache PVs (VG metadata keeps a lost PV's tags)."""
        missing = [pv for pv in report.physical if pv.missing]
        fast = set(self.config.cache_pv_tags)
        return lv.cached and bool(missing) and all(pv.tags & fast or self.fast.fast(pv.name) for pv in missing)

    @staticmethod
    def _mirrored(lv: LogicalVolume) -> bool:
        layout = Layout.from_tag(lv.tags)
        return lv.layout.startswith("raid") or (layout is not None and layout.raid)

    @staticmethod
    def _missing(report: VgReport) -> str:
        return ", ".join(pv.name for pv in report.physical if pv.missing) or "unknown"

    def _free(self, report: VgReport) -> int:
        return max(report.vg.free - self.config.spare_bytes, 0) // self.extent * self.extent

    def _check_room(self, report: VgReport, size: int) -> None:
        free = self._free(report)
        if align_up(size, self.extent) > free:
            raise InsufficientCapacity(
                f"volume group {self.vg} has {human(free)} free for volumes"
                + (f" ({human(self.config.spare_bytes)} kept spare)" if self.config.spare_bytes else "")
                + f"; {human(size)} requested"
            )

    # layouts: `localdisk.backends.lvmlayout` plans them from each PV's free space
    @property
    def parameters(self) -> frozenset[str]:
        return LAYOUT_PARAMETERS | CACHE_PARAMETERS

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        parse_layout(parameters, self.config.layout)
        self._cache(parameters)

    async def check_same(self, volume: Volume, parameters: Mapping[str, str]) -> None:
        """The layout and cache `parameters` ask for (over the pool's defaults) against those the volume's LV
        records in its tags (no layout tag: a plain volume; no cache tag: no cache)."""
        lv = (await self._report()).lv(volume.ref.handle)
        layout, cache = parse_layout(parameters, self.config.layout), self._cache(parameters)
        difference = differs(lv.tags, layout, cache) if lv is not None else None
        if difference:
            raise AlreadyExists(f"volume {volume.name!r} already exists {difference}")

    def _cache(self, parameters: Mapping[str, str]) -> CacheSpec | None:
        cache = parse_cache(parameters, self.config.cache, self.config.cache_size)
        if cache is not None and not self._cache_layout().pv_tags:
            raise InvalidArgument(
                f"lvm pool {self.pool!r} has no fast PVs for caches; set pools.lvm.{self.pool}.cache_pv_tags or"
                " cache_match"
            )
        return cache

    def _cache_layout(self) -> Layout:
        return Layout(pv_tags=self.fast.tags(self.config.cache_pv_tags))

    def _pvs(self, report: VgReport) -> list[PvSpace]:
        """The report's PVs as the planner sees them: those `cache_match` finds fast carry `FAST_TAG`."""
        return self.fast.mark(pv_space(report.physical))

    def _layout(self, spec: VolumeSpec) -> Layout:
        return parse_layout(spec.parameters, self.config.layout)

    def _rounded(self, spec: VolumeSpec) -> int:
        return self._layout(spec).rounded(spec.size_bytes, self.extent)

    def _plan(self, report: VgReport, layout: Layout, size: int) -> list[str]:
        """The PVs for a new volume (`lvmlayout.plan`), within the VG's free space less the pool's spare."""
        where = f"volume group {self.vg}"
        pvs = plan(layout, self._pvs(report), size, self.extent, where)
        if layout.footprint(size, self.extent) > self._free(report):
            self._check_room(report, layout.footprint(size, self.extent))
        return pvs

    def _check_create(self, report: VgReport, spec: VolumeSpec) -> None:
        layout = self._layout(spec)
        if layout.plain and not layout.pv_tags:
            self._check_room(report, spec.size_bytes)
        else:
            self._plan(report, layout, spec.size_bytes)
        cache = self._cache(spec.parameters)
        if cache is not None:
            size = cache.bytes_for(layout.rounded(spec.size_bytes, self.extent), self.extent)
            plan(self._cache_layout(), self._pvs(report), size, self.extent, f"the cache PVs of {self.vg}")

    async def _create(self, report: VgReport, lv: str, spec: VolumeSpec) -> bool:
        # The tags go into the same lvcreate: a crash can then never leave an LV of ours without them (it would
        # hold space nobody can see or delete). The pending tag keeps it from being handed out before it is zeroed.
        # No wipe here: `_finish` zeroes all of it, and LVM's wipe would only repeat the first 4 KiB of that.
        layout = self._layout(spec)
        simple = layout.plain and not layout.pv_tags
        tags = [*identity_tags(VOLUME, spec.name, encrypted=spec.encrypted), PENDING_TAG]
        tags += [] if simple else [layout.tag()]
        cache = self._cache(spec.parameters)
        tags += [cache.tag()] if cache is not None else []
        pvs = [] if simple else self._plan(report, layout, spec.size_bytes)
        await self.lvm.create_linear(
            self.vg,
            lv,
            spec.size_bytes,
            tags,
            wipe=False,
            stripes=layout.stripes,
            stripe_size=layout.stripe_size,
            mirrors=layout.mirrors,
            pvs=pvs,
        )
        if simple:
            made = new_lv(lv, align_up(spec.size_bytes, self.extent), tags, attr=LINEAR_ACTIVE)
            self.view.apply(lambda r: with_lv(r, made, takes_extents=True))
        else:
            self.view.invalidate()  # it took space on particular PVs (several times its size, for a mirror)
        return True

    async def _extend(self, report: VgReport, lv: LogicalVolume, size: int) -> int:
        cache = CacheSpec.from_tags(lv.tags)
        if cache is None:
            return await self._extend_origin(report, lv, size)
        # A cache is taken off (flushed) while its volume grows, grown with it as configured, and put back.
        if lv.cached:
            await self.lvm.detach_cache(self.vg, lv.name, keep=True)
            report = await self.view.refresh()
            lv = report.lvs[lv.name]
        grown = await self._extend_origin(report, lv, size)
        try:
            await self._attach_cache(lv.name, cache, grown)
        except InsufficientCapacity as exc:  # no room to grow the cache: back at its old size, not left off
            log.warning("volume %s/%s grew; its cache could not grow with it: %s", self.vg, lv.name, exc)
            await self._attach_cache(lv.name, cache, grown, grow=False)
        return grown

    async def _expanded(self, lv: LogicalVolume) -> None:
        """The retry of an expansion whose cache did not go back on (an error or a kill after the growth) puts it
        back, as the next start would; failing, it is logged and the volume, whole on its own PVs, served uncached."""
        cache = CacheSpec.from_tags(lv.tags)
        if cache is None or lv.cached:
            return
        log.warning("volume %s/%s grew earlier without its cache going back on: attaching it again", self.vg, lv.name)
        try:
            try:
                await self._attach_cache(lv.name, cache, lv.size)
            except InsufficientCapacity:
                await self._attach_cache(lv.name, cache, lv.size, grow=False)
        except LocalDiskError as exc:
            self.view.invalidate()
            log.warning("volume %s/%s stays without its cache for now: %s", self.vg, lv.name, exc)

    async def _before_ready(self, lv: str, spec: VolumeSpec) -> None:
        cache = self._cache(spec.parameters)
        if cache is not None:
            async with self._writing():
                await self._attach_cache(lv, cache, self._rounded(spec))

    async def _recover(self) -> None:
        """Cache LVs a crash left detached (see `localdisk.backends.lvmcache`): a finished volume's is attached
        again (grown as an expansion would have, or at its size if the fast PVs have no room), one whose volume is
        gone or never wanted a cache is removed. A pending volume's is left to its create's retry or reclaim. An
        attach that fails is logged and the volume served without its cache; the next start tries again."""
        async with self._writing() as report:
            for lv in list(report.lvs.values()):
                owner = cache_owner(lv, OWNER_TAG, KIND_TAG)
                volume = report.lv(owner) if owner else None
                if owner is None or (volume is not None and not self._ready(volume, VOLUME)):
                    continue
                cache = CacheSpec.from_tags(volume.tags) if volume is not None else None
                if volume is None or cache is None or volume.cached:
                    log.warning("removing cache LV %s/%s: volume %s does not take it", self.vg, lv.name, owner)
                    with contextlib.suppress(NotFound):
                        await self.lvm.remove(self.vg, lv.name)
                    self.view.invalidate()
                    continue
                log.warning(
                    "volume %s/%s was found without its cache (a crash cut an expansion): attaching it again",
                    self.vg,
                    owner,
                )
                try:
                    try:
                        await self._attach_cache(owner, cache, volume.size)
                    except InsufficientCapacity:
                        await self._attach_cache(owner, cache, volume.size, grow=False)
                except LocalDiskError as exc:
                    self.view.invalidate()
                    log.warning("volume %s/%s stays without its cache for now: %s", self.vg, owner, exc)

    async def _attach_cache(self, lv_name: str, cache: CacheSpec, volume_size: int, *, grow: bool = True) -> None:
        """Make (or grow, unless not `grow`) volume `lv_name`'s cache LV on the fast PVs and attach it, unless it is
        attached already. Under the pool's lock; every step can be repeated after a crash."""
        report = await self.view.refresh()
        lv = report.lv(lv_name)
        if lv is None:
            raise Busy(f"volume {self.vg}/{lv_name} was deleted while its cache was being attached; retry")
        if lv.cached:
            return
        name, wanted = cache_name(lv_name), cache.bytes_for(volume_size, self.extent)
        existing = report.lv(name)
        if existing is None:
            pvs = plan(self._cache_layout(), self._pvs(report), wanted, self.extent, f"the cache PVs of {self.vg}")
            tags = cache_tags(lv_name, OWNER_TAG, KIND_TAG)
            await self.lvm.create_linear(self.vg, name, wanted, tags, wipe=False, pvs=pvs, active=False)
        else:
            if existing.active:  # dm-writecache takes only an inactive cache LV (an activated VG activated it)
                await self.lvm.deactivate_lv(self.vg, name)
            if existing.size < wanted and self.config.cache_on_expand == "grow" and grow:
                pvs = [pv.name for pv in eligible(self._pvs(report), self._cache_layout())]
                await self.lvm.extend(self.vg, name, wanted, pvs)
        await self.lvm.attach_cache(self.vg, lv_name, name, cache.mode)
        self.view.invalidate()

    async def _remove(self, report: VgReport, lv: LogicalVolume) -> None:
        if lv.cached:
            try:  # flushed and taken off first, so the HDD volume is whole when it goes (and a failure is seen here)
                await self.lvm.detach_cache(self.vg, lv.name, keep=False)
            except LocalDiskError as exc:  # a cache SSD gone: lvremove below still removes both
                log.warning("removing volume %s/%s: its cache could not be flushed: %s", self.vg, lv.name, exc)
        leftover = report.lv(cache_name(lv.name))
        if leftover is not None and cache_owner(leftover, OWNER_TAG, KIND_TAG) == lv.name:
            # A cache LV a crash left unattached, removed before its volume: a crash between the two lvremoves then
            # leaves the volume, which the retried delete finds, not a cache LV that nothing names any more.
            with contextlib.suppress(NotFound):
                await self.lvm.remove(self.vg, leftover.name)
            self.view.invalidate()
        await super()._remove(report, lv)

    async def _extend_origin(self, report: VgReport, lv: LogicalVolume, size: int) -> int:
        layout = Layout.from_tag(lv.tags)
        if layout is None:
            return await super()._extend(report, lv, size)
        # LVM keeps a striped or RAID LV's stripes and copies when it grows it; the PVs it may take are the tagged
        # ones. Whether the legs' PVs have room is LVM's to say (InsufficientCapacity), the plan only prechecks
        # that some layout of that growth fits at all.
        grown = layout.rounded(size, self.extent)
        self._check_room(report, layout.footprint(grown - lv.size, self.extent))
        eligible_pvs = [pv.name for pv in eligible(self._pvs(report), layout)] if layout.pv_tags else []
        if layout.pv_tags and not eligible_pvs:
            raise InsufficientCapacity(f"volume group {self.vg} has no PV tagged {' or '.join(layout.pv_tags)} left")
        await self.lvm.extend(self.vg, lv.name, grown, eligible_pvs)
        self.view.invalidate()
        return grown

    async def repair_volume(self, handle: str, devices: list[str]) -> Volume:
        """Rebuild the copies a degraded mirror lost on `devices` (PVs of this VG: `vgextend` a new disk first),
        resynced from the copies it kept, or drop a cache whose PV is gone (`lvconvert --uncache`). Then drop the
        missing PVs from the VG if nothing else uses them (LVM refuses every change to a VG with missing PVs, so until
        then the pool makes no new volumes)."""
        async with self._writing():
            report = await self.view.refresh()
            lv = self._get(report, handle, VOLUME)
            if self._cache_lost(report, lv):
                await self.lvm.detach_cache(self.vg, handle, keep=False)
            elif not self._mirrored(lv):
                raise InvalidArgument(f"volume {self.vg}/{handle} is not a mirror; there is no copy to rebuild from")
            elif lv.partial:
                known = {pv.name for pv in report.physical if not pv.missing}
                strangers = [device for device in devices if device not in known]
                if strangers or not devices:
                    raise InvalidArgument(
                        f"give PVs of volume group {self.vg} to rebuild on ({', '.join(sorted(known))});"
                        f" add a new disk with `vgextend {self.vg} <disk>` first"
                        + (f" ({', '.join(strangers)} is not one)" if strangers else "")
                    )
                await self.lvm.repair(self.vg, handle, devices)
            with contextlib.suppress(LocalDiskError):  # other LVs still on the missing PV: the administrator decides
                await self.lvm.remove_missing(self.vg)
            report = await self.view.refresh()
            return self._volume(report, self._get(report, handle, VOLUME))

    async def _zero(self, lv: str, encrypted: bool) -> None:
        # An encrypted volume is seen only through its mapping: under a fresh volume key, old extents read as noise,
        # so only the signature areas are cleared (the node formats only a device without any signature).
        wipe = erase_signatures if encrypted else zero_out
        try:
            await wipe(f"/dev/{self.vg}/{lv}", self.runner.observers)
        except NotFound:
            self.view.invalidate()
            raise Busy(f"volume {self.vg}/{lv} was deleted while it was being created; retry") from None

    async def capacity(self) -> Capacity:
        report = await self._report()
        if not self.config.layout.plain or self.config.layout.pv_tags:
            return await self.capacity_for({})
        free = self._free(report)
        details = {"vg_size": report.vg.size, "vg_free": report.vg.free, "spare_bytes": self.config.spare_bytes}
        details |= {"extent_size": report.vg.extent_size, **self._health(report)}
        return Capacity(report.vg.size, free, free, details)

    def _health(self, report: VgReport) -> dict[str, int]:
        """Pool figures for metrics (`localdisk_pool_detail`): degraded and cached volumes, and the caches' hits,
        misses and dirty blocks summed over the pool's volumes."""
        ours = [lv for lv in report.lvs.values() if self._ours(lv, VOLUME)]
        figures = {
            "degraded_volumes": sum(1 for lv in ours if lv.partial and self._mirrored(lv)),
            "failed_volumes": sum(1 for lv in ours if lv.partial and not self._mirrored(lv)),
            "cached_volumes": sum(1 for lv in ours if lv.cached),
        }
        for lv in ours:
            for key, value in lv.cache_stats:
                figures[key] = figures.get(key, 0) + value
        return figures

    def _space(self, report: VgReport) -> PoolSpace:
        """The pool's space as the planner sees it (`lvmspace`): its node agent reports it to the cluster's
        controller, which answers the same layouts from it."""
        return PoolSpace(
            extent=self.extent,
            vg_free=report.vg.free,
            pvs=tuple(self._pvs(report)),
            spare=self.config.spare_bytes,
            defaults=self.config.layout,
            cache_mode=self.config.cache,
            cache_size=self.config.cache_size,
            cache_pv_tags=self._cache_layout().pv_tags,
            pool=self.pool,
        )

    async def layout_space(self) -> dict[str, Any]:
        """`DescribesLayouts`: the pool's space in JSON (`PoolSpace.to_json`), from the cached VG report."""
        return self._space(await self._report()).to_json()

    async def capacity_for(self, parameters: Mapping[str, str]) -> Capacity:
        """What volumes of the layout `parameters` ask for can get (`PoolSpace.capacity`, which the cluster's
        controller computes from the same figures): in total, and in one volume; 0 if the VG cannot make that layout
        at all. With a cache, also bounded by the room on the cache PVs: a share of 10% of 6 GiB free makes at most
        60 GiB; a fixed size of 2 GiB makes at most 3 caches, so at most 3 of the largest volumes."""
        report = await self._report()
        answer = self._space(report).capacity(parameters)
        layout, _ = self._space(report).resolve(parameters)
        details = {"vg_size": report.vg.size, "vg_free": report.vg.free, "spare_bytes": self.config.spare_bytes}
        details |= {"extent_size": report.vg.extent_size, "legs": layout.legs, **self._health(report)}
        details["eligible_pvs"] = answer.eligible_pvs
        if answer.cache_room is not None:
            details["cache_room_bytes"] = answer.cache_room
        if answer.caches_that_fit is not None:
            details["caches_that_fit"] = answer.caches_that_fit
        return Capacity(answer.total, answer.available, answer.largest, details)


_SHARED: weakref.WeakKeyDictionary[CommandRunner, Lvm] = weakref.WeakKeyDictionary()
DEVICES_FILE = "localdisk.devices"  # LVM devices file of the served VGs' PVs: commands scan nothing else


def shared_lvm(runner: CommandRunner) -> Lvm:
    """One `Lvm` (one lvm shell) for every pool served with this runner; processes if LOCALDISK_LVM_SHELL=0."""
    lvm = _SHARED.get(runner)
    if lvm is None:
        use_shell = os.environ.get(SHELL_ENV, "1") != "0"
        lvm = Lvm(runner, executor=ShellExecutor(runner) if use_shell else None, devices_file=DEVICES_FILE)
        _SHARED[runner] = lvm
    return lvm


def _linear(pool: str, config: PoolConfig, runner: CommandRunner) -> VolumeBackend:
    assert isinstance(config, LinearPoolConfig)
    backend = LinearBackend(pool, config, shared_lvm(runner), runner, view_max_age=config.view_max_age_seconds)
    return with_rules(backend, config, runner)  # a pool with `match` finds (and may make) its VG: `lvmsetup`


def _thin(pool: str, config: PoolConfig, runner: CommandRunner) -> VolumeBackend:
    assert isinstance(config, ThinPoolConfig)
    backend = ThinBackend(pool, config, shared_lvm(runner), runner, view_max_age=config.view_max_age_seconds)
    return with_rules(backend, config, runner, thin_pool=config.thin_pool)


LINEAR_BACKEND = BackendSpec("lvm", LinearPoolConfig, _linear, "linear LVs in a volume group, zeroed before use")
THIN_BACKEND = BackendSpec("thin", ThinPoolConfig, _thin, "thin LVs in a zeroing thin pool, with snapshots and clones")
