"""The node agent's part of I/O limits (split shape): spec.ioLimits recorded on the node and answered in status.

The agent runs against a stub of the custom-objects API that records the status patches; the real API path
(external-resizer, VolumeAttributesClass) is tests/k8s/test_split.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from localdisk.cgroups import CgroupTree
from localdisk.config import development_default
from localdisk.k8s.agent import AgentSettings, NodeAgent
from localdisk.k8s.crd import VolumeObject
from localdisk.manager import VolumeManager
from localdisk.qos import IoLimits, VolumeQos

pytestmark = pytest.mark.anyio


class CustomObjects:
    """What the agent calls of CustomObjectsApi here: status patches (recorded) and finalizer patches."""

    def __init__(self) -> None:
        self.status: list[dict[str, Any]] = []
        self.released: list[str] = []

    async def patch_cluster_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        self.status.append(args[4]["status"])

    async def patch_cluster_custom_object(self, *args: Any, **kwargs: Any) -> None:
        self.released.append(args[3])


def local_volume(
    limits: dict[str, int], *, generation: int = 1, status: dict[str, Any] | None = None, deleting: bool = False
) -> VolumeObject:
    metadata: dict[str, Any] = {
        "name": "pvc-agent",
        "generation": generation,
        "finalizers": ["localdisk.csi.io/on-disk"],
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec = {"name": "pvc-agent", "node": "n1", "backend": "fake", "requiredBytes": 1 << 20, "ioLimits": limits}
    return VolumeObject.of({"metadata": metadata, "spec": spec, "status": status or {}})


@pytest.fixture
async def agent(tmp_path: Path) -> Any:
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cgroup.controllers").write_text("io\n")
    manager = VolumeManager.from_config(development_default())
    io = VolumeQos(tmp_path / "state", CgroupTree(tmp_path / "cgroup"))
    async with manager.session(), client.ApiClient() as api:  # never called: `custom` is replaced below
        made = NodeAgent(api, manager, AgentSettings("n1"), io=io)
        made.custom = CustomObjects()
        yield made


async def test_the_agent_records_applies_and_reports_the_limits(agent: Any) -> None:
    await agent._reconcile_volume(local_volume({"writeIOPS": 100}))
    answer = agent.custom.status[-1]
    handle = answer["handle"]
    assert answer["phase"] == "Ready"
    assert answer["ioLimits"] == {
        "readIOPS": None,
        "writeIOPS": 100,
        "readBytesPerSecond": None,
        "writeBytesPerSecond": None,
    }
    assert agent.io.limits(handle) == IoLimits(write_iops=100)

    # A new spec (a VolumeAttributesClass change): a new generation, recorded and answered.
    ready = {
        "phase": "Ready",
        "handle": handle,
        "sizeBytes": 1 << 20,
        "observedGeneration": 1,
        "ioLimits": answer["ioLimits"],
    }
    await agent._reconcile_volume(local_volume({"readBytesPerSecond": 4096}, generation=2, status=ready))
    assert agent.custom.status[-1]["ioLimits"]["readBytesPerSecond"] == 4096
    assert agent.custom.status[-1]["ioLimits"]["writeIOPS"] is None  # a merge patch removes it with null
    assert agent.io.limits(handle) == IoLimits(read_bytes_per_second=4096)

    # Settled, and the node's record lost (a state directory wiped): the next pass writes it again.
    agent.io.forget(handle)
    settled = dict(ready, observedGeneration=2, ioLimits={"readBytesPerSecond": 4096})
    patches = len(agent.custom.status)
    await agent._reconcile_volume(local_volume({"readBytesPerSecond": 4096}, generation=2, status=settled))
    assert agent.io.limits(handle) == IoLimits(read_bytes_per_second=4096)
    assert len(agent.custom.status) == patches  # status already says so

    await agent._reconcile_volume(local_volume({}, generation=2, status=settled, deleting=True))
    assert agent.custom.released == ["pvc-agent"]
    assert agent.io.record(handle).limits.empty


async def test_a_node_that_cannot_enforce_limits_makes_no_volume(agent: Any, tmp_path: Path) -> None:
    (tmp_path / "cgroup" / "cgroup.controllers").unlink()  # what a cgroup v1 host looks like
    await agent._reconcile_volume(local_volume({"writeIOPS": 100}))
    answer = agent.custom.status[-1]
    assert answer["phase"] == "Failed"
    assert answer["error"]["reason"] == "FailedPrecondition" and "cgroup v1" in answer["error"]["message"]
    assert await agent.manager.list_volumes() == []
