"""The `partition` backend: one GPT partition per volume, carved from whole disks listed in the pool config.

For nodes without LVM, or where a volume must be a plain partition. The disks' GPT tables are the only state: a
volume is a partition whose GPT name is `ld-<key>`, the key derived from the CSI name, and its handle is the
partition's PARTUUID, which survives renumbering and reboots. Nothing else is stored, so a restarted node finds its
volumes by reading the tables again.

Changes to one disk are serialized with a per-disk lock, because every tool rewrites the whole table: two creates
racing on one disk would each write a table without the other's partition. Reads take the lock too, so they never
see a half-written table. Zeroing a deleted volume, which can take minutes, runs outside the lock.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
from pydantic import Field, field_validator

from localdisk.backends.gpt import Partition, Table, best_fit, parse_sfdisk, parse_wipefs
from localdisk.blockdev import zero_out
from localdisk.errors import (
    BackendFailure,
    CommandFailed,
    ConfigError,
    FailedPrecondition,
    InsufficientCapacity,
    NotFound,
    OutOfRange,
    Unsupported,
)
from localdisk.model import Capacity, Features, ObjectRef, Snapshot, Volume, VolumeSpec
from localdisk.registry import BackendSpec, PoolConfig
from localdisk.runner import CommandRunner
from localdisk.sizes import GiB, MiB, human

ALIGNMENT = MiB
GPT_NAME_LIMIT = 36  # UTF-16 code units in a GPT partition entry's name field
READY_PREFIX = "ld-"  # a volume handed out
PENDING_PREFIX = "lp-"  # created, not yet wiped and handed out (seen only after a crash)
KEY_LENGTH = 32
_OURS = re.compile(rf"^(?:{READY_PREFIX}|{PENDING_PREFIX})[a-z2-7]{{{KEY_LENGTH}}}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SYSFS_BLOCK = Path("/sys/class/block")
_BY_PARTUUID = Path("/dev/disk/by-partuuid")
_UDEV_CONTROL = Path("/run/udev/control")
assert len(READY_PREFIX) + KEY_LENGTH <= GPT_NAME_LIMIT


def volume_key(name: str) -> str:
    """The GPT-name key of a CSI name: 32 base32 characters (160 bits) of its SHA-256.

    A CSI name may be 128 bytes of any UTF-8 and a GPT name holds 36 UTF-16 units, so the name itself cannot be
    stored; its hash can. 160 bits make an accidental collision negligible (for a million volumes on one node the
    birthday bound is about 1e12 / 2**161, i.e. 1e-36), and crafting one needs about 2**80 SHA-256 evaluations,
    far beyond anyone who can merely choose PVC names. Base32 keeps the name to [a-z2-7], safe for parted's argv.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:KEY_LENGTH]


def is_ours(part: Partition) -> bool:
    return bool(_OURS.match(part.name))


def is_ready(part: Partition) -> bool:
    return is_ours(part) and part.name.startswith(READY_PREFIX)


class PartitionPoolConfig(PoolConfig):
    disks: tuple[str, ...] = Field(min_length=1)
    """Whole disks the pool may partition, by stable path (/dev/disk/by-id/...). No other disk is ever touched."""
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

    @field_validator("disks")
    @classmethod
    def _distinct_absolute(cls, disks: tuple[str, ...]) -> tuple[str, ...]:
        for disk in disks:
            if not disk.startswith("/dev/"):
                raise ValueError(f"{disk!r} is not a device path under /dev (use /dev/disk/by-id/...)")
        if len(set(disks)) != len(disks):
            raise ValueError("a disk is listed twice")
        return disks


@dataclass(frozen=True)
class KernelPartition:
    name: str  # kernel name, e.g. loop3p2, nvme0n1p2
    start: int  # 512-byte units, as sysfs counts
    size: int


def kernel_partitions(device: str) -> dict[int, KernelPartition]:
    """The partitions the kernel knows on `device` (from sysfs), by number: what the device nodes really map."""
    found: dict[int, KernelPartition] = {}
    base = _SYSFS_BLOCK / Path(device).name
    try:
        children = list(base.iterdir())
    except OSError:
        return found
    for child in children:
        try:
            number = int((child / "partition").read_text())
            start = int((child / "start").read_text())
            size = int((child / "size").read_text())
        except (OSError, ValueError):
            continue
        found[number] = KernelPartition(child.name, start, size)
    return found


