"""The two halves of the split deployment: `serve --role node` and `serve --role controller`.

- node: Identity and Node on the kubelet plugin socket, beside the node agent (`localdisk.k8s.agent`) that carries
  out what the controller writes into this node's LocalVolume and LocalSnapshot objects. Volume IDs are object names
  there; the Node service is handed the on-disk ID the agent recorded (`AgentNodeService`).
- controller: Identity and the Controller over custom resources (`localdisk.csi.central`), for the sidecars in their
  ordinary central mode.

`--role all` (`localdisk.csi.server.serve`) keeps both halves in one process, without Kubernetes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio
from grpclib._typing import IServable
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.utils import graceful_exit

from localdisk import qos
from localdisk._proto.csi.v1 import (
    NodeExpandVolumeRequest,
    NodeExpandVolumeResponse,
    NodeGetVolumeStatsRequest,
    NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest,
    NodePublishVolumeResponse,
    NodeStageVolumeRequest,
    NodeStageVolumeResponse,
    NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest,
    NodeUnstageVolumeResponse,
)
from localdisk.config import NodeConfig
from localdisk.csi.central import CentralControllerService
from localdisk.csi.identity import IdentityService
from localdisk.csi.node import NodeService
from localdisk.csi.server import remove_stale_socket, serve, socket_path
from localdisk.csi.wire import GuardedServer
from localdisk.k8s.agent import AgentSettings, NodeAgent
from localdisk.k8s.client import connect
from localdisk.k8s.cluster import ClusterVolumes
from localdisk.k8s.labels import follow_node_labels, selects_by_node
from localdisk.k8s.orphans import OrphanReporter, OrphanSettings, object_claims
from localdisk.k8s.pools import report_pool_states
from localdisk.k8s.watch import TRANSIENT
from localdisk.manager import VolumeManager
from localdisk.metrics import Metrics

log = logging.getLogger(__name__)


class AgentNodeService(NodeService):
    """The Node service of the split shape: the CSI volume ID names a LocalVolume; the volume on disk is found by
    the handle its status records. An ID of the per-node shape (`<backend>:<pool>:<handle>`) is used as it is, so
    volumes provisioned before the split keep working."""

    def __init__(self, agent: NodeAgent, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agent = agent

    async def _on_disk(self, volume_id: str) -> str:
        if not volume_id:
            return volume_id  # the base class answers INVALID_ARGUMENT
        try:
            handle = await self.agent.resolve(volume_id)
        except TRANSIENT as exc:
            raise GRPCError(Status.UNAVAILABLE, f"cannot read volume {volume_id} from the API server: {exc}") from None
        return handle or volume_id  # unknown: the base class answers NOT_FOUND, or cleans up what it can

    async def node_stage_volume(self, message: NodeStageVolumeRequest) -> NodeStageVolumeResponse:
        message.volume_id = await self._on_disk(message.volume_id)
        return await super().node_stage_volume(message)

    async def node_unstage_volume(self, message: NodeUnstageVolumeRequest) -> NodeUnstageVolumeResponse:
        message.volume_id = await self._on_disk(message.volume_id)
        return await super().node_unstage_volume(message)

    async def node_publish_volume(self, message: NodePublishVolumeRequest) -> NodePublishVolumeResponse:
        message.volume_id = await self._on_disk(message.volume_id)
        return await super().node_publish_volume(message)

    async def node_unpublish_volume(self, message: NodeUnpublishVolumeRequest) -> NodeUnpublishVolumeResponse:
        message.volume_id = await self._on_disk(message.volume_id)
        return await super().node_unpublish_volume(message)

    async def node_get_volume_stats(self, message: NodeGetVolumeStatsRequest) -> NodeGetVolumeStatsResponse:
        message.volume_id = await self._on_disk(message.volume_id)
        return await super().node_get_volume_stats(message)

    async def node_expand_volume(self, message: NodeExpandVolumeRequest) -> NodeExpandVolumeResponse:
        message.volume_id = await self._on_disk(message.volume_id)
        return await super().node_expand_volume(message)


def _with_metrics(servicers: list[IServable], metrics: Metrics | None) -> list[IServable]:
    for servicer in servicers:
        servicer.metrics = metrics  # type: ignore[attr-defined]
    return servicers


def node_services(agent: NodeAgent, node_id: str, config: NodeConfig, metrics: Metrics | None) -> list[IServable]:
    return _with_metrics(
        # Always ready: kubelet needs the Node service (unpublish, unstage) most when the API server is away, and a
        # restart would not bring the API back. The agent's watches retry with backoff meanwhile.
        [IdentityService(controller=False), AgentNodeService(agent, agent.manager, node_id, config, io=agent.io)],
        metrics,
    )


async def run_node(
    kubeconfig: str | None,
    manager: VolumeManager,
    node_id: str,
    endpoint: str,
    metrics: Metrics,
    metrics_address: str | None,
    config: NodeConfig,
    orphan_report: bool = True,
    orphan_delete_after: float | None = None,
    adopt: bool = False,
    every_pool: NodeConfig | None = None,
) -> None:
    """`serve --role node`: the Node service and the node agent, on one opened `VolumeManager`; beside them the
    pool-state Events, the orphan report (volumes no LocalVolume points to) and, given the whole config with pools
    for some nodes only (`every_pool`), the pools following the node's labels."""
    api = await connect(kubeconfig)
    async with api:
        agent = NodeAgent(api, manager, AgentSettings(node_id, adopt=adopt), io=qos.for_node(config.node))

        async def node_agent(_: VolumeManager) -> None:
            await agent.run()

        async def pool_events(opened: VolumeManager) -> None:
            await report_pool_states(opened, node_id, kubeconfig)

        async def orphan_reporter(opened: VolumeManager) -> None:
            settings = OrphanSettings(node_id, delete_after=orphan_delete_after)
            claims = object_claims(api, node_id)
            await OrphanReporter(api, opened, settings, registry=metrics.registry, claims=claims).run()

        async def pools_by_labels(opened: VolumeManager) -> None:
            if every_pool is not None and selects_by_node(every_pool):
                await follow_node_labels(api, opened, every_pool, node_id)

        await serve(
            manager,
            node_id,
            endpoint,
            metrics,
            metrics_address,
            config,
            background=[node_agent, pool_events, pools_by_labels, *([orphan_reporter] if orphan_report else [])],
            servicers=node_services(agent, node_id, config, metrics),
        )


async def run_controller(
    kubeconfig: str | None, endpoint: str, config: NodeConfig, metrics: Metrics, metrics_address: str | None
) -> None:
    api = await connect(kubeconfig)
    async with api:
        await serve_controller(api, endpoint, config, metrics, metrics_address)


async def serve_controller(
    api: Any,
    endpoint: str,
    config: NodeConfig,
    metrics: Metrics | None = None,
    metrics_address: str | None = None,
) -> None:
    """Serve Identity and the Controller over custom resources until SIGTERM or SIGINT."""
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path)
    cluster = ClusterVolumes(api)
    server = GuardedServer(
        _with_metrics([IdentityService(cluster.healthy), CentralControllerService(cluster, config)], metrics)
    )
    if metrics is not None and metrics_address:
        metrics.serve(metrics_address)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(cluster.run)
        with graceful_exit([server]):
            await server.start(path=str(path))
            os.chmod(path, 0o660)
            log.info("serving the CSI controller on %s", path)
            await server.wait_closed()
        tasks.cancel_scope.cancel()
    remove_stale_socket(path)
    log.info("stopped")
