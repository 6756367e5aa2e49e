"""`localdisk demo`: the whole story on loop-file-backed disks, with no real disks and no cluster.

It plays kubelet and the CSI sidecars against a real `localdisk serve` process over its socket: capacity, create,
stage, publish, write, read, unstage, stage again (the data must still be there), expand online, stats, snapshot and
clone (thin), delete, capacity again. Partitions run on host loop devices; LVM needs device-mapper, so where the host
has none the LVM part runs inside the User-Mode Linux sandbox and reports back through a file on the shared root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
from grpclib.client import Channel

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerStub,
    CreateSnapshotRequest,
    CreateVolumeRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
    NodeExpandVolumeRequest,
    NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    NodeStub,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityAccessModeMode,
    VolumeCapabilityMountVolume,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
    VolumeUsageUnit,
)
from localdisk.sizes import MiB, human

Say = Callable[[str], None]


@dataclass
class StoryResult:
    backend: str
    filesystem: str
    created: int = 0
    expanded: int = 0
    fs_size_before: int = 0
    fs_size_after: int = 0
    data_kept: bool = False
    snapshot_clone: str = "-"
    capacity_before: int = 0
    capacity_during: int = 0
    capacity_after: int = 0
    seconds: float = 0.0
    error: str = ""
    steps: list[str] = field(default_factory=list)


def _mount_cap(fs_type: str) -> VolumeCapability:
    return VolumeCapability(
        mount=VolumeCapabilityMountVolume(fs_type=fs_type),
        access_mode=VolumeCapabilityAccessMode(mode=VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER),
    )


class Kubelet:
    """Paths the way kubelet lays them out, under a private kubelet root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def staging(self, volume_id: str) -> Path:
        digest = hashlib.sha256(volume_id.encode()).hexdigest()[:16]
        path = self.root / "plugins/kubernetes.io/csi/localdisk.csi.io" / digest / "globalmount"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def target(self, volume_id: str, pod: str) -> Path:
        digest = hashlib.sha256(volume_id.encode()).hexdigest()[:16]
        path = self.root / "pods" / pod / "volumes/kubernetes.io~csi" / f"pvc-{digest}" / "mount"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


