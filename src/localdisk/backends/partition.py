"""The `partition` backend: one GPT partition per volume, carved from whole disks listed in the pool config.

For nodes without LVM, or where a volume must be a plain partition. The disks' GPT tables are the only state: a
volume is a partition whose GPT name is `ld-<key>`, the key derived from the CSI name, and its handle is the
partition's PARTUUID, which survives renumbering and reboots. An encrypted volume (a LUKS2 container, see
`localdisk.crypt`) is made with the partition type "Linux LUKS" (`LUKS_TYPE`); its delete is a crypto-erase and
skips the zeroing pass. Nothing else is stored, so a restarted node finds its
volumes by reading the tables again.

The backend is split in four modules along what a reader looks for:

- here, the pool: its disks (listed, or found by `match` rules and labelled), creating, deleting, expanding and
  looking up volumes, capacity, and the pending partitions a cut-off create leaves;
- `partnames`: how localdisk marks what is its own in a GPT (the `ld-`/`lp-` names and their key, the partition
  types, the disk label GUID);
- `partdisk`: one disk: its lock, the cached view of its table, and the one-write table changes made under the lock,
  with the kernel told about each partition in-process (BLKPG) and repaired (`settle`) when it lags;
- `partgroup`: the group commit of creates waiting for one disk, which share its table writes.

Each disk's table is kept as a cached view, read again once older than the pool's `view_max_age_seconds` (in the
background by the server's `VolumeManager.keep_fresh`, so GetCapacity, ListVolumes and lookups by name spawn no
process). Every change re-reads its disk under the lock first, so a decision that takes space or destroys data is
never made on a stale view; a change made behind localdisk's back therefore shows up at once to the next change of
that disk and within the max age to reads. The kernel's partition nodes (sysfs) are mapped once per table, not once
per volume. A backend constructed directly (tests, tools) reads on every call unless given `view_max_age`. Zeroing
a deleted volume, which can take minutes, runs outside the disk's lock.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
from pydantic import Field, field_validator, model_validator

from localdisk import crypt
from localdisk.backend import finish_despite_cancellation
from localdisk.backends.gpt import Partition, Table, best_fit, parse_wipefs
from localdisk.backends.partdisk import SFDISK_WRITE, PoolDisk, claim, node, wipe
from localdisk.backends.partgroup import Order, group_create
from localdisk.backends.partkernel import BLKPG_RESIZE, kernel_shows, tell_kernel
from localdisk.backends.partnames import (
    GPT_NAME_LIMIT,
    KEY_LENGTH,
    LABEL_MARK,
    LINUX_TYPE,
    LUKS_TYPE,
    PENDING_PREFIX,
    READY_PREFIX,
    SYSFS_BLOCK,
    is_ours,
    is_ready,
    key_of,
    label_id,
    labelled_for,
    pool_mark,
    unfinished_label,
    volume_key,
)
from localdisk.blockdev import zero_out
from localdisk.discovery import CLAIMS, HOST, Claims, DiskRules, Roots, summary, survey
from localdisk.errors import (
    BackendFailure,
    Busy,
    ConfigError,
    FailedPrecondition,
    InsufficientCapacity,
    LocalDiskError,
    NotFound,
    OutOfRange,
    Unsupported,
)
from localdisk.model import Capacity, Features, ObjectRef, PendingVolume, Snapshot, Volume, VolumeSpec
from localdisk.registry import BackendSpec, PoolConfig
from localdisk.runner import CommandRunner
from localdisk.sizes import GiB, MiB, human

__all__ = [  # the names and marks are `partnames`'s; importable from here too, where the backend's users look
    "GPT_NAME_LIMIT",
    "KEY_LENGTH",
    "LABEL_MARK",
    "LINUX_TYPE",
    "LUKS_TYPE",
    "PENDING_PREFIX",
    "READY_PREFIX",
    "PartitionBackend",
    "PartitionPoolConfig",
    "is_ours",
    "is_ready",
    "label_id",
    "labelled_for",
    "unfinished_label",
    "volume_key",
]

ALIGNMENT = MiB
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
VIEW_MAX_AGE = 30.0  # seconds a cached table is trusted for changes made outside localdisk
DISCOVER_INTERVAL = 60.0  # seconds between discovery passes of a pool with `match`
log = logging.getLogger(__name__)


class PartitionPoolConfig(PoolConfig):
    disks: tuple[str, ...] = ()
    """Whole disks the pool may partition, by stable path (/dev/disk/by-id/...), under the `adopt` rules."""
    match: DiskRules | None = None
    """Disks found by rules instead (or as well): see `localdisk.discovery`. Only a blank matching disk, or one
    localdisk labelled for this pool, is used; `adopt` does not apply to them."""
    setup: bool = False
    """With `match`: write localdisk's GPT label on a blank matching disk, making it part of the pool (also one
    attached while the server runs). Without it such a disk is reported and left alone."""
    discover_seconds: float = Field(default=DISCOVER_INTERVAL, gt=0)
    """With `match`: how often the disks are looked over again for new matching ones."""
    adopt: Literal["never", "free-space", "erase"] = "never"
    """What to do with a disk that is not blank. `never`: refuse it unless it is a GPT disk holding only localdisk
    partitions. `free-space`: also share a GPT disk with partitions localdisk did not make, using only its free space
    and never touching those partitions. `erase`: also erase any disk holding no localdisk partition (filesystem,
    LVM PV, foreign partitions: all lost) and give it a fresh GPT."""
    wipe: Literal["zero", "signatures"] = "zero"
    """How a deleted volume is cleaned before its space is reused. `zero` (discard with zeroing where the disk
    offloads it, else the kernel writes zeros) guarantees the next tenant reads no old data; `signatures` only erases
    filesystem signatures, which is fast but leaks data between tenants."""
    settle_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long to wait for the kernel and udev to show a changed partition."""
    view_max_age_seconds: float = Field(default=VIEW_MAX_AGE, ge=0)
    """How long GetCapacity, ListVolumes and lookups may answer from the cached partition tables, so how late they
    see a change made to the disks by anything but localdisk (0: read the disks on every call). Changes always
    re-read their disk first."""

    @model_validator(mode="after")
    def _some_disks(self) -> PartitionPoolConfig:
        if not self.disks and self.match is None:
            raise ValueError("give the pool's disks, by path (disks = [...]) or by rules ([...match] table)")
        if self.setup and self.match is None:
            raise ValueError("setup = true needs a [...match] table: it labels blank disks the rules find")
        return self

    @field_validator("disks")
    @classmethod
    def _distinct_absolute(cls, disks: tuple[str, ...]) -> tuple[str, ...]:
        for disk in disks:
            if not disk.startswith("/dev/"):
                raise ValueError(f"{disk!r} is not a device path under /dev (use /dev/disk/by-id/...)")
        if len(set(disks)) != len(disks):
            raise ValueError("a disk is listed twice")
        return disks


