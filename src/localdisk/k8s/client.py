"""Connecting to the API server, reading its errors, and recording Events.

kubernetes-asyncio ships no type information for its generated API classes, so they are handled as `Any` here and
at the call sites; the few fields localdisk reads are named in one place per module.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from localdisk.errors import ConfigError
from localdisk.k8s import COMPONENT, in_cluster

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0
"""Seconds any single API call may take: kubernetes-asyncio waits forever by default, and a hung call would stall
a controller (or let a leader act past its lease)."""


async def connect(kubeconfig: str | None = None) -> Any:
    """An `ApiClient` for the in-cluster service account, or for a kubeconfig file (`--kubeconfig`, `$KUBECONFIG`)."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and in_cluster():
            config.load_incluster_config(client_configuration=configuration)
        else:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ConfigError(
            f"cannot reach Kubernetes: not in a pod and no usable kubeconfig at {where} ({exc}); pass --kubeconfig"
        ) from exc
    return client.ApiClient(configuration)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API error, or None for anything that is not one."""
    return exc.status if isinstance(exc, ApiException) else None


def is_status(exc: BaseException, *codes: int) -> bool:
    return status_of(exc) in codes


def micro_time(moment: datetime | None = None) -> str:
    """A `MicroTime` as the API server parses it: RFC 3339, UTC, exactly six fractional digits."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wire_time(moment: datetime | None = None) -> str:
    """A `Time` (whole seconds) as the API server writes it."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Writes core/v1 Events so `kubectl describe` shows what localdisk did to an object and why."""

    def __init__(self, api: Any, component: str = COMPONENT, host: str | None = None) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.component = component
        self.host = host

    async def record(self, involved: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        """Record one Event about `involved` (kind, name, namespace, uid, apiVersion); failures are only logged."""
        namespace = involved.get("namespace") or "default"  # Events about cluster-scoped objects live in default
        now = wire_time()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{involved['name']}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {k: v for k, v in involved.items() if v},
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": self.component, **({"host": self.host} if self.host else {})},
            "reportingComponent": self.component,
            "reportingInstance": self.host or self.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.core.create_namespaced_event(namespace, body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            what = f"{involved['kind']} {involved['name']}"
            log.warning("could not record event %s on %s: %s", reason, what, exc.reason)


def reference(obj: Any, kind: str, api_version: str = "v1") -> dict[str, Any]:
    """An `ObjectReference` to a model object read from the API."""
    meta = obj.metadata
    return {
        "kind": kind,
        "apiVersion": api_version,
        "name": meta.name,
        "namespace": meta.namespace,
        "uid": meta.uid,
    }


async def node_labels(node: str, kubeconfig: str | None = None) -> dict[str, str]:
    """The labels of the Node object `node` (the node plugin's own, read once at start)."""
    api = await connect(kubeconfig)
    try:
        found = await client.CoreV1Api(api).read_node(node, _request_timeout=REQUEST_TIMEOUT)
    except client.ApiException as exc:
        raise ConfigError(f"cannot read the labels of node {node}: {exc.status} {exc.reason}") from exc
    finally:
        await api.close()
    return dict(found.metadata.labels or {})