async def story(
    channel: Channel,
    kubelet: Kubelet,
    backend: str,
    fs_type: str,
    size: int,
    say: Say,
    snapshot: bool = False,
) -> StoryResult:
    """One volume's life through the CSI API, as Kubernetes would drive it."""
    controller, node = ControllerStub(channel), NodeStub(channel)
    result = StoryResult(backend, fs_type)
    start = time.monotonic()
    cap = _mount_cap(fs_type)
    params = {"backend": backend}

    def step(text: str) -> None:
        result.steps.append(text)
        say(f"  [{backend}] {text}")

    async def capacity() -> int:
        return (await controller.get_capacity(GetCapacityRequest(parameters=params))).available_capacity

    mounted: list[tuple[str, Path, Path]] = []

    async def fs_size(path: str) -> int:
        stats = await node.node_get_volume_stats(NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))
        return next((u.total for u in stats.usage if u.unit == VolumeUsageUnit.BYTES), 0)

    async def mount(volume_id: str, pod: str) -> tuple[Path, Path]:
        staging, target = kubelet.staging(volume_id), kubelet.target(volume_id, pod)
        mounted.append((volume_id, staging, target))
        await node.node_stage_volume(
            NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap)
        )
        await node.node_publish_volume(
            NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=str(staging), target_path=str(target), volume_capability=cap
            )
        )
        return staging, target

    async def unmount(volume_id: str, staging: Path, target: Path) -> None:
        await node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))
        await node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)))
        mounted.remove((volume_id, staging, target))

    result.capacity_before = await capacity()
    step(f"capacity before: {human(result.capacity_before)} available")
    volume = (
        await controller.create_volume(
            CreateVolumeRequest(
                name=f"demo-{backend}",
                capacity_range=CapacityRange(required_bytes=size),
                volume_capabilities=[cap],
                parameters=params,
            )
        )
    ).volume
    assert volume is not None
    volume_id = volume.volume_id
    result.created = volume.capacity_bytes
    step(f"CreateVolume -> {volume_id} ({human(volume.capacity_bytes)})")
    cleanup: list[tuple[str, str]] = [("volume", volume_id)]
    try:
        staging, target = await mount(volume_id, "pod-a")
        step(f"staged ({fs_type}) and published at {target}")
        payload = f"hello from {backend} at {time.time()}\n" * 1000
        (target / "data.txt").write_text(payload)
        step(f"wrote {len(payload)} bytes")
        await unmount(volume_id, staging, target)
        staging, target = await mount(volume_id, "pod-b")
        result.data_kept = (target / "data.txt").read_text() == payload
        step(f"unstaged, staged again in another pod: data {'intact' if result.data_kept else 'LOST'}")
        result.capacity_during = await capacity()

        result.fs_size_before = await fs_size(str(target))
        new_size = volume.capacity_bytes + 64 * MiB
        expanded = await controller.controller_expand_volume(
            ControllerExpandVolumeRequest(
                volume_id=volume_id, capacity_range=CapacityRange(required_bytes=new_size), volume_capability=cap
            )
        )
        await node.node_expand_volume(
            NodeExpandVolumeRequest(
                volume_id=volume_id,
                volume_path=str(target),
                staging_target_path=str(staging),
                capacity_range=CapacityRange(required_bytes=new_size),
                volume_capability=cap,
            )
        )
        result.expanded = expanded.capacity_bytes
        result.fs_size_after = await fs_size(str(target))
        step(
            f"expanded online to {human(expanded.capacity_bytes)}; filesystem {human(result.fs_size_before)}"
            f" -> {human(result.fs_size_after)} (NodeGetVolumeStats)"
        )

        if snapshot:
            snap = (
                await controller.create_snapshot(CreateSnapshotRequest(source_volume_id=volume_id, name="demo-snap"))
            ).snapshot
            assert snap is not None
            cleanup.insert(0, ("snapshot", snap.snapshot_id))
            step(f"CreateSnapshot -> {snap.snapshot_id}")
            clone = (
                await controller.create_volume(
                    CreateVolumeRequest(
                        name=f"demo-{backend}-clone",
                        capacity_range=CapacityRange(required_bytes=expanded.capacity_bytes),
                        volume_capabilities=[cap],
                        parameters=params,
                        volume_content_source=VolumeContentSource(
                            snapshot=VolumeContentSourceSnapshotSource(snapshot_id=snap.snapshot_id)
                        ),
                    )
                )
            ).volume
            assert clone is not None
            cleanup.insert(0, ("volume", clone.volume_id))
            clone_staging, clone_target = await mount(clone.volume_id, "pod-c")
            same = (clone_target / "data.txt").read_text() == payload
            result.snapshot_clone = "data matches" if same else "DATA DIFFERS"
            step(f"volume from snapshot {clone.volume_id}: {result.snapshot_clone}")
            await unmount(clone.volume_id, clone_staging, clone_target)
        await unmount(volume_id, staging, target)
        step("unpublished and unstaged")
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        step(f"FAILED: {result.error}")
    finally:
        for volume_id_, staging_, target_ in list(mounted):  # after a failure: unmount before deleting
            with contextlib.suppress(Exception):
                await unmount(volume_id_, staging_, target_)
        for kind, object_id in cleanup:
            with contextlib.suppress(Exception):
                if kind == "snapshot":
                    await controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=object_id))
                else:
                    await controller.delete_volume(DeleteVolumeRequest(volume_id=object_id))
        result.capacity_after = await capacity()
        step(f"deleted; capacity after: {human(result.capacity_after)} available")
        result.seconds = time.monotonic() - start
    return result


# -- running a server and loop disks ----------------------------------------------------------------------------
@contextlib.contextmanager
def loop_disks(workdir: Path, count: int, size: int, say: Say) -> Iterator[list[str]]:
    devices: list[str] = []
    try:
        for index in range(count):
            image = workdir / f"disk{index}.img"
            with image.open("wb") as handle:
                handle.truncate(size)
            device = subprocess.run(
                ["losetup", "-f", "--show", "-P", str(image)], capture_output=True, text=True, check=True
            ).stdout.strip()
            devices.append(device)
        say(f"loop-file disks: {', '.join(devices)} ({human(size)} each, sparse)")
        yield devices
    finally:
        for device in devices:
            detach = ["losetup", "-d", device]
            subprocess.run(detach, capture_output=True, check=False)


