"""The `lvm` and `thin` backends: one logical volume per CSI volume, in a configured VG or thin pool.

Everything localdisk knows about a volume is on the disk, in LV tags, so a restarted or reinstalled node finds its
volumes again and nothing is lost with a side database:

- `localdisk.csi.io/owned` marks an LV as ours. LVs without it are invisible: never listed, changed or removed, even
  when they sit in the same VG or thin pool, or carry a name that looks like ours.
- `localdisk.csi.io/kind=volume|snapshot`, `localdisk.csi.io/name.<i>=<base32>` (the CSI name, any Unicode, in
  chunks: LVM tags allow only [A-Za-z0-9_+.-/=!:&#]) and `localdisk.csi.io/source=<kind>:<lv>` (what a snapshot was
  taken of, what a volume was restored or cloned from).
- `localdisk.csi.io/encrypted` marks a volume that holds a LUKS2 container (`localdisk.crypt`): the node opens it
  with the passphrase of its node-stage secret, and deleting it is a crypto-erase. A thick encrypted LV is therefore
  not zeroed in full when created (only its signature areas are): nothing but ciphertext under a new key is seen
  through its mapping. Clones, restores and snapshots of an encrypted thin volume inherit the tag, and deleting
  them is a crypto-erase too: a snapshot is marked pending (no longer found, so nothing is restored from a
  half-erased one), activated, erased and removed. A thin LV's header area is discarded rather than zeroed (see
  `localdisk.crypt.erase`): its blocks may be shared with the origin, which copy-on-write keeps as they are.
- `localdisk.csi.io/pending` marks a volume that exists but is not ready to hand out (a thick LV not yet zeroed, a
  restored volume not yet grown to its size). Pending volumes are not found by name, so a retried CreateVolume
  finishes them instead of returning them half made. A create cancelled half-way removes its own; what a crash
  leaves, the server removes once it has been pending for the grace period (`VolumeManager.reclaim_pending`).

The LV name is derived from the CSI name (`ldv-` or `lds-` and 32 hex digits of its SHA-256), so any CSI name works,
none reaches a command line, and a lookup by name is one report. The volume ID is `lvm:<pool>:<lv>` or
`thin:<pool>:<lv>`.

A new thick LV would show whatever the disk held before (`lvcreate -Z y` clears only its first 4 KiB), so it is
zeroed in full (BLKZEROOUT, as `blkdiscard -z` does, made in-process by `localdisk.blockdev`: WRITE ZEROES where
the device offers it, written zeros otherwise) before it is handed out, under the pending tag, outside the pool's
lock. Its cost is the device's; on a disk without WRITE ZEROES it is a full write of the volume. Thin volumes need
no wipe: unprovisioned blocks read as zeros and a pool with zeroing on (checked at open) zeroes each block it
provisions.

Reads come from a cached view of the VG (`VgView`), so GetCapacity, ListVolumes and lookups run no LVM command at all.
The view is one `lvm fullreport`; after each of our own changes it is updated in memory with what the change did,
and the report is read again once the writers queued on the pool's lock have all gone (one read per burst of
creates, not one per create), after any failed change, and in the background every half `VIEW_MAX_AGE` (the
server's `VolumeManager.keep_fresh`; changes made by someone else, an administrator's lvcreate, show up within that
time), so a read never waits for a re-read unless the view is older than `VIEW_MAX_AGE`. Writes are serialized per
pool by that lock, which is where concurrent creates queue: LVM would serialize them on its VG lock anyway.
GetVolume and GetSnapshot always read LVM (their health must be current). The server's pools cache for
`view_max_age_seconds` (30 s by default); a backend constructed directly (tests, tools) reads LVM on every call
unless given `view_max_age`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated

import anyio
from pydantic import Field, field_validator

from localdisk import crypt
from localdisk.backend import VolumeBackend, finish_despite_cancellation
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, VgReport, check_name
from localdisk.backends.lvmsetup import ThinRulesConfig, VgRulesConfig, with_rules
from localdisk.backends.lvmshell import ShellExecutor
from localdisk.blockdev import erase_signatures, zero_out
from localdisk.errors import (
    AlreadyExists,
    BackendFailure,
    Busy,
    FailedPrecondition,
    InsufficientCapacity,
    InvalidArgument,
    NotFound,
    Unsupported,
)
from localdisk.model import (
    Capacity,
    ContentSource,
    Features,
    ObjectRef,
    PendingVolume,
    Snapshot,
    SourceKind,
    Volume,
    VolumeSpec,
)
from localdisk.registry import BackendSpec, PoolConfig
from localdisk.runner import CommandRunner
from localdisk.sizes import align_up, human

TAG_ROOT = "localdisk.csi.io/"
OWNER_TAG = TAG_ROOT + "owned"
PENDING_TAG = TAG_ROOT + "pending"
KIND_TAG = TAG_ROOT + "kind="
NAME_TAG = TAG_ROOT + "name."
SOURCE_TAG = TAG_ROOT + "source="
ENCRYPTED_TAG = TAG_ROOT + "encrypted"
VOLUME, SNAPSHOT = "volume", "snapshot"
PREFIXES = {VOLUME: "ldv-", SNAPSHOT: "lds-"}
HANDLE = re.compile(r"ld[vs]-[0-9a-f]{32}")
NAME_CHUNK = 512  # characters of base32 per tag; LVM allows 1024 per tag
MAX_NAME_BYTES = 1024
VIEW_MAX_AGE = 30.0  # seconds a cached VG report is trusted for changes made outside localdisk
SHELL_ENV = "LOCALDISK_LVM_SHELL"  # "0": one lvm process per command instead of the persistent shell


# -- identity on disk (pure) ------------------------------------------------------------------------------------------
def lv_name_for(kind: str, name: str) -> str:
    """The LV name of the volume or snapshot with CSI name `name`: safe for LVM whatever the name holds."""
    return PREFIXES[kind] + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def name_tags(name: str) -> list[str]:
    raw = name.encode("utf-8", "surrogatepass")
    if not raw or len(raw) > MAX_NAME_BYTES:
        raise InvalidArgument(f"names must be 1 to {MAX_NAME_BYTES} bytes of UTF-8; this one has {len(raw)}")
    encoded = base64.b32encode(raw).decode("ascii").rstrip("=")
    chunks = [encoded[i : i + NAME_CHUNK] for i in range(0, len(encoded), NAME_CHUNK)]
    return [f"{NAME_TAG}{index}={chunk}" for index, chunk in enumerate(chunks)]


def decode_name(tags: Iterable[str]) -> str | None:
    """The CSI name held by `name_tags`, or None if the tags do not hold a readable one."""
    chunks: dict[int, str] = {}
    for tag in tags:
        if tag.startswith(NAME_TAG):
            index, sep, chunk = tag[len(NAME_TAG) :].partition("=")
            if sep and index.isdigit():
                chunks[int(index)] = chunk
    if not chunks or sorted(chunks) != list(range(len(chunks))):
        return None
    encoded = "".join(chunks[i] for i in range(len(chunks)))
    try:
        return base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode("utf-8", "surrogatepass")
    except ValueError:
        return None


def identity_tags(kind: str, name: str, source: tuple[str, str] | None = None, *, encrypted: bool = False) -> list[str]:
    tags = [OWNER_TAG, KIND_TAG + kind, *name_tags(name)]
    if source is not None:
        tags.append(f"{SOURCE_TAG}{source[0]}:{source[1]}")
    if encrypted:
        tags.append(ENCRYPTED_TAG)
    return tags


def tag_value(tags: Iterable[str], prefix: str) -> str | None:
    return next((tag[len(prefix) :] for tag in tags if tag.startswith(prefix)), None)


def source_of(tags: Iterable[str]) -> tuple[str, str] | None:
    """(`volume` or `snapshot`, LV name) from a source tag, or None."""
    value = tag_value(tags, SOURCE_TAG)
    if value is None:
        return None
    kind, _, lv = value.partition(":")
    return (kind, lv) if kind in PREFIXES and HANDLE.fullmatch(lv) else None


# -- thin pool arithmetic (pure) --------------------------------------------------------------------------------------
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


# -- finishing creates in bursts ---------------------------------------------------------------------------------------
@dataclass
class _Drop:
    lv: str
    done: bool = False
    error: Exception | None = None


class PendingDrops:
    """Drops the pending tag of finished LVs, many in one lvchange when creates come in a burst.

    A thick volume costs two metadata commits: the lvcreate and, once it is zeroed, dropping its pending tag. When
    creates queue on the pool's lock (`busy`), a finished LV's drop waits for them (at most `MAX_BATCH` drops or
    `MAX_WAIT` seconds), so the lvcreates run back to back and the drops of the burst go to LVM as one command.
    A single create does not wait. If the batch's lvchange fails, every create in it fails and is retried by its
    client; the retry finds its LV ready or still pending, and either way converges (see `create_volume`).
    """

    MAX_BATCH = 16
    MAX_WAIT = 5.0

    def __init__(self, lvm: Lvm, vg: str, busy: Callable[[], bool]) -> None:
        self.lvm = lvm
        self.vg = vg
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
                    await self.lvm.drop_tag(self.vg, lvs, PENDING_TAG)
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


# -- configuration ---------------------------------------------------------------------------------------------------
def _lvm_name(value: str) -> str:
    try:
        return check_name(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


class LinearPoolConfig(VgRulesConfig):
    volume_group: str
    """The VG whose free extents become volumes."""
    spare_bytes: Annotated[int, Field(ge=0)] = 0
    """Free space in the VG that volumes never take (for snapshots an administrator takes by hand, say)."""
    view_max_age_seconds: Annotated[float, Field(ge=0)] = VIEW_MAX_AGE
    """How long GetCapacity and ListVolumes may answer from the cached VG report (0: read LVM on every call)."""

    _check_vg = field_validator("volume_group")(_lvm_name)


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

    _check_names = field_validator("volume_group", "thin_pool")(_lvm_name)


# -- the backends --------------------------------------------------------------------------------------------------
class _LvmBackend:
    """What both backends share: identity, lookups, deletion, activation; subclasses decide placement and room."""

    kind: str
    _takes_extents = False  # whether a volume's size comes out of the VG's free extents (linear) or a pool (thin)
    _discard_header = False  # erase a LUKS header area by discarding it (thin) rather than zeroing it (thick)

    def __init__(
        self, pool: str, vg: str, lvm: Lvm, runner: CommandRunner, features: Features, view_max_age: float
    ) -> None:
        self.pool = pool
        self.vg = vg
        self.lvm = lvm
        self.runner = runner
        self.features = features
        self.extent = features.alignment  # replaced by the VG's extent size at open()
        self._lock = anyio.Lock()  # check-then-change on this pool's space happens one at a time
        self._ready_tags = PendingDrops(lvm, vg, busy=self._lock.locked)
        self._creating: Counter[str] = Counter()  # LVs of the creates running in this process
        self.view = VgView(lvm, vg, view_max_age)

    # hooks
    def _belongs(self, lv: LogicalVolume) -> bool:
        raise NotImplementedError

    async def _activate(self, report: VgReport) -> None:
        raise NotImplementedError

    def _check_room(self, report: VgReport, size: int) -> None:
        raise NotImplementedError

    async def _create(self, report: VgReport, lv: str, spec: VolumeSpec) -> bool:
        """Create the LV for `spec`; True if it was created pending and needs `_grow` and `_zero`."""
        raise NotImplementedError

    async def _grow(self, lv: str, spec: VolumeSpec, current_size: int) -> None:
        """Finish a pending LV's size (under the pool's lock: it takes space)."""

    async def _zero(self, lv: str, encrypted: bool) -> None:
        """Finish a pending LV's content (outside the pool's lock: it takes time, not space)."""

    def _abnormal(self, report: VgReport, lv: LogicalVolume) -> str | None:
        return None if lv.active else f"logical volume {self.vg}/{lv.name} is not active"

    # lifecycle
    async def open(self) -> None:
        try:
            report = await self.view.refresh()
        except NotFound:
            raise FailedPrecondition(
                f"{self.kind} pool {self.pool!r}: volume group {self.vg!r} not found on this node;"
                f" create it or fix pools.{self.kind}.{self.pool}.volume_group"
            ) from None
        self.extent = report.vg.extent_size
        self.features = replace(self.features, alignment=self.extent, minimum_size=self.extent)
        await self._activate(report)
        self.view.invalidate()  # activation changed what the report said

    async def aclose(self) -> None:
        await self.lvm.aclose()

    @property
    def refresh_interval(self) -> float:
        """Half the view's age limit: re-read in the background well before a read would have to wait for it."""
        return self.view.max_age / 2

    async def refresh_state(self) -> None:
        if time.monotonic() - self.view.read_at >= self.refresh_interval or self.view.report is None:
            await self.view.refresh()

    # reading
    async def _report(self) -> VgReport:
        return await self.view.get()

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[VgReport]:
        """The pool's write lock and the view to decide on; the view is re-read once no other writer is queued."""
        async with self._lock:
            try:
                yield await self._report()
            except BaseException:
                self.view.invalidate()  # a failed or interrupted change leaves the VG in a state we did not see
                raise
            if self.view.unconfirmed and self.view.max_age > 0 and self._lock.statistics().tasks_waiting == 0:
                try:
                    await self.view.refresh()
                except Exception:
                    self.view.invalidate()  # the change itself succeeded; the next read tries again

    def _ours(self, lv: LogicalVolume | None, kind: str) -> bool:
        return (
            lv is not None
            and OWNER_TAG in lv.tags
            and tag_value(lv.tags, KIND_TAG) == kind
            and lv.name.startswith(PREFIXES[kind])
            and self._belongs(lv)
        )

    def _ready(self, lv: LogicalVolume | None, kind: str) -> bool:
        return lv is not None and self._ours(lv, kind) and PENDING_TAG not in lv.tags

    def _ref(self, lv_name: str) -> ObjectRef:
        return ObjectRef(self.kind, self.pool, lv_name)

    def _volume(self, report: VgReport, lv: LogicalVolume) -> Volume:
        source = source_of(lv.tags)
        return Volume(
            ref=self._ref(lv.name),
            name=decode_name(lv.tags) or "",
            size_bytes=lv.size,
            source=ContentSource(SourceKind(source[0]), str(self._ref(source[1]))) if source else None,
            device_path=f"/dev/{self.vg}/{lv.name}",
            abnormal=self._abnormal(report, lv),
            encrypted=ENCRYPTED_TAG in lv.tags,
        )

    def _claim(self, lv: LogicalVolume, kind: str, name: str) -> None:
        """Refuse to reuse an existing LV that is not our object of that name."""
        if not self._ours(lv, kind):
            raise AlreadyExists(
                f"LV {self.vg}/{lv.name} exists but is not a localdisk {kind} of {self.kind} pool {self.pool!r};"
                " localdisk will not touch it"
            )
        if decode_name(lv.tags) != name:
            raise AlreadyExists(f"LV {self.vg}/{lv.name} holds another {kind} (a name hash collision)")

    # volumes
    async def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create (or finish, or return) the volume; a create cancelled half-way (the client's deadline) removes
        the pending LV it leaves before its cancellation goes on, so only a crash leaves one for the background."""
        lv_name = lv_name_for(VOLUME, spec.name)
        name_tags(spec.name)  # refuse an unstorable name before touching anything
        self._creating[lv_name] += 1
        try:
            return await self._create_volume(spec, lv_name)
        except anyio.get_cancelled_exc_class():
            what = f"removing the pending LV {self.vg}/{lv_name} of cancelled create {spec.name!r}"
            await finish_despite_cancellation(lambda: self._remove_pending(lv_name), what)
            raise
        finally:
            self._creating[lv_name] -= 1
            if not self._creating[lv_name]:
                del self._creating[lv_name]

    async def _create_volume(self, spec: VolumeSpec, lv_name: str) -> Volume:
        async with self._writing() as report:
            existing = report.lv(lv_name)
            if existing is None:
                self._check_room(report, spec.size_bytes)
                try:
                    pending = await self._create(report, lv_name, spec)
                except AlreadyExists:
                    # Made behind the view's back (a crashed attempt, someone else): decide on what LVM says now.
                    report = await self.view.refresh()
                    existing = report.lv(lv_name)
                    if existing is None:
                        raise
            if existing is None:
                size = align_up(spec.size_bytes, self.extent)
            else:
                self._claim(existing, VOLUME, spec.name)
                if PENDING_TAG not in existing.tags:
                    return self._volume(report, existing)
                wanted = (spec.source.kind.value, spec.source_handle) if spec.source and spec.source_handle else None
                if source_of(existing.tags) != wanted:
                    raise AlreadyExists(f"volume {spec.name!r} is being created with another content source")
                pending, size = True, max(existing.size, align_up(spec.size_bytes, self.extent))
            made = report.lv(lv_name) if existing is None and self.view.report is not None else existing
            encrypted = ENCRYPTED_TAG in made.tags if made is not None else spec.encrypted
            if pending:
                await self._grow(lv_name, spec, existing.size if existing else 0)
        if pending:
            # Zeroing runs outside the pool's lock, so the next create's lvcreate overlaps with it. Nothing else
            # can touch this LV meanwhile: it is pending (never found by name, never handed out), a second create
            # of the same name is refused by the manager's per-name guard, and a delete by its ID fails as busy
            # while the zeroing holds the device open exclusively. Each step can be repeated, so a crash anywhere
            # here leaves a pending LV that the retried create finishes.
            await self._zero(lv_name, encrypted)
            await self._ready_tags.drop(lv_name)
            self.view.apply(lambda r: with_tags(r, lv_name, delete=[PENDING_TAG]))
        source = (spec.source.kind.value, spec.source_handle) if spec.source and spec.source_handle else None
        return Volume(
            ref=self._ref(lv_name),
            name=spec.name,
            size_bytes=size,
            source=ContentSource(SourceKind(source[0]), str(self._ref(source[1]))) if source else None,
            device_path=f"/dev/{self.vg}/{lv_name}",
            encrypted=encrypted,
        )

    async def delete_volume(self, handle: str) -> None:
        if not handle.startswith(PREFIXES[VOLUME]) or not HANDLE.fullmatch(handle):
            return
        async with self._writing() as report:
            lv = report.lv(handle)
            if lv is None or not self._ours(lv, VOLUME):
                return  # gone already, or not ours to remove
            if ENCRYPTED_TAG in lv.tags and lv.active:  # Busy while the node has it open
                await crypt.erase(self.runner, f"/dev/{self.vg}/{handle}", discard=self._discard_header)
            with contextlib.suppress(NotFound):
                await self.lvm.remove(self.vg, handle)
            self.view.apply(lambda r: without_lv(r, handle, takes_extents=self._takes_extents))

    # pending leftovers
    async def pending_volumes(self) -> list[PendingVolume]:
        report = await self._report()
        return [
            PendingVolume(self._ref(lv.name), decode_name(lv.tags), lv.size)
            for lv in report.lvs.values()
            if self._ours(lv, VOLUME) and PENDING_TAG in lv.tags
        ]

    async def reclaim_pending(self, handle: str) -> bool:
        """Remove pending LV `handle` as a delete does (an lvremove, after a crypto-erase if it is encrypted),
        unless a create of it runs in this process (`Busy`)."""
        if not handle.startswith(PREFIXES[VOLUME]) or not HANDLE.fullmatch(handle):
            return False
        if handle in self._creating:
            raise Busy(f"pending volume {self.vg}/{handle} is being created; not reclaimed")
        return await self._remove_pending(handle)

    async def _remove_pending(self, lv_name: str) -> bool:
        """Remove our LV `lv_name` if it is still pending on a fresh report; True if it was removed.

        Not while a batch of `PendingDrops` drops its tag (its create finished it); a cancelled create's entry
        leaves the queue when it is cancelled, so no later batch names a removed LV.
        """
        async with self._writing():
            report = await self.view.refresh()
            lv = report.lv(lv_name)
            if not self._ours(lv, VOLUME) or lv is None or PENDING_TAG not in lv.tags:
                return False
            if lv_name in self._ready_tags.running:
                return False
            if ENCRYPTED_TAG in lv.tags and lv.active:  # as `delete_volume` does
                await crypt.erase(self.runner, f"/dev/{self.vg}/{lv_name}", discard=self._discard_header)
            with contextlib.suppress(NotFound):
                await self.lvm.remove(self.vg, lv_name)
            self.view.apply(lambda r: without_lv(r, lv_name, takes_extents=self._takes_extents))
            return True

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        async with self._writing() as report:
            lv = self._get(report, handle, VOLUME)
            volume = self._volume(report, lv)
            if size_bytes <= lv.size:
                return volume
            self._check_room(report, size_bytes - lv.size)
            await self.lvm.extend(self.vg, handle, size_bytes)
            grown = replace(lv, size=align_up(size_bytes, self.extent))
            self.view.apply(lambda r: with_lv(r, grown, takes_extents=self._takes_extents))
        return replace(volume, size_bytes=align_up(size_bytes, self.extent))

    def _get(self, report: VgReport, handle: str, kind: str) -> LogicalVolume:
        lv = report.lv(handle) if HANDLE.fullmatch(handle) else None
        if lv is None or not self._ready(lv, kind):
            raise NotFound(f"{kind} {handle!r} not found in {self.kind} pool {self.pool!r}")
        return lv

    async def get_volume(self, handle: str) -> Volume:
        report = await self.view.refresh()  # its health (active, pool full) as it is now, not as cached
        return self._volume(report, self._get(report, handle, VOLUME))

    async def find_volume(self, name: str) -> Volume | None:
        report = await self._report()
        lv = report.lv(lv_name_for(VOLUME, name))
        if lv is None or not self._ready(lv, VOLUME) or decode_name(lv.tags) != name:
            return None
        return self._volume(report, lv)

    async def list_volumes(self) -> list[Volume]:
        report = await self._report()
        return [self._volume(report, lv) for lv in report.lvs.values() if self._ready(lv, VOLUME)]

    # snapshots: the linear backend has none (features.snapshots is False, so the core refuses before calling)
    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        raise Unsupported(f"backend {self.kind!r} does not support snapshots; use a thin pool")

    async def delete_snapshot(self, handle: str) -> None:
        raise Unsupported(f"backend {self.kind!r} does not support snapshots")

    async def get_snapshot(self, handle: str) -> Snapshot:
        raise NotFound(f"snapshot {handle!r} not found: backend {self.kind!r} has no snapshots")

    async def find_snapshot(self, name: str) -> Snapshot | None:
        return None

    async def list_snapshots(self) -> list[Snapshot]:
        return []


class LinearBackend(_LvmBackend):
    """Thick (linear) LVs in one volume group: fixed space per volume, zeroed before first use."""

    kind = "lvm"
    _takes_extents = True

    def __init__(
        self, pool: str, config: LinearPoolConfig, lvm: Lvm, runner: CommandRunner, *, view_max_age: float = 0.0
    ) -> None:
        features = Features(snapshots=False, clones=False)
        super().__init__(pool, config.volume_group, lvm, runner, features, view_max_age)
        self.config = config

    def _belongs(self, lv: LogicalVolume) -> bool:
        return not lv.pool and not lv.is_thin and not lv.is_thin_pool and not lv.hidden

    async def _activate(self, report: VgReport) -> None:
        if any(self._ours(lv, VOLUME) and not lv.active for lv in report.lvs.values()):
            await self.lvm.activate_vg(self.vg)

    def _free(self, report: VgReport) -> int:
        return max(report.vg.free - self.config.spare_bytes, 0) // self.extent * self.extent

    def _check_room(self, report: VgReport, size: int) -> None:
        free = self._free(report)
        if align_up(size, self.extent) > free:
            raise InsufficientCapacity(
                f"volume group {self.vg} has {human(free)} free for volumes"
                + (f" ({human(self.config.spare_bytes)} kept spare)" if self.config.spare_bytes else "")
                + f"; {human(size)} requested"
            )

    async def _create(self, report: VgReport, lv: str, spec: VolumeSpec) -> bool:
        # The tags go into the same lvcreate: a crash can then never leave an LV of ours without them (it would
        # hold space nobody can see or delete). The pending tag keeps it from being handed out before it is zeroed.
        # No wipe here: `_finish` zeroes all of it, and LVM's wipe would only repeat the first 4 KiB of that.
        tags = [*identity_tags(VOLUME, spec.name, encrypted=spec.encrypted), PENDING_TAG]
        await self.lvm.create_linear(self.vg, lv, spec.size_bytes, tags, wipe=False)
        made = new_lv(lv, align_up(spec.size_bytes, self.extent), tags, attr=LINEAR_ACTIVE)
        self.view.apply(lambda r: with_lv(r, made, takes_extents=True))
        return True

    async def _zero(self, lv: str, encrypted: bool) -> None:
        # An encrypted volume is seen only through its mapping: under a fresh volume key, old extents read as noise,
        # so only the signature areas are cleared (the node formats only a device without any signature).
        wipe = erase_signatures if encrypted else zero_out
        try:
            await wipe(f"/dev/{self.vg}/{lv}", self.runner.observers)
        except NotFound:
            self.view.invalidate()
            raise Busy(f"volume {self.vg}/{lv} was deleted while it was being created; retry") from None

    async def capacity(self) -> Capacity:
        report = await self._report()
        free = self._free(report)
        details = {"vg_size": report.vg.size, "vg_free": report.vg.free, "spare_bytes": self.config.spare_bytes}
        return Capacity(report.vg.size, free, free, details | {"extent_size": report.vg.extent_size})


class ThinBackend(_LvmBackend):
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


_SHARED: weakref.WeakKeyDictionary[CommandRunner, Lvm] = weakref.WeakKeyDictionary()


DEVICES_FILE = "localdisk.devices"  # LVM devices file of the served VGs' PVs: commands scan nothing else


def shared_lvm(runner: CommandRunner) -> Lvm:
    """One `Lvm` (one lvm shell) for every pool served with this runner; processes if LOCALDISK_LVM_SHELL=0."""
    lvm = _SHARED.get(runner)
    if lvm is None:
        use_shell = os.environ.get(SHELL_ENV, "1") != "0"
        lvm = Lvm(runner, executor=ShellExecutor(runner) if use_shell else None, devices_file=DEVICES_FILE)
        _SHARED[runner] = lvm
    return lvm


def _linear(pool: str, config: PoolConfig, runner: CommandRunner) -> VolumeBackend:
    assert isinstance(config, LinearPoolConfig)
    backend = LinearBackend(pool, config, shared_lvm(runner), runner, view_max_age=config.view_max_age_seconds)
    return with_rules(backend, config, runner)  # a pool with `match` finds (and may make) its VG: `lvmsetup`


def _thin(pool: str, config: PoolConfig, runner: CommandRunner) -> VolumeBackend:
    assert isinstance(config, ThinPoolConfig)
    backend = ThinBackend(pool, config, shared_lvm(runner), runner, view_max_age=config.view_max_age_seconds)
    return with_rules(backend, config, runner, thin_pool=config.thin_pool)


LINEAR_BACKEND = BackendSpec("lvm", LinearPoolConfig, _linear, "linear LVs in a volume group, zeroed before use")
THIN_BACKEND = BackendSpec("thin", ThinPoolConfig, _thin, "thin LVs in a zeroing thin pool, with snapshots and clones")