class _Disk:
    def __init__(self, configured: str) -> None:
        self.configured = configured
        self.lock = anyio.Lock()

    def device(self) -> str:
        """The kernel node behind the configured (stable) path, resolved each time: it may change across reboots."""
        return os.path.realpath(self.configured)


class PartitionBackend:
    kind = "partition"

    def __init__(self, pool: str, config: PartitionPoolConfig, runner: CommandRunner) -> None:
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

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        self._disks = [_Disk(path) for path in self.config.disks]
        devices = [self._check_block_device(disk) for disk in self._disks]
        if len(set(devices)) != len(devices):
            raise ConfigError(f"partition pool {self.pool!r}: two entries of disks name the same device")
        for disk in self._disks:
            async with disk.lock:
                leftovers = await self._prepare(disk)
            for part in leftovers:
                await self._remove(disk, part, zero=False)

    async def aclose(self) -> None:
        return None

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
        await self.runner.run(["parted", "--script", "--", disk.device(), "mklabel", "gpt"])
        await self._settle(disk.device(), await self._read(disk))

    # -- reading ----------------------------------------------------------------------------------------------------
    async def _read(self, disk: _Disk) -> Table:
        device = disk.device()
        try:
            result = await self.runner.run(["sfdisk", "--json", "--", device])
        except CommandFailed as exc:
            if "does not contain a recognized partition table" in exc.stderr:
                raise FailedPrecondition(
                    f"disk {disk.configured} ({device}) of partition pool {self.pool!r} has lost its partition table"
                ) from exc
            raise
        return parse_sfdisk(result.text, device)

    async def _tables(self) -> list[tuple[_Disk, Table]]:
        tables = []
        for disk in self._disks:
            async with disk.lock:
                tables.append((disk, await self._read(disk)))
        return tables

    async def _locate(self, handle: str) -> tuple[_Disk, Partition] | None:
        """The disk and partition of a handle, if it is one of our partitions (ready or pending) on a pool disk."""
        if not _UUID.match(handle):
            return None
        for disk, table in await self._tables():
            part = table.by_uuid(handle)
            if part is not None and is_ours(part):
                return disk, part
        return None

    def _volume(self, table: Table, part: Partition) -> Volume:
        key = part.name[len(READY_PREFIX) :]
        path = self._device_path(table, part)
        return Volume(
            ref=ObjectRef(self.kind, self.pool, part.uuid),
            name=self._names.get(key, part.name),
            size_bytes=part.size * table.sector_size,
            device_path=path,
            abnormal=None
            if path
            else f"the kernel shows no device for partition {part.number} of {table.device}; run partx -u on it",
        )

    @staticmethod
    def _device_path(table: Table, part: Partition) -> str | None:
        """udev's /dev/disk/by-partuuid link when there is one, else the kernel node now holding that partition."""
        link = _BY_PARTUUID / part.uuid
        if link.exists():
            return str(link)
        known = kernel_partitions(table.device).get(part.number)
        if known is None or known.start != table.kernel_units(part.start):
            return None
        node = Path("/dev") / known.name
        return str(node) if node.exists() else None

    # -- keeping the kernel in step ---------------------------------------------------------------------------------
    async def _settle(self, device: str, table: Table) -> None:
        """Wait until the kernel's partitions match `table` and their nodes exist, then let udev finish.

        parted and sfdisk tell the kernel about each change themselves (BLKPG); `partx -u` repairs what they could
        not (a change made while the kernel was out of step, a crash in between). Bounded by the settle timeout.
        """
        timeout = self.config.settle_timeout_seconds
        deadline = anyio.current_time() + timeout
        next_repair = anyio.current_time()
        while (problem := _kernel_mismatch(table)) is not None:
            now = anyio.current_time()
            if now >= deadline:
                raise BackendFailure(
                    f"the kernel still disagrees with the partition table of {device} after {timeout}s: {problem};"
                    " is a partition held open? check with lsblk and retry"
                )
            if now >= next_repair:
                # `partx -u` adds and resizes but never deletes: a partition the table no longer holds (parted was
                # killed between writing the table and telling the kernel) is deleted by number.
                for number in sorted(set(kernel_partitions(device)) - {p.number for p in table.partitions}):
                    stale = ["partx", "--delete", "--nr", f"{number}:{number}", "--", device]
                    await self.runner.run(stale, check=False)
                await self.runner.run(["partx", "--update", "--", device], check=False)
                next_repair = now + 1.0
            await anyio.sleep(0.05)
        if _udev_running():
            await self.runner.run(["udevadm", "settle", f"--timeout={max(1, int(timeout))}"], check=False)

    # -- volumes ----------------------------------------------------------------------------------------------------
    async def create_volume(self, spec: VolumeSpec) -> Volume:
        key = volume_key(spec.name)
        self._names[key] = spec.name
        ready, pending = READY_PREFIX + key, PENDING_PREFIX + key
        resume: _Disk | None = None  # the disk of a pending partition a crashed create left, to finish it
        for disk, table in await self._tables():
            part = table.by_name(ready)
            if part is not None:
                return self._volume(table, part)
            leftover = table.by_name(pending)
            if leftover is not None:
                if leftover.size * table.sector_size == spec.size_bytes:
                    resume = disk
                else:
                    await self._remove(disk, leftover, zero=False)
        # Best fit across disks, decided on a read without the locks, then checked again under the chosen disk's
        # lock: another create may have taken the extent meanwhile, in which case look again.
        for _ in range(len(self._disks) + 1):
            choice, resume = resume, None
            if choice is None:
                tables = await self._tables()
                choice = self._choose(tables, spec.size_bytes)
                if choice is None:
                    raise self._no_room(tables, spec.size_bytes)
            async with choice.lock:
                table = await self._read(choice)
                if (part := table.by_name(pending)) is None:
                    sectors = spec.size_bytes // table.sector_size
                    extent = best_fit(table.free_extents(ALIGNMENT), sectors)
                    if extent is None:
                        continue
                    # The partition is named in the same parted run that creates it: parted writes the table once,
                    # so no crash can leave an unnamed partition. It is born pending ("lp-"): until it is wiped and
                    # renamed "ld-" no lookup returns it, a retry of this create resumes it, and `open` drops it.
                    first, last = f"{extent.start}s", f"{extent.start + sectors - 1}s"
                    mkpart = ["mkpart", pending, first, last]
                    await self.runner.run(
                        ["parted", "--script", "--align", "none", "--", table.device, "unit", "s", *mkpart]
                    )
                    table = await self._read(choice)
                    part = table.by_name(pending)
                    if part is None:
                        raise BackendFailure(f"parted reported success but {table.device} has no partition {pending}")
                await self._settle(table.device, table)
                # Space freed by localdisk was zeroed when its volume was deleted, so only stale signatures can be
                # left here (from before the disk joined the pool). Erasing them is cheap and stops the node from
                # mounting an old filesystem instead of formatting; zeroing every new volume would double the
                # write cost of each volume on disks that cannot offload zeroing.
                await self._wipe(table, part, zero=False)
                await self.runner.run(["parted", "--script", "--", table.device, "name", str(part.number), ready])
                table = await self._read(choice)
                await self._settle(table.device, table)
                done = table.by_uuid(part.uuid)
                if done is None or done.name != ready:
                    raise BackendFailure(f"partition {part.uuid} on {table.device} was not renamed to {ready}")
                return self._volume(table, done)
        raise InsufficientCapacity(
            f"partition pool {self.pool!r}: other volumes kept taking the free space; retry later"
        )

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
        disk, part = located
        await self._remove(disk, part, zero=self.config.wipe == "zero")

    async def _remove(self, disk: _Disk, part: Partition, *, zero: bool) -> None:
        """Wipe a partition of ours, then delete it; the caller must not hold the disk's lock.

        The wipe runs outside the lock, as zeroing may take minutes; a crash during it leaves the partition in
        place, so the retried delete wipes it again. No space is freed before it is clean.
        """
        async with disk.lock:
            table = await self._read(disk)
            current = table.by_uuid(part.uuid)
            if current is None:
                return
            part = current
            await self._settle(table.device, table)
        await self._wipe(table, part, zero=zero)
        async with disk.lock:
            table = await self._read(disk)
            now = table.by_uuid(part.uuid)
            if now is None:
                return
            if (now.start, now.size) != (part.start, part.size):
                raise BackendFailure(f"partition {part.uuid} changed while it was being deleted; retry")
            await self.runner.run(["parted", "--script", "--", table.device, "rm", str(now.number)])
            await self._settle(table.device, await self._read(disk))

    async def _wipe(self, table: Table, part: Partition, *, zero: bool) -> None:
        node = self._device_path(table, part)
        if node is None:
            raise BackendFailure(f"no device node for partition {part.number} of {table.device}; run partx -u")
        _refuse_if_in_use(node)
        if zero:
            # BLKZEROOUT (in-process, see localdisk.blockdev): the disk zeroes (or discards with guaranteed zeroes)
            # where it can, else the kernel writes zeros itself, which can cost a full write of the volume.
            await zero_out(node, self.runner.observers)
        await self.runner.run(["wipefs", "--all", "--quiet", "--", node])

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        located = await self._locate(handle)
        if located is None or not is_ready(located[1]):
            raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")
        disk = located[0]
        async with disk.lock:
            table = await self._read(disk)
            part = table.by_uuid(handle)
            if part is None or not is_ready(part):
                raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")
            sectors = size_bytes // table.sector_size
            if sectors <= part.size:
                return self._volume(table, part)
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
            # for online expansion), which --script answers with "no". sfdisk changes the table only; util-linux
            # `resizepart` (BLKPG_RESIZE_PARTITION) then grows the kernel's partition in place. Not `partx -u`:
            # on recent kernels it deletes and re-adds a partition nobody holds open (a raw block publication holds
            # none), which gives it a new device number and leaves the published node pointing at nothing.
            quiet = ["--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", "--wipe-partitions", "never"]
            await self.runner.run(
                ["sfdisk", *quiet, "-N", str(part.number), "--", table.device], input=f",{sectors}\n".encode()
            )
            # A crash between the table write and resizepart leaves the table grown and the kernel not. The retried
            # expand finds the volume big enough and is answered without coming here, and the restart the crash
            # implies runs `_settle` in `open`, which sees the kernel's size differ and resizes it (partx -u).
            kernel_sectors = sectors * table.sector_size // 512  # resizepart counts 512-byte sectors
            await self.runner.run(["resizepart", table.device, str(part.number), str(kernel_sectors)])
            table = await self._read(disk)
            await self._settle(table.device, table)
            grown = table.by_uuid(handle)
            if grown is None or grown.size != sectors:
                raise BackendFailure(f"sfdisk did not resize partition {part.number} of {table.device}")
            return self._volume(table, grown)

    async def get_volume(self, handle: str) -> Volume:
        if _UUID.match(handle):
            for _, table in await self._tables():
                part = table.by_uuid(handle)
                if part is not None and is_ready(part):
                    return self._volume(table, part)
        raise NotFound(f"volume {handle!r} not found in partition pool {self.pool!r}")

    async def find_volume(self, name: str) -> Volume | None:
        key = volume_key(name)
        for _, table in await self._tables():
            part = table.by_name(READY_PREFIX + key)
            if part is not None:
                self._names[key] = name
                return self._volume(table, part)
        return None

    async def list_volumes(self) -> list[Volume]:
        return [self._volume(t, p) for _, t in await self._tables() for p in t.partitions if is_ready(p)]

    async def capacity(self) -> Capacity:
        tables = await self._tables()
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