@asynccontextmanager
async def running_server(workdir: Path, config: Path, say: Say) -> AsyncIterator[Channel]:
    sock = workdir / "csi.sock"
    log = (workdir / "server.log").open("wb")
    proc = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "localdisk.cli",
            "serve",
            "--endpoint",
            f"unix://{sock}",
            "--node-id",
            "demo-node",
            "--config",
            str(config),
            "--log-format",
            "text",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not _listening(sock):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {workdir / 'server.log'}")
            await anyio.sleep(0.05)
        say(f"CSI server pid {proc.pid} on unix://{sock}")
        channel = Channel(path=str(sock))
        try:
            yield channel
        finally:
            channel.close()
    finally:
        with anyio.CancelScope(shield=True):
            proc.terminate()
            with anyio.move_on_after(30) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
                await proc.wait()
            await proc.aclose()
        log.close()


def _listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _write_config(path: Path, kubelet_root: Path, pools: str) -> None:
    path.write_text(f'[node]\nkubelet_dir = "{kubelet_root}"\ndefault_fs = "ext4"\n\n{pools}')


async def partition_part(workdir: Path, say: Say) -> list[StoryResult]:
    say("== partition backend on host loop devices")
    with loop_disks(workdir, 2, 512 * MiB, say) as disks:
        config = workdir / "partition.toml"
        _write_config(config, workdir / "kubelet", f"[pools.partition.demo]\ndisks = {json.dumps(disks)}\n")
        async with running_server(workdir, config, say) as channel:
            # xfs: online ext4 growth needs CAP_SYS_RESOURCE, which containers often drop (the thin part shows ext4)
            return [await story(channel, Kubelet(workdir / "kubelet"), "partition", "xfs", 320 * MiB, say)]


async def lvm_part(workdir: Path, say: Say, vg: str, thin_pool: str) -> list[StoryResult]:
    say("== lvm and thin backends")
    config = workdir / "lvm.toml"
    _write_config(
        config,
        workdir / "kubelet",
        f'[pools.lvm.demo]\nvolume_group = "{vg}"\n\n'
        f'[pools.thin.demo]\nvolume_group = "{vg}"\nthin_pool = "{thin_pool}"\n',
    )
    async with running_server(workdir, config, say) as channel:
        kubelet = Kubelet(workdir / "kubelet")
        return [
            await story(channel, kubelet, "lvm", "btrfs", 256 * MiB, say),
            await story(channel, kubelet, "thin", "ext4", 256 * MiB, say, snapshot=True),
        ]


def summary(results: list[StoryResult]) -> str:
    from localdisk.commands.output import table

    rows = [
        (
            r.backend,
            r.filesystem,
            human(r.created),
            human(r.expanded) if r.expanded else "-",
            f"{human(r.fs_size_before)} -> {human(r.fs_size_after)}" if r.fs_size_after else "-",
            "yes" if r.data_kept else "NO",
            r.snapshot_clone,
            "yes" if r.capacity_after == r.capacity_before else "NO",
            f"{r.seconds:.1f}s",
            r.error or "ok",
        )
        for r in results
    ]
    headers = (
        "BACKEND",
        "FS",
        "CREATED",
        "EXPANDED",
        "FS SIZE",
        "DATA KEPT",
        "SNAPSHOT+CLONE",
        "SPACE BACK",
        "TIME",
        "RESULT",
    )
    return table(headers, rows)


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="localdisk-demo-", dir="/var/tmp"))


def save_results(path: Path, results: list[StoryResult]) -> None:
    path.write_text(json.dumps([asdict(r) for r in results]))


def load_results(path: Path) -> list[StoryResult]:
    return [StoryResult(**r) for r in json.loads(path.read_text())]


def remove_workdir(workdir: Path) -> None:
    for mount in _mounts_under(workdir):
        lazy_unmount = ["umount", "-l", mount]
        subprocess.run(lazy_unmount, capture_output=True, check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == str(root) or mount_point.startswith(f"{root}/"):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def has_device_mapper() -> bool:
    return os.path.exists("/dev/mapper/control")