class PartitionBackend:
    kind = "partition"

    def __init__(
        self,
        pool: str,
        config: PartitionPoolConfig,
        runner: CommandRunner,
        *,
        view_max_age: float = 0.0,
        claims: Claims = CLAIMS,
        roots: Roots = HOST,
    ) -> None:
        self.pool = pool
        self.config = config
        self.runner = runner
        self.features = Features(
            snapshots=False, clones=False, expansion=True, alignment=ALIGNMENT, minimum_size=MiB, default_size=GiB
        )
        self._disks: list[PoolDisk] = []
        self._every_disk: dict[str, PoolDisk] = {}  # by path, every disk this pool has used: see `_disk`
        # Key -> CSI name for names seen by this process. The disks keep only the key, so after a restart a volume
        # is listed under its GPT name until CreateVolume (whose retries always look the name up) shows it again.
        self._names: dict[str, str] = {}
        self._max_age = view_max_age
        self._creating: Counter[str] = Counter()  # keys of the creates running in this process
        self._reclaiming: set[str] = set()  # keys whose pending partition `reclaim_pending` is removing
        self._owner = f"partition pool {pool!r}"
        self._claims = claims
        self._roots = roots
        claims.name(self._owner, config.disks)
        self._discovering = anyio.Lock()
        self._discovered_at = -math.inf
        self.discovered: dict[str, str] = {}  # kernel name -> what the last discovery pass made of that disk
        self._summary = ""

    def _disk(self, path: str) -> PoolDisk:
        """The disk at `path`: the same object, so the same lock, for as long as this pool lives. A pool that went
        down (a table read failed) and is opened again must not write a table beside a call from before that still
        runs under the old lock: two sfdisk writes interleaved can leave neither GPT header whole."""
        disk = self._every_disk.get(path)
        if disk is None:
            disk = self._every_disk[path] = PoolDisk(
                path, self._max_age, self._owner, self.config.settle_timeout_seconds
            )
        return disk

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        self._disks = [self._disk(path) for path in self.config.disks]
        devices = [self._check_block_device(disk) for disk in self._disks]
        if len(set(devices)) != len(devices):
            raise ConfigError(f"partition pool {self.pool!r}: two entries of disks name the same device")
        for disk in self._disks:
            async with disk.lock:
                leftovers = await self._prepare(disk)
            for part in leftovers:
                await self._remove(disk, part, zero=False)
        if self.config.match is not None:
            await self.discover()
            if not self._disks:
                raise FailedPrecondition(f"{self._owner} has no disk yet: {self._summary}")

    async def disks(self) -> tuple[str, ...]:
        """The pool's disks, listed and discovered (`UsesDisks`)."""
        return tuple(disk.configured for disk in self._disks)

    async def aclose(self) -> None:
        self._claims.release(self._owner)

    @property
    def finds_disks(self) -> bool:
        return self.config.match is not None

    def discover_soon(self) -> None:
        self._discovered_at = -math.inf

    @property
    def refresh_interval(self) -> float:
        """Half the views' age limit: re-read in the background well before a read would have to wait for it; as
        often as discovery is due if that is sooner."""
        intervals = [self._max_age / 2, self.config.discover_seconds if self.config.match is not None else 0]
        return min((i for i in intervals if i > 0), default=0.0)

    async def refresh_state(self) -> None:
        if self.config.match is not None and time.monotonic() - self._discovered_at >= self.config.discover_seconds:
            await self.discover()
        for disk in self._disks:
            if disk.table is None or time.monotonic() - disk.read_at >= self.refresh_interval:
                async with disk.lock:
                    await disk.read(self.runner)

    def _check_block_device(self, disk: PoolDisk) -> str:
        device = disk.device()
        where = f"partition pool {self.pool!r}: disk {disk.configured}"
        try:
            mode = os.stat(device).st_mode
        except OSError as exc:
            raise ConfigError(f"{where} does not exist ({exc.strerror})") from exc
        if not stat.S_ISBLK(mode):
            raise ConfigError(f"{where} is not a block device")
        if (SYSFS_BLOCK / Path(device).name / "partition").exists():
            raise ConfigError(f"{where} is a partition ({device}); list whole disks, localdisk partitions them")
        return device

    async def _prepare(self, disk: PoolDisk) -> list[Partition]:
        """Check a disk may be used (see `adopt`) and label a blank one; returns the partitions a crash left pending.

        Called with the disk's lock held.
        """
        device = disk.device()
        signatures = parse_wipefs((await self.runner.run(["wipefs", "--json", "--", device])).text)
        others = sorted({s.type for s in signatures} - {"gpt", "PMBR"})
        table = await disk.read(self.runner) if any(s.type == "gpt" for s in signatures) else None
        ours = [p for p in table.partitions if is_ours(p)] if table else []
        foreign = [p for p in table.partitions if not is_ours(p)] if table else []
        where = f"partition pool {self.pool!r}: disk {disk.configured} ({device})"
        if not signatures:
            await self._label(disk)
            return []
        if (others or foreign) and not ours and self.config.adopt == "erase":
            await self.runner.run(["wipefs", "--all", "--quiet", "--", device])
            await self._label(disk)
            return []
        if others and ours:
            raise FailedPrecondition(
                f"{where} holds localdisk volumes but also {', '.join(others)} signature(s); localdisk will not"
                " guess which is right: inspect the disk (wipefs, lsblk) and remove the stray signature by hand"
            )
        if others or table is None:
            found = ", ".join(others) or "a protective MBR without GPT"
            raise FailedPrecondition(
                f"{where} carries {found} signature(s), so it may hold data; localdisk uses only blank disks. If its"
                ' content is disposable, erase it (wipefs -a) or set adopt = "erase" for this pool'
            )
        if foreign and self.config.adopt == "never":
            numbers = ", ".join(str(p.number) for p in foreign)
            raise FailedPrecondition(
                f'{where} has partition(s) {numbers} that localdisk did not create; set adopt = "free-space" to'
                ' use only its free space, or adopt = "erase" to erase the whole disk'
            )
        await disk.settle(self.runner, table)
        return [p for p in ours if not is_ready(p)]

    async def _label(self, disk: PoolDisk) -> None:
        """Write an empty GPT whose disk GUID marks it as this pool's (`label_id`): one sfdisk run, five writes
        (backup entries, backup header, primary entries, primary header, protective MBR). A crash before the
        second leaves the disk blank; after it and before the last, a header carrying this pool's mark without a
        protective MBR, which `unfinished_label` recognises and the next discovery pass labels again."""
        script = f"label: gpt\nlabel-id: {label_id(self.pool)}\n".encode()
        await self.runner.run([*SFDISK_WRITE, "--wipe", "never", "--", disk.device()], input=script)
        await disk.settle(self.runner, await disk.read(self.runner))

    # -- discovery (`match`) ----------------------------------------------------------------------------------------
    async def discover(self) -> list[str]:
        """One discovery pass: survey the disks the rules match and add to the pool those that are blank (labelling
        them, with `setup`) or labelled for it already; returns the kernel names added. Logs a line when the
        outcome differs from the last pass's; `discovered` keeps it for metrics and `doctor`."""
        rules = self.config.match
        assert rules is not None
        async with self._discovering:
            used = {Path(d.device()).name for d in self._disks}
            result = await survey(rules, self._owner, self.runner, claims=self._claims, roots=self._roots, in_pool=used)
            self._discovered_at = time.monotonic()
            decided: dict[str, str] = {}
            added: list[PoolDisk] = []
            for finding in result.findings:
                name = finding.disk.name
                if name in used:
                    decided[name] = "used"
                elif finding.state == "refused" or not self._claims.take(self._owner, name):
                    decided[name] = f"refused: {finding.reason or 'taken by another pool'}"
                else:
                    disk = self._disk(finding.disk.path)
                    try:
                        decided[name] = await self._adopt_found(disk, finding.state == "blank")
                    except (LocalDiskError, OSError) as exc:
                        decided[name] = f"refused: {getattr(exc, 'message', None) or exc}"
                    if decided[name].startswith("used"):
                        added.append(disk)
                    else:
                        self._claims.drop(self._owner, name)
            self._disks = [*self._disks, *added]
            self.discovered = decided
            line = summary(result, decided)
            if line != self._summary:
                log.info("%s: disk discovery: %s", self._owner, line)
                self._summary = line
            return [Path(d.device()).name for d in added]

    async def _adopt_found(self, disk: PoolDisk, blank: bool) -> str:
        """What to make of a disk discovery found blank or partitioned: "used" (and it is ready), or why not."""
        async with disk.lock:
            device = disk.device()
            if blank:
                if not self.config.setup:
                    return "blank: left alone, set setup = true to let localdisk label it"
                # Looked at again right before the write: nothing may have appeared on it since the survey.
                if parse_wipefs((await self.runner.run(["wipefs", "--json", "--", device])).text):
                    return "refused: no longer blank"
                await self._label(disk)
                log.info("%s: labelled blank disk %s", self._owner, device)
                return "used: labelled now"
            if await anyio.to_thread.run_sync(unfinished_label, device, self.pool):
                if not self.config.setup:
                    return "refused: a label of this pool cut off half-way; set setup = true to finish it"
                await self._label(disk)
                log.info("%s: finished the label cut off on disk %s", self._owner, device)
                return "used: label finished"
            table = await disk.read(self.runner)
            mark = labelled_for(table)
            if mark is None:
                return "refused: a GPT localdisk did not write; list it under disks to adopt it"
            if mark != pool_mark(self.pool):
                return "refused: labelled by localdisk for another pool"
            if any(not is_ours(p) for p in table.partitions):
                return "refused: holds partitions localdisk did not create"
            await disk.settle(self.runner, table)
            leftovers = [p for p in table.partitions if is_ours(p) and not is_ready(p)]
        for part in leftovers:
            await self._remove(disk, part, zero=False)
        return "used"

    async def _views(self, *, fresh: bool = False) -> list[tuple[PoolDisk, Table]]:
        """Every disk's view: the cached one while young enough (unless `fresh`), else read under the disk's lock."""
        views = []
        for disk in self._disks:
            table = None if fresh else disk.cached()
            if table is None:
                asked = time.monotonic()
                async with disk.lock:
                    table = disk.table
                    if table is None or disk.read_at < asked:  # nobody read it while we waited for the lock
                        table = await disk.read(self.runner)
            views.append((disk, table))
        return views

    async def _locate(self, handle: str) -> tuple[PoolDisk, Table, Partition] | None:
        """The disk and partition of a handle, if it is one of our partitions (ready or pending) on a pool disk.

        A handle missing from the cached views is looked up again on fresh reads before it is called gone: a delete
        must not report success for a volume that exists.
        """
        if not _UUID.match(handle):
            return None
        for fresh in (False, True):
            for disk, table in await self._views(fresh=fresh):
                part = table.by_uuid(handle)
                if part is not None and is_ours(part):
                    return disk, table, part
            if self._max_age == 0:
                break  # the views were read just now
        return None

    def _volume(self, disk: PoolDisk, table: Table, part: Partition) -> Volume:
        key = key_of(part)
        path = disk.device_path(table, part)
        return Volume(
            ref=ObjectRef(self.kind, self.pool, part.uuid),
            name=self._names.get(key, part.name),
            size_bytes=part.size * table.sector_size,
            device_path=path,
            encrypted=part.type == LUKS_TYPE,
            abnormal=None
            if path
            else f"the kernel shows no device for partition {part.number} of {table.device}; restart the driver on"
            " this node: at start it puts the kernel's partitions in line with the disk's table",
        )

    # -- volumes ----------------------------------------------------------------------------------------------------
    async def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create (or finish, or return) the volume; a create cancelled half-way (the client's deadline) removes
        the pending partition it leaves before its cancellation goes on, so only a crash leaves one for the
        background reclaim."""
        key = volume_key(spec.name)
        if key in self._reclaiming:
            raise Busy(f"a pending partition of volume {spec.name!r} is being removed; retry")
        self._names[key] = spec.name
        self._creating[key] += 1
        try:
            return await self._create(spec, key)
        except anyio.get_cancelled_exc_class():
            what = f"removing the pending partition of cancelled create {spec.name!r}"
            await finish_despite_cancellation(lambda: self._drop_pending(key), what)
            raise
        finally:
            self._creating[key] -= 1
            if not self._creating[key]:
                del self._creating[key]

    async def _create(self, spec: VolumeSpec, key: str) -> Volume:
        ready, pending = READY_PREFIX + key, PENDING_PREFIX + key
        resume: PoolDisk | None = None  # the disk of a pending partition a crashed create left, to finish it
        views = await self._views()
        for disk, table in views:
            part = table.by_name(ready)
            if part is not None:
                return self._volume(disk, table, part)
            leftover = table.by_name(pending)
            if leftover is not None:
                if leftover.size * table.sector_size == spec.size_bytes:
                    resume = disk
                else:
                    await self._remove(disk, leftover, zero=False)
                    views = await self._views()
        # Best fit across disks, decided on the views without the locks, then checked again on a fresh read under
        # the chosen disk's lock: another create may have taken the extent meanwhile, in which case look again.
        for attempt in range(len(self._disks) + 1):
            choice, resume = resume, None
            if choice is None:
                if attempt:
                    views = await self._views()
                choice = self._choose(views, spec.size_bytes)
                if choice is None:
                    views = await self._views(fresh=True)  # refuse only on what the disks hold now
                    choice = self._choose(views, spec.size_bytes)
                    if choice is None:
                        raise self._no_room(views, spec.size_bytes)
                order = Order(key, spec.size_bytes, LUKS_TYPE if spec.encrypted else LINUX_TYPE)
                made = await group_create(self.runner, choice, order, ALIGNMENT)
                if made is None:
                    continue  # other volumes took the room meanwhile: look again
                if made != "resume":
                    return self._volume(choice, *made)
            # Finishing a pending partition of this name (a crash or a failure left it), one create alone.
            async with choice.changing(self.runner) as table:
                if (done := table.by_name(ready)) is not None:
                    return self._volume(choice, table, done)
                if (part := table.by_name(pending)) is None or part.size * table.sector_size != spec.size_bytes:
                    if part is not None:  # left with another size: drop it, then make the volume afresh
                        await choice.settle(self.runner, table)
                        await wipe(self.runner, table, part)
                        await choice.delete(self.runner, table, part)
                        table = table.without_partition(part.number)
                    sectors = spec.size_bytes // table.sector_size
                    extent = best_fit(table.free_extents(ALIGNMENT), sectors)
                    if extent is None:
                        continue
                    # Born pending ("lp-"): until it is wiped and renamed "ld-" no lookup returns it, a retry of
                    # this create resumes it, and `open` drops it.
                    kind = LUKS_TYPE if spec.encrypted else ""
                    table, part = await choice.make(self.runner, table, pending, extent.start, sectors, kind)
                else:
                    await choice.settle(self.runner, table)  # a leftover of a failure: the kernel may lag behind
                # Space freed by localdisk was zeroed when its volume was deleted, so only stale signatures can be
                # left here (from before the disk joined the pool). Erasing them is cheap and stops the node from
                # mounting an old filesystem instead of formatting; zeroing every new volume would double the
                # write cost of each volume on disks that cannot offload zeroing.
                await wipe(self.runner, table, part)
                table, done = await choice.rename(self.runner, table, part, ready)
                return self._volume(choice, table, done)
        raise InsufficientCapacity(
            f"partition pool {self.pool!r}: other volumes kept taking the free space; retry later"
        )

    def _choose(self, tables: list[tuple[PoolDisk, Table]], size: int) -> PoolDisk | None:
        options = []
        for index, (disk, table) in enumerate(tables):
            extent = best_fit(table.free_extents(ALIGNMENT), size // table.sector_size)
            if extent is not None:
                options.append((extent.size * table.sector_size, index, disk))
        return min(options, key=lambda o: (o[0], o[1]))[2] if options else None

    def _no_room(self, tables: list[tuple[PoolDisk, Table]], size: int) -> InsufficientCapacity:
        extents = [e.size * t.sector_size for _, t in tables for e in t.free_extents(ALIGNMENT)]
        return InsufficientCapacity(
            f"partition pool {self.pool!r} has no free extent of {human(size)} ({size} bytes): the largest is"
            f" {human(max(extents, default=0))}, {human(sum(extents))} free in all; a partition cannot span gaps"
            " or disks, so delete volumes next to a gap or add a disk"
        )

    async def delete_volume(self, handle: str) -> None:
        located = await self._locate(handle)
        if located is None:
            return
        disk, _, part = located
        await self._remove_wiped(disk, part)

    async def _remove_wiped(self, disk: PoolDisk, part: Partition, *, pending_only: bool = False) -> bool:
        """`_remove`, wiping as a delete does: an encrypted volume is crypto-erased (the data left is ciphertext
        under a destroyed key), any other as the pool's `wipe` says."""
        if part.type == LUKS_TYPE:
            return await self._remove(disk, part, zero=False, crypto_erase=True, pending_only=pending_only)
        return await self._remove(disk, part, zero=self.config.wipe == "zero", pending_only=pending_only)

    # -- pending leftovers ------------------------------------------------------------------------------------------
    async def pending_volumes(self) -> list[PendingVolume]:
        found = []
        for _, table in await self._views():
            for part in table.partitions:
                if is_ours(part) and not is_ready(part):
                    name = self._names.get(key_of(part))  # None: not created by this process
                    ref = ObjectRef(self.kind, self.pool, part.uuid)
                    found.append(PendingVolume(ref, name, part.size * table.sector_size))
        return found

    async def reclaim_pending(self, handle: str) -> bool:
        """Remove pending partition `handle`, wiped as a delete wipes, unless a create of its name runs in this
        process (`Busy`); a create of its name arriving meanwhile is refused (`Busy`) until it is gone, so the
        zeroing, outside the disk's lock, never races that create's resume of it."""
        located = await self._locate(handle)
        if located is None or is_ready(located[2]):
            return False
        disk, _, part = located
        key = key_of(part)
        if key in self._creating:
            raise Busy(f"pending partition {handle} is being created; not reclaimed")
        self._reclaiming.add(key)
        try:
            return await self._remove_wiped(disk, part, pending_only=True)
        finally:
            self._reclaiming.discard(key)

    async def _drop_pending(self, key: str) -> None:
        """Remove the pending partition of `key` from whichever disk holds one (a cancelled create's clean-up)."""
        for disk, table in await self._views(fresh=True):
            part = table.by_name(PENDING_PREFIX + key)
            if part is not None:
                await self._remove_wiped(disk, part, pending_only=True)

    async def _remove(
        self, disk: PoolDisk, part: Partition, *, zero: bool, crypto_erase: bool = False, pending_only: bool = False
    ) -> bool:
        """Wipe a partition of ours, then delete it; the caller must not hold the disk's lock. True if it did.

        Zeroing runs outside the lock, as it may take minutes, through an exclusive claim on the partition taken
        under it; a signature wipe is quick and runs under it. A crash during either leaves the partition in place,
        so the retried delete wipes it again. No space is freed before it is clean. Both steps decide on a
        fresh read: what is wiped and what is removed must be ours at that very moment (and still pending, if
        `pending_only`: a create may have finished it since it was seen).
        """
        async with disk.changing(self.runner) as table:
            current = table.by_uuid(part.uuid)
            if current is None or not is_ours(current) or (pending_only and is_ready(current)):
                return False
            part = current
            await disk.settle_one(self.runner, table, part)
            if not zero:  # a signature wipe is quick: wipe and remove under one hold of the lock
                if crypto_erase:
                    await crypt.erase(self.runner, node(table, part))
                await wipe(self.runner, table, part)
                await disk.delete(self.runner, table, part)
                return True
            # The exclusive claim is taken here, under the lock, where no table write of ours holds the whole disk
            # (which would make the kernel refuse it, see localdisk.blockdev), and kept through the zeroing.
            path = node(table, part)
            held = claim(path)
        # BLKZEROOUT (in-process, see localdisk.blockdev): the disk zeroes (or discards with guaranteed zeroes) where
        # it can, else the kernel writes zeros itself, which can cost a full write of the volume.
        await zero_out(path, self.runner.observers, fd=held)
        async with disk.changing(self.runner) as table:
            now = table.by_uuid(part.uuid)
            if now is None:
                return False
            if (now.number, now.start, now.size, now.name) != (part.number, part.start, part.size, part.name):
                raise BackendFailure(f"partition {part.uuid} changed while it was being deleted; retry")
            await disk.delete(self.runner, table, now)
            return True

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        located = await self._locate(handle)
        if located is None or not is_ready(located[2]):
            raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")
        disk = located[0]
        async with disk.changing(self.runner) as table:
            part = table.by_uuid(handle)
            if part is None or not is_ready(part):
                raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")
            sectors = size_bytes // table.sector_size
            if sectors <= part.size:
                # Also the retry of an expand cut between the table write and the kernel's resize: the kernel must
                # show the size the answer gives (a restart repairs it too, but a retry may come first).
                if not kernel_shows(table, part):
                    await disk.settle_one(self.runner, table, part)
                return self._volume(disk, table, part)
            disk_end = table.usable_end(ALIGNMENT)
            if part.start + sectors > disk_end:
                most = (disk_end - part.start) * table.sector_size
                raise OutOfRange(
                    f"volume {handle} cannot grow to {human(size_bytes)}: only {human(most)} lie between its start and"
                    f" the end of disk {disk.configured}, and a partition cannot span disks"
                )
            limit = table.room_after(part, ALIGNMENT)
            if part.start + sectors > limit:
                room = (limit - part.start) * table.sector_size
                raise InsufficientCapacity(
                    f"volume {handle} can grow in place to at most {human(room)}: the next partition on disk"
                    f" {disk.configured} starts there; partitions cannot move, so delete that volume or copy the"
                    " data to a new, larger volume"
                )
            # sfdisk, not parted: parted's resizepart asks for a confirmation when the partition is in use (mounted
            # for online expansion), which --script answers with "no". sfdisk changes the table only; BLKPG's
            # resize (what util-linux `resizepart` does) then grows the kernel's partition in place. Not `partx -u`:
            # on recent kernels it deletes and re-adds a partition nobody holds open (a raw block publication holds
            # none), which gives it a new device number and leaves the published node pointing at nothing.
            resize = ["--wipe", "never", "--wipe-partitions", "never", "-N", str(part.number), "--", table.device]
            await self.runner.run([*SFDISK_WRITE, *resize], input=f",{sectors}\n".encode())
            grown = replace(part, size=sectors)
            table = table.with_partition(grown)
            disk.remember(table)
            # A crash between the table write and the kernel's resize leaves the table grown and the kernel not.
            # The retried expand finds the volume big enough and is answered without coming here, and the restart
            # the crash implies runs `settle` in `open`, which sees the kernel's size differ and resizes it.
            try:
                await tell_kernel(table, BLKPG_RESIZE, grown)
            except OSError as exc:
                raise BackendFailure(
                    f"the table of {table.device} now gives partition {part.number} {human(size_bytes)}, but the"
                    f" kernel refused to grow it ({exc.strerror}); retry: the retry repairs the kernel's view first"
                ) from exc
            await disk.settle_one(self.runner, table, grown)
            return self._volume(disk, table, grown)

    async def get_volume(self, handle: str) -> Volume:
        located = await self._locate(handle)
        if located is not None and is_ready(located[2]):
            return self._volume(*located)
        raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")

    async def find_volume(self, name: str) -> Volume | None:
        key = volume_key(name)
        for disk, table in await self._views():
            part = table.by_name(READY_PREFIX + key)
            if part is not None:
                self._names[key] = name
                return self._volume(disk, table, part)
        return None

    async def list_volumes(self) -> list[Volume]:
        return [self._volume(d, t, p) for d, t in await self._views() for p in t.partitions if is_ready(p)]

    async def capacity(self) -> Capacity:
        tables = await self._views()
        extents = [e.size * t.sector_size for _, t in tables for e in t.free_extents(ALIGNMENT)]
        used = sum(p.size * t.sector_size for _, t in tables for p in t.partitions if is_ours(p))
        available = sum(extents)
        return Capacity(
            total_bytes=used + available,
            available_bytes=available,
            maximum_volume_bytes=max(extents, default=0),
            details={"disks": len(tables), "free_extents": len(extents)},
        )

    # -- snapshots: a partition has no copy-on-write, so there are none -------------------------------------------
    def _no_snapshots(self) -> Unsupported:
        return Unsupported(
            f"partition pool {self.pool!r} cannot take snapshots: a partition has no copy-on-write; use the thin"
            " backend for volumes that need snapshots"
        )

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        raise self._no_snapshots()

    async def delete_snapshot(self, handle: str) -> None:
        raise self._no_snapshots()

    async def get_snapshot(self, handle: str) -> Snapshot:
        raise self._no_snapshots()

    async def find_snapshot(self, name: str) -> Snapshot | None:
        return None

    async def list_snapshots(self) -> list[Snapshot]:
        return []


def _factory(pool: str, config: PoolConfig, runner: CommandRunner) -> PartitionBackend:
    assert isinstance(config, PartitionPoolConfig)
    return PartitionBackend(pool, config, runner, view_max_age=config.view_max_age_seconds)


BACKEND = BackendSpec("partition", PartitionPoolConfig, _factory, "GPT partitions on whole disks")
