"""Hostile input to every Controller RPC, served by the partition backend on a real GPT disk.

tests/test_hostile.py sends the same kind of requests to the fake backend; here they reach parted, sfdisk,
wipefs and partx on a loop device, whose commands an `ArgvWatch` checks: no request string in any argv, no
option localdisk does not use. The disk also holds a partition localdisk did not make (the pool adopts free space
only): requests naming its PARTUUID must never touch it. After each example every volume the example created is
deleted, and the disk must be back to what it was: same partitions, same capacity, the foreign data intact.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio.from_thread
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from localdisk import VolumeManager
from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerGetVolumeRequest,
    ControllerStub,
    CreateSnapshotRequest,
    CreateVolumeRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
    ListSnapshotsRequest,
    ListVolumesRequest,
    Topology,
    TopologyRequirement,
    ValidateVolumeCapabilitiesRequest,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
    VolumeContentSourceVolumeSource,
)
from localdisk.csi.controller import ControllerService
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.csi_helpers import create_request
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.reliability.hostile import CAPABILITIES, NAMES, RANGES, SIZES, ArgvWatch, parameters, proper, volume_ids
from tests.reliability.tally import TALLY
from tests.reliability.test_hostile_node import strings_in
from tests.reliability.views import LvmView, PartitionView
from tests.test_partition_backend import partition_pool, read_direct, write_synced

POOL = "test"
FOREIGN = b"precious data that is not localdisk's" * 100


@dataclass
class Bench:
    controller: ControllerStub
    manager: VolumeManager
    watch: ArgvWatch
    view: PartitionView | LvmView
    disk: str  # the disk, or the volume group
    base_id: str
    foreign_id: str
    foreign_node: str  # the device of the object localdisk did not make
    backend: str = "partition"
    pool: str = POOL
    layout: dict[str, str] = field(default_factory=dict)  # GPT name -> PARTUUID at the start
    capacity: int = 0
    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)

    async def run(self, calls: list[tuple[str, object]]) -> None:
        created: list[str] = []
        snapshots: list[str] = []
        strings: dict[str, set[str]] = {"paths": set(), "flags": set(), "other": set()}
        self.watch.seen.clear()  # a failed example leaves its commands unchecked; shrinking runs more
        try:
            for method, request in calls:
                self.sent += 1
                strings_in(request, strings)
                if method == "expand_created":  # a hostile size for a volume this example made
                    assert isinstance(request, ControllerExpandVolumeRequest)
                    if not created:
                        continue
                    method, request.volume_id = "controller_expand_volume", created[-1]
                try:
                    answer = await getattr(self.controller, method)(request)
                except GRPCError as exc:
                    proper(exc)
                    self.answers[f"{method} {exc.status.name}"] += 1
                    continue
                self.answers[f"{method} OK"] += 1
                volume = getattr(answer, "volume", None)
                if method == "create_volume" and volume is not None and volume.volume_id != self.base_id:
                    created.append(volume.volume_id)
                snapshot = getattr(answer, "snapshot", None)
                if method == "create_snapshot" and snapshot is not None:
                    snapshots.append(snapshot.snapshot_id)
        finally:
            for volume_id in created:
                await self.manager.delete_volume(volume_id)
            for snapshot_id in snapshots:
                await self.manager.delete_snapshot(snapshot_id)
        on_disk = {name: uuid for name, (uuid, _) in self.view.objects().items()}
        assert on_disk == self.layout, f"the disk changed: {on_disk} != {self.layout}"
        assert not self.view.problems(), self.view.problems()
        capacity = await self.manager.capacity(self.backend, self.pool)
        assert capacity.total_bytes == self.capacity, (capacity, self.capacity)
        assert read_direct(self.foreign_node, 0, 4096)[: len(FOREIGN[:4096])] == FOREIGN[:4096]
        hostile = strings["other"] | strings["flags"] | strings["paths"]
        self.watch.check(hostile - {self.backend, self.pool, "ext4", "xfs", "btrfs", self.base_id})


def calls_for(
    base_id: str, foreign_id: str, backend: str = "partition", pool: str = POOL, size_unit: int = MiB
) -> st.SearchStrategy[list[tuple[str, object]]]:
    """Lists of hostile calls to one pool; `base_id` is a volume that must survive, `foreign_id` the handle of an
    object localdisk did not make; `size_unit` is the pool's alignment (sizes around it are the interesting ones)."""
    real = [base_id, f"{backend}:{pool}:{foreign_id}"]
    ids = st.one_of(st.sampled_from(real), volume_ids(backend, pool, real))
    not_base = ids.filter(lambda i: i != base_id)  # deleting the base volume is legitimate; keep it
    params = parameters(backend)
    sources = st.one_of(
        st.none(),
        st.builds(VolumeContentSource, snapshot=st.builds(VolumeContentSourceSnapshotSource, snapshot_id=ids)),
        st.builds(VolumeContentSource, volume=st.builds(VolumeContentSourceVolumeSource, volume_id=ids)),
        st.just(VolumeContentSource()),
    )
    segments = st.dictionaries(st.sampled_from(["topology.localdisk.io/node", "zone", ""]), NAMES, max_size=2)
    topologies = st.one_of(
        st.none(),
        st.builds(TopologyRequirement, requisite=st.lists(st.builds(Topology, segments=segments), max_size=2)),
    )
    caps = st.lists(CAPABILITIES, max_size=3)
    one = st.one_of(
        st.tuples(
            st.just("create_volume"),
            st.builds(
                CreateVolumeRequest,
                name=NAMES,
                capacity_range=RANGES,
                volume_capabilities=caps,
                parameters=params,
                volume_content_source=sources,
                accessibility_requirements=topologies,
            ),
        ),
        st.tuples(
            st.just("create_volume"),  # everything valid but the name and the size
            st.builds(
                lambda name, size: create_request(name, size, backend, pool),
                NAMES.filter(bool),
                st.integers(0, 16 * MiB)
                | st.sampled_from([1, size_unit - 1, size_unit + 1, 47 * size_unit, 64 * size_unit]),
            ),
        ),
        st.tuples(
            st.just("expand_created"),
            st.builds(
                ControllerExpandVolumeRequest,
                capacity_range=RANGES
                | st.builds(CapacityRange, required_bytes=st.integers(0, 32 * MiB), limit_bytes=st.just(0) | SIZES),
                volume_capability=st.none() | CAPABILITIES,
            ),
        ),
        st.tuples(st.just("delete_volume"), st.builds(DeleteVolumeRequest, volume_id=not_base)),
        st.tuples(
            st.just("controller_expand_volume"),
            st.builds(
                ControllerExpandVolumeRequest,
                volume_id=not_base,
                capacity_range=RANGES,
                volume_capability=st.one_of(st.none(), CAPABILITIES),
            ),
        ),
        st.tuples(st.just("controller_get_volume"), st.builds(ControllerGetVolumeRequest, volume_id=ids)),
        st.tuples(
            st.just("validate_volume_capabilities"),
            st.builds(ValidateVolumeCapabilitiesRequest, volume_id=ids, volume_capabilities=caps, parameters=params),
        ),
        st.tuples(
            st.just("list_volumes"),
            st.builds(
                ListVolumesRequest, max_entries=st.integers(-5, 5), starting_token=st.one_of(NAMES, st.just("1"))
            ),
        ),
        st.tuples(
            st.just("get_capacity"),
            st.builds(GetCapacityRequest, volume_capabilities=caps, parameters=params),
        ),
        st.tuples(
            st.just("create_snapshot"),
            st.builds(CreateSnapshotRequest, source_volume_id=ids, name=NAMES, parameters=params),
        ),
        st.tuples(st.just("delete_snapshot"), st.builds(DeleteSnapshotRequest, snapshot_id=ids)),
        st.tuples(
            st.just("list_snapshots"),
            st.builds(ListSnapshotsRequest, source_volume_id=ids, snapshot_id=ids, starting_token=NAMES),
        ),
    )
    valid_create = st.tuples(
        st.just("create_volume"),
        st.builds(
            lambda name, size: create_request(name, size, backend, pool),
            NAMES.filter(bool),
            st.integers(1, 8 * MiB),
        ),
    )
    grow = st.tuples(
        st.just("expand_created"),
        st.builds(
            ControllerExpandVolumeRequest,
            capacity_range=st.builds(CapacityRange, required_bytes=SIZES, limit_bytes=st.just(0) | SIZES),
        ),
    )
    pairs = st.tuples(valid_create, grow).map(list)
    return st.lists(one.map(lambda call: [call]) | pairs, min_size=1, max_size=4).map(
        lambda groups: [call for group in groups for call in group]
    )


