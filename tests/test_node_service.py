"""The Node service: lifecycle on loop devices (root), and request and path validation (anyone).

`TestLoopContract` checks that the test-only loop backend is an honest `VolumeBackend`; `TestLoopNode` binds the
reusable `NodeLifecycle` suite to it and adds what only a loop backend can do (pull the device from under a
mount). The rest runs without root on the fake backend: validation happens before any device is needed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from grpclib.const import Status

from localdisk import CreateRequest, ObjectRef, VolumeManager, parse_config
from localdisk._proto.csi.v1 import (
    CapacityRange,
    DeleteVolumeRequest,
    NodeExpandVolumeRequest,
    NodeGetCapabilitiesRequest,
    NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest,
    NodeServiceCapabilityRpcType,
    NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityMountVolume,
)
from localdisk.config import NodeConfig, NodeSettings, PoolEntry
from localdisk.csi.node import NodeService
from localdisk.errors import InvalidArgument
from localdisk.mounts import Mounter, Signature, mount_flags, parse_mountinfo, parse_probe
from localdisk.registry import PoolConfig
from localdisk.runner import CommandRunner
from tests.contract import BackendContract, manager_for
from tests.csi_helpers import Csi, Mode, block_cap, create_request, csi_for, mount_cap
from tests.loopbackend import LoopBackend, require_loop_devices
from tests.node_lifecycle import NodeLifecycle, expect, kubelet_paths, release_mounts

pytestmark = pytest.mark.anyio


@pytest.fixture
async def loop_backend(tmp_path: Path) -> AsyncIterator[LoopBackend]:
    require_loop_devices()
    backend = LoopBackend("default", tmp_path / "loop-pool", CommandRunner())
    await backend.open()
    try:
        yield backend
    finally:
        try:
            for volume in await backend.list_volumes():
                await backend.delete_volume(volume.ref.handle)
        finally:
            await backend.detach_all()
            await backend.aclose()


@pytest.mark.root
class TestLoopContract(BackendContract):
    @pytest.fixture
    def backend(self, loop_backend: LoopBackend) -> LoopBackend:
        return loop_backend


class TestLoopNode(NodeLifecycle):
    @pytest.fixture
    def backend(self, loop_backend: LoopBackend) -> LoopBackend:
        return loop_backend

    async def test_volume_removed_underneath_is_not_found(
        self, csi: Csi, backend: LoopBackend, kubelet_root: Path, runner: CommandRunner
    ) -> None:
        for kind, cap in (("fs", mount_cap("ext4")), ("block", block_cap())):
            name = f"pvc-gone-{kind}"
            volume_id = await self.create(csi, backend, name, cap)
            paths = kubelet_paths(kubelet_root, name, block=kind == "block")
            await self.stage_and_publish(csi, volume_id, paths, cap)
            device = await self.device_of(csi, volume_id)
            await backend.delete_volume(ObjectRef.parse(volume_id).handle)  # loop detached, image deleted
            # CSI: NodeGetVolumeStats of a volume that does not exist is NOT_FOUND, not OK with a condition.
            error = await expect(Status.NOT_FOUND, self.stats(csi, volume_id, paths.target))
            assert "not found" in error
            # Cleaning up still works, and the loop device is really released afterwards.
            await self.unpublish_and_unstage(csi, volume_id, paths)
            await self.unpublish_and_unstage(csi, volume_id, paths)
            listed = await runner.run(["losetup", "--list", "--noheadings", "--output", "NAME"])
            assert device not in listed.text.split()
            assert Mounter(runner).mounts_under(str(kubelet_root)) == []

    @pytest.mark.parametrize(("pool_fs", "expected"), [("xfs", "xfs"), (None, "btrfs")])
    async def test_filesystem_of_an_empty_device_comes_from_pool_then_node(
        self, backend: LoopBackend, kubelet_root: Path, runner: CommandRunner, pool_fs: str | None, expected: str
    ) -> None:
        config = NodeConfig(
            node=NodeSettings(kubelet_dir=str(kubelet_root), default_fs="btrfs"),
            pools=(PoolEntry(backend.kind, backend.pool, PoolConfig(fs_type=pool_fs)),),
        )
        async with csi_for(manager_for(backend), config=config) as csi:
            volume_id = await self.create(csi, backend, "pvc-default-fs", mount_cap(""))
            paths = kubelet_paths(kubelet_root, "pvc-default-fs", block=False)
            await self.stage_and_publish(csi, volume_id, paths, mount_cap(""))
            device = await self.device_of(csi, volume_id)
            assert (await Mounter(runner).probe(device)).fs_type == expected
            await self.unpublish_and_unstage(csi, volume_id, paths)
        # Without fs_type, a device that has a filesystem keeps it, whatever the defaults say now (ext4 here).
        plain = NodeConfig(node=NodeSettings(kubelet_dir=str(kubelet_root)))
        async with csi_for(manager_for(backend), config=plain) as csi:
            await self.stage_and_publish(csi, volume_id, paths, mount_cap(""))
            staged = Mounter(runner).mount_at(paths.staging)
            assert staged is not None and staged.fs_type == expected
            assert (await Mounter(runner).probe(device)).fs_type == expected
            await self.unpublish_and_unstage(csi, volume_id, paths)
            await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))

    async def test_resized_loop_shows_in_block_stats(self, csi: Csi, backend: LoopBackend, kubelet_root: Path) -> None:
        volume_id = await self.create(csi, backend, "pvc-block-size", block_cap())
        paths = kubelet_paths(kubelet_root, "pvc-block-size", block=True)
        await self.stage_and_publish(csi, volume_id, paths, block_cap())
        await csi.manager.expand_volume(volume_id, self.grown_bytes)
        grown = await csi.node.node_expand_volume(
            NodeExpandVolumeRequest(volume_id=volume_id, volume_path=paths.target)
        )
        assert grown.capacity_bytes == self.grown_bytes
        await self.unpublish_and_unstage(csi, volume_id, paths)
        await csi.manager.delete_volume(volume_id)


# -- without root: validation on the fake backend ---------------------------------------------------------------
def fake_manager() -> VolumeManager:
    return VolumeManager.from_config(parse_config({"pools": {"fake": {"default": {"default": True}}}}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    kubelet = tmp_path / "kubelet"
    (kubelet / "pods").mkdir(parents=True)
    return kubelet


@pytest.fixture
async def csi(root: Path) -> AsyncIterator[Csi]:
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(root)))
    try:
        async with csi_for(fake_manager(), config=config) as channel:
            yield channel
    finally:
        if os.geteuid() == 0:  # nothing should be mounted; if a bug mounted something, do not leave it
            assert await release_mounts(root, CommandRunner()) == []


async def fake_volume(csi: Csi, name: str = "pvc-fake") -> str:
    response = await csi.controller.create_volume(create_request(name))
    assert response.volume is not None
    return response.volume.volume_id


def stage(volume_id: str, path: str, cap: VolumeCapability | None = None) -> NodeStageVolumeRequest:
    return NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=path, volume_capability=cap if cap is not None else mount_cap()
    )


async def test_capabilities(csi: Csi) -> None:
    response = await csi.node.node_get_capabilities(NodeGetCapabilitiesRequest())
    types = {c.rpc.type for c in response.capabilities if c.rpc is not None}
    rpc = NodeServiceCapabilityRpcType
    assert types == {
        rpc.STAGE_UNSTAGE_VOLUME,
        rpc.GET_VOLUME_STATS,
        rpc.EXPAND_VOLUME,
        rpc.VOLUME_CONDITION,
        rpc.SINGLE_NODE_MULTI_WRITER,
    }


async def test_unknown_volume_is_not_found(csi: Csi, root: Path) -> None:
    staging = str(root / "staging")
    await expect(Status.NOT_FOUND, csi.node.node_stage_volume(stage("fake:default:vnope", staging)))
    await expect(Status.NOT_FOUND, csi.node.node_stage_volume(stage("not-a-localdisk-id", staging)))
    publish = NodePublishVolumeRequest(
        volume_id="fake:default:vnope",
        staging_target_path=staging,
        target_path=str(root / "pods/p/mount"),
        volume_capability=mount_cap(),
    )
    await expect(Status.NOT_FOUND, csi.node.node_publish_volume(publish))


async def test_volume_without_device_is_failed_precondition(csi: Csi, root: Path) -> None:
    volume_id = await fake_volume(csi)
    error = await expect(Status.FAILED_PRECONDITION, csi.node.node_stage_volume(stage(volume_id, str(root / "s"))))
    assert "no device" in error


async def test_missing_fields_are_invalid_argument(csi: Csi, root: Path) -> None:
    volume_id = await fake_volume(csi)
    staging = str(root / "staging")
    target = str(root / "pods/p/mount")
    no_access_mode = VolumeCapability(mount=VolumeCapabilityMountVolume(fs_type="ext4"))
    no_access_type = VolumeCapability(access_mode=VolumeCapabilityAccessMode(mode=Mode.SINGLE_NODE_WRITER))
    calls = [
        csi.node.node_stage_volume(stage("", staging)),
        csi.node.node_stage_volume(stage(volume_id, "")),
        csi.node.node_stage_volume(NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging)),
        csi.node.node_stage_volume(stage(volume_id, staging, no_access_mode)),
        csi.node.node_stage_volume(stage(volume_id, staging, no_access_type)),
        csi.node.node_stage_volume(stage(volume_id, staging, mount_cap("ntfs"))),
        csi.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=volume_id)),
        csi.node.node_unstage_volume(NodeUnstageVolumeRequest(staging_target_path=staging)),
        csi.node.node_publish_volume(
            NodePublishVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=mount_cap())
        ),
        csi.node.node_publish_volume(
            NodePublishVolumeRequest(volume_id=volume_id, target_path=target, volume_capability=mount_cap())
        ),
        csi.node.node_publish_volume(
            NodePublishVolumeRequest(volume_id=volume_id, staging_target_path=staging, target_path=target)
        ),
        csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id)),
        csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(target_path=target)),
        csi.node.node_get_volume_stats(NodeGetVolumeStatsRequest(volume_id=volume_id)),
        csi.node.node_get_volume_stats(NodeGetVolumeStatsRequest(volume_path=target)),
        csi.node.node_expand_volume(NodeExpandVolumeRequest(volume_id=volume_id)),
        csi.node.node_expand_volume(
            NodeExpandVolumeRequest(
                volume_id=volume_id, volume_path=target, capacity_range=CapacityRange(required_bytes=-1)
            )
        ),
    ]
    for call in calls:
        await expect(Status.INVALID_ARGUMENT, call)


@pytest.mark.parametrize(
    "mode", [Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER]
)
async def test_multi_node_modes_are_refused(csi: Csi, root: Path, mode: Mode) -> None:
    volume_id = await fake_volume(csi)
    for cap in (mount_cap("ext4", mode), block_cap(mode)):
        error = await expect(
            Status.INVALID_ARGUMENT, csi.node.node_stage_volume(stage(volume_id, str(root / "s"), cap))
        )
        assert "single-node" in error


@pytest.mark.parametrize(
    "mode",
    [
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    ],
)
async def test_single_node_modes_pass_validation(csi: Csi, root: Path, mode: Mode) -> None:
    volume_id = await fake_volume(csi)  # gets as far as asking for the device, which the fake has none of
    await expect(
        Status.FAILED_PRECONDITION,
        csi.node.node_stage_volume(stage(volume_id, str(root / "s"), mount_cap("xfs", mode))),
    )


@pytest.mark.parametrize(
    "flag", ["rw,exec", "bind", "remount", "loop=/dev/loop0", "X-mount.mkdir", "x-systemd.automount", "a b", ""]
)
async def test_dangerous_mount_flags_are_refused(csi: Csi, root: Path, flag: str) -> None:
    volume_id = await fake_volume(csi)
    cap = mount_cap("ext4", flags=[flag])
    await expect(Status.INVALID_ARGUMENT, csi.node.node_stage_volume(stage(volume_id, str(root / "s"), cap)))


def bad_paths(root: Path, outside: Path) -> list[str]:
    return [
        "relative/path",
        "pods/p/mount",
        f"{root}/pods/../../escape",
        f"{root}/pods/./p",
        f"{root}//pods/p",
        f"{root}/pods/p/",
        str(root),
        str(outside),
        f"{root}-sibling/pods/p",
        f"{root}/pods/link-out/mount",
        f"{root}/pods/link-out",
        "/etc",
        "/",
    ]


@pytest.fixture
def outside(tmp_path: Path, root: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "pods" / "link-out").symlink_to(elsewhere)
    return elsewhere


async def test_paths_outside_the_kubelet_root_are_refused(csi: Csi, root: Path, outside: Path) -> None:
    volume_id = await fake_volume(csi)
    good = str(root / "pods/p/mount")
    for path in bad_paths(root, outside):
        calls = [
            csi.node.node_stage_volume(stage(volume_id, path)),
            csi.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=path)),
            csi.node.node_publish_volume(
                NodePublishVolumeRequest(
                    volume_id=volume_id, staging_target_path=good, target_path=path, volume_capability=mount_cap()
                )
            ),
            csi.node.node_publish_volume(
                NodePublishVolumeRequest(
                    volume_id=volume_id, staging_target_path=path, target_path=good, volume_capability=mount_cap()
                )
            ),
            csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=path)),
        ]
        for call in calls:
            await expect(Status.INVALID_ARGUMENT, call)
        # A volume_path is where the volume is staged or published: outside the root it cannot be (CSI: NOT_FOUND).
        for where in (
            csi.node.node_get_volume_stats(NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)),
            csi.node.node_expand_volume(NodeExpandVolumeRequest(volume_id=volume_id, volume_path=path)),
        ):
            assert "not staged or published" in await expect(Status.NOT_FOUND, where)
    assert list(outside.iterdir()) == [], "nothing may be created through the symlink"


async def test_symlink_inside_the_root_is_followed(csi: Csi, root: Path) -> None:
    (root / "pods" / "real").mkdir()
    (root / "pods" / "alias").symlink_to(root / "pods" / "real")
    target = root / "pods" / "alias" / "mount"
    await csi.node.node_unpublish_volume(
        NodeUnpublishVolumeRequest(volume_id="fake:default:v1", target_path=str(target))
    )


async def test_unpublish_and_unstage_of_nothing_succeed(csi: Csi, root: Path) -> None:
    target = root / "pods" / "p" / "mount"
    target.mkdir(parents=True)
    for _ in range(2):
        await csi.node.node_unpublish_volume(
            NodeUnpublishVolumeRequest(volume_id="fake:default:v1", target_path=str(target))
        )
        await csi.node.node_unstage_volume(
            NodeUnstageVolumeRequest(volume_id="fake:default:v1", staging_target_path=str(root / "never-staged"))
        )
    assert not target.exists(), "an empty target directory left by an earlier attempt is removed"


async def test_unpublish_never_deletes_files(csi: Csi, root: Path) -> None:
    target = root / "pods" / "p" / "mount"
    target.mkdir(parents=True)
    (target / "precious").write_text("not on any volume")
    await expect(
        Status.FAILED_PRECONDITION,
        csi.node.node_unpublish_volume(
            NodeUnpublishVolumeRequest(volume_id="fake:default:v1", target_path=str(target))
        ),
    )
    assert (target / "precious").read_text() == "not on any volume"


async def test_stats_of_missing_path_is_not_found(csi: Csi, root: Path) -> None:
    volume_id = await fake_volume(csi)
    request = NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(root / "pods/none/mount"))
    await expect(Status.NOT_FOUND, csi.node.node_get_volume_stats(request))


async def test_stats_of_unmounted_path_is_abnormal(csi: Csi, root: Path) -> None:
    volume_id = await fake_volume(csi)
    path = root / "pods" / "p" / "mount"
    path.mkdir(parents=True)
    stats = await csi.node.node_get_volume_stats(NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path)))
    assert stats.volume_condition is not None and stats.volume_condition.abnormal
    assert stats.volume_condition.message


# -- pure parts -------------------------------------------------------------------------------------------------
def test_parse_mountinfo() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "37 36 0:40 / /var/lib/kubelet/x ro,relatime shared:5 master:3 - btrfs /dev/loop3 rw,space_cache=v2\n"
        "38 36 0:6 /loop3 /var/lib/kubelet/blk ro,relatime - devtmpfs udev rw,mode=755\n"
        "garbage line\n"
    )
    first, second, third = parse_mountinfo(text)
    assert first.mount_point == "/mnt/with space" and first.root == "/mnt1" and first.fs_type == "ext3"
    assert first.dev == os.makedev(98, 0) and not first.readonly and "noatime" in first.options
    assert second.readonly and second.source == "/dev/loop3" and second.fs_type == "btrfs"
    assert third.root == "/loop3" and third.source == "udev"


def test_mount_flags() -> None:
    assert mount_flags(["noatime", "discard", "commit=30", "context=system_u:object_r:x_t:s0"]) == [
        "noatime",
        "discard",
        "commit=30",
        "context=system_u:object_r:x_t:s0",
    ]
    for bad in ("ro,remount", "--bind", "-o", "owner", "X-mount.subdir=a", "user=x", "a\nb"):
        with pytest.raises(InvalidArgument):
            mount_flags([bad])


async def test_default_filesystem_comes_from_pool_then_node(tmp_path: Path) -> None:
    config = NodeConfig(
        node=NodeSettings(kubelet_dir=str(tmp_path), default_fs="btrfs"),
        pools=(PoolEntry("fake", "fast", PoolConfig(fs_type="xfs")),),
    )
    service = NodeService(fake_manager(), "node-1", config)
    manager = service.manager
    volume = await manager.create_volume(CreateRequest(name="pvc-fs", backend="fake", required_bytes=1 << 20))
    assert service._default_fs(volume) == "btrfs"
    in_fast = replace(volume, ref=ObjectRef("fake", "fast", volume.ref.handle))
    assert service._default_fs(in_fast) == "xfs"


def test_parse_probe() -> None:
    partition_entry_only = (  # recorded: blkid -p -o export on an empty GPT partition made by the partition backend
        "DEVNAME=/dev/loop0p1\nPART_ENTRY_SCHEME=gpt\nPART_ENTRY_NAME=ld-fvyrmqvxe2yeialcpsu7xlbs6xefgd5r\n"
        "PART_ENTRY_UUID=92c188e4-a004-4fc3-b09a-bd30ad67b7ed\nPART_ENTRY_TYPE=0fc63daf-8483-4772-8e79-3d69d8477de4\n"
        "PART_ENTRY_NUMBER=1\nPART_ENTRY_OFFSET=2048\nPART_ENTRY_SIZE=655360\nPART_ENTRY_DISK=7:0\n"
    )
    assert parse_probe(partition_entry_only).empty
    xfs = "DEVNAME=/dev/loop0\nUUID=1f6bbcea\nBLOCK_SIZE=512\nTYPE=xfs\nUSAGE=filesystem\n"
    assert parse_probe(xfs) == Signature("xfs", "an xfs filesystem")
    assert parse_probe(partition_entry_only + "TYPE=ext4\nUSAGE=filesystem\n").fs_type == "ext4"
    assert parse_probe("DEVNAME=/dev/loop0\nPTUUID=ab\nPTTYPE=gpt\n").description == "a gpt partition table"
    swap = parse_probe("DEVNAME=/dev/loop0\nVERSION=1\nTYPE=swap\nUSAGE=other\n")
    assert swap.fs_type is None and not swap.empty
    assert not parse_probe("DEVNAME=/dev/loop0\nSBMAGIC=xyz\n").empty
