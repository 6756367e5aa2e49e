"""Sequential and random throughput of a plain, a striped, a mirrored and an SSD-cached thick volume (`nox -s bench`,
BENCH_ONLY=layout), inside a UML guest with a VG of tagged disks (`--vg ldbench-layout:256Mx4@hdd,128M@ssd`).

Relative figures only: the sandbox's "disks" are sparse files on one host disk, seen through the host's page cache,
so a stripe over four of them or an "SSD" cache is no faster in kind than the files beneath; what the table does
show is each layout's overhead in the I/O path (dm-stripe, dm-raid writing twice, dm-cache's bookkeeping).

Usage: python bench/layoutbench.py OUT.json   (BENCH_LAYOUT_MIB: volume size, default 64; BENCH_RANDOM_READS: 2000)
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time

import anyio

from localdisk import CreateRequest, VolumeManager
from localdisk.backends.lvm import LinearBackend, LinearPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB

VG = "ldbench-layout"
SIZE = int(os.environ.get("BENCH_LAYOUT_MIB", "64")) * MiB
RANDOM_READS = int(os.environ.get("BENCH_RANDOM_READS", "2000"))
LAYOUTS = {
    "plain": {},
    "striped x4": {"stripes": "4"},
    "raid1 x2": {"mirrors": "2"},
    "cached (writethrough)": {"cache": "writethrough", "cacheSize": "50%"},
    "cached (writecache)": {"cache": "writecache", "cacheSize": "50%"},
}


def sequential(path: str, write: bool) -> float:
    """MiB/s of O_DIRECT 1 MiB writes or reads over the whole volume."""
    block = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(MiB))
    fd = os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        started = time.perf_counter()
        for offset in range(0, SIZE, MiB):
            (os.pwritev if write else os.preadv)(fd, [block], offset)
        if write:
            os.fsync(fd)
        return SIZE / MiB / (time.perf_counter() - started)
    finally:
        os.close(fd)


def random_reads(path: str, seed: int) -> float:
    """4 KiB O_DIRECT reads per second at random offsets, twice over the same offsets (a cache's second pass)."""
    block = mmap.mmap(-1, 4096)
    offsets = random.Random(seed).sample(  # noqa: S311 - offsets, not secrets
        range(SIZE // 4096), min(RANDOM_READS, SIZE // 4096)
    )
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in offsets:  # the first pass warms a cache
            os.preadv(fd, [block], offset * 4096)
        started = time.perf_counter()
        for offset in offsets:
            os.preadv(fd, [block], offset * 4096)
        return len(offsets) / (time.perf_counter() - started)
    finally:
        os.close(fd)


async def main(out: str) -> None:
    runner = CommandRunner()
    config = LinearPoolConfig(volume_group=VG, pv_tags=("hdd",), cache_pv_tags=("ssd",))
    backend = LinearBackend("bench", config, Lvm(runner), runner)
    await backend.open()
    manager = VolumeManager({("lvm", "bench"): backend}, {"lvm": "bench"})
    rows = {}
    for index, (name, parameters) in enumerate(LAYOUTS.items()):
        volume = await manager.create_volume(
            CreateRequest(f"bench-{index}", "lvm", "bench", SIZE, parameters=parameters)
        )
        path = volume.device_path or ""
        rows[name] = {
            "seq_write_mib_s": sequential(path, write=True),
            "seq_read_mib_s": sequential(path, write=False),
            "rand_read_iops": random_reads(path, index),
        }
        await manager.delete_volume(volume.id)
    await backend.aclose()
    base = rows["plain"]
    print(f"{'layout':24s} {'seq write':>16s} {'seq read':>16s} {'4k rand read':>18s}")
    for name, row in rows.items():
        cells = [
            f"{row[key]:8.1f} ({row[key] / base[key]:4.2f}x)"
            for key in ("seq_write_mib_s", "seq_read_mib_s", "rand_read_iops")
        ]
        print(f"{name:24s} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>18s}")
    result = {"size_bytes": SIZE, "random_reads": RANDOM_READS, "layouts": rows}
    await anyio.Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "bench-layout.json")
