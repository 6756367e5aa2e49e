"""I/O limits enforced by the kernel: cgroup v2 io.max on real LVs, inside the sandbox, through the CSI services.

A fake kubelet cgroup tree is made under the guest's real cgroup2 mount; `dd` with O_DIRECT runs in a container
cgroup of the fake pod and measures what the volume really gives: within 10% of the limit, raised and lowered live
by ControllerModifyVolume without a remount, two volumes of one pod limited apart, nothing left after unpublish.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from localdisk._proto.csi.v1 import (
    ControllerModifyVolumeRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
    VolumeCapability,
)
from localdisk.backends.lvm import LinearBackend
from localdisk.config import NodeConfig, NodeSettings
from localdisk.csi.node import NodeService
from localdisk.mounts import device_number
from localdisk.qos import POD_UID_KEY
from localdisk.runner import CommandRunner
from tests.cgroup_tree import CGROUPFS, SYSTEMD, io_max_line, make_pod, remove
from tests.contract import manager_for
from tests.csi_helpers import Csi, MiB, block_cap, create_request, csi_for, mount_cap
from tests.node_lifecycle import kubelet_paths, release_mounts

pytestmark = [pytest.mark.uml, pytest.mark.anyio]
CGROUP2 = Path("/sys/fs/cgroup")
SECONDS = 3.0  # each measurement moves about this long at the limit: the throttle's first slice is under 5% of it
COPIED = re.compile(rb"^(\d+) bytes .* copied, ([\d.]+) s", re.MULTILINE)


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    if "io" not in (CGROUP2 / "cgroup.subtree_control").read_text().split():
        pytest.skip("the sandbox guest has no cgroup2 with the io controller at /sys/fs/cgroup")
    root = CGROUP2 / f"ldtest-kubelet-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        yield root
    finally:
        remove(root, CGROUP2)


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


def dd_in(cgroup: Path, *argv: str) -> float:
    """Run dd in `cgroup`; the bytes per second it measured."""

    def join() -> None:
        (cgroup / "cgroup.procs").write_text("0")

    done = subprocess.run(["dd", *argv], capture_output=True, preexec_fn=join, check=True, timeout=120)
    found = COPIED.search(done.stderr)
    assert found is not None, done.stderr
    return int(found.group(1)) / float(found.group(2))


async def write_rate(cgroup: Path, path: str, rate: int, *, block: int = 64 * 1024) -> float:
    count = max(int(rate * SECONDS) // block, 1)
    argv = ("if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct", "conv=notrunc")
    return await anyio.to_thread.run_sync(lambda: dd_in(cgroup, *argv))


async def read_rate(cgroup: Path, path: str, rate: int, *, block: int = 64 * 1024) -> float:
    count = max(int(rate * SECONDS) // block, 1)
    argv = (f"if={path}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct")
    return await anyio.to_thread.run_sync(lambda: dd_in(cgroup, *argv))


def near(measured: float, limit: float) -> bool:
    return abs(measured - limit) <= 0.1 * limit


async def publish(csi: Csi, kubelet_root: Path, volume_id: str, name: str, cap: VolumeCapability, pod_uid: str) -> str:
    paths = kubelet_paths(kubelet_root, name, cap.block is not None, pod=pod_uid)
    await csi.node.node_stage_volume(
        NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=paths.staging, volume_capability=cap)
    )
    await csi.node.node_publish_volume(
        NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=paths.staging,
            target_path=paths.target,
            volume_capability=cap,
            volume_context={POD_UID_KEY: pod_uid},
        )
    )
    return paths.target


async def create(csi: Csi, linear: LinearBackend, name: str, cap: VolumeCapability, **limits: str) -> str:
    request = create_request(name, 64 * MiB, linear.kind, linear.pool, volume_capabilities=[cap])
    request.parameters |= limits
    response = await csi.controller.create_volume(request)
    assert response.volume is not None
    return response.volume.volume_id


async def modify(csi: Csi, volume_id: str, **limits: str) -> None:
    await csi.controller.controller_modify_volume(
        ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=limits)
    )


async def device_of(csi: Csi, volume_id: str) -> tuple[int, int]:
    path = (await csi.manager.get_volume(volume_id)).device_path
    assert path is not None
    number = device_number(path)
    return os.major(number), os.minor(number)


async def test_bandwidth_limit_holds_and_changes_live(
    csi: Csi, linear: LinearBackend, kubelet_root: Path, cgroup_root: Path, config: NodeConfig
) -> None:
    pod_uid = str(uuid.uuid4())
    pod = make_pod(cgroup_root, SYSTEMD, "burstable", pod_uid, plain=False)
    container = pod / "container"
    cap = block_cap()
    volume_id = await create(csi, linear, "pvc-qos-bw", cap, writeBytesPerSecond="4Mi", readBytesPerSecond="6Mi")
    target = await publish(csi, kubelet_root, volume_id, "pvc-qos-bw", cap, pod_uid)
    device = await device_of(csi, volume_id)
    assert io_max_line(pod, device) == {"rbps": str(6 * MiB), "wbps": str(4 * MiB), "riops": "max", "wiops": "max"}

    measured = {"write 4Mi": (await write_rate(container, target, 4 * MiB), 4 * MiB)}
    measured["read 6Mi"] = (await read_rate(container, target, 6 * MiB), 6 * MiB)
    await modify(csi, volume_id, writeBytesPerSecond="8Mi")  # raised live: same publication, no remount
    measured["write 8Mi"] = (await write_rate(container, target, 8 * MiB), 8 * MiB)
    await modify(csi, volume_id, writeBytesPerSecond="2Mi", readBytesPerSecond="max")  # lowered live
    measured["write 2Mi"] = (await write_rate(container, target, 2 * MiB), 2 * MiB)
    assert io_max_line(pod, device) == {"rbps": "max", "wbps": str(2 * MiB), "riops": "max", "wiops": "max"}
    print({k: f"{v / MiB:.2f} MiB/s (limit {n / MiB:.0f})" for k, (v, n) in measured.items()})
    assert all(near(value, limit) for value, limit in measured.values()), measured

    # A restarted node plugin re-applies what the kernel lost (here: the line removed by hand).
    (pod / "io.max").write_text(f"{device[0]}:{device[1]} rbps=max wbps=max riops=max wiops=max")
    assert io_max_line(pod, device) == {}
    assert NodeService(csi.manager, "node-1", config).restore_io_limits() == 1
    assert io_max_line(pod, device)["wbps"] == str(2 * MiB)

    await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    assert io_max_line(pod, device) == {}
    path = (await csi.manager.get_volume(volume_id)).device_path
    assert path is not None
    free = await write_rate(container, path, 2 * MiB)  # same cgroup, same device: no limit left
    assert free > 3 * 2 * MiB, f"{free / MiB:.2f} MiB/s after unpublish"


async def test_two_volumes_of_one_pod_iops_and_filesystem(
    csi: Csi, linear: LinearBackend, kubelet_root: Path, cgroup_root: Path
) -> None:
    pod_uid = str(uuid.uuid4())
    pod = make_pod(cgroup_root, CGROUPFS, "besteffort", pod_uid, plain=False)
    container = pod / "container"
    fs_cap, raw_cap = mount_cap("ext4"), block_cap()
    fs_id = await create(csi, linear, "pvc-qos-fs", fs_cap, writeIOPS="100")
    raw_id = await create(csi, linear, "pvc-qos-raw", raw_cap, writeBytesPerSecond="3Mi")
    fs_target = await publish(csi, kubelet_root, fs_id, "pvc-qos-fs", fs_cap, pod_uid)
    raw_target = await publish(csi, kubelet_root, raw_id, "pvc-qos-raw", raw_cap, pod_uid)
    fs_device, raw_device = await device_of(csi, fs_id), await device_of(csi, raw_id)
    assert io_max_line(pod, fs_device)["wiops"] == "100"
    assert io_max_line(pod, raw_device)["wbps"] == str(3 * MiB)

    iops = await write_rate(container, f"{fs_target}/data.bin", 100 * 4096, block=4096) / 4096
    raw = await write_rate(container, raw_target, 3 * MiB)
    print(f"filesystem volume: {iops:.1f} IOPS (limit 100); raw volume: {raw / MiB:.2f} MiB/s (limit 3)")
    assert near(iops, 100) and near(raw, 3 * MiB), (iops, raw / MiB)

    for volume_id, target in ((fs_id, fs_target), (raw_id, raw_target)):
        await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    assert io_max_line(pod, fs_device) == {} and io_max_line(pod, raw_device) == {}
    staging = kubelet_paths(kubelet_root, "pvc-qos-fs", block=False).staging
    await csi.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=fs_id, staging_target_path=staging))
