"""Zeroing a block device from inside the process, with the same kernel call `blkdiscard --zeroout` makes.

Every thick volume is zeroed in full before it is handed out, so nobody reads a previous tenant's data. That used
to be one `blkdiscard -z` process per volume; under load, and much more under User-Mode Linux, starting that process
cost more than zeroing a small volume. `zero_out` makes the same BLKZEROOUT ioctl in a worker thread: the device
zeroes (WRITE ZEROES, or a discard that guarantees zeroes) where it can, and the kernel writes zero pages where it
cannot, exactly as blkdiscard would.

The device is opened with O_EXCL, which the kernel refuses (EBUSY) while the device is mounted, is part of another
device (a holder) or is open exclusively elsewhere: a volume in use is never zeroed. For a partition, "elsewhere"
includes its whole disk: sfdisk opens the disk O_EXCL while it writes the table, so a partition opened during a
table write is refused although nobody uses it. A caller that writes tables itself takes the claim
(`open_exclusive`) while it keeps its table writers out, and hands it to `zero_out` to zero later; sfdisk, finding
a partition claimed, falls back to a shared open of the disk. The ioctl cannot be interrupted;
a cancelled caller returns at once and the thread finishes the zeroing on its own, which leaves nothing wrong behind
(the volume is still marked pending and the retried create zeroes it again).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread

from localdisk.errors import BackendFailure, Busy, NotFound
from localdisk.runner import Observer

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range [start, start + length)
SECTOR = 512  # the ioctl wants the range in multiples of 512 bytes
SIGNATURE_HEAD = 8 << 20  # see erase_signatures
SIGNATURE_TAIL = 1 << 20


def open_exclusive(path: str) -> int:
    """Open block device `path` for writing, exclusively (O_EXCL): Busy while it is in use (see the module's text)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"block device {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise Busy(f"{path} is in use (mounted, held by another device or open exclusively); not zeroed") from None
        raise BackendFailure(f"cannot open {path}: {exc.strerror or exc}") from None


class _Handoff:
    """An open descriptor passed to the worker thread: whoever takes it first closes it, the thread when it starts,
    else the caller (cancelled before the thread ran), so a claim is never left open."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            fd, self._fd = self._fd, None
            return fd


def _all(size: int) -> list[tuple[int, int]]:
    return [(0, size - size % SECTOR)]


def _ends(size: int) -> list[tuple[int, int]]:
    usable = size - size % SECTOR
    if usable <= SIGNATURE_HEAD + SIGNATURE_TAIL:
        return [(0, usable)]
    return [(0, SIGNATURE_HEAD), (usable - SIGNATURE_TAIL, SIGNATURE_TAIL)]


def _zero_sync(path: str, handoff: _Handoff, ranges: Callable[[int], list[tuple[int, int]]]) -> int:
    fd = handoff.take()
    if fd is None:
        fd = open_exclusive(path)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for start, length in ranges(size):
            if length:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", start, length))
        return size
    finally:
        os.close(fd)


async def zero_out(path: str, observers: Sequence[Observer] = (), *, fd: int | None = None) -> int:
    """Zero all of block device `path`; its size in bytes. Observers see it as the command `BLKZEROOUT <path>`.

    `fd`: the device already opened by `open_exclusive`; zero_out takes it over and closes it, whatever happens.
    """
    return await _zero(path, observers, fd, _all, ["BLKZEROOUT", path])


async def erase_signatures(path: str, observers: Sequence[Observer] = (), *, fd: int | None = None) -> int:
    """Zero the first 8 MiB and the last 1 MiB of block device `path` (all of it if smaller); its size in bytes.

    What `wipefs --all` is for, without its process: every signature libblkid looks for lies there (filesystems and
    LVM near the start, LUKS2's secondary headers up to 4 MiB, the GPT backup, md 0.90/1.0 superblocks and ZFS's
    last labels at the end), so the node never finds an old filesystem to mount instead of formatting. Observers
    see it as the command `BLKZEROOUT --ends <path>`. `fd`: as for `zero_out`.
    """
    return await _zero(path, observers, fd, _ends, ["BLKZEROOUT", "--ends", path])


async def _zero(
    path: str,
    observers: Sequence[Observer],
    fd: int | None,
    ranges: Callable[[int], list[tuple[int, int]]],
    shown: list[str],
) -> int:
    started = time.monotonic()
    ok = False
    handoff = _Handoff(fd)
    try:
        size = await anyio.to_thread.run_sync(_zero_sync, path, handoff, ranges, abandon_on_cancel=True)
        ok = True
        return size
    except OSError as exc:
        raise BackendFailure(f"zeroing {path} failed: {exc.strerror or exc}") from None
    finally:
        if (unused := handoff.take()) is not None:  # the thread never started: the claim is still ours to close
            os.close(unused)
        duration = time.monotonic() - started
        for observe in observers:
            observe(shown, duration, ok)
