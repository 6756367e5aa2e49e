"""The `partition` backend: one GPT partition per volume, carved from whole disks listed in the pool config.

For nodes without LVM, or where a volume must be a plain partition. The disks' GPT tables are the only state: a
volume is a partition whose GPT name is `ld-<key>`, the key derived from the CSI name, and its handle is the
partition's PARTUUID, which survives renumbering and reboots. An encrypted volume (a LUKS2 container, see
`localdisk.crypt`) is made with the partition type "Linux LUKS" (`LUKS_TYPE`); its delete is a crypto-erase and
skips the zeroing pass. Nothing else is stored, so a restarted node finds its
volumes by reading the tables again.

Changes to one disk are serialized with a per-disk lock, because every tool rewrites the whole table: two creates
racing on one disk would each write a table without the other's partition. Reads take the lock too, so they never
see a half-written table. Zeroing a deleted volume, which can take minutes, runs outside the lock.

Each disk's table is kept as a cached view (`_Disk`): the last `sfdisk --json` read, with our own changes applied in
memory as they succeed, dropped after any failed or interrupted change, and read again once older than the pool's
`view_max_age_seconds` (in the background by the server's `VolumeManager.keep_fresh`, so GetCapacity, ListVolumes and
lookups by name spawn no process). Every change re-reads its disk under the lock first, so a decision that takes
space or destroys data is never made on a stale view; a change made behind localdisk's back therefore shows up at
once to the next change of that disk and within the max age to reads. The kernel's partition nodes (sysfs) are
mapped once per table, not once per volume. A backend constructed directly (tests, tools) reads on every call unless
given `view_max_age`.

Changes are one table write each: `sfdisk --append` creates a partition with its number, place, name and PARTUUID
given (so nothing has to be read back), `sfdisk --part-label` renames it, `sfdisk --delete` removes it, all with
the kernel left alone; localdisk then tells the kernel about that one partition itself (the BLKPG ioctl `partx` and
parted use, made in-process), so no other partition's node is ever re-created and no process is spent on it.

Creates on one disk are group-committed (`_commit`): the creates waiting for the disk's lock queue their orders,
and whichever takes the lock next carries out every order queued by then with one read, one `sfdisk --append` of
all their pending partitions, and one write naming them all ready (the whole table written back as read plus these
names, `gpt.table_script`; `--part-label` when there is one). Each partition still goes through the same states
(pending, wiped, ready), so a crash anywhere leaves what a crash of a single create leaves.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import stat
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
from pydantic import Field, field_validator, model_validator

from localdisk import crypt
from localdisk.backend import finish_despite_cancellation
from localdisk.backends.gpt import (
    Partition,
    Table,
    best_fit,
    has_protective_mbr,
    parse_header,
    parse_sfdisk,
    parse_wipefs,
    table_script,
)
from localdisk.backends.partkernel import (
    BLKPG_ADD,
    BLKPG_DELETE,
    BLKPG_RESIZE,
    KernelPartition,
    kernel_mismatch,
    kernel_partition,
    kernel_partitions,
    kernel_shows,
    node_name,
    repair_kernel,
    tell_kernel,
    udev_running,
    views_of,
)
from localdisk.blockdev import erase_signatures, open_exclusive, zero_out
from localdisk.discovery import CLAIMS, HOST, Claims, DiskRules, Roots, summary, survey
from localdisk.errors import (
    BackendFailure,
    Busy,
    CommandFailed,
    ConfigError,
    FailedPrecondition,
    InsufficientCapacity,
    LocalDiskError,
    NotFound,
    OutOfRange,
    PoolGone,
    Unsupported,
)
from localdisk.model import Capacity, Features, ObjectRef, PendingVolume, Snapshot, Volume, VolumeSpec
from localdisk.registry import BackendSpec, PoolConfig
from localdisk.runner import CommandRunner
from localdisk.sizes import GiB, MiB, human

ALIGNMENT = MiB
GPT_NAME_LIMIT = 36  # UTF-16 code units in a GPT partition entry's name field
READY_PREFIX = "ld-"  # a volume handed out
PENDING_PREFIX = "lp-"  # created, not yet wiped and handed out (left by a crash, or by a cancelled create whose
# own clean-up did not finish: removed at start-up and by the background reclaim)
KEY_LENGTH = 32
LUKS_TYPE = "CA7D7CCB-63ED-4C53-861C-1742536059CC"  # GPT type "Linux LUKS": the volume is encrypted
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # GPT type "Linux filesystem", sfdisk's default
_OURS = re.compile(rf"^(?:{READY_PREFIX}|{PENDING_PREFIX})[a-z2-7]{{{KEY_LENGTH}}}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SYSFS_BLOCK = Path("/sys/class/block")
_BY_PARTUUID = Path("/dev/disk/by-partuuid")
VIEW_MAX_AGE = 30.0  # seconds a cached table is trusted for changes made outside localdisk
_SFDISK_WRITE = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel"]  # write the table, leave the kernel alone
LABEL_MARK = "10CA1D15"  # the first 8 hex digits of the disk GUID of every GPT label localdisk writes
DISCOVER_INTERVAL = 60.0  # seconds between discovery passes of a pool with `match`
assert len(READY_PREFIX) + KEY_LENGTH <= GPT_NAME_LIMIT
log = logging.getLogger(__name__)


def volume_key(name: str) -> str:
    """The GPT-name key of a CSI name: 32 base32 characters (160 bits) of its SHA-256.

    A CSI name may be 128 bytes of any UTF-8 and a GPT name holds 36 UTF-16 units, so the name itself cannot be
    stored; its hash can. 160 bits make an accidental collision negligible (for a million volumes on one node the
    birthday bound is about 1e12 / 2**161, i.e. 1e-36), and crafting one needs about 2**80 SHA-256 evaluations,
    far beyond anyone who can merely choose PVC names. Base32 keeps the name to [a-z2-7], safe in sfdisk's argv.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:KEY_LENGTH]


