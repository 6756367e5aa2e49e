"""Hostile input to the Node service: paths, capabilities, mount flags and volume IDs chosen to hurt.

Property-based over every Node RPC. Whatever the request holds, the answer is a proper gRPC status (never UNKNOWN
or INTERNAL), nothing outside the kubelet root is mounted, created or removed, and (on real devices) no argv of
mkfs, mount, umount, blkid or blockdev holds a hostile string, a request path before `--`, or an option localdisk
does not use. On the fake backend (no root needed) the requests stop at validation or at the missing device; on the
partition backend (root, one loop device) they reach mkfs and mount for real.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import betterproto2
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdisk import VolumeManager
from localdisk._proto.csi.v1 import (
    ControllerStub,
    NodeExpandVolumeRequest,
    NodeGetCapabilitiesRequest,
    NodeGetInfoRequest,
    NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    NodeStub,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
)
from localdisk.config import NodeConfig, NodeSettings
from localdisk.config import parse as parse_config
from localdisk.csi.controller import ControllerService
from localdisk.csi.identity import IdentityService
from localdisk.csi.node import NodeService
from localdisk.csi.paths import KubeletPaths
from localdisk.errors import InvalidArgument
from localdisk.mounts import Mounter, mount_flags
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.csi_helpers import block_cap, create_request, csi_for, mount_cap
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.node_lifecycle import release_mounts
from tests.reliability.hostile import CAPABILITIES, RANGES, ArgvWatch, path_strategy, proper, volume_ids
from tests.reliability.tally import TALLY
from tests.test_partition_backend import partition_pool

PATH_FIELDS = {"staging_target_path", "target_path", "volume_path"}
Send = Callable[[NodeStub], Awaitable[Any]]


@dataclass
class Place:
    """A kubelet root with a symlink that stays inside it and one that leads out, next to a directory to guard."""

    root: Path
    outside: Path
    inside_link: Path
    outside_link: Path

    @classmethod
    def make(cls, base: Path) -> Place:
        root, outside = base / "kubelet", base / "outside"
        (root / "pods" / "real").mkdir(parents=True)
        (root / "pods" / "file").write_text("")  # a regular file: paths through it cannot exist
        (outside / "empty-dir").mkdir(parents=True)
        (outside / "empty-file").touch()
        place = cls(root, outside, root / "pods" / "in", root / "pods" / "out")
        place.inside_link.symlink_to(root / "pods" / "real")
        place.outside_link.symlink_to(outside)
        return place

    def outside_state(self) -> set[str]:
        return {str(p.relative_to(self.outside)) for p in self.outside.rglob("*")}


def strings_in(message: object, into: dict[str, set[str]]) -> None:
    """Every string of a request, sorted into path fields, mount flags and the rest."""
    if isinstance(message, betterproto2.Message):
        for name in vars(message):
            value = getattr(message, name)
            if name in PATH_FIELDS and isinstance(value, str):
                into["paths"].add(value)
            elif name == "mount_flags":
                into["flags"].update(value)
            else:
                strings_in(value, into)
    elif isinstance(message, str):
        into["other"].add(message)
    elif isinstance(message, dict):
        for key, value in message.items():
            strings_in(key, into)
            strings_in(value, into)
    elif isinstance(message, list):
        for item in message:
            strings_in(item, into)


def node_requests(place: Place, ids: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, object]]:
    paths = path_strategy(str(place.root), str(place.inside_link), str(place.outside_link))
    caps = st.one_of(st.none(), CAPABILITIES, st.just(mount_cap()), st.just(mount_cap("xfs")))
    return st.one_of(
        st.tuples(
            st.just("node_stage_volume"),
            st.builds(NodeStageVolumeRequest, volume_id=ids, staging_target_path=paths, volume_capability=caps),
        ),
        st.tuples(
            st.just("node_unstage_volume"),
            st.builds(NodeUnstageVolumeRequest, volume_id=ids, staging_target_path=paths),
        ),
        st.tuples(
            st.just("node_publish_volume"),
            st.builds(
                NodePublishVolumeRequest,
                volume_id=ids,
                staging_target_path=paths,
                target_path=paths,
                volume_capability=caps,
                readonly=st.booleans(),
            ),
        ),
        st.tuples(
            st.just("node_unpublish_volume"), st.builds(NodeUnpublishVolumeRequest, volume_id=ids, target_path=paths)
        ),
        st.tuples(
            st.just("node_get_volume_stats"),
            st.builds(NodeGetVolumeStatsRequest, volume_id=ids, volume_path=paths, staging_target_path=paths),
        ),
        st.tuples(
            st.just("node_expand_volume"),
            st.builds(
                NodeExpandVolumeRequest,
                volume_id=ids,
                volume_path=paths,
                staging_target_path=st.one_of(st.just(""), paths),
                capacity_range=RANGES,
                volume_capability=caps,
            ),
        ),
        st.tuples(st.just("node_get_info"), st.just(NodeGetInfoRequest())),
        st.tuples(st.just("node_get_capabilities"), st.just(NodeGetCapabilitiesRequest())),
    )


# Valid paths (inside the root, normalized) whose names look like options, shell or Unicode: they must reach
# mount(8) only as absolute paths after `--`.
ODD_DIRS = ["-o", "--bind", "ünï 🙂", "a b;c", "$(id)", "-"]


def valid_flows(place: Place, ids: list[str]) -> st.SearchStrategy[list[tuple[str, object]]]:
    """Whole stage/publish/stats/expand/unpublish/unstage sequences that pass validation, on odd valid paths."""

    def flow(volume_id: str, kind: str, flags: list[str], readonly: bool, dirs: list[str]) -> list[tuple[str, object]]:
        base = place.inside_link if len(dirs[0]) % 2 else place.root / "pods" / "real"
        staging, target = str(base / dirs[0] / "stage"), str(base / dirs[1] / "target")
        cap = block_cap() if kind == "block" else mount_cap(kind, flags=flags)
        return [
            (
                "node_stage_volume",
                NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap),
            ),
            (
                "node_publish_volume",
                NodePublishVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=staging,
                    target_path=target,
                    volume_capability=cap,
                    readonly=readonly,
                ),
            ),
            ("node_get_volume_stats", NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target)),
            (
                "node_expand_volume",
                NodeExpandVolumeRequest(volume_id=volume_id, volume_path=target, staging_target_path=staging),
            ),
            ("node_unpublish_volume", NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)),
            ("node_unstage_volume", NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)),
        ]

    return st.builds(
        flow,
        st.sampled_from(ids),
        st.sampled_from(["ext4", "block", "ext4"]),
        st.lists(st.sampled_from(["noatime", "nodev", "nosuid", "ro", "noexec", "sync"]), max_size=3, unique=True),
        st.booleans(),
        st.lists(st.sampled_from(ODD_DIRS), min_size=2, max_size=2),
    ).flatmap(lambda calls: st.just(calls[: len(calls)]) | st.integers(1, len(calls)).map(lambda n: calls[:n]))


@dataclass
class NodeBench:
    """One Node service (and a controller to make volumes with) over an in-memory channel."""

    place: Place
    manager: VolumeManager
    runner: CommandRunner
    watch: ArgvWatch
    node: NodeStub
    controller: ControllerStub
    volume_ids: list[str] = field(default_factory=list)
    sent: int = 0

    async def run(self, calls: list[tuple[str, object]]) -> None:
        before = self.place.outside_state()
        mounts_before = {m.mount_point for m in Mounter().mounts()}
        strings: dict[str, set[str]] = {"paths": set(), "flags": set(), "other": set()}
        self.watch.seen.clear()  # a failed example leaves its commands unchecked; shrinking runs more
        try:
            for method, request in calls:
                self.sent += 1
                strings_in(request, strings)
                try:
                    await getattr(self.node, method)(request)
                except GRPCError as exc:
                    proper(exc)
        finally:
            if os.geteuid() == 0:
                await release_mounts(self.place.root, self.runner)
                for volume_id in self.volume_ids:  # a read-only block publication leaves the device read-only
                    device = (await self.manager.get_volume(volume_id)).device_path
                    if device:
                        await self.runner.run(["blockdev", "--setrw", device])
        new_mounts = {m.mount_point for m in Mounter().mounts()} - mounts_before
        root = os.path.realpath(self.place.root)
        assert all(p.startswith(root + "/") for p in new_mounts), f"mounted outside the kubelet root: {new_mounts}"
        assert self.place.outside_state() == before, "something outside the kubelet root was created or removed"
        self.watch.check(*self._classify(strings))

    def _classify(self, strings: dict[str, set[str]]) -> tuple[set[str], set[str], set[str]]:
        """Request paths the Node service accepts may reach mount(8); refused ones and all else must not."""
        checker = KubeletPaths(str(self.place.root))
        hostile = set(strings["other"])
        paths: set[str] = set()
        for path in strings["paths"]:
            try:
                paths |= {path, checker.check(path, "path")}
            except InvalidArgument:
                hostile.add(path)
        flags: set[str] = set()
        for flag in strings["flags"]:
            try:
                flags |= set(mount_flags([flag]))
            except InvalidArgument:
                hostile.add(flag)
        hostile -= set(self.volume_ids)  # real IDs are not request-controlled in the sense checked here
        return hostile, paths, flags


@asynccontextmanager
async def bench(
    manager: VolumeManager, runner: CommandRunner, watch: ArgvWatch, place: Place
) -> AsyncIterator[NodeBench]:
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(place.root)))
    node = NodeService(manager, "node-1", config, Mounter(runner))
    async with manager.session(), ChannelFor([IdentityService(), ControllerService(manager, "node-1"), node]) as ch:
        yield NodeBench(place, manager, runner, watch, NodeStub(ch), ControllerStub(ch))


def run_property(
    make: Callable[[], AbstractAsyncContextManager[NodeBench]],
    calls_for: Callable[[NodeBench], st.SearchStrategy[list[tuple[str, object]]]],
    examples: int,
    suite: str,
) -> NodeBench:
    """Run hypothesis examples against one bench kept open for all of them (setting up disks per example is slow)."""
    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(make()) as node:

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(calls=calls_for(node))
        def examples_(calls: list[tuple[str, object]]) -> None:
            portal.call(node.run, calls)

        try:
            examples_()
        finally:
            TALLY.hostile[suite] += node.sent
            TALLY.argv_checked += node.watch.checked
    return node


def test_node_rpcs_on_the_fake_backend(tmp_path: Path) -> None:
    place = Place.make(tmp_path)
    watch = ArgvWatch()
    runner = CommandRunner(default_timeout=60, observers=[watch])

    @asynccontextmanager
    async def make() -> AsyncIterator[NodeBench]:
        manager = VolumeManager.from_config(parse_config({"pools": {"fake": {"default": {"default": True}}}}))
        async with bench(manager, runner, watch, place) as node:
            answer = await node.controller.create_volume(create_request("pvc-hostile-node"))
            assert answer.volume is not None
            node.volume_ids.append(answer.volume.volume_id)
            yield node

    def calls(node: NodeBench) -> st.SearchStrategy[list[tuple[str, object]]]:
        ids = st.one_of(st.sampled_from(node.volume_ids), volume_ids("fake", "default", node.volume_ids))
        return st.lists(node_requests(place, ids), min_size=1, max_size=5)

    run_property(make, calls, 300, "node rpcs, fake backend")


@needs_loop_devices
def test_node_rpcs_on_partitions(tmp_path: Path) -> None:
    """The same on real partitions: requests that pass validation format, mount and bind for real."""
    place = Place.make(tmp_path)
    watch = ArgvWatch()
    runner = CommandRunner(default_timeout=60, observers=[watch])

    @asynccontextmanager
    async def make() -> AsyncIterator[NodeBench]:
        async with loop_disks(1, 96 * MiB) as disks, partition_pool(disks, opened=False) as backend:
            backend.runner = runner
            manager = VolumeManager({(backend.kind, backend.pool): backend}, {backend.kind: backend.pool})
            async with bench(manager, runner, watch, place) as node:
                for name in ("pvc-hostile-a", "--pvc-hostile-b"):
                    request = create_request(name, 32 * MiB, "partition", "test")
                    answer = await node.controller.create_volume(request)
                    assert answer.volume is not None
                    node.volume_ids.append(answer.volume.volume_id)
                watch.seen.clear()
                yield node

    def calls(node: NodeBench) -> st.SearchStrategy[list[tuple[str, object]]]:
        ids = st.one_of(st.sampled_from(node.volume_ids), volume_ids("partition", "test", node.volume_ids))
        flows = valid_flows(place, node.volume_ids)
        hostile = node_requests(place, ids)
        return st.lists(st.one_of(flows, hostile.map(lambda call: [call])), min_size=1, max_size=4).map(
            lambda groups: [call for group in groups for call in group]
        )

    node = run_property(make, calls, 150, "node rpcs, partition backend")
    assert node.watch.checked > 0, "no command ran: the property never reached a real device"


@pytest.mark.anyio
async def test_paths_no_file_can_have(tmp_path: Path) -> None:
    """Found by the property above: a path below a regular file (ENOTDIR) or with a component over NAME_MAX
    (ENAMETOOLONG) made NodeUnpublishVolume fail with INTERNAL. Unpublishing what cannot exist succeeds; a name
    no file can have is INVALID_ARGUMENT."""
    place = Place.make(tmp_path)
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(place.root)))
    manager = VolumeManager.from_config(parse_config({"pools": {"fake": {"default": {"default": True}}}}))
    async with csi_for(manager, config=config) as csi:
        below_file = str(place.root / "pods" / "file" / "target")
        await csi.node.node_unpublish_volume(
            NodeUnpublishVolumeRequest(volume_id="fake:default:v", target_path=below_file)
        )
        await csi.node.node_unstage_volume(
            NodeUnstageVolumeRequest(volume_id="fake:default:v", staging_target_path=below_file)
        )
        too_long = str(place.root / "pods" / ("z" * 256))
        with pytest.raises(GRPCError) as refused:
            await csi.node.node_unpublish_volume(
                NodeUnpublishVolumeRequest(volume_id="fake:default:v", target_path=too_long)
            )
        assert refused.value.status == Status.INVALID_ARGUMENT
        assert (place.root / "pods" / "file").is_file()