def grown(backend: str, pool: str) -> list[tuple[str, object]]:
    """An example every run tries: a valid create, then a valid expand of it (random ones rarely are both)."""
    expand = ControllerExpandVolumeRequest(capacity_range=CapacityRange(required_bytes=16 * MiB))
    return [("create_volume", create_request("pvc-grown", 4 * MiB, backend, pool)), ("expand_created", expand)]


@asynccontextmanager
async def partition_bench() -> AsyncIterator[Bench]:
    watch = ArgvWatch()
    runner = CommandRunner(default_timeout=60, observers=[watch])
    async with loop_disks(1, 64 * MiB) as (disk,):
        # A partition localdisk did not make, holding data, at the end of the disk.
        await runner.run(["parted", "--script", "--", disk, "mklabel", "gpt", "mkpart", "precious", "56MiB", "60MiB"])
        view = PartitionView([disk])
        foreign_uuid, _ = view.objects()["precious"]
        foreign_node = f"{disk}p1"
        write_synced(foreign_node, FOREIGN)
        async with partition_pool([disk], opened=False, adopt="free-space") as backend:
            backend.runner = runner
            manager = VolumeManager({(backend.kind, backend.pool): backend}, {backend.kind: backend.pool})
            async with manager.session(), ChannelFor([ControllerService(manager, "node-1")]) as channel:
                controller = ControllerStub(channel)
                answer = await controller.create_volume(create_request("pvc-base", 8 * MiB, "partition", POOL))
                assert answer.volume is not None
                bench = Bench(
                    controller, manager, watch, view, disk, answer.volume.volume_id, foreign_uuid, foreign_node
                )
                bench.layout = {name: uuid for name, (uuid, _) in view.objects().items()}
                bench.capacity = (await manager.capacity("partition", POOL)).total_bytes
                watch.seen.clear()
                yield bench


@needs_loop_devices
def test_controller_rpcs_on_partitions() -> None:
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(partition_bench()) as bench,
    ):

        @settings(
            max_examples=int(os.environ.get("LOCALDISK_HOSTILE_EXAMPLES", "300")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            database=None,
        )
        @example(calls=grown("partition", POOL))
        @given(calls=calls_for(bench.base_id, bench.foreign_id))
        def examples(calls: list[tuple[str, object]]) -> None:
            portal.call(bench.run, calls)

        try:
            examples()
        finally:
            TALLY.hostile["controller rpcs, partition backend"] += bench.sent
            TALLY.argv_checked += bench.watch.checked
    print(sorted(bench.answers.items()))
    assert bench.answers["create_volume OK"] > 0 and bench.answers["controller_expand_volume OK"] > 0
