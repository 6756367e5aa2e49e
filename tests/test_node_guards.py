"""The Node service under hostile calls on real devices (issue 20): a path swapped for a symlink mid-call mounts
nothing outside the kubelet root; one volume's calls never unmount another's; bad paths, mount options and sizes
are the caller's error (never INTERNAL); and what can never work is refused up front.

Volumes are loop devices (`tests.loopbackend`); the tests need root.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib._typing import IServable
from grpclib.const import Status
from grpclib.testing import ChannelFor

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerStub,
    CreateVolumeRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    NodeStub,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
    VolumeCapability,
    VolumeCapabilityBlockVolume,
)
from localdisk.config import NodeConfig, NodeSettings
from localdisk.csi.controller import ControllerService
from localdisk.csi.node import NodeService
from localdisk.mounts import MIN_FS_BYTES, Mounter
from localdisk.runner import CommandResult, CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import block_cap, create_request, mount_cap
from tests.loopbackend import LoopBackend, require_loop_devices
from tests.node_lifecycle import expect, kubelet_paths, release_mounts

pytestmark = [pytest.mark.anyio, pytest.mark.root]


class SwappingRunner(CommandRunner):
    """Runs commands, but the first time `trigger` is about to run, replaces `victim` with a symlink to `outside`
    (the directory moves aside, as an attacker racing the server would do it)."""

    def __init__(self) -> None:
        super().__init__(default_timeout=120)
        self.trigger: str | None = None
        self.victim: Path | None = None
        self.outside: Path | None = None
        self.swapped = False

    async def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult:
        if self.trigger is not None and argv[0] == self.trigger and not self.swapped:
            assert self.victim is not None and self.outside is not None
            self.victim.rename(self.victim.with_name(self.victim.name + "-moved"))
            self.victim.symlink_to(self.outside)
            self.swapped = True
        return await super().run(argv, **kwargs)


@dataclass
class Bench:
    root: Path
    outside: Path
    runner: SwappingRunner
    backend: LoopBackend
    node: NodeStub
    controller: ControllerStub

    async def volume(self, name: str, cap: VolumeCapability, size: int = 64 * MiB) -> str:
        request = create_request(name, size, self.backend.kind, self.backend.pool, volume_capabilities=[cap])
        response = await self.controller.create_volume(request)
        assert response.volume is not None
        return response.volume.volume_id

    async def stage(self, volume_id: str, staging: str, cap: VolumeCapability) -> None:
        await self.node.node_stage_volume(
            NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap)
        )

    async def publish(self, volume_id: str, staging: str, target: str, cap: VolumeCapability) -> None:
        await self.node.node_publish_volume(
            NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
            )
        )

    def mounts_outside_root(self) -> list[str]:
        root = os.path.realpath(self.root)
        tmp = os.path.realpath(self.root.parent)
        return [
            m.mount_point
            for m in Mounter().mounts()
            if m.mount_point.startswith(tmp) and not m.mount_point.startswith(root + "/")
        ]


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    require_loop_devices()
    root, outside = tmp_path / "kubelet", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    runner = SwappingRunner()
    backend = LoopBackend("default", tmp_path / "loop-pool", runner)
    await backend.open()
    manager = manager_for(backend)
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(root)))
    servicers: list[IServable] = [
        ControllerService(manager, "node-1", config),
        NodeService(manager, "node-1", config, Mounter(runner)),
    ]
    try:
        async with manager.session(), ChannelFor(servicers) as channel:
            yield Bench(root, outside, runner, backend, NodeStub(channel), ControllerStub(channel))
    finally:
        await release_mounts(tmp_path, runner)
        try:
            for volume in await backend.list_volumes():
                await backend.delete_volume(volume.ref.handle)
        finally:
            await backend.detach_all()


# -- item 3: a symlink swapped in mid-call ----------------------------------------------------------------------
async def test_stage_with_a_symlink_swapped_in_during_the_probe_mounts_nothing_outside(bench: Bench) -> None:
    volume_id = await bench.volume("pvc-race-stage", mount_cap("ext4"))
    race = bench.root / "race"
    race.mkdir()
    bench.runner.trigger, bench.runner.victim, bench.runner.outside = "blkid", race, bench.outside
    await bench.stage(volume_id, str(race / "stage"), mount_cap("ext4"))
    assert bench.runner.swapped, "the swap happened during the call"
    assert bench.mounts_outside_root() == []
    assert list(bench.outside.iterdir()) == [], "nothing is made outside the root"
    # What was checked is what was mounted: the directory that moved aside, still inside the root.
    assert Mounter().mount_at(os.path.realpath(bench.root / "race-moved" / "stage")) is not None
    await bench.node.node_unstage_volume(
        NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(bench.root / "race-moved" / "stage"))
    )


@pytest.mark.parametrize("kind", ["ext4", "block"])
async def test_publish_with_a_symlink_swapped_in_before_mount_mounts_nothing_outside(bench: Bench, kind: str) -> None:
    cap = block_cap() if kind == "block" else mount_cap("ext4")
    volume_id = await bench.volume(f"pvc-race-publish-{kind}", cap)
    staging = bench.root / "staging"
    await bench.stage(volume_id, str(staging), cap)
    race = bench.root / "pods" / "race"
    race.mkdir(parents=True)
    bench.runner.trigger, bench.runner.victim, bench.runner.outside = "mount", race, bench.outside
    await bench.publish(volume_id, str(staging), str(race / "target"), cap)
    assert bench.runner.swapped
    assert bench.mounts_outside_root() == []
    assert list(bench.outside.iterdir()) == []


async def test_a_path_already_through_a_symlink_out_is_refused(bench: Bench) -> None:
    volume_id = await bench.volume("pvc-race-link", mount_cap("ext4"))
    (bench.root / "link").symlink_to(bench.outside)
    await expect(Status.INVALID_ARGUMENT, bench.stage(volume_id, str(bench.root / "link" / "stage"), mount_cap()))
    assert list(bench.outside.iterdir()) == []


# -- item 4: one volume's calls never touch another's mounts -----------------------------------------------------
async def test_unpublish_and_unstage_leave_other_volumes_mounts_alone(bench: Bench) -> None:
    cap = mount_cap("ext4")
    a, b = await bench.volume("pvc-a", cap), await bench.volume("pvc-b", cap)
    pa, pb = kubelet_paths(bench.root, "pvc-a", block=False), kubelet_paths(bench.root, "pvc-b", block=False)
    for volume_id, paths in ((a, pa), (b, pb)):
        await bench.stage(volume_id, paths.staging, cap)
        await bench.publish(volume_id, paths.staging, paths.target, cap)
    mounter = Mounter()
    for call in (
        bench.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=b, target_path=pa.target)),
        bench.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=a, staging_target_path=pb.staging)),
        bench.node.node_unpublish_volume(
            NodeUnpublishVolumeRequest(volume_id=a[:-4] + "ffff", target_path=pa.target)  # unknown volume
        ),
    ):
        message = await expect(Status.FAILED_PRECONDITION, call)
        assert "left as it is" in message
    for path in (pa.target, pa.staging, pb.target, pb.staging):
        assert mounter.mount_at(path) is not None, f"{path} was unmounted"
    for volume_id, paths in ((a, pa), (b, pb)):
        await bench.node.node_unpublish_volume(
            NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=paths.target)
        )
        await bench.node.node_unstage_volume(
            NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=paths.staging)
        )
    assert mounter.mounts_under(os.path.realpath(bench.root)) == []


# -- item 5: the caller's mistakes are the caller's errors ---------------------------------------------------------
async def test_paths_at_or_under_regular_files_are_failed_precondition(bench: Bench) -> None:
    cap = mount_cap("ext4")
    volume_id = await bench.volume("pvc-files", cap)
    (bench.root / "afile").write_text("x")
    for staging in (bench.root / "afile", bench.root / "afile" / "stage"):
        await expect(Status.FAILED_PRECONDITION, bench.stage(volume_id, str(staging), cap))
    device = (await bench.backend.list_volumes())[0].device_path
    assert device is not None and (await Mounter().probe(device)).empty, "nothing was formatted"
    staging = bench.root / "staging"
    await bench.stage(volume_id, str(staging), cap)
    await expect(Status.FAILED_PRECONDITION, bench.publish(volume_id, str(staging), str(bench.root / "afile/t"), cap))
    block_id = await bench.volume("pvc-files-block", block_cap())
    await expect(
        Status.FAILED_PRECONDITION,
        bench.publish(block_id, str(bench.root / "bstage"), str(bench.root / "afile" / "t"), block_cap()),
    )


async def test_an_unknown_mount_option_is_invalid_argument(bench: Bench) -> None:
    cap = mount_cap("ext4", flags=["bogus_option_xyz"])
    volume_id = await bench.volume("pvc-bogus", cap)
    staging = bench.root / "staging"
    message = await expect(Status.INVALID_ARGUMENT, bench.stage(volume_id, str(staging), cap))
    assert "bogus_option_xyz" in message
    assert Mounter().mount_at(str(staging)) is None, "the trial mount was undone"
    await bench.stage(volume_id, str(staging), mount_cap("ext4", flags=["noatime"]))  # a known option works


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
async def test_small_volumes_of_xfs_and_btrfs_are_rounded_up_or_refused(bench: Bench, fs: str) -> None:
    minimum = MIN_FS_BYTES[fs]
    request = create_request(
        f"pvc-small-{fs}", 32 * MiB, bench.backend.kind, bench.backend.pool, volume_capabilities=[mount_cap(fs)]
    )
    response = await bench.controller.create_volume(request)
    assert response.volume is not None and response.volume.capacity_bytes >= minimum
    await bench.stage(response.volume.volume_id, str(bench.root / f"stage-{fs}"), mount_cap(fs))
    capped = CreateVolumeRequest(
        name=f"pvc-small-capped-{fs}",
        capacity_range=CapacityRange(required_bytes=32 * MiB, limit_bytes=64 * MiB),
        volume_capabilities=[mount_cap(fs)],
        parameters={"backend": bench.backend.kind},
    )
    assert str(minimum) in await expect(Status.OUT_OF_RANGE, bench.controller.create_volume(capped))


# -- item 9: what can never work is refused up front ---------------------------------------------------------------
async def test_requests_that_cannot_work_are_refused(bench: Bench) -> None:
    cap = mount_cap("ext4")
    volume_id = await bench.volume("pvc-never", cap)
    staging = str(bench.root / "staging")
    await bench.stage(volume_id, staging, cap)
    await expect(Status.INVALID_ARGUMENT, bench.publish(volume_id, staging, staging, cap))
    await expect(Status.INVALID_ARGUMENT, bench.publish(volume_id, staging, staging + "/inside", cap))
    full = bench.root / "pods" / "full"
    full.mkdir(parents=True)
    (full / "keep.txt").write_text("not the volume's")
    await expect(Status.FAILED_PRECONDITION, bench.publish(volume_id, staging, str(full), cap))
    assert (full / "keep.txt").read_text() == "not the volume's" and Mounter().mount_at(str(full)) is None
    both = mount_cap("ext4")
    both.block = VolumeCapabilityBlockVolume()
    await expect(Status.INVALID_ARGUMENT, bench.publish(volume_id, staging, str(bench.root / "pods/t"), both))
    mutable = create_request("pvc-mutable", 64 * MiB, bench.backend.kind, bench.backend.pool)
    mutable.mutable_parameters = {"iops": "100"}
    assert "mutable_parameters" in await expect(Status.INVALID_ARGUMENT, bench.controller.create_volume(mutable))
