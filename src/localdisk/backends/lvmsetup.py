"""Zero-touch LVM: the volume group (and thin pool) of an `lvm` or `thin` pool made and grown by localdisk from the
blank disks its rules find, so one config serves nodes whose disks nobody prepared by hand.

A pool with a `match` table (`localdisk.discovery.DiskRules`) is wrapped in a `RulesPool`. Each discovery pass (at
open, then every `discover_seconds` while the pool is up, and at each background retry while it is down) looks at
the VG the pool names and the disks the rules match:

* a VG of that name that does not carry `OURS_TAG` is never touched: the pool is down, saying so;
* a VG carrying it is taken as it is, and grown (with `setup = true`) by every new blank matching disk;
* no VG: with `setup = true`, one is made from the blank matching disks; without, the pool is down saying what it
  would use.

Set-up is made of steps that are each one LVM command and each recognisable afterwards, so a kill anywhere is
finished by the next pass instead of leaving a half-made VG:

1. `pvcreate --uuid` on a blank disk, with a PV UUID that marks it as made for this VG (`pv_uuid_for`): an orphan
   PV carrying that mark is ours to resume, any other PV (or LVM label) is someone else's and refused;
2. `vgcreate` on one such PV, with `OURS_TAG` (and, for a thin pool, `BUILDING_TAG`) in the same metadata write;
3. `vgextend` with each other marked PV (an orphan marked PV found later is resumed the same way);
4. thin pools: `lvcreate --type thin-pool` while the VG carries `BUILDING_TAG`, then `vgchange --deltag` of it.
   A VG still carrying `BUILDING_TAG` holds nothing but what a cut-off step 4 left (no volume can exist before the
   pool does), so those leftovers are removed and the pool is made again.

Nothing is ever written to a disk the survey did not find blank, and the disk is looked at again right before
`pvcreate`, which itself refuses (`-qq` answers no) a disk on which a signature has appeared.

A VG that lost a PV (a disk vanished or died) is partial: LVM refuses to change it, so new volumes, expansions and
snapshots are refused with a clear FAILED_PRECONDITION, while the volumes on the remaining disks are still found,
staged and published.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import anyio
from pydantic import Field, model_validator

from localdisk.backend import CachedState, PendingVolumes, TakesParameters, UsesDisks, VolumeBackend
from localdisk.backends.lvmcmd import ProcessExecutor, check_name, classify, parse_report_json
from localdisk.discovery import CLAIMS, HOST, ByteSize, Claims, DiskRules, Roots, signatures_of, summary, survey
from localdisk.errors import CommandFailed, FailedPrecondition, LocalDiskError
from localdisk.model import Capacity, Features, PendingVolume, Snapshot, Volume, VolumeSpec
from localdisk.registry import PoolConfig
from localdisk.runner import CommandRunner

log = logging.getLogger(__name__)

OURS_TAG = "localdisk.csi.io/setup"  # on a VG: made by localdisk (an administrator may add it to hand one over)
BUILDING_TAG = "localdisk.csi.io/building"  # on a VG: its thin pool is not made yet; what it holds are leftovers
OWNER_TAG = "localdisk.csi.io/owned"  # on an LV: a localdisk volume (see `localdisk.backends.lvm`)
UUID_MARK = "LDzt"
DISCOVER_INTERVAL = 60.0
MISSING_PV = "[unknown]"


# -- identity on disk (pure) ------------------------------------------------------------------------------------------
def _mark(vg: str) -> str:
    return UUID_MARK + hashlib.sha256(vg.encode()).hexdigest()[:8]


def pv_uuid_for(vg: str) -> str:
    """A fresh PV UUID (LVM's 32 characters, hyphenated 6-4-4-4-4-4-6) that marks the PV as made for `vg`."""
    raw = _mark(vg) + secrets.token_hex(10)
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(raw[a:b] for a, b in itertools.pairwise(cuts))


def marked_for(uuid: str, vg: str) -> bool:
    return uuid.replace("-", "").startswith(_mark(vg))


# -- configuration ----------------------------------------------------------------------------------------------------
class VgRulesConfig(PoolConfig):
    """The keys an `lvm` or `thin` pool has for disks found by rules (the pool's own keys are in `backends.lvm`).

    [pools.lvm.bulk]
    volume_group = "ld-bulk"
    setup = true
    [pools.lvm.bulk.match]
    rotational = true
    min_size = "2T"
    """

    match: DiskRules | None = None
    """The disks of the VG, by rules (see `localdisk.discovery`): only blank disks are taken."""
    setup: bool = False
    """With `match`: make the VG (tagged as localdisk's) from the blank disks found, and extend it with the new ones
    that appear later. Without it the VG must exist and carry the tag `localdisk.csi.io/setup`."""
    discover_seconds: float = Field(default=DISCOVER_INTERVAL, gt=0)
    """With `match`: how often the disks are looked over again for new matching ones."""

    @model_validator(mode="after")
    def _setup_needs_rules(self) -> VgRulesConfig:
        if self.setup and self.match is None:
            raise ValueError("setup = true needs a [...match] table: it makes the VG from the blank disks found")
        return self


class ThinRulesConfig(VgRulesConfig):
    """What set-up makes the thin pool of: `thin_size`, else `thin_percent` of the VG; `metadata_size` or LVM's."""

    thin_size: ByteSize | None = None
    """Data size of the thin pool set-up makes (default: `thin_percent` of the VG, grown as disks join)."""
    thin_percent: Annotated[int, Field(gt=0, le=95)] = 90
    """Share of the VG the thin pool's data takes when `thin_size` is not given; the rest keeps room for its
    metadata and LVM's spare metadata area."""
    metadata_size: ByteSize | None = None
    """Metadata size of the thin pool set-up makes (default: LVM's choice for the data size)."""


# -- what LVM shows ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhysicalVolume:
    device: str  # as LVM names it (/dev/sdb); "[unknown]" for a missing one
    vg: str  # "" for an orphan PV
    uuid: str

    @property
    def kernel_name(self) -> str:
        return os.path.basename(os.path.realpath(self.device))


@dataclass(frozen=True)
class GroupState:
    tags: frozenset[str]
    missing: int  # PVs the VG's metadata names that are not present
    lvs: tuple[tuple[str, frozenset[str]], ...]  # visible LVs: (name, tags)
    size: int
    thin_size: int | None = None  # the data size of the pool's thin pool, if it has one


def parse_pvs(text: str) -> list[PhysicalVolume]:
    rows = [row for entry in parse_report_json(text) for row in entry.get("pv") or []]
    return [
        PhysicalVolume(str(r.get("pv_name", "")), str(r.get("vg_name", "")), str(r.get("pv_uuid", ""))) for r in rows
    ]


def _tags(value: Any) -> frozenset[str]:
    return frozenset(t for t in str(value or "").split(",") if t)


def parse_group(vgs: str, lvs_text: str, vg: str, thin_pool: str | None) -> GroupState | None:
    """The VG `vg` from `vgs` and `lvs` JSON reports, or None if `vgs` does not list it."""
    found: GroupState | None = None
    for entry in parse_report_json(vgs):
        for row in entry.get("vg") or []:
            if row.get("vg_name") == vg:
                missing = int(str(row.get("vg_missing_pv_count") or 0))
                found = GroupState(_tags(row.get("vg_tags")), missing, (), int(str(row.get("vg_size") or 0)))
    if found is None:
        return None
    lvs: list[tuple[str, frozenset[str]]] = []
    thin_size = None
    for entry in parse_report_json(lvs_text):
        for row in entry.get("lv") or []:
            name = str(row.get("lv_name", ""))
            if not name or name.startswith("["):
                continue
            lvs.append((name, _tags(row.get("lv_tags"))))
            if name == thin_pool and str(row.get("lv_attr") or " ")[0] == "t":
                thin_size = int(str(row.get("lv_size") or 0))
    return GroupState(found.tags, found.missing, tuple(lvs), found.size, thin_size)


# -- the pool ---------------------------------------------------------------------------------------------------------
class LvmPool(VolumeBackend, CachedState, PendingVolumes, TakesParameters, UsesDisks, Protocol):
    """What `RulesPool` needs of the backend it wraps (`LinearBackend`, `ThinBackend`)."""

    vg: str


REPORT = ("--reportformat", "json", "--units", "b", "--nosuffix")


class RulesPool:
    """An `lvm` or `thin` pool whose VG localdisk finds (and, with `setup`, makes and grows) from disk rules."""

    def __init__(
        self,
        inner: LvmPool,
        config: VgRulesConfig,
        runner: CommandRunner,
        *,
        thin_pool: str | None = None,
        claims: Claims = CLAIMS,
        roots: Roots = HOST,
    ) -> None:
        assert config.match is not None
        self.inner = inner
        self.kind = inner.kind
        self.pool = inner.pool
        self.vg = inner.vg
        self.config = config
        self.rules = config.match
        self.thin_pool = thin_pool
        self.runner = runner
        self._lvm = ProcessExecutor(runner)
        self._claims = claims
        self._roots = roots
        self._owner = f"{self.kind} pool {self.pool!r}"
        self._passing = anyio.Lock()
        self._discovered_at = -math.inf
        self._summary = ""
        self.discovered: dict[str, str] = {}  # kernel name -> what the last pass made of that disk
        self.missing_pvs = 0  # PVs the VG lacks, as the last pass saw

    @property
    def features(self) -> Features:
        return self.inner.features

    @features.setter
    def features(self, value: Features) -> None:
        self.inner.features = value

    @property
    def finds_disks(self) -> bool:
        return True

    def discover_soon(self) -> None:
        self._discovered_at = -math.inf

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        await self.discover()
        await self.inner.open()

    async def aclose(self) -> None:
        self._claims.release(self._owner)
        await self.inner.aclose()

    @property
    def refresh_interval(self) -> float:
        inner = self.inner.refresh_interval
        return min(inner, self.config.discover_seconds) if inner > 0 else self.config.discover_seconds

    async def refresh_state(self) -> None:
        if time.monotonic() - self._discovered_at >= self.config.discover_seconds and await self.discover():
            await self.inner.open()  # the VG grew: its size, the devices LVM scans
        await self.inner.refresh_state()

    # -- LVM --------------------------------------------------------------------------------------------------------
    async def _run(self, args: Sequence[str]) -> str:
        result = await self._lvm.run(list(args))
        if result.returncode != 0:
            raise classify(result.argv, result.returncode, result.error_text)
        return result.text

    async def _pvs(self) -> list[PhysicalVolume]:
        return parse_pvs(await self._run(["pvs", *REPORT, "-o", "pv_name,vg_name,pv_uuid"]))

    async def _group(self) -> GroupState | None:
        vgs = await self._run(["vgs", *REPORT, "-o", "vg_name,vg_tags,vg_missing_pv_count,vg_size"])
        if parse_group(vgs, '{"report": []}', self.vg, None) is None:
            return None
        lvs = await self._run(["lvs", *REPORT, "-o", "lv_name,lv_tags,lv_attr,lv_size", "--", self.vg])
        return parse_group(vgs, lvs, self.vg, self.thin_pool)

    # -- discovery and set-up -------------------------------------------------------------------------------------
    async def discover(self) -> bool:
        """One pass: find the disks, make, finish or extend the VG as `setup` allows; True if the VG changed.

        Raises FailedPrecondition when the pool cannot be served (a foreign VG of that name, no disk yet, set-up
        needed but off): `Available` shows the pool down with that reason and runs the pass again later."""
        async with self._passing:
            try:
                return await self._pass()
            finally:
                self._discovered_at = time.monotonic()

    async def _pass(self) -> bool:
        vg = self.vg
        group = await self._group()
        if group is not None and OURS_TAG not in group.tags:
            raise FailedPrecondition(
                f"{self._owner}: volume group {vg!r} exists but was not made by localdisk (no tag {OURS_TAG}), so"
                f" localdisk leaves it alone; give the pool another volume_group, or hand this one over with"
                f" `vgchange --addtag {OURS_TAG} {vg}`"
            )
        pvs = await self._pvs()
        in_vg = {pv.kernel_name for pv in pvs if pv.vg == vg and pv.device != MISSING_PV}
        resumable = {pv.kernel_name: pv for pv in pvs if not pv.vg and marked_for(pv.uuid, vg)}
        result = await survey(
            self.rules, self._owner, self.runner, claims=self._claims, roots=self._roots, in_pool={*in_vg, *resumable}
        )
        decided: dict[str, str] = {}
        joining: list[str] = []  # devices to make part of the VG, marked PVs first
        for finding in result.findings:
            name = finding.disk.name
            if name in in_vg:
                self._claims.take(self._owner, name)
                decided[name] = "used"
            elif not self._claims.take(self._owner, name):
                decided[name] = "refused: taken by another pool"
            elif name in resumable:
                if not self.config.setup:
                    decided[name] = "refused: a set-up of this pool was cut off; set setup = true to finish it"
                    continue
                joining.insert(0, resumable[name].device)
                decided[name] = "used: set-up resumed"
            elif finding.state == "blank":
                if not self.config.setup:
                    decided[name] = "blank: left alone, set setup = true to let localdisk make it a PV"
                    continue
                try:
                    joining.append(await self._make_pv(f"/dev/{name}"))
                except LocalDiskError as exc:
                    decided[name] = f"refused: {exc.message}"
                    continue
                decided[name] = "used: made a PV now"
            else:
                reason = finding.reason or "a partition table (an lvm pool takes blank disks only)"
                decided[name] = f"refused: {reason}"
            if decided[name].startswith("refused") or decided[name].startswith("blank"):
                self._claims.drop(self._owner, name)
        self.discovered = decided
        line = summary(result, decided)
        if line != self._summary:
            log.info("%s: disk discovery: %s", self._owner, line)
            self._summary = line
        changed = await self._assemble(group, joining, line)
        self.missing_pvs = (await self._group() or group or GroupState(frozenset(), 0, (), 0)).missing
        return changed

    async def _make_pv(self, device: str) -> str:
        """Make a blank disk a PV marked for this VG; looked at again right before, as the write is final."""
        found = await signatures_of(self.runner, device)
        if found:
            raise FailedPrecondition(f"no longer blank ({found if isinstance(found, str) else ', '.join(found)})")
        # -qq answers no to every prompt: a signature that appeared since makes pvcreate fail, not wipe it.
        await self._run(["pvcreate", "-qq", "--norestorefile", "--uuid", pv_uuid_for(self.vg), "--", device])
        log.info("%s: made blank disk %s a physical volume for volume group %s", self._owner, device, self.vg)
        return device

    async def _assemble(self, group: GroupState | None, joining: list[str], line: str) -> bool:
        vg = check_name(self.vg, "volume group")
        changed = False
        if group is None:
            if not joining:
                hint = "" if self.config.setup else " (setup = false: localdisk does not make it)"
                raise FailedPrecondition(
                    f"{self._owner}: volume group {vg!r} does not exist and no disk to make it from{hint}: {line}"
                )
            tags = ["--addtag", OURS_TAG, *(("--addtag", BUILDING_TAG) if self.thin_pool else ())]
            await self._run(["vgcreate", "-qq", *tags, "--", vg, joining.pop(0)])
            log.info("%s: created volume group %s", self._owner, vg)
            group = GroupState(frozenset({OURS_TAG, *([BUILDING_TAG] if self.thin_pool else [])}), 0, (), 0)
            changed = True
        for device in joining:
            await self._run(["vgextend", "-qq", "--", vg, device])
            log.info("%s: extended volume group %s with %s", self._owner, vg, device)
            changed = True
        if self.thin_pool is not None:
            changed = await self._thin(group) or changed
        return changed

    async def _thin(self, group: GroupState) -> bool:
        assert self.thin_pool is not None and isinstance(self.config, ThinRulesConfig)
        vg, pool = self.vg, self.thin_pool
        if BUILDING_TAG not in group.tags:
            if group.thin_size is None and not group.lvs and self.config.setup:
                await self._run(["vgchange", "-qq", "--addtag", BUILDING_TAG, "--", vg])  # an empty VG of ours
            else:
                return await self._grow_thin(group)
        if not self.config.setup:
            raise FailedPrecondition(
                f"{self._owner}: the set-up of thin pool {vg}/{pool} was cut off; set setup = true"
            )
        # Everything visible in a VG still marked building is a leftover of a cut-off pool creation.
        current = await self._group()
        for name, tags in current.lvs if current else ():
            if OWNER_TAG not in tags:
                await self._run(["lvremove", "-qq", "-y", "-f", "-f", "--", f"{vg}/{name}"])
                log.info("%s: removed %s/%s, left by a cut-off thin pool set-up", self._owner, vg, name)
        share = ["-l", f"{self.config.thin_percent}%VG"]
        size = ["-L", f"{self.config.thin_size}b"] if self.config.thin_size else share
        metadata = ["--poolmetadatasize", f"{self.config.metadata_size}b"] if self.config.metadata_size else []
        await self._run(
            ["lvcreate", "-qq", "-y", "--type", "thin-pool", "-Z", "y", *size, *metadata, "-n", pool, "--", vg]
        )
        await self._run(["vgchange", "-qq", "--deltag", BUILDING_TAG, "--", vg])
        log.info("%s: created thin pool %s/%s", self._owner, vg, pool)
        return True

    async def _grow_thin(self, group: GroupState) -> bool:
        """With the default size (a share of the VG), grow the thin pool as disks join the VG."""
        assert isinstance(self.config, ThinRulesConfig)
        if not self.config.setup or self.config.thin_size or group.thin_size is None or group.missing:
            return False
        target = group.size * self.config.thin_percent // 100
        if group.thin_size >= target * 0.98:
            return False
        try:
            share = f"{self.config.thin_percent}%VG"
            await self._run(["lvextend", "-qq", "-l", share, "--", f"{self.vg}/{self.thin_pool}"])
        except CommandFailed as exc:
            log.warning("%s: could not grow thin pool %s/%s: %s", self._owner, self.vg, self.thin_pool, exc.message)
            return False
        log.info(
            "%s: grew thin pool %s/%s to %d%% of the volume group",
            self._owner,
            self.vg,
            self.thin_pool,
            self.config.thin_percent,
        )
        return True

    # -- a partial VG ----------------------------------------------------------------------------------------------
    def _refuse_if_partial(self) -> None:
        if self.missing_pvs:
            raise FailedPrecondition(self._partial_reason())

    def _partial_reason(self) -> str:
        return (
            f"{self._owner}: volume group {self.vg!r} is missing {self.missing_pvs} physical volume(s) (a disk"
            " vanished or died), and LVM changes nothing in it until the disk is back (or the VG is repaired with"
            " `vgreduce --removemissing`); volumes on its other disks keep working"
        )

    async def _changing(self, change: Callable[[], Awaitable[Any]]) -> Any:
        """`change()`, unless the VG is partial (refused before anything starts) or LVM finds it so."""
        self._refuse_if_partial()
        try:
            return await change()
        except CommandFailed as exc:
            if "PVs are missing" in exc.stderr or "physical volumes are missing" in exc.stderr:
                self.missing_pvs = max(self.missing_pvs, 1)
                raise FailedPrecondition(self._partial_reason()) from exc
            raise

    # -- the backend's calls ---------------------------------------------------------------------------------------
    async def create_volume(self, spec: VolumeSpec) -> Volume:
        volume: Volume = await self._changing(lambda: self.inner.create_volume(spec))
        return volume

    async def delete_volume(self, handle: str) -> None:
        await self._changing(lambda: self.inner.delete_volume(handle))

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        volume: Volume = await self._changing(lambda: self.inner.expand_volume(handle, size_bytes))
        return volume

    async def get_volume(self, handle: str) -> Volume:
        return await self.inner.get_volume(handle)

    async def find_volume(self, name: str) -> Volume | None:
        return await self.inner.find_volume(name)

    async def list_volumes(self) -> list[Volume]:
        return await self.inner.list_volumes()

    async def capacity(self) -> Capacity:
        if self.missing_pvs:
            return Capacity(total_bytes=0, available_bytes=0, maximum_volume_bytes=0)
        return await self.inner.capacity()

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        snapshot: Snapshot = await self._changing(lambda: self.inner.create_snapshot(source_handle, name))
        return snapshot

    async def delete_snapshot(self, handle: str) -> None:
        await self._changing(lambda: self.inner.delete_snapshot(handle))

    async def get_snapshot(self, handle: str) -> Snapshot:
        return await self.inner.get_snapshot(handle)

    async def find_snapshot(self, name: str) -> Snapshot | None:
        return await self.inner.find_snapshot(name)

    async def list_snapshots(self) -> list[Snapshot]:
        return await self.inner.list_snapshots()

    async def pending_volumes(self) -> list[PendingVolume]:
        return await self.inner.pending_volumes()

    async def reclaim_pending(self, handle: str) -> bool:
        removed: bool = await self._changing(lambda: self.inner.reclaim_pending(handle))
        return removed

    # -- layouts (`TakesParameters`) and disks (`UsesDisks`): the wrapped pool's ------------------------------------
    @property
    def parameters(self) -> frozenset[str]:
        return self.inner.parameters

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        self.inner.check_parameters(parameters)

    async def capacity_for(self, parameters: Mapping[str, str]) -> Capacity:
        if self.missing_pvs:
            return Capacity(total_bytes=0, available_bytes=0, maximum_volume_bytes=0)
        return await self.inner.capacity_for(parameters)

    async def check_same(self, volume: Volume, parameters: Mapping[str, str]) -> None:
        await self.inner.check_same(volume, parameters)

    async def disks(self) -> tuple[str, ...]:
        return await self.inner.disks()


def with_rules(
    backend: LvmPool, config: PoolConfig, runner: CommandRunner, *, thin_pool: str | None = None
) -> VolumeBackend:
    """The hook `backends.lvm`'s factories call: `backend` itself for a pool that names its VG only, else wrapped
    in a `RulesPool` that finds (and, with `setup`, makes and grows) the VG from the disks its rules match."""
    if not isinstance(config, VgRulesConfig) or config.match is None:
        return backend
    return RulesPool(backend, config, runner, thin_pool=thin_pool)
