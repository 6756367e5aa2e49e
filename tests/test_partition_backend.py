"""The partition backend on real GPT tables: loop devices for the disks, parted and the kernel doing the work.

The GPT parsing and extent arithmetic are also checked on recorded `sfdisk --json` output, which needs no root.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path

import anyio
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import Busy, CreateRequest, FailedPrecondition, InsufficientCapacity, OutOfRange, VolumeManager
from localdisk._proto.csi.v1 import CreateSnapshotRequest, DeleteVolumeRequest, GetCapacityRequest
from localdisk.backends.gpt import Extent, Table, best_fit, parse_sfdisk, parse_wipefs
from localdisk.backends.partition import (
    GPT_NAME_LIMIT,
    PENDING_PREFIX,
    READY_PREFIX,
    PartitionBackend,
    PartitionPoolConfig,
    volume_key,
)
from localdisk.backends.partkernel import kernel_partitions
from localdisk.blockdev import open_exclusive
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import BackendContract, manager_for
from tests.csi_helpers import create_request, csi_for
from tests.loopdisks import loop_disks, needs_loop_devices

DISK = 64 * MiB  # usable, 1 MiB aligned: [1 MiB, 63 MiB) = 62 MiB
runner = CommandRunner(default_timeout=60)


@asynccontextmanager
async def partition_pool(
    disks: list[str], *, opened: bool = True, view_max_age: float = 0.0, **settings: object
) -> AsyncIterator[PartitionBackend]:
    config = PartitionPoolConfig.model_validate({"disks": disks, **settings})
    backend = PartitionBackend("test", config, runner, view_max_age=view_max_age)
    if not opened:
        yield backend
        return
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


async def read_table(device: str) -> Table:
    return parse_sfdisk((await runner.run(["sfdisk", "--json", "--", device])).text, device)


def request(name: str, size: int) -> CreateRequest:
    return CreateRequest(name=name, backend="partition", pool="test", required_bytes=size)


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read past the page cache (O_DIRECT), so what the disk holds is what we see."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, length)
        os.preadv(fd, [buffer], offset)
        return bytes(buffer)
    finally:
        os.close(fd)


def write_synced(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- pure: parsing and extent arithmetic ------------------------------------------------------------------------
RECORDED = """{
   "partitiontable": {
      "label": "gpt", "id": "0969C8CF-85CF-4854-9D4C-AB9DF1D20C5C", "device": "/dev/loop0", "unit": "sectors",
      "firstlba": 34, "lastlba": 131038, "sectorsize": 512,
      "partitions": [
         {"node": "/dev/loop0p2", "start": 40960, "size": 16384, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
          "uuid": "6FB9358F-2A86-45A5-9D17-3EFC5741EF88", "name": "data"},
         {"node": "/dev/loop0p1", "start": 2048, "size": 16384, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
          "uuid": "9A7D65CD-4E9F-43D9-AB49-13E40DCA06F9", "name": "ld-x"}
      ]
   }
}"""


def test_parse_sfdisk_and_free_extents() -> None:
    table = parse_sfdisk(RECORDED, "/dev/loop0")
    assert [p.number for p in table.partitions] == [1, 2]
    first = table.partitions[0]
    assert first.uuid == "9a7d65cd-4e9f-43d9-ab49-13e40dca06f9" and first.name == "ld-x" and first.end == 18432
    assert table.by_uuid("9A7D65CD-4E9F-43D9-AB49-13E40DCA06F9") == first
    # 34..2047 lies below the first MiB boundary; 18432..40959 is free; 57344 up to the last full MiB (129024).
    assert table.free_extents(MiB) == [Extent(18432, 40960), Extent(57344, 129024)]
    assert table.room_after(first, MiB) == 40960
    assert table.room_after(table.partitions[1], MiB) == 129024 == table.usable_end(MiB)
    assert best_fit(table.free_extents(MiB), 2048) == Extent(18432, 40960)
    assert best_fit(table.free_extents(MiB), 30000) == Extent(57344, 129024)
    assert best_fit(table.free_extents(MiB), 80000) is None
    assert table.kernel_units(8) == 8


def test_parse_wipefs() -> None:
    assert parse_wipefs('{"signatures": []}') == []
    assert parse_wipefs("") == []
    found = parse_wipefs('{"signatures": [{"device": "loop0", "offset": "0x438", "type": "ext4", "uuid": null}]}')
    assert [(s.type, s.offset) for s in found] == [("ext4", 0x438)]


@pytest.mark.parametrize("name", ["pvc-1", "x" * 128, "ünïcødé-名前-🙂" * 5, "--force", "$(id)"])
def test_gpt_name_fits_any_csi_name(name: str) -> None:
    gpt_name = READY_PREFIX + volume_key(name)
    assert len(gpt_name.encode("utf-16-le")) // 2 <= GPT_NAME_LIMIT
    assert gpt_name.isascii() and gpt_name.replace("-", "").isalnum()
    assert volume_key(name) != volume_key(name + "!")


def test_config_rejects_bad_disks() -> None:
    with pytest.raises(ValueError, match="under /dev"):
        PartitionPoolConfig.model_validate({"disks": ["sda"]})
    with pytest.raises(ValueError, match="twice"):
        PartitionPoolConfig.model_validate({"disks": ["/dev/sda", "/dev/sda"]})
    with pytest.raises(ValueError, match="adopt"):
        PartitionPoolConfig.model_validate({"disks": ["/dev/sda"], "adopt": True})


# -- on loop devices ----------------------------------------------------------------------------------------------
@needs_loop_devices
class TestPartitionContract(BackendContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[PartitionBackend]:
        async with loop_disks(2, DISK) as disks, partition_pool(disks) as backend:
            yield backend


@needs_loop_devices
@pytest.mark.anyio
class TestPartitionBackend:
    async def test_blank_disk_gets_gpt_and_volume_has_device(self) -> None:
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk]) as backend:
            assert (await read_table(disk)).partitions == ()
            capacity = await backend.capacity()
            assert capacity.available_bytes == capacity.maximum_volume_bytes == 62 * MiB
            volume = await manager_for(backend).create_volume(request("pvc-a", 10 * MiB))
            assert volume.ref.handle == (await read_table(disk)).partitions[0].uuid
            assert volume.id == f"partition:test:{volume.ref.handle}"
            assert volume.device_path is not None and Path(volume.device_path).exists()
            size = int(Path(f"/sys/class/block/{Path(volume.device_path).resolve().name}/size").read_text())
            assert size * 512 == 10 * MiB
            assert volume.abnormal is None

    async def test_fragmentation_merged_gap(self) -> None:
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk]) as backend:
            manager = manager_for(backend)
            volumes = [await manager.create_volume(request(f"pvc-{i}", 8 * MiB)) for i in range(7)]
            assert (await backend.capacity()).maximum_volume_bytes == 6 * MiB  # the tail
            with pytest.raises(InsufficientCapacity, match="largest is 6 MiB"):
                await manager.create_volume(request("pvc-big", 16 * MiB))
            await manager.delete_volume(volumes[1].id)
            await manager.delete_volume(volumes[2].id)
            capacity = await backend.capacity()
            assert capacity.maximum_volume_bytes == 16 * MiB  # the two 8 MiB holes merged into one
            assert capacity.available_bytes == 22 * MiB
            small = await manager.create_volume(request("pvc-small", 4 * MiB))  # best fit: the 6 MiB tail
            big = await manager.create_volume(request("pvc-big", 16 * MiB))  # only fits in the merged gap
            starts = {p.uuid: p.start * 512 for p in (await read_table(disk)).partitions}
            assert starts[small.ref.handle] == 57 * MiB
            assert starts[big.ref.handle] == 9 * MiB
            assert (await backend.capacity()).available_bytes == 2 * MiB

    async def test_refuses_disk_with_filesystem_unless_erase(self) -> None:
        async with loop_disks(1, DISK) as (disk,):
            await runner.run(["mkfs.ext4", "-q", "-F", "--", disk])
            with pytest.raises(FailedPrecondition, match="ext4") as info:
                async with partition_pool([disk]):
                    pass
            assert "adopt" in info.value.message
            signatures = parse_wipefs((await runner.run(["wipefs", "--json", "--", disk])).text)
            assert [s.type for s in signatures] == ["ext4"]  # untouched
            async with partition_pool([disk], adopt="erase") as backend:
                assert (await read_table(disk)).partitions == ()
                assert (await backend.capacity()).available_bytes == 62 * MiB

    async def test_foreign_partition_refused_or_shared(self) -> None:
        async with loop_disks(1, DISK) as (disk,):
            await runner.run(["parted", "--script", "--", disk, "mklabel", "gpt", "mkpart", "data", "1MiB", "11MiB"])
            foreign = (await read_table(disk)).partitions[0]
            node = f"{disk}p{foreign.number}"
            for _ in range(100):
                if Path(node).exists():
                    break
                await anyio.sleep(0.05)
            write_synced(node, b"precious" * 512)
            with pytest.raises(FailedPrecondition, match="did not create"):
                async with partition_pool([disk]):
                    pass
            async with partition_pool([disk], adopt="free-space") as backend:
                manager = manager_for(backend)
                assert await manager.list_volumes() == []
                assert (await backend.capacity()).available_bytes == 52 * MiB
                volume = await manager.create_volume(request("pvc-beside", 8 * MiB))
                await manager.delete_volume(volume.id)
            assert (await read_table(disk)).partitions == (foreign,)
            assert read_direct(node, 0, 4096) == (b"precious" * 512)[:4096]

    async def test_long_names_and_restart(self) -> None:
        long_a, long_b = "p" * 127 + "a", "p" * 127 + "b"
        async with loop_disks(1, DISK) as (disk,):
            async with partition_pool([disk]) as backend:
                manager = manager_for(backend)
                a = await manager.create_volume(request(long_a, 8 * MiB))
                b = await manager.create_volume(request(long_b, 8 * MiB))
                assert a.id != b.id and (a.name, b.name) == (long_a, long_b)
                names = [p.name for p in (await read_table(disk)).partitions]
                assert all(n.startswith(READY_PREFIX) and len(n) <= GPT_NAME_LIMIT for n in names)
            async with partition_pool([disk]) as restarted:  # a new process: only the disk remembers
                assert sorted(v.id for v in await restarted.list_volumes()) == sorted([a.id, b.id])
                assert (await restarted.get_volume(a.ref.handle)).name == READY_PREFIX + volume_key(long_a)
                assert await restarted.find_volume(long_a) == a
                assert await restarted.get_volume(a.ref.handle) == a  # the name is known again
                assert await restarted.find_volume("p" * 128) is None

    async def test_concurrent_creates(self) -> None:
        async with loop_disks(2, DISK) as disks, partition_pool(disks) as backend:
            manager = manager_for(backend)
            created = []

            async def create(i: int) -> None:
                created.append(await manager.create_volume(request(f"pvc-race-{i}", 10 * MiB)))

            async with anyio.create_task_group() as tasks:
                for i in range(12):  # 6 x 10 MiB fill each 62 MiB disk: every extent is contended
                    tasks.start_soon(create, i)
            assert len({v.id for v in created}) == 12
            assert len({v.device_path for v in created}) == 12
            for disk in disks:
                parts = sorted((await read_table(disk)).partitions, key=lambda p: p.start)
                assert len(parts) == 6
                assert all(a.end <= b.start for a, b in pairwise(parts))
            assert (await backend.capacity()).maximum_volume_bytes == 2 * MiB
            with pytest.raises(InsufficientCapacity):
                await manager.create_volume(request("pvc-one-too-many", 10 * MiB))

    async def test_expand_with_and_without_room(self) -> None:
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk]) as backend:
            manager = manager_for(backend)
            first = await manager.create_volume(request("pvc-first", 8 * MiB))
            second = await manager.create_volume(request("pvc-second", 8 * MiB))
            with pytest.raises(InsufficientCapacity, match="grow in place to at most 8 MiB"):
                await manager.expand_volume(first.id, 16 * MiB)
            with pytest.raises(OutOfRange, match="cannot span disks"):
                await manager.expand_volume(second.id, 100 * MiB)
            assert second.device_path is not None
            await runner.run(["mkfs.ext4", "-q", "--", second.device_path])
            mountpoint = Path(f"/tmp/localdisk-partition-test-{os.getpid()}")
            mountpoint.mkdir(exist_ok=True)
            await runner.run(["mount", "--", second.device_path, str(mountpoint)])
            try:  # online: parted would refuse a mounted partition, sfdisk + partx must not
                grown = await manager.expand_volume(second.id, 24 * MiB)
            finally:
                await runner.run(["umount", "--", str(mountpoint)])
                mountpoint.rmdir()
            assert grown.size_bytes == 24 * MiB and grown.device_path == second.device_path
            kernel = Path(f"/sys/class/block/{Path(second.device_path).resolve().name}/size").read_text()
            assert int(kernel) * 512 == 24 * MiB
            assert await manager.get_volume(second.id) == grown

    async def test_no_leak_after_delete(self) -> None:
        pattern = bytes(range(256)) * (8 * MiB // 256)
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk]) as backend:
            manager = manager_for(backend)
            old = await manager.create_volume(request("pvc-old-tenant", 8 * MiB))
            assert old.device_path is not None
            write_synced(old.device_path, pattern)
            assert read_direct(disk, MiB, 8 * MiB) == pattern  # the old tenant's data, as the disk holds it
            await runner.run(["mkfs.ext4", "-q", "-E", "nodiscard", "--", old.device_path])
            await manager.delete_volume(old.id)
            assert read_direct(disk, MiB, 8 * MiB) == bytes(8 * MiB)  # the freed space itself is zeroed
            new = await manager.create_volume(request("pvc-new-tenant", 8 * MiB))
            assert new.id != old.id and new.device_path is not None
            assert read_direct(new.device_path, 0, 8 * MiB) == bytes(8 * MiB)
            signatures = parse_wipefs((await runner.run(["wipefs", "--json", "--", new.device_path])).text)
            assert signatures == []

    async def test_delete_refuses_mounted_volume(self) -> None:
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk]) as backend:
            manager = manager_for(backend)
            volume = await manager.create_volume(request("pvc-busy", 8 * MiB))
            assert volume.device_path is not None
            await runner.run(["mkfs.ext4", "-q", "--", volume.device_path])
            mountpoint = Path(f"/tmp/localdisk-partition-busy-{os.getpid()}")
            mountpoint.mkdir(exist_ok=True)
            await runner.run(["mount", "--", volume.device_path, str(mountpoint)])
            try:
                with pytest.raises(FailedPrecondition, match="in use"):
                    await manager.delete_volume(volume.id)
            finally:
                await runner.run(["umount", "--", str(mountpoint)])
                mountpoint.rmdir()
            assert await manager.get_volume(volume.id) == volume
            await manager.delete_volume(volume.id)
            assert (await read_table(disk)).partitions == ()

    async def test_delete_refuses_a_volume_held_open_without_touching_the_table(self) -> None:
        """The kernel is told first: a partition someone holds open (not exclusively, so O_EXCL does not see it)
        is refused by the kernel before the table changes, and the volume stays whole."""
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk], wipe="signatures") as backend:
            manager = manager_for(backend)
            volume = await manager.create_volume(request("pvc-held", 8 * MiB))
            assert volume.device_path is not None
            fd = os.open(volume.device_path, os.O_RDONLY)
            try:
                with pytest.raises(FailedPrecondition, match=r"in use \(open"):  # the kernel's refusal
                    await manager.delete_volume(volume.id)
            finally:
                os.close(fd)
            assert [p.uuid for p in (await read_table(disk)).partitions] == [volume.ref.handle]
            assert await manager.get_volume(volume.id) == volume
            await manager.delete_volume(volume.id)
            assert (await read_table(disk)).partitions == ()
            assert not Path(volume.device_path).exists()

    async def test_create_repairs_a_kernel_out_of_step(self) -> None:
        """A partition the kernel still has but the table lost (a crash between the two) is in the way of the next
        create's BLKPG add: the create repairs the kernel and goes on."""
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk]) as backend:
            await runner.run(["parted", "--script", "--", disk, "mkpart", "gone", "1MiB", "9MiB"])
            await runner.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--delete", "--", disk, "1"])
            assert (
                Path("/sys/class/block") / Path(disk).name / f"{Path(disk).name}p1"
                in (Path("/sys/class/block") / Path(disk).name).iterdir()
            )
            volume = await manager_for(backend).create_volume(request("pvc-after-crash", 16 * MiB))
            (part,) = (await read_table(disk)).partitions
            assert (part.number, part.uuid, part.start * 512) == (1, volume.ref.handle, MiB)
            assert volume.device_path is not None
            size = int(Path(f"/sys/class/block/{Path(volume.device_path).resolve().name}/size").read_text())
            assert size * 512 == 16 * MiB

    async def test_table_writes_go_on_while_another_volume_is_being_zeroed(self) -> None:
        """A delete zeroes through an exclusive claim on the partition, taken under the disk's lock because the
        kernel refuses it while sfdisk has the disk open exclusively (seen at concurrency 32 in the benchmark, when
        the claim was taken after the lock). While a claim is held, other volumes' table writes must go on: sfdisk,
        refused the exclusive open of the disk, falls back to a shared one."""
        async with loop_disks(1, DISK) as (disk,), partition_pool([disk], wipe="zero") as backend:
            manager = manager_for(backend)
            zeroing, other = [await manager.create_volume(request(f"pvc-{n}", 4 * MiB)) for n in ("zeroing", "other")]
            assert zeroing.device_path is not None
            claim = open_exclusive(zeroing.device_path)
            try:
                with pytest.raises(Busy):
                    open_exclusive(disk)  # what sfdisk tries first
                third = await manager.create_volume(request("pvc-third", 4 * MiB))
                await manager.expand_volume(third.id, 8 * MiB)
                await manager.delete_volume(other.id)
            finally:
                os.close(claim)
            await manager.delete_volume(zeroing.id)
            assert [p.uuid for p in (await read_table(disk)).partitions] == [third.ref.handle]

    async def test_start_up_repairs_a_kernel_behind_a_table_with_gaps(self) -> None:
        """The state a kill left once (crash loop, seed 1795786003): the table holds 3, 4 and 7 (1, 2, 5 and 6 were
        deleted), the kernel a stale 3 where the table's 7 is, a 4 shorter than the table's, a 5 the table no longer
        holds, and no 7. `partx --update` never reaches 7 (it walks numbers up to the count of partitions) and
        could not add it anyway while the stale 3 is in the way; the start-up repair must leave the kernel as the
        table says, every volume with its device."""
        async with loop_disks(1, DISK) as (disk,):
            names = {3: "pvc-three", 4: "pvc-four", 7: "pvc-seven"}
            places = {3: (2048, 16384), 4: (40960, 8192), 7: (20480, 16384)}  # 512-byte sectors
            script = "label: gpt\n" + "".join(
                f"{disk}p{n} : start={start}, size={size}, name={READY_PREFIX + volume_key(names[n])}\n"
                for n, (start, size) in places.items()
            )
            write = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--", disk]
            await runner.run(write, input=script.encode())
            for number, (start, size) in ((3, (20480, 16384)), (4, (40960, 4096)), (5, (61440, 4096))):
                await runner.run(["addpart", disk, str(number), str(start), str(size)])
            async with partition_pool([disk]) as backend:
                assert {n: (k.start, k.size) for n, k in kernel_partitions(disk).items()} == places
                volumes = await backend.list_volumes()
                assert sorted(v.name for v in volumes) == sorted(READY_PREFIX + volume_key(n) for n in names.values())
                for volume in volumes:
                    assert volume.abnormal is None
                    assert volume.device_path is not None
                    assert Path(volume.device_path).exists()

    async def test_pending_partition_converges(self) -> None:
        """A create interrupted after mkpart leaves an "lp-" partition: a retry finishes it, a restart drops it."""
        async with loop_disks(1, DISK) as (disk,):
            async with partition_pool([disk]) as backend:
                for name, start in (("pvc-interrupted", 1), ("pvc-resized", 9), ("pvc-never-retried", 17)):
                    mkpart = ["mkpart", PENDING_PREFIX + volume_key(name), f"{start}MiB", f"{start + 8}MiB"]
                    await runner.run(["parted", "--script", "--", disk, *mkpart])
                pending = (await read_table(disk)).by_name(PENDING_PREFIX + volume_key("pvc-interrupted"))
                assert pending is not None
                assert await backend.list_volumes() == []  # pending partitions are not volumes yet
                assert await backend.find_volume("pvc-interrupted") is None
                resumed = await manager_for(backend).create_volume(request("pvc-interrupted", 8 * MiB))
                assert resumed.ref.handle == pending.uuid
                names = {p.uuid: p.name for p in (await read_table(disk)).partitions}
                assert names[pending.uuid] == READY_PREFIX + volume_key("pvc-interrupted")
                # Retried with another size: the pending partition is dropped and the volume made afresh.
                other = await manager_for(backend).create_volume(request("pvc-resized", 4 * MiB))
                assert other.size_bytes == 4 * MiB
                names = {p.uuid: p.name for p in (await read_table(disk)).partitions}
                assert PENDING_PREFIX + volume_key("pvc-resized") not in names.values()
                assert len(names) == 3
            async with partition_pool([disk]) as restarted:  # open() drops what was never handed out
                assert sorted(p.uuid for p in (await read_table(disk)).partitions) == sorted(
                    [pending.uuid, other.ref.handle]
                )
                assert sorted(v.id for v in await restarted.list_volumes()) == sorted([resumed.id, other.id])


