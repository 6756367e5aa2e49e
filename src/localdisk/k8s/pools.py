"""Pool state as Events on the node's Node object: `kubectl describe node` says which pool is down and why.

`localdisk serve` keeps a pool that cannot open as unavailable (`localdisk.availability`) and retries it. In a
cluster this reporter turns each change of a pool's state into an Event on the Node: `PoolUnavailable` (Warning,
with the reason) when a pool goes down or its reason changes, `PoolAvailable` when it comes back; and for volumes
that still serve but need care (a mirror that lost a copy: `Volume.degraded`), `VolumeDegraded` (Warning, naming the
volume, why and what mends it) when one becomes degraded or its reason changes, `VolumeRecovered` once it is whole.
"""

from __future__ import annotations

import logging
from typing import Protocol

import anyio

from localdisk.availability import PoolState
from localdisk.errors import LocalDiskError
from localdisk.k8s.client import EventRecorder, connect
from localdisk.manager import VolumeManager

log = logging.getLogger(__name__)
INTERVAL = 5.0  # seconds between looks at the pools' states


class Recorder(Protocol):
    async def record(self, involved: dict[str, str], reason: str, message: str, *, warning: bool = False) -> None: ...


class PoolEvents:
    def __init__(self, manager: VolumeManager, node_name: str, recorder: Recorder) -> None:
        self.manager = manager
        self.node_name = node_name
        self.recorder = recorder
        self._seen: dict[tuple[str, str], PoolState] = {}
        self._degraded: dict[str, str] = {}  # volume ID -> why it was degraded at the last look

    async def tick(self) -> None:
        """Record an Event for every pool whose state changed since the last tick (a pool first seen down too)."""
        for (backend, pool), state in self.manager.pool_states().items():
            before = self._seen.get((backend, pool))
            self._seen[(backend, pool)] = state
            if before is None and state.up:
                continue
            if before is not None and before.up == state.up and before.reason == state.reason:
                continue
            if state.up:
                await self._event("PoolAvailable", f"{backend} pool {pool!r} is available again", warning=False)
            else:
                await self._event("PoolUnavailable", f"{backend} pool {pool!r} is unavailable: {state.reason}")
        await self._volume_health()

    async def _volume_health(self) -> None:
        """An Event for every volume that became degraded (or whose reason changed) or whole again since the last
        look. A volume that is no longer listed (deleted, or its pool down) is forgotten without one."""
        try:
            volumes = await self.manager.list_volumes()  # the pools' cached views: no process while they are fresh
        except LocalDiskError as exc:
            log.warning("looking at the volumes' health failed: %s", exc)
            return
        degraded = {v.id: v.degraded for v in volumes if v.degraded}
        for volume in volumes:
            why, called = degraded.get(volume.id), f"volume {volume.name or volume.id} ({volume.id})"
            if why is not None and self._degraded.get(volume.id) != why:
                await self._event("VolumeDegraded", f"{called} is degraded: {why}")
            elif why is None and volume.id in self._degraded:
                await self._event("VolumeRecovered", f"{called} is whole again", warning=False)
        self._degraded = degraded

    async def _event(self, reason: str, message: str, *, warning: bool = True) -> None:
        # kubelet's convention, which `kubectl describe node` relies on: a Node's events carry its name as UID
        node = {"kind": "Node", "apiVersion": "v1", "name": self.node_name, "uid": self.node_name}
        await self.recorder.record(node, reason, message, warning=warning)

    async def run(self, interval: float = INTERVAL) -> None:
        while True:
            await self.tick()
            await anyio.sleep(interval)


async def report_pool_states(manager: VolumeManager, node_name: str, kubeconfig: str | None = None) -> None:
    """Run beside `localdisk serve` (in its task group, with its opened manager) until cancelled."""
    api = await connect(kubeconfig)
    async with api:
        await PoolEvents(manager, node_name, EventRecorder(api, host=node_name)).run()
