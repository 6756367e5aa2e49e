"""I/O limits on partition volumes, enforced by the host's own cgroup v2 io controller (loop disks, real partitions).

Runs where the host's cgroups allow it (cgroup v2 with io in the root's subtree_control); elsewhere it skips saying
why, and tests/lvm/test_qos_lvm.py shows the same enforcement on LVM inside the UML sandbox.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from localdisk._proto.csi.v1 import NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest
from localdisk.backends.partition import PartitionBackend
from localdisk.config import NodeConfig, NodeSettings
from localdisk.runner import CommandRunner
from localdisk.sizes import GiB
from tests.cgroup_tree import (
    SYSTEMD,
    create,
    device_of,
    io_max_line,
    make_pod,
    modify,
    near,
    publish,
    real_tree,
    write_rate,
)
from tests.contract import manager_for
from tests.csi_helpers import Csi, MiB, block_cap, csi_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.node_lifecycle import kubelet_paths, release_mounts
from tests.test_partition_backend import partition_pool

pytestmark = [pytest.mark.anyio, pytest.mark.root]
POD = "5e1f0c2b-9a0d-4b7e-8c3f-1d2e3f4a5b6c"


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    with real_tree("this host") as root:
        yield root


@pytest.fixture
async def csi(tmp_path: Path, cgroup_root: Path) -> AsyncIterator[Csi]:
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(kubelet), cgroup_root=str(cgroup_root)))
    try:
        async with (
            loop_disks(1, 1 * GiB) as disks,
            partition_pool(disks) as backend,
            csi_for(manager_for(backend), config=config) as channel,
        ):
            yield channel
    finally:
        await release_mounts(kubelet, CommandRunner())


@needs_loop_devices
async def test_a_partition_volume_is_limited_and_changed_live(csi: Csi, tmp_path: Path, cgroup_root: Path) -> None:
    pod = make_pod(cgroup_root, SYSTEMD, "burstable", POD, plain=False)
    backend = next(iter(csi.manager.backends.values()))
    assert isinstance(backend.inner, PartitionBackend)
    cap = block_cap()
    volume_id = await create(csi, backend, "pvc-qos-part", cap, writeBytesPerSecond="4Mi")
    kubelet = tmp_path / "kubelet"
    target = await publish(csi, kubelet, volume_id, "pvc-qos-part", cap, POD)
    device = await device_of(csi, volume_id)
    limited = await write_rate(pod / "container", target, 4 * MiB)
    await modify(csi, volume_id, writeBytesPerSecond="8Mi")
    raised = await write_rate(pod / "container", target, 8 * MiB)
    print(f"partition volume: {limited / MiB:.2f} MiB/s (limit 4), {raised / MiB:.2f} MiB/s (raised live to 8)")
    assert near(limited, 4 * MiB) and near(raised, 8 * MiB), (limited / MiB, raised / MiB)
    await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    assert io_max_line(pod, device) == {}
    staging = kubelet_paths(kubelet, "pvc-qos-part", block=True).staging
    await csi.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
