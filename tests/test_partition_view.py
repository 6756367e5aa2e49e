"""The partition backend's cached view of its disks' tables, on loop devices.

What the cache may and may not do: our own changes are visible at once, reads answered from it spawn no process, a
change made behind its back shows up once the view is older than its max age (at once to the next change of that
disk, which always re-reads), a failed change drops it, and `VolumeManager.keep_fresh` re-reads it in the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from localdisk import CreateRequest
from localdisk.backends.partition import PENDING_PREFIX, READY_PREFIX, PartitionBackend, volume_key
from localdisk.errors import Busy, CommandFailed
from localdisk.runner import CommandResult, CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.test_partition_backend import DISK, partition_pool, read_table, runner

pytestmark = [pytest.mark.anyio]


def request(name: str, size: int) -> CreateRequest:
    return CreateRequest(name=name, backend="partition", pool="test", required_bytes=size)


class Recorded:
    """Every command the backend runs, as `tool first-option` (e.g. "sfdisk --json")."""

    def __init__(self, backend: PartitionBackend) -> None:
        self.seen: list[str] = []
        backend.runner.observers.append(self)

    def __call__(self, argv: Sequence[str], seconds: float, ok: bool) -> None:
        self.seen.append(f"{argv[0]} {argv[1]}" if argv[0] != "sfdisk" else f"sfdisk {_sfdisk_action(argv)}")

    def take(self) -> list[str]:
        seen, self.seen = self.seen, []
        return seen


def _sfdisk_action(argv: Sequence[str]) -> str:
    for action in ("--json", "--append", "--part-label", "--delete", "-N"):
        if action in argv:
            return action
    return "?"


class FailOnce(CommandRunner):
    """A real runner that fails the first command containing `word` instead of running it (fault injection)."""

    def __init__(self, word: str) -> None:
        super().__init__(default_timeout=60)
        self.word = word
        self.failed = False

    async def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult:
        if not self.failed and self.word in argv:
            self.failed = True
            raise CommandFailed(list(argv), 1, "injected failure")
        return await super().run(argv, **kwargs)


@needs_loop_devices
async def test_own_changes_are_visible_at_once_and_reads_spawn_nothing() -> None:
    async with loop_disks(2, DISK) as disks, partition_pool(disks, view_max_age=3600) as backend:
        backend.runner = CommandRunner(default_timeout=60)
        commands = Recorded(backend)
        manager = manager_for(backend)
        free = (await backend.capacity()).available_bytes
        volume = await manager.create_volume(request("pvc-cached", 8 * MiB))
        # A lone create on a young view: one write to create, the wipe (in-process), one write to rename; no read.
        assert commands.take() == ["sfdisk --append", "BLKZEROOUT --ends", "sfdisk --part-label"]
        assert await backend.list_volumes() == [volume]
        assert (await backend.capacity()).available_bytes == free - 8 * MiB
        assert await backend.find_volume("pvc-cached") == volume
        assert await backend.get_volume(volume.ref.handle) == volume
        assert await manager.create_volume(request("pvc-cached", 8 * MiB)) == volume  # the retry answers from cache
        assert commands.take() == []
        on_disk = {p.uuid: p.name for disk in disks for p in (await read_table(disk)).partitions}
        assert on_disk == {volume.ref.handle: READY_PREFIX + volume_key("pvc-cached")}
        await manager.delete_volume(volume.id)
        zeroed = f"BLKZEROOUT {volume.device_path}"  # in-process (localdisk.blockdev), reported like a command
        assert commands.take() == ["sfdisk --json", zeroed, "sfdisk --json", "sfdisk --delete"]
        assert await backend.list_volumes() == []
        assert (await backend.capacity()).available_bytes == free
        assert commands.take() == []
        for disk in disks:
            assert (await read_table(disk)).partitions == ()


@needs_loop_devices
async def test_change_behind_its_back_shows_up_after_the_max_age() -> None:
    # 5 s: the steps between the create's read and the first listing below take ~0.3 s, but over 1 s under load
    async with loop_disks(1, DISK) as (disk,), partition_pool([disk], view_max_age=5.0, adopt="free-space") as backend:
        free = (await backend.capacity()).available_bytes
        reads = backend._disks[0].reads
        await runner.run(["parted", "--script", "--", disk, "mkpart", "theirs", "1MiB", "9MiB"])
        assert (await backend.capacity()).available_bytes == free  # answered from the view
        assert backend._disks[0].reads == reads
        # A lone create places on the young view: sfdisk refuses the place (and entry) their partition took, the
        # create answers Busy and drops the view; its retry reads afresh and goes beside their partition, not on it.
        with pytest.raises(Busy, match="changed behind localdisk's back"):
            await manager_for(backend).create_volume(request("pvc-beside", 4 * MiB))
        assert (await read_table(disk)).partitions[0].name == "theirs"
        volume = await manager_for(backend).create_volume(request("pvc-beside", 4 * MiB))
        starts = {p.name: p.start * 512 for p in (await read_table(disk)).partitions}
        assert starts == {"theirs": 1 * MiB, READY_PREFIX + volume_key("pvc-beside"): 9 * MiB}
        assert (await backend.capacity()).available_bytes == free - 12 * MiB
        # Removed behind its back: still listed while the view is young, gone once it is older than the max age.
        number = next(p.number for p in (await read_table(disk)).partitions if p.uuid == volume.ref.handle)
        await runner.run(["sfdisk", "--quiet", "--delete", "--", disk, str(number)])
        assert [v.id for v in await backend.list_volumes()] == [volume.id]
        await anyio.sleep(5.1)
        assert await backend.list_volumes() == []
        assert (await backend.capacity()).available_bytes == free - 8 * MiB
        assert backend._disks[0].reads > reads + 1


@needs_loop_devices
async def test_a_failed_change_drops_the_view_and_the_retry_converges() -> None:
    async with loop_disks(1, DISK) as (disk,), partition_pool([disk], view_max_age=3600) as backend:
        failing = FailOnce("--part-label")
        backend.runner = failing
        manager = manager_for(backend)
        await backend.capacity()
        with pytest.raises(CommandFailed, match="injected"):
            await manager.create_volume(request("pvc-interrupted", 8 * MiB))
        assert failing.failed
        assert backend._disks[0].table is None  # dropped: the disk may hold what the view does not
        reads = backend._disks[0].reads
        (left,) = (await read_table(disk)).partitions
        assert left.name == PENDING_PREFIX + volume_key("pvc-interrupted")
        assert await backend.list_volumes() == []  # read again: the pending partition is there, and no volume
        assert backend._disks[0].reads == reads + 1
        volume = await manager.create_volume(request("pvc-interrupted", 8 * MiB))
        assert volume.ref.handle == left.uuid  # the retry resumed it
        assert [p.name for p in (await read_table(disk)).partitions] == [READY_PREFIX + volume_key("pvc-interrupted")]


@needs_loop_devices
async def test_keep_fresh_rereads_in_the_background() -> None:
    """With `keep_fresh` running, reads spawn no process, yet a change made behind our back shows up."""
    # 5 s: the steps between the create's read and the first listing below take ~0.3 s, but over 1 s under load
    async with loop_disks(1, DISK) as (disk,), partition_pool([disk], view_max_age=5.0, adopt="free-space") as backend:
        manager = manager_for(backend)
        backend.runner = CommandRunner(default_timeout=60)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(manager.keep_fresh)
            free = (await backend.capacity()).available_bytes
            reads = backend._disks[0].reads
            await runner.run(["parted", "--script", "--", disk, "mkpart", "theirs", "40MiB", "48MiB"])
            commands = Recorded(backend)
            with anyio.fail_after(30):
                while (await backend.capacity()).available_bytes == free:
                    await anyio.sleep(0.05)
            tasks.cancel_scope.cancel()
        assert (await backend.capacity()).available_bytes == free - 8 * MiB
        assert backend._disks[0].reads > reads
        assert commands.seen and set(commands.seen) == {"sfdisk --json"}  # only the background re-reads
