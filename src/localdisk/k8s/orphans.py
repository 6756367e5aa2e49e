"""Volumes on a node's disks that no PersistentVolume points to: found, reported, and (opt-in) deleted.

They happen: a PVC deleted while CreateVolume was running leaves a volume whose PV is never made; a PV deleted by
hand with its finalizers stripped leaves its volume behind. They hold space the scheduler is told is used, so each
node looks for them: `find_orphans` is the pure comparison, `OrphanReporter` the periodic task on the node that
feeds it, publishes `localdisk_orphan_volumes{backend,pool}` and an Event on the Node for each orphan, and deletes
orphans older than `delete_after` only when that is set.

A volume is not called an orphan before `report_after` seconds, because every volume is PV-less for a moment between
CreateVolume and the provisioner's creation of the PV. The node's volumes are listed before the PVs, so a volume
created in between is not in the list at all, rather than listed without its brand-new PV. First-seen times live
in memory: after a restart the clock starts again, which only ever delays a deletion.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from kubernetes_asyncio import client
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from localdisk.errors import ConfigError, LocalDiskError
from localdisk.k8s import DRIVER_NAME
from localdisk.k8s.client import REQUEST_TIMEOUT, EventRecorder, connect, is_status
from localdisk.k8s.crd import GROUP, VERSION, VOLUMES, VolumeObject, node_selector
from localdisk.k8s.watch import TRANSIENT
from localdisk.manager import VolumeManager
from localdisk.model import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Orphan:
    volume: Volume
    first_seen: datetime

    def age(self, now: datetime) -> float:
        return (now - self.first_seen).total_seconds()


@dataclass(frozen=True)
class OrphanScan:
    orphans: tuple[Orphan, ...]
    first_seen: dict[str, datetime] = field(default_factory=dict)
    """Volume ID to first-seen time, for exactly the current orphans: pass it to the next scan."""


def find_orphans(
    volumes: Sequence[Volume],
    persistent_volumes: Iterable[Any],
    first_seen: Mapping[str, datetime],
    now: datetime,
    driver: str = DRIVER_NAME,
) -> OrphanScan:
    """The volumes that no PV of `driver` names, by volume handle or by name, with the time each was first seen.

    `volumes` comes from `VolumeManager.list_volumes()`, `persistent_volumes` from listing PVs (kubernetes-asyncio
    models); `first_seen` is the previous scan's `first_seen`. A volume that gained a PV is forgotten.
    """
    return find_unclaimed(volumes, pv_claims(persistent_volumes, driver), first_seen, now)


Claims = tuple[set[str], set[str]]
"""The volume IDs and the CSI names something in the cluster points to: a volume matching either is not an orphan."""


def pv_claims(persistent_volumes: Iterable[Any], driver: str = DRIVER_NAME) -> Claims:
    """What the PVs of `driver` point to (the per-node shape: PV handles are on-disk volume IDs)."""
    handles: set[str] = set()
    names: set[str] = set()
    for pv in persistent_volumes:
        names.add(pv.metadata.name)  # the provisioner names PV and volume alike; a match by name is never an orphan
        csi = pv.spec.csi if pv.spec is not None else None
        if csi is not None and csi.driver == driver:
            handles.add(csi.volume_handle)
    return handles, names


def find_unclaimed(
    volumes: Sequence[Volume], claims: Claims, first_seen: Mapping[str, datetime], now: datetime
) -> OrphanScan:
    handles, names = claims
    orphans = tuple(
        Orphan(v, first_seen.get(v.id, now)) for v in volumes if v.id not in handles and v.name not in names
    )
    return OrphanScan(orphans, {o.volume.id: o.first_seen for o in orphans})


@dataclass(frozen=True)
class OrphanSettings:
    node_name: str
    interval: float = 300.0
    report_after: float = 600.0
    delete_after: float | None = None
    """Seconds after which a reported orphan is deleted; None (the default) never deletes anything."""
    driver: str = DRIVER_NAME


ClaimSource = Callable[[], Awaitable[Claims]]


class OrphanReporter:
    """The node-side periodic task: scan, report, and delete what `OrphanSettings.delete_after` allows.

    What counts as pointing to a volume is `claims`: by default the PVs of the driver (the per-node shape); in the
    split shape, the LocalVolume objects of this node (`NodeAgent.claims`), so the node agent needs no PV rights."""

    def __init__(
        self,
        api: Any,
        manager: VolumeManager,
        settings: OrphanSettings,
        *,
        events: EventRecorder | None = None,
        registry: CollectorRegistry | None = REGISTRY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        claims: ClaimSource | None = None,
    ) -> None:
        if settings.delete_after is not None and settings.delete_after < settings.report_after:
            raise ConfigError("the orphan deletion grace period must not be shorter than the reporting delay")
        self.core: Any = client.CoreV1Api(api)
        self.manager = manager
        self.settings = settings
        self.events = events or EventRecorder(api, host=settings.node_name)
        self.clock = clock
        self.first_seen: dict[str, datetime] = {}
        self.claims: ClaimSource = claims or self._pv_claims
        self._reported: set[str] = set()
        self.gauge = Gauge(
            "localdisk_orphan_volumes",
            f"Volumes on this node without a PersistentVolume for more than {settings.report_after:.0f}s",
            ["backend", "pool"],
            registry=registry,
        )

    async def run(self) -> None:
        """Scan every `interval` seconds until cancelled; a failed scan is logged and tried again next time."""
        while True:
            try:
                await self.scan()
            except (*TRANSIENT, LocalDiskError) as exc:
                log.warning("orphan scan failed: %s", exc)
            await anyio.sleep(self.settings.interval)

    async def scan(self) -> list[Orphan]:
        """One scan; returns the orphans old enough to report."""
        now = self.clock()
        volumes = await self.manager.list_volumes()  # before the claims: see the module docstring
        result = find_unclaimed(volumes, await self.claims(), self.first_seen, now)
        self.first_seen = result.first_seen
        reportable = [o for o in result.orphans if o.age(now) >= self.settings.report_after]
        self._publish(reportable)
        for orphan in reportable:
            if orphan.volume.id not in self._reported:
                self._reported.add(orphan.volume.id)
                log.warning("orphan volume %s (%s) is claimed by nothing", orphan.volume.id, orphan.volume.name)
                await self._event(
                    "OrphanVolume",
                    f"volume {orphan.volume.id} ({orphan.volume.name}, {orphan.volume.size_bytes} bytes) has had no"
                    f" PersistentVolume or LocalVolume since {orphan.first_seen:%Y-%m-%d %H:%M:%S}Z"
                    + (
                        f"; it will be deleted after {self.settings.delete_after:.0f}s"
                        if self.settings.delete_after is not None
                        else "; delete it with the localdisk CLI if it is not needed"
                    ),
                )
        self._reported &= {o.volume.id for o in reportable}
        if self.settings.delete_after is not None:
            due = [o for o in reportable if o.age(now) >= self.settings.delete_after]
            if due:
                await self._delete(due)
        return reportable

    def _publish(self, reportable: list[Orphan]) -> None:
        counts = dict.fromkeys(self.manager.pools(), 0)
        for orphan in reportable:
            key = (orphan.volume.ref.backend, orphan.volume.ref.pool)
            counts[key] = counts.get(key, 0) + 1
        for (backend, pool), count in counts.items():
            self.gauge.labels(backend=backend, pool=pool).set(count)

    async def _delete(self, due: list[Orphan]) -> None:
        # Ask the API once more, right before deleting: the scan's list may be minutes old by now.
        still = find_unclaimed([o.volume for o in due], await self.claims(), {}, self.clock())
        for orphan in still.orphans:
            volume = orphan.volume
            if self.claims == self._pv_claims and await self._pv_named(volume.name):
                continue
            try:
                await self.manager.delete_volume(volume.id)
            except LocalDiskError as exc:
                log.warning("could not delete orphan volume %s: %s", volume.id, exc.message)
                await self._event("OrphanVolumeDeleteFailed", f"deleting orphan volume {volume.id} failed: {exc}")
                continue
            log.warning("deleted orphan volume %s (%s)", volume.id, volume.name)
            self.first_seen.pop(volume.id, None)
            self._reported.discard(volume.id)
            await self._event(
                "OrphanVolumeDeleted",
                f"deleted volume {volume.id} ({volume.name}): it had no PersistentVolume or LocalVolume for more than"
                f" {self.settings.delete_after:.0f}s",
            )

    async def _pv_claims(self) -> Claims:
        pvs = (await self.core.list_persistent_volume(_request_timeout=REQUEST_TIMEOUT)).items or []
        return pv_claims(pvs, self.settings.driver)

    async def _pv_named(self, name: str) -> bool:
        try:
            await self.core.read_persistent_volume(name, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            if is_status(exc, 404):
                return False
            raise
        return True

    async def _event(self, reason: str, message: str) -> None:
        # kubelet's convention, which `kubectl describe node` relies on: a Node's events carry its name as UID
        node = {"kind": "Node", "apiVersion": "v1", "name": self.settings.node_name, "uid": self.settings.node_name}
        await self.events.record(node, reason, message, warning=reason != "OrphanVolumeDeleted")


async def report_orphans(
    manager: VolumeManager,
    settings: OrphanSettings,
    kubeconfig: str | None = None,
    registry: CollectorRegistry | None = REGISTRY,
) -> None:
    """Run the reporter beside `localdisk serve` (in its task group, with its opened manager) until cancelled."""
    api = await connect(kubeconfig)
    async with api:
        await OrphanReporter(api, manager, settings, registry=registry).run()


def object_claims(api: Any, node: str) -> ClaimSource:
    """The split shape's claims: what this node's LocalVolume objects point to, listed fresh from the API server
    (never from a cache that may lag behind a create)."""
    custom: Any = client.CustomObjectsApi(api)

    async def claims() -> Claims:
        listed = await custom.list_cluster_custom_object(
            GROUP, VERSION, VOLUMES, label_selector=node_selector(node), _request_timeout=REQUEST_TIMEOUT
        )
        handles: set[str] = set()
        names: set[str] = set()
        for item in listed.get("items") or []:
            volume = VolumeObject.of(item)
            names.add(volume.csi_name)
            if volume.handle:
                handles.add(volume.handle)
        return handles, names

    return claims
