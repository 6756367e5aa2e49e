"""Pools that follow their node's labels: the node plugin re-reads its Node's labels and serves the pools they select.

One config names pools by the nodes they are for (`nodes`, `node_labels`). At start the node plugin reads its labels
once (`serve`); in a cluster it then re-reads them every `interval` seconds, with the same `get` on its own Node it
already has rights to (no watch on every Node), and when the pools they select change it hands the new selection to
`VolumeManager.select`: a newly selected pool opens without a restart, a pool no longer selected takes no new
volumes but keeps serving the ones it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
from kubernetes_asyncio import client

from localdisk.config import NodeConfig
from localdisk.errors import ConfigError
from localdisk.k8s.client import REQUEST_TIMEOUT
from localdisk.k8s.watch import TRANSIENT
from localdisk.manager import VolumeManager

log = logging.getLogger(__name__)
INTERVAL = 10.0


def selects_by_node(config: NodeConfig) -> bool:
    """Whether any pool of `config` is for some nodes only (then the labels matter)."""
    return any(p.config.nodes or p.config.node_labels for p in config.pools)


def _chosen(config: NodeConfig) -> set[tuple[str, str]]:
    return {(p.backend, p.name) for p in config.pools}


async def follow_node_labels(
    api: Any, manager: VolumeManager, config: NodeConfig, node: str, interval: float = INTERVAL
) -> None:
    """Until cancelled: re-read node `node`'s labels every `interval` seconds and serve the pools of the whole
    `config` that they select (`VolumeManager.select`). A failed read or a selection that is not valid (two default
    pools of one backend) keeps the pools as they are, with a warning."""
    core = client.CoreV1Api(api)
    manager.pools_may_change = True
    while True:
        labels = await _labels(core, node)  # at once too: they may have changed since the start-up read
        if labels is not None:
            await _select(manager, config, node, labels)
        await anyio.sleep(interval)


async def _labels(core: client.CoreV1Api, node: str) -> Mapping[str, str] | None:
    try:
        found = await core.read_node(node, _request_timeout=REQUEST_TIMEOUT)
    except TRANSIENT as exc:
        log.warning("reading the labels of node %s failed (%s); its pools stay as they are", node, exc)
        return None
    return dict(found.metadata.labels or {})


async def _select(manager: VolumeManager, config: NodeConfig, node: str, labels: Mapping[str, str]) -> None:
    try:
        selection = config.for_node(node, labels)
    except ConfigError as exc:
        log.warning("the labels of node %s select no valid set of pools (%s); its pools stay as they are", node, exc)
        return
    served = {key for key, backend in manager.backends.items() if backend.retired is None}
    if _chosen(selection) == served:
        return
    log.info(
        "the labels of node %s now select the pools %s",
        node,
        ", ".join(f"{b}/{p}" for b, p in sorted(_chosen(selection))) or "none",
    )
    await manager.select(selection, "its node's labels no longer select it")
