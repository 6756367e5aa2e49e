"""Group commit of partition creates: creates waiting for one disk share its table writes.

The creates queued while a disk's lock is held are carried out together by whichever takes the lock next: one
table read, one `sfdisk --append` of every pending partition, one write naming them all ready. Checked here on
loop devices: the writes are shared, every volume is exactly its size and where the table says, a cancelled create
leaves nothing, and the whole-table write (`gpt.table_script`) gives back the table it was made from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import anyio
import pytest

from localdisk.backends.gpt import Partition, Table, table_script
from localdisk.backends.partition import PENDING_PREFIX, READY_PREFIX, PartitionBackend, PartitionPoolConfig
from localdisk.backends.partkernel import kernel_partitions, node_name
from localdisk.manager import CreateRequest
from localdisk.model import Volume
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.test_partition_backend import read_table

DISK = 64 * MiB


class Sfdisk:
    """The sfdisk runs of a runner, by kind: reads (--json) and writes (anything else)."""

    def __init__(self) -> None:
        self.reads = 0
        self.writes: list[list[str]] = []

    def __call__(self, argv: Sequence[str], seconds: float, ok: bool) -> None:
        if Path(argv[0]).name == "sfdisk":
            if "--json" in argv:
                self.reads += 1
            else:
                self.writes.append(list(argv))


def request(name: str, size: int, *, encrypted: bool = False) -> CreateRequest:
    return CreateRequest(name=name, backend="partition", pool="test", required_bytes=size, encrypted=encrypted)


async def wait_for(condition: str, check: object) -> None:
    assert callable(check)
    with anyio.fail_after(10, shield=False):
        while not check():
            await anyio.sleep(0.01)


def pool(disks: list[str], runner: CommandRunner) -> PartitionBackend:
    config = PartitionPoolConfig.model_validate({"disks": disks})
    return PartitionBackend("test", config, runner, view_max_age=30.0)


# -- pure -------------------------------------------------------------------------------------------------------
def test_table_script_writes_every_field_and_refuses_odd_names() -> None:
    part = Partition(
        3, 2048, 4096, "5ffadd23-3167-f44a-bb28-e5d7a0e169d0", "ld-x", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    )
    table = Table("/dev/loop0", 512, 2048, 131038, (part,), "27A24F3E-A2E6-2C43-B1B6-DB7981AE451A", 256)
    script = table_script(table, lambda n: node_name("/dev/loop0", n))
    assert script is not None
    assert "label-id: 27A24F3E-A2E6-2C43-B1B6-DB7981AE451A\n" in script
    assert "first-lba: 2048\nlast-lba: 131038\nsector-size: 512\ntable-length: 256\n" in script
    assert script.endswith(
        "/dev/loop0p3 : start=2048, size=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4,"
        ' uuid=5ffadd23-3167-f44a-bb28-e5d7a0e169d0, name="ld-x"\n'
    )
    for odd in ('a "quoted" name', "back\\slash", "new\nline"):
        assert table_script(replace(table, partitions=(replace(part, name=odd),)), str) is None


# -- on loop devices ----------------------------------------------------------------------------------------------
@needs_loop_devices
@pytest.mark.anyio
class TestGroupCommit:
    async def test_waiting_creates_share_one_read_and_two_writes(self) -> None:
        sfdisk = Sfdisk()
        async with loop_disks(1, DISK) as disks:
            backend = pool(disks, CommandRunner(default_timeout=60, observers=[sfdisk]))
            await backend.open()
            try:
                manager = manager_for(backend)
                disk = backend._disks[0]
                volumes: dict[str, Volume] = {}
                sizes = {f"pvc-{i}": (i % 3 + 1) * 4 * MiB for i in range(8)}

                async def create(name: str) -> None:
                    volumes[name] = await manager.create_volume(request(name, sizes[name], encrypted=name == "pvc-7"))

                await backend.capacity()  # the view is read: the creates below read nothing before they queue
                reads, writes = sfdisk.reads, len(sfdisk.writes)
                # A change in progress holds the disk's lock: every create queues behind it.
                async with anyio.create_task_group() as tasks, disk.lock:
                    for name in sizes:
                        tasks.start_soon(create, name)
                    await wait_for("8 queued", lambda: len(disk.orders) == len(sizes))
                assert sfdisk.reads - reads == 1
                commands = sfdisk.writes[writes:]
                assert len(commands) == 2, commands  # one --append of all eight, one write naming them ready
                assert "--append" in commands[0]

                table = await read_table(disks[0])
                assert len(table.partitions) == len(sizes)
                assert all(p.name.startswith(READY_PREFIX) for p in table.partitions)
                ordered = sorted(table.partitions, key=lambda p: p.start)
                assert all(a.end <= b.start for a, b in pairwise(ordered))
                kernel = kernel_partitions(disks[0])
                for name, volume in volumes.items():
                    part = table.by_uuid(volume.ref.handle)
                    assert part is not None and part.size * 512 == sizes[name] == volume.size_bytes
                    assert (kernel[part.number].start, kernel[part.number].size) == (part.start, part.size)
                    assert volume.encrypted == (name == "pvc-7")
                    again = request(name, sizes[name], encrypted=name == "pvc-7")
                    assert await manager.create_volume(again) == volume  # idempotent
                listed = {v.id for v in await manager.list_volumes()}
                assert listed == {v.id for v in volumes.values()}
            finally:
                await backend.aclose()

    async def test_cancelled_create_in_a_group_leaves_nothing(self) -> None:
        async with loop_disks(1, DISK) as disks:
            backend = pool(disks, CommandRunner(default_timeout=60))
            await backend.open()
            try:
                manager = manager_for(backend)
                disk = backend._disks[0]
                kept: list[Volume] = []

                async def create(name: str) -> None:
                    kept.append(await manager.create_volume(request(name, 4 * MiB)))

                doomed = anyio.CancelScope()

                async def cancelled() -> None:
                    with doomed:
                        await manager.create_volume(request("pvc-cancelled", 4 * MiB))

                async with anyio.create_task_group() as outer, disk.lock:
                    for i in range(3):
                        outer.start_soon(create, f"pvc-kept-{i}")
                    outer.start_soon(cancelled)
                    await wait_for("4 queued", lambda: len(disk.orders) == 4)
                    doomed.cancel()  # the client's deadline, while its order waits for the disk
                    await wait_for("3 queued", lambda: len(disk.orders) == 3)
                assert len(kept) == 3
                table = await read_table(disks[0])
                assert sorted(p.uuid for p in table.partitions) == sorted(v.ref.handle for v in kept)
                assert not [p for p in table.partitions if p.name.startswith(PENDING_PREFIX)]
            finally:
                await backend.aclose()

    async def test_whole_table_write_gives_back_the_table(self) -> None:
        """A foreign partition with attributes, a type and a name of its own, and a table of 256 entries, kept
        exactly through the write that names a group ready."""
        runner = CommandRunner(default_timeout=60)
        async with loop_disks(1, DISK) as (device,):
            script = "label: gpt\ntable-length: 256\n\nstart=2048, size=2048, name=foreign, attrs=RequiredPartition\n"
            await runner.run(["sfdisk", "--quiet", "--", device], input=script.encode())
            before = await read_table(device)
            assert before.table_length == 256 and before.partitions[0].attrs == "RequiredPartition"
            ours = Partition(5, 8192, 2048, "a8a34a52-70a8-4a4e-9c39-0ab2bb0a8b55", "ld-y", "")
            wanted = before.with_partition(ours)
            written = table_script(wanted, lambda n: node_name(device, n))
            assert written is not None
            await runner.run(
                ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", "--", device],
                input=written.encode(),
            )
            after = await read_table(device)
            linux = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
            assert after == replace(wanted, partitions=(before.partitions[0], replace(ours, type=linux)))
