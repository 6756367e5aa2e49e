"""Group commit of partition creates on one disk: the creates waiting for the disk's lock share its table writes.

Each write of a GPT rewrites the whole table, and a create is three table changes (a pending partition, its wipe, its
ready name), so creates arriving together would otherwise queue for the disk's lock one by one. Instead each create
queues an `Order` on the disk, and whichever create takes the lock next carries out every order queued by then
(`group_create`): one read (none for a lone create while the view is young), one `sfdisk --append` of all their pending
partitions, their wipes, and one write naming them all ready (`PoolDisk.name_ready`). Each partition still goes through
the same states (pending, wiped, ready), so a crash anywhere leaves what a crash of a single create leaves.

An order ends with its partition (table and entry), None when the disk had no room for it, or "resume" when a
pending partition of its name is there already, which the backend's single-create path finishes.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Literal

import anyio

from localdisk.backends.gpt import Partition, Table, best_fit
from localdisk.backends.partdisk import PoolDisk, unreadable, wipe
from localdisk.backends.partnames import PENDING_PREFIX, READY_PREFIX, is_ready
from localdisk.errors import Busy, CommandFailed, LocalDiskError, PoolGone
from localdisk.runner import CommandRunner

Resume = Literal["resume"]
Made = tuple[Table, Partition]  # a ready partition, and the table it was seen in


@dataclass(eq=False)
class Order:
    """One create waiting for its disk's next group commit (`result`: see the module docstring)."""

    key: str
    size_bytes: int
    type_guid: str
    done: anyio.Event = field(default_factory=anyio.Event)
    abandoned: bool = False  # its create was cancelled: its partition stays pending, for its own clean-up
    placed: bool = False  # its pending partition is in the write under way (or was written)
    result: Made | Resume | None = None
    error: LocalDiskError | None = None

    def finish(self, result: Made | Resume | None = None, error: LocalDiskError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


async def group_create(runner: CommandRunner, disk: PoolDisk, order: Order, alignment: int) -> Made | Resume | None:
    """Queue `order` on `disk` and wait until a group commit carried it out: this create's own, if it takes the
    disk's lock while its order is still queued, or the one of whichever create took the lock first."""
    disk.orders.append(order)
    try:
        while not order.done.is_set():
            async with disk.lock:
                if order.done.is_set():
                    break
                orders, disk.orders = disk.orders, []
                await _commit(runner, disk, orders, order, alignment)
    except BaseException:
        order.abandoned = True
        with contextlib.suppress(ValueError):
            disk.orders.remove(order)
        raise
    if order.error is not None:
        raise order.error
    return order.result


async def _commit(runner: CommandRunner, disk: PoolDisk, orders: list[Order], own: Order, alignment: int) -> None:
    """Carry out `orders` together; the disk's lock is held, `own` is the order of the create doing it. A failure
    or a cancellation (its client's deadline) part-way drops the view and fails only `own`: another create whose
    partition may have been written goes on alone (`"resume"`: it finishes its pending partition, or makes it
    afresh), one not placed yet waits for the next group commit."""
    try:
        await _commit_orders(runner, disk, orders, alignment)
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


async def _commit_orders(runner: CommandRunner, disk: PoolDisk, orders: list[Order], alignment: int) -> None:
    """One read, one write creating every new partition (pending), their wipes, one write naming them ready.

    A lone create decides on the disk's view while it is young (`PoolDisk.cached`, which holds every change of ours)
    instead of reading the table again: sfdisk refuses an entry or a range that is taken on the disk, so a view made
    stale by a change behind localdisk's back costs one refused create (ABORTED: its retry reads afresh), never a
    partition. A group reads, as its ready-naming write is the whole table (`PoolDisk.name_ready`)."""
    viewed = disk.cached() if len(orders) == 1 else None
    table = viewed or await disk.read(runner)
    made: list[tuple[Order, Partition]] = []
    for order in orders:
        ready, pending = READY_PREFIX + order.key, PENDING_PREFIX + order.key
        if order.abandoned:
            order.finish()
        elif (done := table.by_name(ready)) is not None:
            order.finish((table, done))
        elif table.by_name(pending) is not None:
            order.finish("resume")
        else:
            sectors = order.size_bytes // table.sector_size
            extent = best_fit(table.free_extents(alignment), sectors)
            if extent is None:
                order.finish(None)
                continue
            # Born pending ("lp-"): until it is wiped and renamed "ld-" no lookup returns it, a retry of this
            # create resumes it, and the backend's `open` drops it.
            part = Partition(table.free_number(), extent.start, sectors, str(uuid.uuid4()), pending, order.type_guid)
            table = table.with_partition(part)
            made.append((order, part))
            order.placed = True
    if not made:
        return
    try:
        table = await disk.append(runner, table, [part for _, part in made])
    except CommandFailed as exc:
        if viewed is None:
            raise
        if gone := await anyio.to_thread.run_sync(unreadable, disk.device()):  # as a read would have found
            raise PoolGone(f"disk {disk.configured} ({disk.device()}) of {disk.owner} {gone}") from exc
        raise Busy(
            f"the partition table of disk {disk.configured} changed behind localdisk's back ({exc.message}); retry"
        ) from exc
    await disk.settle_parts(runner, table, [part for _, part in made])
    # Space freed by localdisk was zeroed when its volume was deleted, so only stale signatures can be left
    # here (from before the disk joined the pool). Erasing them is cheap and stops the node from mounting an
    # old filesystem instead of formatting; zeroing every new volume would double the write cost of each volume
    # on disks that cannot offload zeroing.
    wiped: list[tuple[Order, Partition]] = []
    for order, part in made:
        if order.abandoned:
            continue
        try:
            await wipe(runner, table, part)
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
    table = await disk.name_ready(runner, table, [part for _, part in wiped])
    for order, part in made:
        named = table.by_uuid(part.uuid)
        if order.done.is_set():
            continue
        if named is not None and is_ready(named):
            order.finish((table, named))
        else:
            order.finish()  # abandoned meanwhile