def is_ours(part: Partition) -> bool:
    return bool(_OURS.match(part.name))


def is_ready(part: Partition) -> bool:
    return is_ours(part) and part.name.startswith(READY_PREFIX)


def _pool_mark(pool: str) -> str:
    return hashlib.sha256(pool.encode()).hexdigest()[:7].upper()


def label_id(pool: str) -> str:
    """A fresh disk GUID for a label localdisk writes for `pool`: `10CA1D15-PPPP-4PPP-xxxx-xxxxxxxxxxxx`, the mark,
    28 bits of the pool name's hash, and random bits (a valid version 4 UUID). Discovery takes a GPT disk only when
    its GUID says localdisk labelled it for this very pool; a foreign GPT disk carries a random GUID (a 1 in 2**60
    chance to look like ours)."""
    mark, rest = _pool_mark(pool), uuid.uuid4().hex.upper()
    return f"{LABEL_MARK}-{mark[:4]}-4{mark[4:]}-{rest[16:20]}-{rest[20:]}"


def labelled_for(table: Table) -> str | None:
    """The pool mark of a label localdisk wrote (see `label_id`), or None for any other GPT."""
    return _mark_of(table.label_id)


def _mark_of(disk_guid: str) -> str | None:
    guid = disk_guid.upper().replace("-", "")
    return guid[8:12] + guid[13:16] if len(guid) == 32 and guid.startswith(LABEL_MARK) else None


def unfinished_label(device: str, pool: str) -> bool:
    """Whether `device` holds what a label write of `pool` cut off before its last write leaves (see `_label`): no
    protective MBR yet, and a GPT header, primary or backup, whose disk GUID marks `pool` and whose entry array is
    all zeros. Reads only. No foreign disk looks so: its GUID would have to carry the mark (1 in 2**60)."""
    sector = int(_read_text(_SYSFS_BLOCK / Path(device).name / "queue" / "logical_block_size") or 512)
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if has_protective_mbr(os.pread(fd, 512, 0)):
            return False
        last = os.lseek(fd, 0, os.SEEK_END) // sector - 1
        for lba in (1, last):
            header = parse_header(os.pread(fd, sector, lba * sector))
            if header is None or _mark_of(header.disk_guid) != _pool_mark(pool):
                continue
            length = header.entries * header.entry_size
            if 0 < length <= 4 * MiB and not any(os.pread(fd, length, header.entries_lba * sector)):
                return True
        return False
    finally:
        os.close(fd)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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


