"""One disk of a partition pool: its lock, the cached view of its GPT, and the table changes made under that lock.

Every tool rewrites the whole table, so changes to one disk are serialized with the disk's lock (two creates racing
on one disk would each write a table without the other's partition), and reads take it too, so they never see a
half-written table. The view (`PoolDisk.table`) is the last `sfdisk --json` read with our own changes applied in
memory as they succeed, dropped after any failed or interrupted change (`changing`), trusted by reads for the pool's
max age; every change re-reads its disk first.

Changes are one table write each: `sfdisk --append` creates a partition with its number, place, name and PARTUUID
given (so nothing has to be read back), `sfdisk --part-label` renames it, `sfdisk --delete` removes it, all with
the kernel left alone; the kernel is then told about that one partition in-process (the BLKPG ioctl `partx` and
parted use, see `localdisk.backends.partkernel`), so no other partition's node is ever re-created. What that could
not do is repaired by `settle`. The runner is passed to each change rather than kept, as the backend's may be
replaced (tests wrap it).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from localdisk.backends.gpt import Partition, Table, parse_sfdisk, table_script
from localdisk.backends.partkernel import (
    BLKPG_ADD,
    BLKPG_DELETE,
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
from localdisk.backends.partnames import ready_name
from localdisk.blockdev import erase_signatures, open_exclusive
from localdisk.errors import BackendFailure, Busy, CommandFailed, FailedPrecondition, PoolGone
from localdisk.runner import CommandRunner

if TYPE_CHECKING:
    from localdisk.backends.partgroup import Order

SFDISK_WRITE = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel"]  # write the table, leave the kernel alone
_BY_PARTUUID = Path("/dev/disk/by-partuuid")


class PoolDisk:
    """One disk of a pool: its lock, and the cached view of its table (see the module docstring).

    `table` is the last read with our own changes applied since; only code holding `lock` reads or changes it, so a
    reader without the lock sees either the table before a change or after it.
    """

    def __init__(self, configured: str, max_age: float, owner: str, settle_timeout: float) -> None:
        self.configured = configured
        self.lock = anyio.Lock()
        self.max_age = max_age
        self.owner = owner  # "partition pool 'name'", for messages
        self.settle_timeout = settle_timeout  # how long to wait for the kernel and udev to show a change
        self.table: Table | None = None
        self.read_at = -math.inf  # monotonic time of the read `table` comes from
        self.reads = 0
        self._kernel: dict[int, KernelPartition] | None = None  # sysfs's partitions, mapped once per table
        self.orders: list[Order] = []  # creates waiting for the next group commit on this disk

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

    # -- reading ----------------------------------------------------------------------------------------------------
    async def read(self, runner: CommandRunner) -> Table:
        """Read the disk's table and take it as its view; the caller holds the lock."""
        device = self.device()
        read_at = time.monotonic()
        try:
            result = await runner.run(["sfdisk", "--json", "--", device])
        except CommandFailed as exc:
            self.invalidate()
            if "does not contain a recognized partition table" in exc.stderr:
                raise FailedPrecondition(
                    f"disk {self.configured} ({device}) of {self.owner} has lost its partition table"
                ) from exc
            gone = await anyio.to_thread.run_sync(unreadable, device)
            if gone:
                raise PoolGone(f"disk {self.configured} ({device}) of {self.owner} {gone}") from exc
            raise
        except BaseException:
            self.invalidate()
            raise
        table = parse_sfdisk(result.text, device)
        self.remember(table, read_at)
        return table

    @contextlib.asynccontextmanager
    async def changing(self, runner: CommandRunner) -> AsyncIterator[Table]:
        """The lock and the table read afresh under it, to decide a change on; a failed or interrupted change drops
        the view, as the disk may then hold something we did not see."""
        async with self.lock:
            try:
                yield await self.read(runner)
            except BaseException:
                self.invalidate()
                raise

    def device_path(self, table: Table, part: Partition) -> str | None:
        """udev's /dev/disk/by-partuuid link when there is one, else the kernel node now holding that partition.

        The node comes from the disk's sysfs map (built once per table), checked against sysfs itself when the map
        does not show the partition where the table puts it.
        """
        link = _BY_PARTUUID / part.uuid
        if link.exists():
            return str(link)
        known = self.kernel().get(part.number)
        if known is None or known.start != table.kernel_units(part.start):
            known = kernel_partition(table.device, part.number)
        if known is None or known.start != table.kernel_units(part.start):
            return None
        node = Path("/dev") / known.name
        return str(node) if node.exists() else None

    # -- keeping the kernel in step ---------------------------------------------------------------------------------
    async def settle(self, runner: CommandRunner, table: Table) -> None:
        """Wait until the kernel's partitions match `table` and their nodes exist, then let udev finish.

        localdisk tells the kernel about each change itself (BLKPG); what that could not do (a crash between the
        table write and the kernel update, a change made while the kernel was out of step) is repaired here, one
        partition at a time with the same ioctl (`repair_kernel`). Not `partx --update`: it walks partition numbers
        only up to the count of partitions, so after a gap (1 and 2 deleted, 3 and 7 in use) it never reaches 7 and
        the kernel stays without it. Bounded by the settle timeout.
        """
        device, timeout = table.device, self.settle_timeout
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
            await runner.run(["udevadm", "settle", f"--timeout={max(1, int(timeout))}"], check=False)

    async def settle_parts(self, runner: CommandRunner, table: Table, parts: list[Partition]) -> None:
        """Wait until the kernel shows `parts` where `table` puts them, with their nodes; the whole-disk `settle`,
        which repairs, if it does not soon. The usual check after a change of ours: the partitions' sysfs entries,
        polled for all, udev waited for once."""
        deadline = anyio.current_time() + 1.0
        while not all(kernel_shows(table, part) for part in parts):
            if anyio.current_time() >= deadline:
                await self.settle(runner, table)
                break
            await anyio.sleep(0.005)
        self.remember(table)  # the kernel changed: map its partitions again when next needed
        if udev_running():
            timeout = max(1, int(self.settle_timeout))
            await runner.run(["udevadm", "settle", f"--timeout={timeout}"], check=False)

    async def settle_one(self, runner: CommandRunner, table: Table, part: Partition) -> None:
        await self.settle_parts(runner, table, [part])

    # -- changing the table: one write each, then the kernel is told about that one partition; the lock is held ----
    async def make(
        self, runner: CommandRunner, table: Table, name: str, start: int, sectors: int, type_guid: str = ""
    ) -> tuple[Table, Partition]:
        """Create partition `name` at [start, start + sectors) in the lowest free entry.

        Its number and PARTUUID are chosen here and given to sfdisk, so the new table is known without a read.
        sfdisk refuses an entry that is taken or a range that overlaps a partition (ours or not), whatever the view
        said. The partition is named in the same write that creates it, so no crash leaves an unnamed partition.
        """
        part = Partition(table.free_number(), start, sectors, str(uuid.uuid4()), name, type_guid)
        table = await self.append(runner, table, [part])
        await self.settle_one(runner, table, part)
        return table, part

    async def append(self, runner: CommandRunner, table: Table, parts: list[Partition]) -> Table:
        """Write new partitions `parts` (numbered and placed already) in one `sfdisk --append`, and tell the kernel
        about each; the table with them. The caller waits for the kernel to show them (`settle_parts`)."""
        lines = "".join(f"{entry(table.device, part)}\n" for part in parts)
        append = ["--append", "--wipe", "never", "--wipe-partitions", "never", "--", table.device]
        await runner.run([*SFDISK_WRITE, *append], input=lines.encode())
        for part in parts:
            table = table.with_partition(part)
        self.remember(table)
        for part in parts:
            try:
                await tell_kernel(table, BLKPG_ADD, part)
            except OSError:
                await self.settle(runner, table)  # the kernel is out of step (a stale partition in the way)
        return table

    async def rename(self, runner: CommandRunner, table: Table, part: Partition, name: str) -> tuple[Table, Partition]:
        """Rename a partition of ours (a label change: the kernel's view stays as it is)."""
        label = ["--part-label", "--", table.device, str(part.number), name]
        await runner.run([*SFDISK_WRITE, *label])
        part = replace(part, name=name)
        table = table.with_partition(part)
        self.remember(table)
        return table, part

    async def name_ready(self, runner: CommandRunner, table: Table, parts: list[Partition]) -> Table:
        """Rename pending `parts` ready in one table write. One partition: `--part-label`. More: the whole table
        written back as read under this hold of the lock plus our own changes since (`table_script`), which is what
        sfdisk writes for any change; a table that cannot be scripted verbatim (a foreign partition's odd name) is
        renamed one partition at a time."""
        renamed = table
        for part in parts:
            renamed = renamed.with_partition(replace(part, name=ready_name(part)))
        script = table_script(renamed, lambda number: node_name(table.device, number)) if len(parts) > 1 else None
        if script is None:
            for part in parts:
                table, _ = await self.rename(runner, table, part, ready_name(part))
            return table
        whole = ["--wipe", "never", "--wipe-partitions", "never", "--", table.device]
        await runner.run([*SFDISK_WRITE, *whole], input=script.encode())
        self.remember(renamed)
        return renamed

    async def delete(self, runner: CommandRunner, table: Table, part: Partition) -> None:
        """Remove a partition of ours from the kernel, then from the table.

        The kernel goes first: it refuses a partition anyone holds open, and then nothing has changed yet. A crash
        between the two leaves the kernel behind the table, which `settle` repairs.
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
        await runner.run([*SFDISK_WRITE, "--delete", "--", table.device, str(part.number)])
        self.remember(table.without_partition(part.number))


def entry(device: str, part: Partition) -> str:
    """`part` as one line of an sfdisk script: number (by node name), place, name, PARTUUID, type."""
    line = f"{node_name(device, part.number)} : start={part.start}, size={part.size}, name={part.name}"
    return line + f", uuid={part.uuid}" + (f", type={part.type}" if part.type else "")


def node(table: Table, part: Partition) -> str:
    """The kernel's node of `part`, checked to be where the table puts it."""
    known = kernel_partition(table.device, part.number)
    path = Path("/dev") / known.name if known is not None else None
    if known is None or path is None or known.start != table.kernel_units(part.start) or not path.exists():
        raise BackendFailure(
            f"no device node for partition {part.number} of {table.device}; retry: the retry repairs the kernel's"
            " view of the disk first"
        )
    return str(path)


async def wipe(runner: CommandRunner, table: Table, part: Partition) -> None:
    """Erase a partition's signatures after checking its node; the disk's lock is held, so no table write of ours
    has the whole disk open exclusively (which would make the O_EXCL opens below fail)."""
    path = node(table, part)
    await erase_signatures(path, runner.observers, fd=claim(path))


def claim(path: str) -> int:
    """The partition opened exclusively for wiping: refused for a volume that is mounted or held, before anything
    is destroyed (the claim is then handed to blockdev, which closes it)."""
    try:
        return open_exclusive(path)
    except Busy as exc:
        raise FailedPrecondition(
            f"{path} is in use (mounted or held by another device); unpublish and unstage the volume first"
        ) from exc


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
