"""`localdisk controller`: the cluster-wide process, run as a Deployment of two replicas of which one leads.

It holds the Lease, runs the node-loss clean-up while it does, and serves `/healthz` and `/metrics` over HTTP
whether it leads or not (a follower is healthy; `localdisk_controller_leader` says which replica acts).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from localdisk.k8s.client import EventRecorder, connect
from localdisk.k8s.leader import LeaderElector, LeaseSettings
from localdisk.k8s.nodeloss import LostNodeExtension, NodeLossController, NodeLossSettings

log = logging.getLogger(__name__)
ExtensionFactory = Callable[[Any], Sequence[LostNodeExtension]]
"""Makes the node-loss extensions from the controller's API client."""


@dataclass(frozen=True)
class ControllerSettings:
    namespace: str
    identity: str
    lease_name: str = "localdisk-controller"
    resync_period: float = 300.0
    node_loss_grace_period: float = 600.0
    """Seconds a deleted node must stay gone before its volumes are released."""
    node_loss_dry_run: bool = False
    """Report what the node-loss clean-up would do, change nothing."""
    http_host: str | None = None
    """Address for /healthz and /metrics; None listens on every interface (what a pod wants)."""
    http_port: int = 8080
    """0 turns the HTTP server off."""
    unhealthy_after: float = 60.0
    """/healthz fails once the watch of Nodes has failed for this many seconds in a row (the API server away, the
    rights gone); the process keeps retrying with backoff meanwhile, it does not exit."""
    kubeconfig: str | None = None


async def main(settings: ControllerSettings, extensions: ExtensionFactory | None = None) -> None:
    """`run_controller` until SIGTERM or SIGINT, which stop it cleanly (the Lease is released on the way out).

    Its errors are raised as they are, not wrapped in an exception group, so the CLI can print them.
    """
    failure: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    group.cancel_scope.cancel()
                    return

        async def control() -> None:
            try:
                await run_controller(settings, extensions)
            except Exception as exc:
                failure.append(exc)
            finally:
                group.cancel_scope.cancel()

        group.start_soon(stop_on_signal)
        group.start_soon(control)
    if failure:
        raise failure[0]


async def run_controller(settings: ControllerSettings, extensions: ExtensionFactory | None = None) -> None:
    """Run until cancelled; raises `LeadershipLost` if the Lease slipped away (the process should exit then).

    `extensions` makes, from the API client, the `LostNodeExtension`s the node-loss clean-up also runs (other objects
    a lost node leaves behind)."""
    api = await connect(settings.kubeconfig)
    async with api:
        registry = CollectorRegistry()
        elector = LeaderElector(api, LeaseSettings(settings.namespace, settings.lease_name, settings.identity))
        leader = Gauge("localdisk_controller_leader", "1 on the replica that holds the Lease", registry=registry)
        leader.set_function(lambda: float(elector.is_leader))
        node_loss = NodeLossController(
            api,
            NodeLossSettings(
                resync_period=settings.resync_period,
                grace_period=settings.node_loss_grace_period,
                dry_run=settings.node_loss_dry_run,
            ),
            events=EventRecorder(api, host=settings.identity),
            registry=registry,
            extensions=extensions(api) if extensions is not None else (),
        )

        def failing() -> float:
            return node_loss.pacer.failing_for()

        runner = await _serve_http(settings, registry, failing) if settings.http_port else None
        try:
            await elector.run(node_loss.run)
        finally:
            if runner is not None:
                with anyio.CancelScope(shield=True):
                    await runner.cleanup()


async def _serve_http(
    settings: ControllerSettings, registry: CollectorRegistry, failing: Callable[[], float]
) -> web.AppRunner:
    async def healthz(request: web.Request) -> web.Response:
        seconds = failing()
        if seconds >= settings.unhealthy_after:
            return web.Response(status=503, text=f"the API server has been failing for {seconds:.0f}s\n")
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("serving /healthz and /metrics on port %d", settings.http_port)
    return runner
