"""What the `lvm` and `thin` backends share: a volume's identity on disk (LV tags and names, see
`localdisk.backends.lvm`) and its lifecycle (`LvmBackend`: create, finish, delete, expand, look up, reclaim), with
hooks the two backends fill in for placement and room."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import replace

import anyio

from localdisk import crypt
from localdisk.backend import finish_despite_cancellation
from localdisk.backends.lvmcmd import LogicalVolume, Lvm, VgReport, check_name, check_tags
from localdisk.backends.lvmlayout import LAYOUT_PARAMETERS
from localdisk.backends.lvmview import PendingDrops, VgView, with_lv, with_tags, without_lv
from localdisk.errors import AlreadyExists, Busy, FailedPrecondition, InvalidArgument, NotFound, PoolGone, Unsupported
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
from localdisk.runner import CommandRunner
from localdisk.sizes import align_up

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


# -- the backends --------------------------------------------------------------------------------------------------
class LvmBackend:
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
        self._ready_tags = PendingDrops(lvm, vg, PENDING_TAG, busy=self._lock.locked)
        self._creating: Counter[str] = Counter()  # LVs of the creates running in this process
        self.view = VgView(lvm, vg, view_max_age)

    async def disks(self) -> tuple[str, ...]:
        """The VG's PVs, as its last report listed them (`UsesDisks`)."""
        return (await self.view.get()).pvs

    # hooks
    def _belongs(self, lv: LogicalVolume) -> bool:
        raise NotImplementedError

    async def _activate(self, report: VgReport) -> None:
        raise NotImplementedError

    def _check_room(self, report: VgReport, size: int) -> None:
        raise NotImplementedError

    async def capacity(self) -> Capacity:
        raise NotImplementedError

    def _check_create(self, report: VgReport, spec: VolumeSpec) -> None:
        """Refuse a create that does not fit (`InsufficientCapacity`) or cannot be made here (`InvalidArgument`)."""
        self._check_room(report, spec.size_bytes)

    def _rounded(self, spec: VolumeSpec) -> int:
        """The size LVM gives the volume `spec` asks for."""
        return align_up(spec.size_bytes, self.extent)

    async def _expanded(self, lv: LogicalVolume) -> None:
        """An expansion found `lv` at the size asked for already (a retry): finish what an earlier try left undone
        (under the pool's lock). Nothing to finish here."""

    async def _extend(self, report: VgReport, lv: LogicalVolume, size: int) -> int:
        """Grow `lv` to `size` bytes (under the pool's lock); its new size."""
        self._check_room(report, size - lv.size)
        await self.lvm.extend(self.vg, lv.name, size)
        grown = replace(lv, size=align_up(size, self.extent))
        self.view.apply(lambda r: with_lv(r, grown, takes_extents=self._takes_extents))
        return grown.size

    # StorageClass parameters (`TakesParameters`): layouts are the thick pool's; a thin pool takes none
    @property
    def parameters(self) -> frozenset[str]:
        return LAYOUT_PARAMETERS

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        if parameters:
            raise InvalidArgument(
                f"{self.kind} pool {self.pool!r} takes no layout parameters ({', '.join(sorted(parameters))}): a thin"
                " volume is laid out as its thin pool's data LV is (stripe or mirror the pool when you make it)"
            )

    async def capacity_for(self, parameters: Mapping[str, str]) -> Capacity:
        self.check_parameters(parameters)
        return await self.capacity()

    async def check_same(self, volume: Volume, parameters: Mapping[str, str]) -> None:
        """Nothing to compare: a thin volume has no layout of its own (any parameter is refused before)."""

    async def _create(self, report: VgReport, lv: str, spec: VolumeSpec) -> bool:
        """Create the LV for `spec`; True if it was created pending and needs `_grow` and `_zero`."""
        raise NotImplementedError

    async def _grow(self, lv: str, spec: VolumeSpec, current_size: int) -> None:
        """Finish a pending LV's size (under the pool's lock: it takes space)."""

    async def _zero(self, lv: str, encrypted: bool) -> None:
        """Finish a pending LV's content (outside the pool's lock: it takes time, not space)."""

    async def _before_ready(self, lv: str, spec: VolumeSpec) -> None:
        """The last step before a pending LV is handed out (attaching its cache); repeatable."""

    async def _recover(self) -> None:
        """At open, after activation: finish or undo what a crash left of a change to a finished volume."""

    def _abnormal(self, report: VgReport, lv: LogicalVolume) -> str | None:
        return None if lv.active else f"logical volume {self.vg}/{lv.name} is not active"

    def _degraded(self, report: VgReport, lv: LogicalVolume) -> str | None:
        """Why a volume that still serves needs care (a mirror short of a copy), or None."""
        return None

    # lifecycle
    async def open(self) -> None:
        try:
            report = await self.view.refresh()
        except (NotFound, PoolGone):
            raise FailedPrecondition(
                f"{self.kind} pool {self.pool!r}: volume group {self.vg!r} not found on this node;"
                f" create it or fix pools.{self.kind}.{self.pool}.volume_group"
            ) from None
        self.extent = report.vg.extent_size
        self.features = replace(self.features, alignment=self.extent, minimum_size=self.extent)
        await self._activate(report)
        self.view.invalidate()  # activation changed what the report said
        await self._recover()

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
            degraded=self._degraded(report, lv),
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
                self._check_create(report, spec)
                try:
                    pending = await self._create(report, lv_name, spec)
                except AlreadyExists:
                    # Made behind the view's back (a crashed attempt, someone else): decide on what LVM says now.
                    report = await self.view.refresh()
                    existing = report.lv(lv_name)
                    if existing is None:
                        raise
            if existing is None:
                size = self._rounded(spec)
            else:
                self._claim(existing, VOLUME, spec.name)
                if PENDING_TAG not in existing.tags:
                    return self._volume(report, existing)
                wanted = (spec.source.kind.value, spec.source_handle) if spec.source and spec.source_handle else None
                if source_of(existing.tags) != wanted:
                    raise AlreadyExists(f"volume {spec.name!r} is being created with another content source")
                pending, size = True, max(existing.size, self._rounded(spec))
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
            await self._before_ready(lv_name, spec)
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
            await self._remove(report, lv)

    async def _remove(self, report: VgReport, lv: LogicalVolume) -> None:
        with contextlib.suppress(NotFound):
            await self.lvm.remove(self.vg, lv.name)
        if lv.layout in ("", "linear") or not self._takes_extents:
            self.view.apply(lambda r: without_lv(r, lv.name, takes_extents=self._takes_extents))
        else:
            self.view.invalidate()  # a striped, mirrored or cached LV gave back more than its size, on several PVs

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
            await self._remove(report, lv)
            return True

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        async with self._writing() as report:
            lv = self._get(report, handle, VOLUME)
            volume = self._volume(report, lv)
            if size_bytes <= lv.size:
                await self._expanded(lv)
                return volume
            size = await self._extend(report, lv, size_bytes)
        return replace(volume, size_bytes=size)

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


# -- what both pools' configs check ---------------------------------------------------------------------------------
def lvm_name(value: str) -> str:
    """A config validator: `value` as an LVM name (VG, LV), or the reason it is not one as a ValueError."""
    try:
        return check_name(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def lvm_tags(value: tuple[str, ...]) -> tuple[str, ...]:
    """A config validator: `value` as LVM tags, or the reason they are not as a ValueError."""
    try:
        return tuple(check_tags(value))
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