# -- through the CSI layer ----------------------------------------------------------------------------------------
@needs_loop_devices
@pytest.mark.anyio
async def test_csi_partition_volume_refuses_snapshots() -> None:
    async with loop_disks(1, DISK) as (disk,), partition_pool([disk], opened=False) as backend:
        manager = VolumeManager({("partition", "test"): backend}, {"partition": "test"})
        async with csi_for(manager) as csi:
            capacity = await csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "partition"}))
            assert capacity.available_capacity == 62 * MiB and capacity.maximum_volume_size == 62 * MiB
            created = (await csi.controller.create_volume(create_request("pvc-csi", 16 * MiB, "partition"))).volume
            assert created is not None and created.capacity_bytes == 16 * MiB
            assert created.volume_id.startswith("partition:test:")
            after = await csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "partition"}))
            assert after.available_capacity == 46 * MiB
            with pytest.raises(GRPCError) as info:
                await csi.controller.create_snapshot(
                    CreateSnapshotRequest(source_volume_id=created.volume_id, name="snap-of-partition")
                )
            assert info.value.status == Status.INVALID_ARGUMENT
            assert "partition" in (info.value.message or "") and "snapshot" in (info.value.message or "")
            await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=created.volume_id))
            assert await manager.list_volumes() == []


@needs_loop_devices
@pytest.mark.anyio
async def test_a_pool_opened_again_waits_for_a_call_still_holding_its_disk() -> None:
    """A pool that went down is opened again by the background retry; a call from before may still be changing a
    disk's table under that disk's lock. The open takes the same lock, so two table writes never interleave."""
    ran: list[str] = []
    watched = CommandRunner(default_timeout=60, observers=[lambda argv, _seconds, _ok: ran.append(argv[0])])
    async with loop_disks(1, DISK) as disks:
        backend = PartitionBackend("test", PartitionPoolConfig(disks=tuple(disks)), watched)
        await backend.open()
        try:
            [disk] = backend._disks
            ran.clear()
            # the lock: the call from before the pool went down, still writing
            async with anyio.create_task_group() as group, disk.lock:
                group.start_soon(backend.open)
                await anyio.wait_all_tasks_blocked()
                assert ran == []  # the open waits: nothing read or written on the disk meanwhile
            assert backend._disks == [disk] and "wipefs" in ran  # then it goes on, with the same disk and lock
        finally:
            await backend.aclose()
