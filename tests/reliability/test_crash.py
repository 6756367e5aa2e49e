"""Crash consistency under SIGKILL: the partition backend on loop devices here, LVM and thin inside User-Mode Linux.

See `crashloop.py` for what the client does and checks. Why every cut converges, per backend:

Partition backend (GPT names are the only state; `partition.py` and `partdisk.py` hold the argument in their comments):
- create: the partition is born pending (`lp-<key>`) and named in the same sfdisk write that creates it, so a kill
  leaves either no partition or a pending one, never an unnamed one. Pending partitions are invisible to lookups;
  a retried create of the same name and size resumes it (wipe, then rename to `ld-<key>`), and a server start drops
  every pending one (`open`). The rename is one table write: before it the volume does not exist for anyone, after
  it the create is done and its retry answers the same PARTUUID. A kill between sfdisk's table write and the
  server's BLKPG call leaves the kernel behind the table, which `PoolDisk.settle` repairs on the next start
  (BLKPG, partition by partition).
- delete: the partition is wiped and then removed (from the kernel, then the table); a kill before the table write
  leaves a ready volume, which the retried delete wipes again and removes (the restart re-adds it to the kernel);
  a kill after it leaves nothing, and deleting nothing succeeds.
- expand: sfdisk rewrites the entry's size (one table write), then a BLKPG resize tells the kernel. A kill between
  the two leaves the table grown and the kernel not: the retry finds the volume already big enough and answers it,
  and the restart that every kill implies runs `PoolDisk.settle`, which sees the kernel's size differ and resizes it.
  The end check compares every partition's kernel size with its table size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from localdisk.sizes import MiB
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.reliability.crashloop import CrashLoop, Report, Server, Settings, Supervisor
from tests.reliability.tally import TALLY
from tests.reliability.views import PartitionView

KILLS = int(os.environ.get("LOCALDISK_CRASH_KILLS", "100"))


def seed() -> int:
    return int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))


def record(report: Report, suite: str) -> None:
    TALLY.kills[report.backend] += report.kills
    TALLY.startup_kills[report.backend] += report.startup_kills
    TALLY.operations[suite] += sum(report.operations.values())
    TALLY.seconds[suite] = TALLY.seconds.get(suite, 0.0) + report.seconds
    TALLY.lost += len(report.lost)
    TALLY.leaked += len(report.leaked)
    TALLY.notes.append(report.summary())


def check(report: Report, kills: int, seed: int) -> None:
    again = f"(seed {seed}: LOCALDISK_CRASH_SEED={seed} reproduces the run)"
    assert not report.lost, f"volumes lost {again}: {report.lost}"
    assert not report.leaked, f"volumes leaked {again}: {report.leaked}"
    assert not report.problems, f"{again}: {report.problems}"
    assert report.kills >= kills, f"only {report.kills} kills in {report.seconds:.0f}s {again}"
    assert "INTERNAL" not in report.answers, f"INTERNAL answers {again}: {report.messages}"


def keep_table_areas(disks: list[str], where: Path) -> str:
    """Copy the first and last 2 MiB of each disk (protective MBR, both GPT headers and entry arrays) beside the
    server's log, so a failure's tables can be read after the loop devices are gone; says where."""
    for index, disk in enumerate(disks):
        fd = os.open(disk, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            (where / f"disk{index}-head.img").write_bytes(os.pread(fd, 2 * MiB, 0))
            (where / f"disk{index}-tail.img").write_bytes(os.pread(fd, 2 * MiB, max(size - 2 * MiB, 0)))
        finally:
            os.close(fd)
    return f"the disks' table areas are kept in {where}"


@needs_loop_devices
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.anyio
async def test_partition_pool_survives_sigkill(tmp_path: Path) -> None:
    run_seed = seed()
    async with loop_disks(2, 40 * MiB) as disks:
        config = tmp_path / "node.toml"
        config.write_text(
            f'[node]\nkubelet_dir = "{tmp_path}/kubelet"\n\n'
            f"[pools.partition.crash]\ndisks = {disks!r}\ndefault = true\n".replace("'", '"')
        )
        settings = Settings(kills=KILLS, seed=run_seed, max_seconds=600, parameters={"backend": "partition"})
        server = Server(config, tmp_path, fork=os.environ.get("LOCALDISK_CRASH_FORK") == "1")
        supervisor = Supervisor(server, run_seed, settings.startup_kill_probability)
        loop = CrashLoop("partition", supervisor, PartitionView(disks), settings)
        try:
            report = await loop.run()
        except AssertionError as exc:
            kept = keep_table_areas(disks, tmp_path)
            raise AssertionError(f"seed {run_seed} (LOCALDISK_CRASH_SEED reproduces it; {kept}): {exc}") from exc
        finally:
            supervisor.close()
    record(report, "crash partition")
    print(report.summary())
    check(report, KILLS, run_seed)
