"""What an LVM pool knows between commands: the cached report of its VG (`VgView`), edited in memory by each of our
own changes until the next report confirms them, and the batching of the pending-tag drops that finish thick creates
(`PendingDrops`). Split out of `localdisk.backends.lvm`, whose docstring says when the view is read again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import anyio

from localdisk.backends.lvmcmd import LogicalVolume, Lvm, VgReport
from localdisk.errors import BackendFailure

VIEW_MAX_AGE = 30.0  # seconds a cached VG report is trusted for changes made outside localdisk


# -- finishing creates in bursts ---------------------------------------------------------------------------------------
@dataclass
class _Drop:
    lv: str
    done: bool = False
    error: Exception | None = None


class PendingDrops:
    """Drops the pending tag (`tag`) of finished LVs, many in one lvchange when creates come in a burst.

    A thick volume costs two metadata commits: the lvcreate and, once it is zeroed, dropping its pending tag. When
    creates queue on the pool's lock (`busy`), a finished LV's drop waits for them (at most `MAX_BATCH` drops or
    `MAX_WAIT` seconds), so the lvcreates run back to back and the drops of the burst go to LVM as one command.
    A single create does not wait. If the batch's lvchange fails, every create in it fails and is retried by its
    client; the retry finds its LV ready or still pending, and either way converges (see `create_volume`).
    """

    MAX_BATCH = 16
    MAX_WAIT = 5.0

    def __init__(self, lvm: Lvm, vg: str, tag: str, busy: Callable[[], bool]) -> None:
        self.lvm = lvm
        self.vg = vg
        self.tag = tag
        self.busy = busy
        self.batches = 0  # lvchange commands run, for tests and the benchmark
        self.running: set[str] = set()  # LVs whose tag the lvchange under way drops
        self._queue: list[_Drop] = []
        self._lock = anyio.Lock()

    async def drop(self, lv: str) -> None:
        entry = _Drop(lv)
        self._queue.append(entry)
        try:
            await self._drop(entry)
        finally:
            if entry in self._queue:  # cancelled before any batch took it: no later batch may touch the LV
                self._queue.remove(entry)

    async def _drop(self, entry: _Drop) -> None:
        with anyio.move_on_after(self.MAX_WAIT):
            # Polled: "creates are queued on the pool's lock" has no event to wait for.
            while self.busy() and len(self._queue) < self.MAX_BATCH and not entry.done:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        async with self._lock:
            if not entry.done:
                batch, self._queue = self._queue, []
                lvs = [e.lv for e in batch]
                self.running.update(lvs)
                try:
                    self.batches += 1
                    await self.lvm.drop_tag(self.vg, lvs, self.tag)
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else BackendFailure("interrupted; retry the request")
                    for other in batch:
                        other.done, other.error = True, other.error or error
                    raise
                finally:
                    self.running.difference_update(lvs)
                for other in batch:
                    other.done = True
        if entry.error is not None:
            raise entry.error


# -- the cached view of a VG ------------------------------------------------------------------------------------------
class VgView:
    """The last report of one VG, with our own changes applied to it in memory until the next report confirms them."""

    def __init__(self, lvm: Lvm, vg: str, max_age: float = VIEW_MAX_AGE) -> None:
        self.lvm = lvm
        self.vg = vg
        self.max_age = max_age
        self.report: VgReport | None = None
        self.read_at = 0.0
        self.unconfirmed = False  # holds changes applied in memory only
        self.reads = 0
        self._lock = anyio.Lock()
        self._during: list[Callable[[VgReport], VgReport]] | None = None  # changes applied while a report is read

    async def get(self) -> VgReport:
        if self.report is None or time.monotonic() - self.read_at > self.max_age:
            return await self.refresh()
        return self.report

    async def refresh(self) -> VgReport:
        asked = time.monotonic()
        async with self._lock:
            if self.report is not None and self.read_at >= asked:
                return self.report  # someone read it while we waited for the lock
            read_at = time.monotonic()
            # A change applied while the report is being read may be missing from it (LVM ran the report first):
            # the changes are applied again to the new report. Each is idempotent, so one already in it is a no-op.
            self._during = []
            try:
                report = await self.lvm.report(self.vg)
            finally:
                during, self._during = self._during, None
            for change in during:
                report = change(report)
            self.report, self.read_at, self.unconfirmed = report, read_at, bool(during)
            self.reads += 1
            return report

    def invalidate(self) -> None:
        self.report = None

    def apply(self, change: Callable[[VgReport], VgReport]) -> None:
        if self._during is not None:
            self._during.append(change)
        if self.report is not None:
            self.report = change(self.report)
            self.unconfirmed = True


def with_lv(report: VgReport, lv: LogicalVolume, *, takes_extents: bool) -> VgReport:
    """`report` after creating or resizing `lv` (a linear LV takes its size from the VG's free space)."""
    old = report.lv(lv.name)
    grown = lv.size - (old.size if old else 0)
    vg = replace(report.vg, free=report.vg.free - grown) if takes_extents else report.vg
    return replace(report, vg=vg, lvs={**report.lvs, lv.name: lv})


def without_lv(report: VgReport, name: str, *, takes_extents: bool) -> VgReport:
    old = report.lv(name)
    if old is None:
        return report
    vg = replace(report.vg, free=report.vg.free + old.size) if takes_extents else report.vg
    return replace(report, vg=vg, lvs={k: v for k, v in report.lvs.items() if k != name})


def with_tags(report: VgReport, name: str, *, add: Iterable[str] = (), delete: Iterable[str] = ()) -> VgReport:
    old = report.lv(name)
    if old is None:
        return report
    tags = (old.tags | frozenset(add)) - frozenset(delete)
    return replace(report, lvs={**report.lvs, name: replace(old, tags=tags)})


def new_lv(name: str, size: int, tags: Iterable[str], *, attr: str, pool: str = "", origin: str = "") -> LogicalVolume:
    """The LV a successful lvcreate made, as the next report will show it (bar its uuid, time and usage)."""
    return LogicalVolume(
        name=name,
        uuid="",
        size=size,
        tags=frozenset(tags),
        attr=attr,
        pool=pool,
        origin=origin,
        data_percent=0.0 if pool else None,
        metadata_percent=None,
        created_at=datetime.now(UTC),
        path="",
    )


LINEAR_ACTIVE = "-wi-a-----"
THIN_ACTIVE = "Vwi-a-tz--"
