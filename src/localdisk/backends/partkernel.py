"""What the kernel knows of a partitioned disk, and telling it: the other half of a partition table.

sfdisk writes the table to the disk without telling the kernel (`--no-tell-kernel`); the partition backend then
brings the kernel's partitions in line itself, one partition at a time, with the BLKPG ioctl (what partx, resizepart
and parted use), and reads back what the kernel has from sysfs. A disk whose other partitions are mounted can change
this way, where a whole-table reread would be refused.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from localdisk.backends.gpt import Partition, Table
from localdisk.errors import BackendFailure

_SYSFS_BLOCK = Path("/sys/class/block")
_UDEV_CONTROL = Path("/run/udev/control")
_KERNEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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


def kernel_partition(device: str, number: int) -> KernelPartition | None:
    """Partition `number` of `device` as the kernel knows it, read from its own sysfs entry where it is named as
    the kernel names partitions (loop0p3, sda3), else found among all of the disk's partitions."""
    disk = Path(device).name
    name = f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"
    entry = _SYSFS_BLOCK / disk / name
    try:
        if int((entry / "partition").read_text()) == number:
            return KernelPartition(name, int((entry / "start").read_text()), int((entry / "size").read_text()))
    except (OSError, ValueError):
        pass
    return kernel_partitions(device).get(number)


def kernel_mismatch(table: Table) -> str | None:
    """Why the kernel's view of `table.device` differs from `table`, or None when it matches."""
    known = kernel_partitions(table.device)
    wanted = {p.number: p for p in table.partitions}
    for number in sorted(set(known) - set(wanted)):
        return f"the kernel still has partition {number}, which the table no longer holds"
    for number, part in sorted(wanted.items()):
        have = known.get(number)
        if have is None:
            return f"partition {number} has no kernel device yet"
        if (have.start, have.size) != table.kernel_place(part):
            return f"the kernel has partition {number} at another place or size than the table"
        if not (Path("/dev") / have.name).exists():
            return f"/dev/{have.name} does not exist yet"
    return None


def views_of(table: Table) -> str:
    """The table's partitions and the kernel's, as (start, size) in the kernel's 512-byte units, for an error."""
    wanted = {p.number: table.kernel_place(p) for p in table.partitions}
    known = {n: (k.start, k.size) for n, k in sorted(kernel_partitions(table.device).items())}
    return f"table {dict(sorted(wanted.items()))}, kernel {known}"


def repair_kernel(table: Table) -> list[str]:
    """One pass of bringing the kernel's partitions of `table.device` in line with `table`, partition by partition:
    drop what the table no longer holds, resize in place what starts where the table says, move (drop, then add)
    what starts elsewhere, add what is missing. Returns what the kernel refused (EBUSY: a partition held open, or an
    add overlapping one not moved yet, which the next pass sees gone), for the caller's next pass or its error."""
    refused: list[str] = []

    def attempt(what: str, op: int, number: int, part: Partition | None = None) -> None:
        start, length = (part.start * table.sector_size, part.size * table.sector_size) if part else (0, 0)
        try:
            _blkpg(table.device, op, number, start, length)
        except OSError as exc:
            refused.append(f"{what} of partition {number} refused: {exc.strerror}")

    wanted = {p.number: p for p in table.partitions}
    for number, have in sorted(kernel_partitions(table.device).items()):
        part = wanted.get(number)
        if part is None:
            attempt("removal", BLKPG_DELETE, number)
        elif (have.start, have.size) != table.kernel_place(part):
            if have.start == table.kernel_units(part.start):
                attempt("resize", BLKPG_RESIZE, number, part)
            else:
                attempt("move", BLKPG_DELETE, number)
    known = kernel_partitions(table.device)
    for number, part in sorted(wanted.items()):
        if number not in known:
            attempt("addition", BLKPG_ADD, number, part)
    return refused


def udev_running() -> bool:
    return _UDEV_CONTROL.exists()


def kernel_shows(table: Table, part: Partition) -> bool:
    """Whether the kernel has `part` where and as large as `table` says, with its node."""
    known = kernel_partition(table.device, part.number)
    return (
        known is not None
        and (known.start, known.size) == table.kernel_place(part)
        and (Path("/dev") / known.name).exists()
    )


def node_name(device: str, number: int) -> str:
    """The node the kernel gives partition `number` of `device`: how an sfdisk script line names its entry."""
    disk = Path(device).name
    if not _KERNEL_NAME.match(disk) or not device.startswith("/dev/"):
        raise BackendFailure(f"unexpected device name {device!r}: localdisk cannot name its partitions for sfdisk")
    return f"{device}p{number}" if disk[-1].isdigit() else f"{device}{number}"


# Telling the kernel about one partition: the BLKPG ioctl (linux/blkpg.h), as partx, resizepart and parted make it.
_BLKPG = 0x1269  # _IO(0x12, 105)
BLKPG_ADD, BLKPG_DELETE, BLKPG_RESIZE = 1, 2, 3


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_longlong),  # bytes
        ("length", ctypes.c_longlong),  # bytes
        ("pno", ctypes.c_int),
        ("devname", ctypes.c_char * 64),  # unused by the kernel
        ("volname", ctypes.c_char * 64),  # unused by the kernel
    ]


class _BlkpgArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int), ("data", ctypes.c_void_p)]


def _blkpg(device: str, op: int, number: int, start: int, length: int) -> None:
    part = _BlkpgPartition(start=start, length=length, pno=number)
    arg = _BlkpgArg(op=op, flags=0, datalen=ctypes.sizeof(part), data=ctypes.addressof(part))
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _BLKPG, arg)
    finally:
        os.close(fd)


async def tell_kernel(table: Table, op: int, part: Partition) -> None:
    """Add, delete or resize the kernel's partition `part.number` of `table.device` as `table` has it; OSError
    (EBUSY: taken, overlapping or open; ENXIO: no such partition) when the kernel refuses."""
    start, length = part.start * table.sector_size, part.size * table.sector_size
    await anyio.to_thread.run_sync(_blkpg, table.device, op, part.number, start, length)
