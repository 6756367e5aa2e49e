"""I/O limits enforced by the kernel: cgroup v2 io.max on real LVs, inside the sandbox, through the CSI services.

A fake kubelet cgroup tree is made under the guest's real cgroup2 mount; `dd` with O_DIRECT runs in a container
cgroup of the fake pod and measures what the volume really gives: within 10% of the limit, raised and lowered live
by ControllerModifyVolume without a remount, two volumes of one pod limited apart, nothing left after unpublish.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpclib._typing import IServable
from grpclib.testing import ChannelFor

from localdisk import qos
from localdisk._proto.csi.v1 import (
    ControllerStub,
    IdentityStub,
    NodeStub,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
)
from localdisk.backends.lvm import LinearBackend
from localdisk.config import NodeConfig, NodeSettings
from localdisk.crypt import Pbkdf
from localdisk.csi.controller import ControllerService
from localdisk.csi.node import NodeService
from localdisk.runner import CommandRunner
from tests.cgroup_tree import (
    CGROUPFS,
    SYSTEMD,
    create,
    device_of,
    io_max_line,
    make_pod,
    modify,
    near,
    publish,
    read_rate,
    real_tree,
    write_rate,
)
from tests.contract import manager_for
from tests.csi_helpers import Csi, MiB, block_cap, csi_for, mount_cap
from tests.lvm.helpers import require_dm_crypt
from tests.node_lifecycle import kubelet_paths, release_mounts

pytestmark = [pytest.mark.uml, pytest.mark.anyio]
FAST = Pbkdf(kind="argon2id", force_iterations=4, memory_kib=32 * 1024)  # cheap stretching: tests only
SECRET = "qos test passphrase 5d1e"


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    with real_tree("the sandbox guest") as root:
        yield root


@pytest.fixture
async def kubelet_root(tmp_path: Path) -> AsyncIterator[Path]:
    root = tmp_path / "kubelet"
    root.mkdir()
    try:
        yield root
    finally:
        await release_mounts(root, CommandRunner())


@pytest.fixture
def config(kubelet_root: Path, cgroup_root: Path) -> NodeConfig:
    return NodeConfig(node=NodeSettings(kubelet_dir=str(kubelet_root), cgroup_root=str(cgroup_root)))


@pytest.fixture
async def csi(linear: LinearBackend, config: NodeConfig) -> AsyncIterator[Csi]:
    async with csi_for(manager_for(linear), config=config) as channel:
        yield channel


async def test_bandwidth_limit_holds_and_changes_live(
    csi: Csi, linear: LinearBackend, kubelet_root: Path, cgroup_root: Path, config: NodeConfig
) -> None:
    pod_uid = str(uuid.uuid4())
    pod = make_pod(cgroup_root, SYSTEMD, "burstable", pod_uid, plain=False)
    container = pod / "container"
    cap = block_cap()
    volume_id = await create(csi, linear, "pvc-qos-bw", cap, writeBytesPerSecond="2Mi", readBytesPerSecond="3Mi")
    target = await publish(csi, kubelet_root, volume_id, "pvc-qos-bw", cap, pod_uid)
    device = await device_of(csi, volume_id)
    assert io_max_line(pod, device) == {"rbps": str(3 * MiB), "wbps": str(2 * MiB), "riops": "max", "wiops": "max"}

    measured = {"write 2Mi": (await write_rate(container, target, 2 * MiB), 2 * MiB)}
    measured["read 3Mi"] = (await read_rate(container, target, 3 * MiB), 3 * MiB)
    await modify(csi, volume_id, writeBytesPerSecond="4Mi")  # raised live: same publication, no remount
    measured["write 4Mi"] = (await write_rate(container, target, 4 * MiB), 4 * MiB)
    await modify(csi, volume_id, writeBytesPerSecond="1Mi", readBytesPerSecond="max")  # lowered live
    measured["write 1Mi"] = (await write_rate(container, target, 1 * MiB), 1 * MiB)
    assert io_max_line(pod, device) == {"rbps": "max", "wbps": str(1 * MiB), "riops": "max", "wiops": "max"}
    print({k: f"{v / MiB:.2f} MiB/s (limit {n / MiB:.0f})" for k, (v, n) in measured.items()})
    assert all(near(value, limit) for value, limit in measured.values()), measured

    # A restarted node plugin re-applies what the kernel lost (here: the line removed by hand).
    (pod / "io.max").write_text(f"{device[0]}:{device[1]} rbps=max wbps=max riops=max wiops=max")
    assert io_max_line(pod, device) == {}
    assert NodeService(csi.manager, "node-1", config).restore_io_limits() == 1
    assert io_max_line(pod, device)["wbps"] == str(1 * MiB)

    await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    assert io_max_line(pod, device) == {}
    path = (await csi.manager.get_volume(volume_id)).device_path
    assert path is not None
    free = await write_rate(container, path, 1 * MiB)  # same cgroup, same device: no limit left
    assert free > 3 * 1 * MiB, f"{free / MiB:.2f} MiB/s after unpublish"


async def test_two_volumes_of_one_pod_iops_and_filesystem(
    csi: Csi, linear: LinearBackend, kubelet_root: Path, cgroup_root: Path
) -> None:
    pod_uid = str(uuid.uuid4())
    pod = make_pod(cgroup_root, CGROUPFS, "besteffort", pod_uid, plain=False)
    container = pod / "container"
    fs_cap, raw_cap = mount_cap("ext4"), block_cap()
    fs_id = await create(csi, linear, "pvc-qos-fs", fs_cap, writeIOPS="50")
    raw_id = await create(csi, linear, "pvc-qos-raw", raw_cap, writeBytesPerSecond="3Mi")
    fs_target = await publish(csi, kubelet_root, fs_id, "pvc-qos-fs", fs_cap, pod_uid)
    raw_target = await publish(csi, kubelet_root, raw_id, "pvc-qos-raw", raw_cap, pod_uid)
    fs_device, raw_device = await device_of(csi, fs_id), await device_of(csi, raw_id)
    assert io_max_line(pod, fs_device)["wiops"] == "50"
    assert io_max_line(pod, raw_device)["wbps"] == str(3 * MiB)

    # Overwrites of a file written beforehand (outside the pod's cgroup): the I/Os measured are the pod's alone,
    # with no block allocation or journal commit behind each one.
    data = f"{fs_target}/data.bin"
    await write_rate(cgroup_root.parent, data, 50 * 4096, block=4096)
    iops = await write_rate(container, data, 50 * 4096, block=4096) / 4096
    raw = await write_rate(container, raw_target, 3 * MiB)
    print(f"filesystem volume: {iops:.1f} IOPS (limit 50); raw volume: {raw / MiB:.2f} MiB/s (limit 3)")
    assert near(iops, 50) and near(raw, 3 * MiB), (iops, raw / MiB)

    for volume_id, target in ((fs_id, fs_target), (raw_id, raw_target)):
        await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    assert io_max_line(pod, fs_device) == {} and io_max_line(pod, raw_device) == {}
    staging = kubelet_paths(kubelet_root, "pvc-qos-fs", block=False).staging
    await csi.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=fs_id, staging_target_path=staging))


async def test_an_encrypted_volume_is_limited_on_its_mapping(
    linear: LinearBackend, kubelet_root: Path, cgroup_root: Path, config: NodeConfig
) -> None:
    """The pod's I/O goes to the dm-crypt mapping, not to the LV under it: the io.max line is the mapping's."""
    require_dm_crypt()
    manager = manager_for(linear)
    io = qos.for_node(config.node)
    servicers: list[IServable] = [
        ControllerService(manager, "node-1", config, io=io),
        NodeService(manager, "node-1", config, pbkdf=FAST, io=io),
    ]
    for servicer in servicers:
        servicer.metrics = None  # type: ignore[attr-defined]
    pod_uid = str(uuid.uuid4())
    pod = make_pod(cgroup_root, SYSTEMD, "guaranteed", pod_uid, plain=False)
    cap = block_cap()
    async with manager.session(), ChannelFor(servicers) as channel:
        csi = Csi(IdentityStub(channel), ControllerStub(channel), NodeStub(channel), manager)
        volume_id = await create(csi, linear, "pvc-qos-crypt", cap, writeBytesPerSecond="2Mi", encrypted="true")
        staging = kubelet_paths(kubelet_root, "pvc-qos-crypt", block=True).staging
        try:
            secrets = {"passphrase": SECRET}
            target = await publish(csi, kubelet_root, volume_id, "pvc-qos-crypt", cap, pod_uid, secrets)
            lv = await device_of(csi, volume_id)
            mapping = os.stat(target).st_rdev
            mapped = (os.major(mapping), os.minor(mapping))
            assert mapped != lv
            assert io_max_line(pod, mapped)["wbps"] == str(2 * MiB)
            assert io_max_line(pod, lv) == {}
            rate = await write_rate(pod / "container", target, 2 * MiB)
            print(f"encrypted volume: {rate / MiB:.2f} MiB/s (limit 2, on its mapping)")
            assert near(rate, 2 * MiB), rate / MiB
            await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
            assert io_max_line(pod, mapped) == {}
        finally:
            await csi.node.node_unstage_volume(
                NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)
            )
