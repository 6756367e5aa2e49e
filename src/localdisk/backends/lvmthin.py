"""The thin backend: thin LVs in one zeroing thin pool, with snapshots and clones (`ThinBackend`, its config), and the
pool's arithmetic (`ThinUse`, pure): what it holds and may still give, by its overprovision ratio, its real free space
and its use threshold. The thick backend and the pool factories are in `localdisk.backends.lvm`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated

from pydantic import Field, field_validator

from localdisk import crypt
from localdisk.backends.lvmbase import (
    ENCRYPTED_TAG,
    HANDLE,
    PENDING_TAG,
    PREFIXES,
    SNAPSHOT,
    VOLUME,
    LvmBackend,
    decode_name,
    identity_tags,
    lv_name_for,
    lvm_name,
    name_tags,
    source_of,
)
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, VgReport
from localdisk.backends.lvmsetup import ThinRulesConfig
from localdisk.backends.lvmview import THIN_ACTIVE, VIEW_MAX_AGE, new_lv, with_lv, with_tags, without_lv
from localdisk.errors import FailedPrecondition, InsufficientCapacity, InvalidArgument, NotFound
from localdisk.model import Capacity, Features, Snapshot, VolumeSpec
from localdisk.runner import CommandRunner
from localdisk.sizes import align_up, human


@dataclass(frozen=True)
class ThinUse:
    """What a thin pool holds and may still give, by the overprovision ratio and by its real free space."""

    data_bytes: int  # the pool's real data size
    used_bytes: int  # provisioned data blocks
    virtual_bytes: int  # sum of the sizes of every thin LV in the pool (ours, foreign, snapshots)
    data_percent: float
    metadata_percent: float
    ratio: float
    threshold_percent: float

    @property
    def past_threshold(self) -> bool:
        return self.data_percent >= self.threshold_percent or self.metadata_percent >= self.threshold_percent

    @property
    def ratio_room(self) -> int:
        return max(int(self.data_bytes * self.ratio) - self.virtual_bytes, 0)

    @property
    def real_room(self) -> int:
        return max(self.data_bytes - self.used_bytes, 0)

    def available(self, extent: int) -> int:
        if self.past_threshold:
            return 0
        return min(self.ratio_room, self.real_room) // extent * extent

    def refusal(self, size: int, extent: int, where: str) -> str | None:
        """Why a new thin LV of `size` virtual bytes must be refused, or None if it fits."""
        if self.past_threshold:
            return (
                f"thin pool {where} is {self.data_percent:.1f}% full of data and {self.metadata_percent:.1f}% of"
                f" metadata, past the {self.threshold_percent:g}% threshold; free space in it or extend it"
            )
        if size > self.available(extent):
            return (
                f"thin pool {where} can give {human(self.available(extent))} more ({human(self.ratio_room)} by the"
                f" overprovision ratio {self.ratio:g}, {human(self.real_room)} really free); {human(size)} requested"
            )
        return None


def thin_use(report: VgReport, pool: str, ratio: float, threshold: float) -> ThinUse:
    found = report.lv(pool)
    if found is None:
        raise FailedPrecondition(f"thin pool {report.vg.name}/{pool} not found")
    data_percent = found.data_percent or 0.0
    return ThinUse(
        data_bytes=found.size,
        used_bytes=int(found.size * data_percent / 100),
        virtual_bytes=sum(lv.size for lv in report.in_pool(pool)),
        data_percent=data_percent,
        metadata_percent=found.metadata_percent or 0.0,
        ratio=ratio,
        threshold_percent=threshold,
    )


class ThinPoolConfig(ThinRulesConfig):
    volume_group: str
    thin_pool: str
    """The thin pool LV in `volume_group`; it must have zeroing on (`lvcreate -Z y` / `lvchange -Z y`)."""
    view_max_age_seconds: Annotated[float, Field(ge=0)] = VIEW_MAX_AGE
    """How long GetCapacity and ListVolumes may answer from the cached VG report, so also how late they see the
    pool's data use grow with writes (0: read LVM on every call)."""
    overprovision_ratio: Annotated[float, Field(ge=1.0)] = 10.0
    """How many times its real data size the pool may promise in thin volumes and snapshots."""
    threshold_percent: Annotated[float, Field(gt=0, le=100)] = 90.0
    """New volumes and snapshots are refused once the pool's data or metadata use reaches this percentage."""

    _check_names = field_validator("volume_group", "thin_pool")(lvm_name)


