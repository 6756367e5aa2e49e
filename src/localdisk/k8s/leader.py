"""Leader election on a coordination.k8s.io/v1 Lease, so that of several controller replicas exactly one acts.

The algorithm is client-go's: a candidate takes the Lease when it is free or when its holder has not renewed it for
`lease_duration` seconds, measured on the candidate's own monotonic clock from the moment it last saw the Lease
change (so clock skew between nodes does not matter); every write carries the resourceVersion it was based on, so
of two candidates racing for it one gets 409 Conflict. The leader renews every `retry_period` and stops its work as
soon as it has failed to renew for `renew_deadline` (shorter than `lease_duration`), i.e. before anyone else may
take over. On a clean shutdown it releases the Lease so the next replica need not wait out the lease.

kubernetes-asyncio has a `leaderelection` module; it is not used because it does not release on shutdown, leaves
the work running as an unawaited task, and writes local wall-clock times without a zone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from kubernetes_asyncio import client

from localdisk.errors import ConfigError
from localdisk.k8s.client import REQUEST_TIMEOUT, micro_time
from localdisk.k8s.watch import TRANSIENT

log = logging.getLogger(__name__)


class LeadershipLost(Exception):
    """The Lease could not be renewed in time (or was taken over); the work was stopped."""


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ConfigError("leader election needs 0 < retry period < renew deadline < lease duration")


class LeaderElector:
    def __init__(self, api: Any, settings: LeaseSettings) -> None:
        self.coordination: Any = client.CoordinationV1Api(api)
        self.settings = settings
        self.is_leader = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Wait to become leader, then run `work` while the Lease is held.

        Returns when `work` returns; raises `LeadershipLost` (after cancelling `work`) when the Lease slips away.
        The Lease is released on the way out in every case, cancellation included.
        """
        s = self.settings
        while True:
            with anyio.move_on_after(s.renew_deadline):
                if await self._try_acquire_or_renew():
                    break
            await anyio.sleep(s.retry_period)
        log.info("%s became the leader (lease %s/%s)", s.identity, s.namespace, s.name)
        self.is_leader = True
        lost = False
        try:
            async with anyio.create_task_group() as group:

                async def keep_lease() -> None:
                    nonlocal lost
                    await self._renew_until_lost()
                    lost = True
                    group.cancel_scope.cancel()

                group.start_soon(keep_lease)
                await work()
                group.cancel_scope.cancel()
        finally:
            self.is_leader = False
            if not lost:
                with anyio.CancelScope(shield=True), anyio.move_on_after(s.retry_period * 2):
                    await self._release()
        if lost:
            raise LeadershipLost(f"{s.identity} could not renew lease {s.namespace}/{s.name} in time; stopped")

    async def _renew_until_lost(self) -> None:
        s = self.settings
        last_renewal = time.monotonic()
        while True:
            await anyio.sleep(s.retry_period)
            renewed = False
            # A renewal that hangs must not outlive the deadline: past it, this replica may no longer act.
            with anyio.move_on_after(max(0.0, last_renewal + s.renew_deadline - time.monotonic())):
                renewed = await self._try_acquire_or_renew()
            if renewed:
                last_renewal = time.monotonic()
            elif self._observed is not None and self._observed[0] not in ("", s.identity):
                log.error("lease %s/%s was taken over by %s", s.namespace, s.name, self._observed[0])
                return
            elif time.monotonic() - last_renewal >= s.renew_deadline:
                log.error("could not renew lease %s/%s for %.0fs", s.namespace, s.name, s.renew_deadline)
                return

    async def _try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        s = self.settings
        try:
            lease = await self.coordination.read_namespaced_lease(s.name, s.namespace, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            if getattr(exc, "status", None) == 404:
                return await self._create()
            log.warning("cannot read lease %s/%s: %s", s.namespace, s.name, exc)
            return False
        spec = lease.spec or client.V1LeaseSpec()
        record = (spec.holder_identity or "", spec.renew_time, spec.lease_duration_seconds, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = record[0]
        duration = spec.lease_duration_seconds or s.lease_duration
        if holder and holder != s.identity and time.monotonic() < self._observed_at + duration:
            return False
        now = micro_time()
        transitions = spec.lease_transitions or 0
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": s.name,
                "namespace": s.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": int(s.lease_duration),
                "acquireTime": micro_time(spec.acquire_time) if holder == s.identity and spec.acquire_time else now,
                "renewTime": now,
                "leaseTransitions": transitions if holder == s.identity else transitions + 1,
            },
        }
        try:
            await self.coordination.replace_namespaced_lease(
                s.name, s.namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
        except TRANSIENT as exc:
            log.info("could not update lease %s/%s: %s", s.namespace, s.name, getattr(exc, "reason", exc))
            return False
        self._observed = None  # our own write: the next read will differ and restart the observation clock
        return True

    async def _create(self) -> bool:
        s = self.settings
        now = micro_time()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": int(s.lease_duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            await self.coordination.create_namespaced_lease(s.namespace, body, _request_timeout=REQUEST_TIMEOUT)
        except TRANSIENT as exc:
            log.info("could not create lease %s/%s: %s", s.namespace, s.name, getattr(exc, "reason", exc))
            return False
        return True

    async def _release(self) -> None:
        """Hand the Lease back (empty holder, 1 s duration) if this candidate still holds it."""
        s = self.settings
        try:
            lease = await self.coordination.read_namespaced_lease(s.name, s.namespace, _request_timeout=REQUEST_TIMEOUT)
            if lease.spec is None or lease.spec.holder_identity != s.identity:
                return
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": s.name,
                    "namespace": s.namespace,
                    "resourceVersion": lease.metadata.resource_version,
                },
                "spec": {
                    "holderIdentity": "",
                    "leaseDurationSeconds": 1,
                    "renewTime": micro_time(),
                    "acquireTime": micro_time(lease.spec.acquire_time) if lease.spec.acquire_time else micro_time(),
                    "leaseTransitions": lease.spec.lease_transitions or 0,
                },
            }
            await self.coordination.replace_namespaced_lease(
                s.name, s.namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
            log.info("%s released lease %s/%s", s.identity, s.namespace, s.name)
        except TRANSIENT as exc:
            log.warning("could not release lease %s/%s: %s", s.namespace, s.name, exc)