def _kernel_mismatch(table: Table) -> str | None:
    """Why the kernel's view of `table.device` differs from `table`, or None when it matches."""
    known = kernel_partitions(table.device)
    wanted = {p.number: p for p in table.partitions}
    for number in sorted(set(known) - set(wanted)):
        return f"the kernel still has partition {number}, which the table no longer holds"
    for number, part in sorted(wanted.items()):
        have = known.get(number)
        if have is None:
            return f"partition {number} has no kernel device yet"
        if (have.start, have.size) != (table.kernel_units(part.start), table.kernel_units(part.size)):
            return f"the kernel has partition {number} at another place or size than the table"
        if not (Path("/dev") / have.name).exists():
            return f"/dev/{have.name} does not exist yet"
    return None


def _udev_running() -> bool:
    return _UDEV_CONTROL.exists()


def _refuse_if_in_use(node: str) -> None:
    """Refuse to wipe a partition that is mounted or held (O_EXCL fails then), before destroying anything."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(
                f"{node} is in use (mounted or held by another device); unpublish and unstage the volume first"
            ) from exc
        raise BackendFailure(f"cannot open {node}: {exc.strerror}") from exc
    os.close(fd)


def _factory(pool: str, config: PoolConfig, runner: CommandRunner) -> PartitionBackend:
    assert isinstance(config, PartitionPoolConfig)
    return PartitionBackend(pool, config, runner)


BACKEND = BackendSpec("partition", PartitionPoolConfig, _factory, "GPT partitions on whole disks")