class _Disk:
    """One disk of a pool: its lock, and the cached view of its table (see the module docstring).

    `table` is the last read with our own changes applied since; only code holding `lock` reads or changes it, so a
    reader without the lock sees either the table before a change or after it.
    """

    def __init__(self, configured: str, max_age: float) -> None:
        self.configured = configured
        self.lock = anyio.Lock()
        self.max_age = max_age
        self.table: Table | None = None
        self.read_at = -math.inf  # monotonic time of the read `table` comes from
        self.reads = 0
        self._kernel: dict[int, KernelPartition] | None = None  # sysfs's partitions, mapped once per table
        self.orders: list[_Order] = []  # creates waiting for the next group commit on this disk

    def device(self) -> str:
        """The kernel node behind the configured (stable) path, resolved each time: it may change across reboots."""
        return os.path.realpath(self.configured)

    def cached(self) -> Table | None:
        """The view if it is young enough to answer from (never with a max age of 0)."""
        if self.table is not None and time.monotonic() - self.read_at < self.max_age:
            return self.table
        return None

    def remember(self, table: Table, read_at: float | None = None) -> None:
        """Take `table` as the view: a fresh read (`read_at` given) or the last one after a change of ours."""
        self.table = table
        if read_at is not None:
            self.read_at = read_at
            self.reads += 1
        self._kernel = None

    def invalidate(self) -> None:
        """Drop the view after a failed or interrupted change: the disk may hold something we did not see."""
        self.table = None
        self._kernel = None

    def kernel(self) -> dict[int, KernelPartition]:
        if self._kernel is None:
            self._kernel = kernel_partitions(self.device())
        return self._kernel


Resume = Literal["resume"]