class ThinBackend(LvmBackend):
    """Thin LVs in one thin pool, with snapshots and clones, overprovisioned up to a ratio and a use threshold."""

    kind = "thin"
    _discard_header = True  # see `localdisk.crypt.erase`: a clone's header blocks may be its origin's

    def __init__(
        self, pool: str, config: ThinPoolConfig, lvm: Lvm, runner: CommandRunner, *, view_max_age: float = 0.0
    ) -> None:
        features = Features(snapshots=True, clones=True)
        super().__init__(pool, config.volume_group, lvm, runner, features, view_max_age)
        self.config = config
        self.thin_pool = config.thin_pool
        self._use_memo: tuple[VgReport, ThinUse] | None = None

    @property
    def _where(self) -> str:
        return f"{self.vg}/{self.thin_pool}"

    def _belongs(self, lv: LogicalVolume) -> bool:
        return lv.pool == self.thin_pool

    def _use(self, report: VgReport) -> ThinUse:
        # Summing the pool's virtual size walks every LV: done once per report, not once per GetCapacity.
        memo = self._use_memo
        if memo is not None and memo[0] is report:
            return memo[1]
        use = thin_use(report, self.thin_pool, self.config.overprovision_ratio, self.config.threshold_percent)
        self._use_memo = (report, use)
        return use

    async def _activate(self, report: VgReport) -> None:
        pool = report.lv(self.thin_pool)
        if pool is None or not pool.is_thin_pool:
            raise FailedPrecondition(
                f"thin pool {self._where} not found (or not a thin pool); create it with"
                f" `lvcreate --type thin-pool -Z y -L <size> -n {self.thin_pool} {self.vg}` or fix"
                f" pools.thin.{self.pool}.thin_pool"
            )
        if not pool.zeroing:
            raise FailedPrecondition(
                f"thin pool {self._where} does not zero newly provisioned blocks, so a new volume could show another"
                f" volume's old data; turn zeroing on with `lvchange -Z y {self._where}`"
            )
        if not pool.active:
            await self.lvm.activate_lv(self.vg, self.thin_pool)
        if any(self._ours(lv, VOLUME) and not lv.active for lv in report.lvs.values()):
            await self.lvm.activate_vg(self.vg)  # snapshots keep their activation-skip flag and stay inactive

    def _abnormal(self, report: VgReport, lv: LogicalVolume) -> str | None:
        pool = report.lv(self.thin_pool)
        if pool is not None and max(pool.data_percent or 0.0, pool.metadata_percent or 0.0) >= 100:
            return f"thin pool {self._where} is out of space: writes to the volume fail"
        return super()._abnormal(report, lv)

    def _check_room(self, report: VgReport, size: int) -> None:
        refusal = self._use(report).refusal(align_up(size, self.extent), self.extent, self._where)
        if refusal:
            raise InsufficientCapacity(refusal)

    async def _create(self, report: VgReport, lv: str, spec: VolumeSpec) -> bool:
        # Tags are set by the creating lvcreate itself, so a crash can never leave an untagged LV of ours behind.
        if spec.source is None or spec.source_handle is None:
            tags = identity_tags(VOLUME, spec.name, encrypted=spec.encrypted)
            await self.lvm.create_thin(self.vg, self.thin_pool, lv, spec.size_bytes, tags)
            made = new_lv(lv, align_up(spec.size_bytes, self.extent), tags, attr=THIN_ACTIVE, pool=self.thin_pool)
            self.view.apply(lambda r: with_lv(r, made, takes_extents=False))
            return False
        kind = spec.source.kind.value
        source = report.lv(spec.source_handle) if HANDLE.fullmatch(spec.source_handle) else None
        if source is None or not self._ready(source, kind):
            raise NotFound(f"{kind} {spec.source.id!r} not found in thin pool {self.pool!r}")
        grow = align_up(spec.size_bytes, self.extent) > source.size
        if spec.encrypted and ENCRYPTED_TAG not in source.tags:
            raise InvalidArgument(f"{kind} {spec.source.id!r} is not encrypted; an encrypted volume cannot copy it")
        encrypted = spec.encrypted or ENCRYPTED_TAG in source.tags  # a copy of a LUKS volume is one too
        tags = identity_tags(VOLUME, spec.name, (kind, spec.source_handle), encrypted=encrypted)
        tags += [PENDING_TAG] if grow else []
        await self.lvm.create_thin_snapshot(self.vg, spec.source_handle, lv, tags, activate=True)
        made = new_lv(lv, source.size, tags, attr=THIN_ACTIVE, pool=self.thin_pool, origin=source.name)
        self.view.apply(lambda r: with_lv(r, made, takes_extents=False))
        return grow

    async def _grow(self, lv: str, spec: VolumeSpec, current_size: int) -> None:
        if align_up(spec.size_bytes, self.extent) > current_size:
            await self.lvm.extend(self.vg, lv, spec.size_bytes)
            size = align_up(spec.size_bytes, self.extent)
            self.view.apply(
                lambda r: with_lv(r, replace(r.lvs[lv], size=size), takes_extents=False) if lv in r.lvs else r
            )

    async def capacity(self) -> Capacity:
        report = await self._report()
        use = self._use(report)
        available = use.available(self.extent)
        details = {
            "data_bytes": use.data_bytes,
            "used_bytes": use.used_bytes,
            "virtual_bytes": use.virtual_bytes,
            "data_percent_x100": round(use.data_percent * 100),
            "metadata_percent_x100": round(use.metadata_percent * 100),
        }
        return Capacity(use.data_bytes, available, available, details)

    # snapshots
    def _snapshot(self, lv: LogicalVolume) -> Snapshot:
        source = source_of(lv.tags)
        return Snapshot(
            ref=self._ref(lv.name),
            name=decode_name(lv.tags) or "",
            source_volume_id=str(self._ref(source[1])) if source else "",
            size_bytes=lv.size,
            created_at=lv.created_at or datetime.fromtimestamp(0, UTC),
            ready=True,
        )

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        lv_name = lv_name_for(SNAPSHOT, name)
        name_tags(name)
        async with self._writing() as report:
            existing = report.lv(lv_name)
            if existing is not None:
                self._claim(existing, SNAPSHOT, name)
                return self._snapshot(existing)
            source = self._get(report, source_handle, VOLUME)
            self._check_room(report, source.size)
            tags = identity_tags(SNAPSHOT, name, (VOLUME, source_handle), encrypted=ENCRYPTED_TAG in source.tags)
            # A snapshot stays inactive (LVM's activation-skip flag); volumes restored from it are activated.
            await self.lvm.create_thin_snapshot(self.vg, source_handle, lv_name, tags, activate=False)
            report = await self.view.refresh()  # for its creation time as LVM recorded it
        return self._snapshot(self._get(report, lv_name, SNAPSHOT))

    async def delete_snapshot(self, handle: str) -> None:
        if not handle.startswith(PREFIXES[SNAPSHOT]) or not HANDLE.fullmatch(handle):
            return
        async with self._writing() as report:
            lv = report.lv(handle)
            if lv is None or not self._ours(lv, SNAPSHOT):
                return
            if ENCRYPTED_TAG in lv.tags:
                await self._erase_snapshot(lv)
            with contextlib.suppress(NotFound):
                await self.lvm.remove(self.vg, handle)
            self.view.apply(lambda r: without_lv(r, handle, takes_extents=False))

    async def _erase_snapshot(self, lv: LogicalVolume) -> None:
        """Crypto-erase an encrypted snapshot before it is removed. Its header blocks are its origin's until written:
        erasing them writes (copy on write) or unmaps blocks of the snapshot alone, and the origin, its clones and
        restores keep their own headers. Marked pending first, so a deletion cut off after the erase leaves a
        snapshot nothing is restored from (a restore would find no header and format a blank volume); a repeated
        DeleteSnapshot finishes it."""
        if PENDING_TAG not in lv.tags:
            await self.lvm.change_tags(self.vg, lv.name, add=[PENDING_TAG])
            self.view.apply(lambda r: with_tags(r, lv.name, add=[PENDING_TAG]))
        if not lv.active:
            await self.lvm.activate_lv(self.vg, lv.name, ignore_skip=True)
            await self.runner.run(["udevadm", "settle", "--timeout=30"], check=False)  # its /dev node
        await crypt.erase(self.runner, f"/dev/{self.vg}/{lv.name}", discard=True)

    async def get_snapshot(self, handle: str) -> Snapshot:
        return self._snapshot(self._get(await self.view.refresh(), handle, SNAPSHOT))

    async def find_snapshot(self, name: str) -> Snapshot | None:
        lv = (await self._report()).lv(lv_name_for(SNAPSHOT, name))
        if lv is None or not self._ready(lv, SNAPSHOT) or decode_name(lv.tags) != name:
            return None
        return self._snapshot(lv)

    async def list_snapshots(self) -> list[Snapshot]:
        report = await self._report()
        return [self._snapshot(lv) for lv in report.lvs.values() if self._ready(lv, SNAPSHOT)]
