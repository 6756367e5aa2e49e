"""One grpclib server on a unix socket serving Identity, Controller and Node together."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
from grpclib._typing import IServable
from grpclib.utils import graceful_exit

from localdisk import qos
from localdisk.config import NodeConfig
from localdisk.csi.controller import ControllerService
from localdisk.csi.identity import IdentityService
from localdisk.csi.node import NodeService
from localdisk.csi.wire import GuardedServer
from localdisk.diskevents import follow_disk_events
from localdisk.errors import ConfigError
from localdisk.manager import VolumeManager
from localdisk.metrics import Metrics

log = logging.getLogger(__name__)


def socket_path(endpoint: str) -> Path:
    """`unix:///csi/csi.sock` (or a bare absolute path) to the socket's path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ConfigError(f"endpoint {endpoint!r}: only unix sockets are supported (unix:///path/to/csi.sock)")
    if not path.startswith("/"):
        raise ConfigError(f"endpoint {endpoint!r}: the socket path must be absolute")
    return Path(path)


def remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to remove it")
    path.unlink()


def services(
    manager: VolumeManager, node_id: str, metrics: Metrics | None = None, config: NodeConfig | None = None
) -> list[IServable]:
    io = qos.for_node((config or NodeConfig()).node)  # one record of I/O limits for both services
    servicers: list[IServable] = [
        IdentityService(),
        ControllerService(manager, node_id, config, io=io),
        NodeService(manager, node_id, config, io=io),
    ]
    for servicer in servicers:
        servicer.metrics = metrics  # type: ignore[attr-defined]
    return servicers


async def serve(
    manager: VolumeManager,
    node_id: str,
    endpoint: str,
    metrics: Metrics | None = None,
    metrics_address: str | None = None,
    config: NodeConfig | None = None,
    background: Sequence[Callable[[VolumeManager], Awaitable[None]]] = (),
    servicers: list[IServable] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish in-flight calls and remove the socket.

    `background` tasks (the orphan reporter, say) run beside the server on the opened manager and are cancelled
    when it stops; one failing is logged and does not take the CSI socket down with it. `servicers` replaces the
    services of `--role all` (Identity, Controller and Node on `manager`).
    """
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path)
    servicers = servicers if servicers is not None else services(manager, node_id, metrics, config)
    server = GuardedServer(servicers)
    async with manager.session():
        for servicer in servicers:
            if isinstance(servicer, NodeService):
                restored = servicer.restore_io_limits()
                log.info("re-applied the I/O limits of %d publication(s)", restored)
                if metrics is not None:
                    metrics.watch_io_limits(servicer.io)
        if metrics is not None and metrics_address:
            metrics.watch_pools(manager, asyncio.get_running_loop())
            metrics.serve(metrics_address)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_logged, VolumeManager.keep_fresh, manager)
            settings = (config or NodeConfig()).node
            retry = settings.pool_retry_seconds
            tasks.start_soon(_logged, functools.partial(VolumeManager.retry_unavailable, interval=retry), manager)
            tasks.start_soon(_logged, functools.partial(follow_disk_events, source=settings.disk_events), manager)
            for (kind, pool), state in manager.pool_states().items():
                if not state.up:
                    log.warning("serving without %s pool %r: %s", kind, pool, state.reason)
            for task in background:
                tasks.start_soon(_logged, task, manager)
            with graceful_exit([server]):
                await server.start(path=str(path))
                os.chmod(path, 0o660)
                log.info("serving CSI on %s as node %s", path, node_id)
                await server.wait_closed()
            tasks.cancel_scope.cancel()
    remove_stale_socket(path)
    log.info("stopped")


async def _logged(task: Callable[[VolumeManager], Awaitable[None]], manager: VolumeManager) -> None:
    try:
        await task(manager)
    except Exception:
        log.exception("background task %s failed; the CSI server keeps serving", getattr(task, "__name__", task))