@dataclass(eq=False)
class _Order:
    """One create waiting for its disk's next group commit. `result`: the volume, None when the disk has no room
    for it, "resume" when a pending partition of its name is there already (the single-create path finishes it)."""

    key: str
    size_bytes: int
    type_guid: str
    done: anyio.Event = field(default_factory=anyio.Event)
    abandoned: bool = False  # its create was cancelled: its partition stays pending, for its own clean-up
    placed: bool = False  # its pending partition is in the write under way (or was written)
    result: Volume | Resume | None = None
    error: LocalDiskError | None = None

    def finish(self, result: Volume | Resume | None = None, error: LocalDiskError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


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
        self._disks: list[_Disk] = []
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

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        self._disks = [_Disk(path, self._max_age) for path in self.config.disks]
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
                    await self._read(disk)

    def _check_block_device(self, disk: _Disk) -> str:
        device = disk.device()
        where = f"partition pool {self.pool!r}: disk {disk.configured}"
        try:
            mode = os.stat(device).st_mode
        except OSError as exc:
            raise ConfigError(f"{where} does not exist ({exc.strerror})") from exc
        if not stat.S_ISBLK(mode):
            raise ConfigError(f"{where} is not a block device")
        if (_SYSFS_BLOCK / Path(device).name / "partition").exists():
            raise ConfigError(f"{where} is a partition ({device}); list whole disks, localdisk partitions them")
        return device

    async def _prepare(self, disk: _Disk) -> list[Partition]:
        """Check a disk may be used (see `adopt`) and label a blank one; returns the partitions a crash left pending.

        Called with the disk's lock held.
        """
        device = disk.device()
        signatures = parse_wipefs((await self.runner.run(["wipefs", "--json", "--", device])).text)
        others = sorted({s.type for s in signatures} - {"gpt", "PMBR"})
        table = await self._read(disk) if any(s.type == "gpt" for s in signatures) else None
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
        await self._settle(device, table)
        return [p for p in ours if not is_ready(p)]

    async def _label(self, disk: _Disk) -> None:
        """Write an empty GPT whose disk GUID marks it as this pool's (`label_id`): one sfdisk run, five writes
        (backup entries, backup header, primary entries, primary header, protective MBR). A crash before the
        second leaves the disk blank; after it and before the last, a header carrying this pool's mark without a
        protective MBR, which `unfinished_label` recognises and the next discovery pass labels again."""
        script = f"label: gpt\nlabel-id: {label_id(self.pool)}\n".encode()
        await self.runner.run([*_SFDISK_WRITE, "--wipe", "never", "--", disk.device()], input=script)
        await self._settle(disk.device(), await self._read(disk))

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
            added: list[_Disk] = []
            for finding in result.findings:
                name = finding.disk.name
                if name in used:
                    decided[name] = "used"
                elif finding.state == "refused" or not self._claims.take(self._owner, name):
                    decided[name] = f"refused: {finding.reason or 'taken by another pool'}"
                else:
                    disk = _Disk(finding.disk.path, self._max_age)
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

    async def _adopt_found(self, disk: _Disk, blank: bool) -> str:
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
            table = await self._read(disk)
            mark = labelled_for(table)
            if mark is None:
                return "refused: a GPT localdisk did not write; list it under disks to adopt it"
            if mark != _pool_mark(self.pool):
                return "refused: labelled by localdisk for another pool"
            if any(not is_ours(p) for p in table.partitions):
                return "refused: holds partitions localdisk did not create"
            await self._settle(device, table)
            leftovers = [p for p in table.partitions if is_ours(p) and not is_ready(p)]
        for part in leftovers:
            await self._remove(disk, part, zero=False)
        return "used"

    # -- reading ----------------------------------------------------------------------------------------------------
    async def _read(self, disk: _Disk) -> Table:
        """Read the disk's table and take it as its view; the caller holds the disk's lock."""
        device = disk.device()
        read_at = time.monotonic()
        try:
            result = await self.runner.run(["sfdisk", "--json", "--", device])
        except CommandFailed as exc:
            disk.invalidate()
            if "does not contain a recognized partition table" in exc.stderr:
                raise FailedPrecondition(
                    f"disk {disk.configured} ({device}) of partition pool {self.pool!r} has lost its partition table"
                ) from exc
            gone = await anyio.to_thread.run_sync(unreadable, device)
            if gone:
                raise PoolGone(f"disk {disk.configured} ({device}) of partition pool {self.pool!r} {gone}") from exc
            raise
        except BaseException:
            disk.invalidate()
            raise
        table = parse_sfdisk(result.text, device)
        disk.remember(table, read_at)
        return table

    async def _views(self, *, fresh: bool = False) -> list[tuple[_Disk, Table]]:
        """Every disk's view: the cached one while young enough (unless `fresh`), else read under the disk's lock."""
        views = []
        for disk in self._disks:
            table = None if fresh else disk.cached()
            if table is None:
                asked = time.monotonic()
                async with disk.lock:
                    table = disk.table
                    if table is None or disk.read_at < asked:  # nobody read it while we waited for the lock
                        table = await self._read(disk)
            views.append((disk, table))
        return views

    @contextlib.asynccontextmanager
    async def _changing(self, disk: _Disk) -> AsyncIterator[Table]:
        """The disk's lock and its table read afresh under it, to decide a change on; a failed or interrupted change
        drops the view, as the disk may then hold something we did not see."""
        async with disk.lock:
            try:
                yield await self._read(disk)
            except BaseException:
                disk.invalidate()
                raise

    async def _locate(self, handle: str) -> tuple[_Disk, Table, Partition] | None:
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

    def _volume(self, disk: _Disk, table: Table, part: Partition) -> Volume:
        key = part.name[len(READY_PREFIX) :]
        path = self._device_path(disk, table, part)
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

    @staticmethod
    def _device_path(disk: _Disk, table: Table, part: Partition) -> str | None:
        """udev's /dev/disk/by-partuuid link when there is one, else the kernel node now holding that partition.

        The node comes from the disk's sysfs map (built once per table), checked against sysfs itself when the map
        does not show the partition where the table puts it.
        """
        link = _BY_PARTUUID / part.uuid
        if link.exists():
            return str(link)
        known = disk.kernel().get(part.number)
        if known is None or known.start != table.kernel_units(part.start):
            known = kernel_partition(table.device, part.number)
        if known is None or known.start != table.kernel_units(part.start):
            return None
        node = Path("/dev") / known.name
        return str(node) if node.exists() else None

    # -- keeping the kernel in step ---------------------------------------------------------------------------------
    async def _settle(self, device: str, table: Table) -> None:
        """Wait until the kernel's partitions match `table` and their nodes exist, then let udev finish.

        localdisk tells the kernel about each change itself (BLKPG); what that could not do (a crash between the
        table write and the kernel update, a change made while the kernel was out of step) is repaired here, one
        partition at a time with the same ioctl (`repair_kernel`). Not `partx --update`: it walks partition numbers
        only up to the count of partitions, so after a gap (1 and 2 deleted, 3 and 7 in use) it never reaches 7 and
        the kernel stays without it. Bounded by the settle timeout.
        """
        timeout = self.config.settle_timeout_seconds
        deadline = anyio.current_time() + timeout
        next_repair = anyio.current_time()
        refused: list[str] = []
        while (problem := kernel_mismatch(table)) is not None:
            now = anyio.current_time()
            if now >= deadline:
                raise BackendFailure(
                    f"the kernel still disagrees with the partition table of {device} after {timeout}s: {problem}"
                    f" ({'; '.join(refused) or 'no change refused'}; {views_of(table)}); is a partition held open?"
                    " check with lsblk and retry"
                )
            if now >= next_repair:
                refused = await anyio.to_thread.run_sync(repair_kernel, table)
                next_repair = now + 0.5
            await anyio.sleep(0.05)
        if udev_running():
            await self.runner.run(["udevadm", "settle", f"--timeout={max(1, int(timeout))}"], check=False)

    async def _settle_one(self, disk: _Disk, table: Table, part: Partition) -> None:
        """Wait until the kernel shows `part` where `table` puts it, with its node; the whole-disk `_settle`, which
        repairs, if it does not soon. The usual check after a change of ours: one partition's sysfs entry."""
        await self._settle_parts(disk, table, [part])

    # -- changing a table: one write each, then the kernel is told about that one partition -------------------------
    async def _make(
        self, disk: _Disk, table: Table, name: str, start: int, sectors: int, type_guid: str = ""
    ) -> tuple[Table, Partition]:
        """Create partition `name` at [start, start + sectors) in the lowest free entry; the disk's lock is held.

        Its number and PARTUUID are chosen here and given to sfdisk, so the new table is known without a read.
        sfdisk refuses an entry that is taken or a range that overlaps a partition (ours or not), whatever the view
        said. The partition is named in the same write that creates it, so no crash leaves an unnamed partition.
        """
        part = Partition(table.free_number(), start, sectors, str(uuid.uuid4()), name, type_guid)
        line = f"{node_name(table.device, part.number)} : start={start}, size={sectors}, name={name}, uuid={part.uuid}"
        if type_guid:
            line += f", type={type_guid}"
        append = ["--append", "--wipe", "never", "--wipe-partitions", "never", "--", table.device]
        await self.runner.run([*_SFDISK_WRITE, *append], input=f"{line}\n".encode())
        table = table.with_partition(part)
        disk.remember(table)
        try:
            await tell_kernel(table, BLKPG_ADD, part)
        except OSError:
            await self._settle(table.device, table)  # the kernel is out of step (a stale partition in the way)
        await self._settle_one(disk, table, part)
        return table, part

    async def _rename(self, disk: _Disk, table: Table, part: Partition, name: str) -> tuple[Table, Partition]:
        """Rename a partition of ours (a label change: the kernel's view stays as it is); the disk's lock is held."""
        label = ["--part-label", "--", table.device, str(part.number), name]
        await self.runner.run([*_SFDISK_WRITE, *label])
        part = replace(part, name=name)
        table = table.with_partition(part)
        disk.remember(table)
        return table, part

    async def _delete(self, disk: _Disk, table: Table, part: Partition) -> None:
        """Remove a partition of ours from the kernel, then from the table; the disk's lock is held.

        The kernel goes first: it refuses a partition anyone holds open, and then nothing has changed yet. A crash
        between the two leaves the kernel behind the table, which `_settle` repairs.
        """
        try:
            await tell_kernel(table, BLKPG_DELETE, part)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise FailedPrecondition(
                    f"partition {part.number} of {table.device} is in use (open, mounted or held by another device);"
                    " unpublish and unstage the volume first"
                ) from exc
            if exc.errno != errno.ENXIO:  # ENXIO: the kernel did not have it, which is what we want
                raise BackendFailure(f"cannot remove partition {part.number} of {table.device}: {exc}") from exc
        await self.runner.run([*_SFDISK_WRITE, "--delete", "--", table.device, str(part.number)])
        disk.remember(table.without_partition(part.number))

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
        resume: _Disk | None = None  # the disk of a pending partition a crashed create left, to finish it
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
                made = await self._group_create(choice, spec, key)
                if made is None:
                    continue  # other volumes took the room meanwhile: look again
                if made != "resume":
                    return made
            # Finishing a pending partition of this name (a crash or a failure left it), one create alone.
            async with self._changing(choice) as table:
                if (done := table.by_name(ready)) is not None:
                    return self._volume(choice, table, done)
                if (part := table.by_name(pending)) is None or part.size * table.sector_size != spec.size_bytes:
                    if part is not None:  # left with another size: drop it, then make the volume afresh
                        await self._settle(table.device, table)
                        await self._wipe(table, part)
                        await self._delete(choice, table, part)
                        table = table.without_partition(part.number)
                    sectors = spec.size_bytes // table.sector_size
                    extent = best_fit(table.free_extents(ALIGNMENT), sectors)
                    if extent is None:
                        continue
                    # Born pending ("lp-"): until it is wiped and renamed "ld-" no lookup returns it, a retry of
                    # this create resumes it, and `open` drops it.
                    kind = LUKS_TYPE if spec.encrypted else ""
                    table, part = await self._make(choice, table, pending, extent.start, sectors, kind)
                else:
                    await self._settle(table.device, table)  # a leftover of a failure: the kernel may lag behind
                # Space freed by localdisk was zeroed when its volume was deleted, so only stale signatures can be
                # left here (from before the disk joined the pool). Erasing them is cheap and stops the node from
                # mounting an old filesystem instead of formatting; zeroing every new volume would double the
                # write cost of each volume on disks that cannot offload zeroing.
                await self._wipe(table, part)
                table, done = await self._rename(choice, table, part, ready)
                return self._volume(choice, table, done)
        raise InsufficientCapacity(
            f"partition pool {self.pool!r}: other volumes kept taking the free space; retry later"
        )

    # -- group commit of creates ------------------------------------------------------------------------------------
    async def _group_create(self, disk: _Disk, spec: VolumeSpec, key: str) -> Volume | Resume | None:
        """Queue a create on `disk` and wait until a group commit carried it out: this create's own, if it takes the
        disk's lock while its order is still queued, or the one of whichever create took the lock first."""
        order = _Order(key, spec.size_bytes, LUKS_TYPE if spec.encrypted else LINUX_TYPE)
        disk.orders.append(order)
        try:
            while not order.done.is_set():
                async with disk.lock:
                    if order.done.is_set():
                        break
                    orders, disk.orders = disk.orders, []
                    await self._commit(disk, orders, order)
        except BaseException:
            order.abandoned = True
            with contextlib.suppress(ValueError):
                disk.orders.remove(order)
            raise
        if order.error is not None:
            raise order.error
        return order.result

    async def _commit(self, disk: _Disk, orders: list[_Order], own: _Order) -> None:
        """Carry out `orders` together; the disk's lock is held, `own` is the order of the create doing it. A failure
        or a cancellation (its client's deadline) part-way drops the view and fails only `own`: another create whose
        partition may have been written goes on alone (`"resume"`: it finishes its pending partition, or makes it
        afresh), one not placed yet waits for the next group commit."""
        try:
            await self._commit_orders(disk, orders)
        except BaseException:
            disk.invalidate()
            for order in orders:
                if order is own or order.done.is_set():
                    continue
                if order.placed:
                    order.finish("resume")
                elif not order.abandoned:
                    disk.orders.append(order)
            raise

    async def _commit_orders(self, disk: _Disk, orders: list[_Order]) -> None:
        """One read, one write creating every new partition (pending), their wipes, one write naming them ready."""
        table = await self._read(disk)
        made: list[tuple[_Order, Partition]] = []
        for order in orders:
            ready, pending = READY_PREFIX + order.key, PENDING_PREFIX + order.key
            if order.abandoned:
                order.finish()
            elif (done := table.by_name(ready)) is not None:
                order.finish(self._volume(disk, table, done))
            elif table.by_name(pending) is not None:
                order.finish("resume")
            else:
                sectors = order.size_bytes // table.sector_size
                extent = best_fit(table.free_extents(ALIGNMENT), sectors)
                if extent is None:
                    order.finish(None)
                    continue
                # Born pending ("lp-"): until it is wiped and renamed "ld-" no lookup returns it, a retry of this
                # create resumes it, and `open` drops it.
                number, place = table.free_number(), extent.start
                part = Partition(number, place, sectors, str(uuid.uuid4()), pending, order.type_guid)
                table = table.with_partition(part)
                made.append((order, part))
                order.placed = True
        if not made:
            return
        lines = "".join(f"{self._entry(table.device, part)}\n" for _, part in made)
        append = ["--append", "--wipe", "never", "--wipe-partitions", "never", "--", table.device]
        await self.runner.run([*_SFDISK_WRITE, *append], input=lines.encode())
        disk.remember(table)
        for _, part in made:
            try:
                await tell_kernel(table, BLKPG_ADD, part)
            except OSError:
                await self._settle(table.device, table)  # the kernel is out of step (a stale partition in the way)
        await self._settle_parts(disk, table, [part for _, part in made])
        # Space freed by localdisk was zeroed when its volume was deleted, so only stale signatures can be left
        # here (from before the disk joined the pool). Erasing them is cheap and stops the node from mounting an
        # old filesystem instead of formatting; zeroing every new volume would double the write cost of each volume
        # on disks that cannot offload zeroing.
        wiped: list[tuple[_Order, Partition]] = []
        for order, part in made:
            if order.abandoned:
                continue
            try:
                await self._wipe(table, part)
            except LocalDiskError as exc:  # this one stays pending: its retry resumes it, or the reclaim drops it
                order.finish(error=exc)
                continue
            wiped.append((order, part))
        wiped = [(order, part) for order, part in wiped if not order.abandoned]  # cancelled during the wipes
        if not wiped:
            for order, _ in made:
                if not order.done.is_set():
                    order.finish()
            return
        table = await self._name_ready(disk, table, [part for _, part in wiped])
        for order, part in made:
            named = table.by_uuid(part.uuid)
            if order.done.is_set():
                continue
            if named is not None and is_ready(named):
                order.finish(self._volume(disk, table, named))
            else:
                order.finish()  # abandoned meanwhile

    @staticmethod
    def _entry(device: str, part: Partition) -> str:
        """`part` as one line of an sfdisk script: number (by node name), place, name, PARTUUID, type."""
        line = f"{node_name(device, part.number)} : start={part.start}, size={part.size}, name={part.name}"
        return line + f", uuid={part.uuid}" + (f", type={part.type}" if part.type else "")

    async def _name_ready(self, disk: _Disk, table: Table, parts: list[Partition]) -> Table:
        """Rename pending `parts` ready in one table write; the disk's lock is held. One partition: `--part-label`.
        More: the whole table written back as read under this hold of the lock plus our own changes since
        (`table_script`), which is what sfdisk writes for any change; a table that cannot be scripted verbatim (a
        foreign partition's odd name) is renamed one partition at a time."""
        renamed = table
        for part in parts:
            renamed = renamed.with_partition(replace(part, name=READY_PREFIX + part.name[len(PENDING_PREFIX) :]))
        script = table_script(renamed, lambda number: node_name(table.device, number)) if len(parts) > 1 else None
        if script is None:
            for part in parts:
                table, _ = await self._rename(disk, table, part, READY_PREFIX + part.name[len(PENDING_PREFIX) :])
            return table
        whole = ["--wipe", "never", "--wipe-partitions", "never", "--", table.device]
        await self.runner.run([*_SFDISK_WRITE, *whole], input=script.encode())
        disk.remember(renamed)
        return renamed

    async def _settle_parts(self, disk: _Disk, table: Table, parts: list[Partition]) -> None:
        """`_settle_one` for several partitions of one change: the kernel polled for all, udev waited for once."""
        deadline = anyio.current_time() + 1.0
        while not all(kernel_shows(table, part) for part in parts):
            if anyio.current_time() >= deadline:
                await self._settle(table.device, table)
                break
            await anyio.sleep(0.005)
        disk.remember(table)  # the kernel changed: map its partitions again when next needed
        if udev_running():
            timeout = max(1, int(self.config.settle_timeout_seconds))
            await self.runner.run(["udevadm", "settle", f"--timeout={timeout}"], check=False)

    def _choose(self, tables: list[tuple[_Disk, Table]], size: int) -> _Disk | None:
        options = []
        for index, (disk, table) in enumerate(tables):
            extent = best_fit(table.free_extents(ALIGNMENT), size // table.sector_size)
            if extent is not None:
                options.append((extent.size * table.sector_size, index, disk))
        return min(options, key=lambda o: (o[0], o[1]))[2] if options else None

    def _no_room(self, tables: list[tuple[_Disk, Table]], size: int) -> InsufficientCapacity:
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

    async def _remove_wiped(self, disk: _Disk, part: Partition, *, pending_only: bool = False) -> bool:
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
                    name = self._names.get(part.name[len(PENDING_PREFIX) :])  # None: not created by this process
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
        key = part.name[len(PENDING_PREFIX) :]
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
        self, disk: _Disk, part: Partition, *, zero: bool, crypto_erase: bool = False, pending_only: bool = False
    ) -> bool:
        """Wipe a partition of ours, then delete it; the caller must not hold the disk's lock. True if it did.

        Zeroing runs outside the lock, as it may take minutes, through an exclusive claim on the partition taken
        under it; a signature wipe is quick and runs under it. A crash during either leaves the partition in place,
        so the retried delete wipes it again. No space is freed before it is clean. Both steps decide on a
        fresh read: what is wiped and what is removed must be ours at that very moment (and still pending, if
        `pending_only`: a create may have finished it since it was seen).
        """
        async with self._changing(disk) as table:
            current = table.by_uuid(part.uuid)
            if current is None or not is_ours(current) or (pending_only and is_ready(current)):
                return False
            part = current
            await self._settle_one(disk, table, part)
            if not zero:  # a signature wipe is quick: wipe and remove under one hold of the lock
                if crypto_erase:
                    await crypt.erase(self.runner, self._node(table, part))
                await self._wipe(table, part)
                await self._delete(disk, table, part)
                return True
            # The exclusive claim is taken here, under the lock, where no table write of ours holds the whole disk
            # (which would make the kernel refuse it, see localdisk.blockdev), and kept through the zeroing.
            node = self._node(table, part)
            claim = _claim(node)
        # BLKZEROOUT (in-process, see localdisk.blockdev): the disk zeroes (or discards with guaranteed zeroes) where
        # it can, else the kernel writes zeros itself, which can cost a full write of the volume.
        await zero_out(node, self.runner.observers, fd=claim)
        async with self._changing(disk) as table:
            now = table.by_uuid(part.uuid)
            if now is None:
                return False
            if (now.number, now.start, now.size, now.name) != (part.number, part.start, part.size, part.name):
                raise BackendFailure(f"partition {part.uuid} changed while it was being deleted; retry")
            await self._delete(disk, table, now)
            return True

    @staticmethod
    def _node(table: Table, part: Partition) -> str:
        """The kernel's node of `part`, checked to be where the table puts it."""
        known = kernel_partition(table.device, part.number)
        node = Path("/dev") / known.name if known is not None else None
        if known is None or node is None or known.start != table.kernel_units(part.start) or not node.exists():
            raise BackendFailure(
                f"no device node for partition {part.number} of {table.device}; retry: the retry repairs the kernel's"
                " view of the disk first"
            )
        return str(node)

    async def _wipe(self, table: Table, part: Partition) -> None:
        """Erase a partition's signatures after checking its node; the disk's lock is held, so no table write of
        ours has the whole disk open exclusively (which would make the O_EXCL opens below fail)."""
        node = self._node(table, part)
        await erase_signatures(node, self.runner.observers, fd=_claim(node))

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        located = await self._locate(handle)
        if located is None or not is_ready(located[2]):
            raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")
        disk = located[0]
        async with self._changing(disk) as table:
            part = table.by_uuid(handle)
            if part is None or not is_ready(part):
                raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")
            sectors = size_bytes // table.sector_size
            if sectors <= part.size:
                # Also the retry of an expand cut between the table write and the kernel's resize: the kernel must
                # show the size the answer gives (a restart repairs it too, but a retry may come first).
                if not kernel_shows(table, part):
                    await self._settle_one(disk, table, part)
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
            await self.runner.run([*_SFDISK_WRITE, *resize], input=f",{sectors}\n".encode())
            grown = replace(part, size=sectors)
            table = table.with_partition(grown)
            disk.remember(table)
            # A crash between the table write and the kernel's resize leaves the table grown and the kernel not.
            # The retried expand finds the volume big enough and is answered without coming here, and the restart
            # the crash implies runs `_settle` in `open`, which sees the kernel's size differ and resizes it.
            try:
                await tell_kernel(table, BLKPG_RESIZE, grown)
            except OSError as exc:
                raise BackendFailure(
                    f"the table of {table.device} now gives partition {part.number} {human(size_bytes)}, but the"
                    f" kernel refused to grow it ({exc.strerror}); retry: the retry repairs the kernel's view first"
                ) from exc
            await self._settle_one(disk, table, grown)
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


def _claim(node: str) -> int:
    """The partition opened exclusively for wiping: refused for a volume that is mounted or held, before anything
    is destroyed (the claim is then handed to blockdev, which closes it)."""
    try:
        return open_exclusive(node)
    except Busy as exc:
        raise FailedPrecondition(
            f"{node} is in use (mounted or held by another device); unpublish and unstage the volume first"
        ) from exc


def _factory(pool: str, config: PoolConfig, runner: CommandRunner) -> PartitionBackend:
    assert isinstance(config, PartitionPoolConfig)
    return PartitionBackend(pool, config, runner, view_max_age=config.view_max_age_seconds)


BACKEND = BackendSpec("partition", PartitionPoolConfig, _factory, "GPT partitions on whole disks")


def unreadable(device: str) -> str | None:
    """Why `device` cannot be read as a disk any more (gone, empty, I/O errors), or None if its first sector reads."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"is gone ({exc.strerror})"
    try:
        if os.lseek(fd, 0, os.SEEK_END) == 0:
            return "has no space any more (0 bytes): the disk died or was pulled"
        os.pread(fd, 512, 0)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    return None
