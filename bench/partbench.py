# ruff: noqa: ASYNC110, ASYNC240 - a benchmark driver: polling for a device node between steps costs nothing
"""The partition benchmark: runs on the HOST (root, loop devices), against the real `partition` backend.

The LVM half (lvmbench.py) needs the UML sandbox; partitions only need loop devices, so this half runs where the
driver really runs. Two sparse loop disks (`tests/loopdisks.py`, released at the end whatever happens) sized so
that each holds exactly half of BENCH_PART_VOLUMES volumes: localdisk's best fit fills the first disk, then the
second, and the baseline places its volumes the same way.

What it measures, each against the same disks in the same run:

- provisioning: CreateVolume through the CSI unix socket of an in-process server at several concurrencies, then
  DeleteVolume; volumes per second, p50/p95 CreateVolume latency, and external processes per volume;
- the baseline, the way a one-process-per-step driver (OpenEBS device-localpv style) does it: per volume one
  `parted print free` process for its state read, one `parted mkpart` and a `wipefs -a` of the new partition
  (localdisk erases stale signatures of every new volume too), with a per-disk lock around read+mkpart as any
  correct driver needs; the wipe runs outside the lock, the baseline's best case. Its deletes mirror localdisk's
  (state read, `blkdiscard -z` outside the lock, `parted rm`). The headline is localdisk's time over the baseline's;
- GetCapacity and ListVolumes p50/p95 over the socket at 0, half and all volumes, with the number of external
  processes the server spawned during those calls (a CommandRunner observer counts them);
- the CSI floor: Probe round trip, and sequential CreateVolume time minus the time spent in external commands.

Results are printed as a table and written as JSON. Counts come from the environment (BENCH_PART_VOLUMES,
BENCH_CONCURRENCY, BENCH_REPEATS, BENCH_CALLS). Numbers are medians over BENCH_REPEATS repeats. Nothing here asserts
a time: a benchmark is not a test.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from common import log, median_of, ms, pct, summary, timed_all
from grpclib.client import Channel

from localdisk import config as node_config
from localdisk._proto.csi.v1 import (
    ControllerStub,
    DeleteVolumeRequest,
    GetCapacityRequest,
    IdentityStub,
    ListVolumesRequest,
    ProbeRequest,
)
from localdisk.csi.server import serve
from localdisk.manager import VolumeManager
from localdisk.runner import CommandRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.csi_helpers import create_request
from tests.loopdisks import MAX_DISKS, loop_disks, loop_unavailable

MiB = 1024 * 1024
SIZE = 4 * MiB
DISKS = 2
GPT_ENTRIES = 128  # partition entries in a default GPT: the most volumes one disk can hold
POOL = "bench"
TOOLS = ("parted", "sfdisk", "wipefs", "partx", "blkdiscard")


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


VOLUMES = _ints("BENCH_PART_VOLUMES", "100")[0]
CONCURRENCY = _ints("BENCH_CONCURRENCY", "1,8,32")
REPEATS = _ints("BENCH_REPEATS", "1")[0]
CALLS = _ints("BENCH_CALLS", "50")[0]
PER_DISK = -(-VOLUMES // DISKS)
# [1 MiB, size - 1 MiB) is the aligned usable area of a GPT disk whose size is a whole number of MiB.
DISK_SIZE = PER_DISK * SIZE + 2 * MiB
LEVELS = sorted({0, VOLUMES // 2, VOLUMES})


class Commands:
    """Counts and times the external commands of a CommandRunner (it reports every command here), and apart from
    them the in-process ioctls localdisk reports the same way (BLKZEROOUT, BLKDISCARD: no process)."""

    def __init__(self) -> None:
        self.count = 0
        self.processes = 0
        self.seconds = 0.0
        self.tools: Counter[str] = Counter()

    def __call__(self, argv: Sequence[str], seconds: float, ok: bool) -> None:
        self.count += 1
        self.processes += not argv[0].startswith("BLK")
        self.seconds += seconds
        self.tools[Path(argv[0]).name] += 1


# -- the baseline: one process per step ---------------------------------------------------------------------------
class Baseline:
    """A one-process-per-step partition driver, kept as small as a correct one can be."""

    def __init__(self, runner: CommandRunner, disks: list[str]) -> None:
        self.runner = runner
        self.disks = disks
        self.locks = {disk: anyio.Lock() for disk in disks}

    async def state(self, disk: str) -> tuple[list[tuple[int, int]], dict[str, int]]:
        """One `parted print free`: the disk's free extents in bytes (1 MiB aligned) and its partitions by name."""
        result = await self.runner.run(["parted", "--script", "--machine", "--", disk, "unit", "B", "print", "free"])
        free: list[tuple[int, int]] = []
        parts: dict[str, int] = {}
        for line in result.text.splitlines()[2:]:  # "BYT;" and the disk's own line come first
            fields = line.rstrip(";").split(":")
            start, end = int(fields[1].rstrip("B")), int(fields[2].rstrip("B")) + 1
            if fields[4] == "free":
                first, last = -(-start // MiB) * MiB, end // MiB * MiB
                if last > first:
                    free.append((first, last))
            else:
                parts[fields[5]] = int(fields[0])
        return free, parts

    async def create(self, names: list[str], i: int) -> None:
        disk, name = self.disks[min(i // PER_DISK, len(self.disks) - 1)], names[i]
        async with self.locks[disk]:
            free, parts = await self.state(disk)
            start = next(first for first, last in free if last - first >= SIZE)
            mkpart = ["unit", "B", "mkpart", name, f"{start}B", f"{start + SIZE - 1}B"]
            await self.runner.run(["parted", "--script", "--align", "none", "--", disk, *mkpart])
            number = min(set(range(1, len(parts) + 2)) - set(parts.values()))  # parted takes the lowest free number
        node = await wait_for_partition(disk, number, start)
        await self.runner.run(["wipefs", "--all", "--quiet", "--", node])

    async def delete(self, names: list[str], i: int) -> None:
        disk = self.disks[min(i // PER_DISK, len(self.disks) - 1)]
        async with self.locks[disk]:
            _, parts = await self.state(disk)
        number = parts[names[i]]
        await self.runner.run(["blkdiscard", "--zeroout", "--", f"{disk}p{number}"])
        async with self.locks[disk]:
            await self.runner.run(["parted", "--script", "--", disk, "rm", str(number)])


async def wait_for_partition(disk: str, number: int, start: int) -> str:
    """The node of partition `number` once the kernel shows it where parted put it (polled, no process)."""
    node = Path(f"{disk}p{number}")
    sysfs = Path("/sys/class/block") / node.name / "start"
    with anyio.fail_after(10):
        while True:
            try:
                if int(sysfs.read_text()) * 512 == start and node.exists():
                    return str(node)
            except (OSError, ValueError):
                pass
            await anyio.sleep(0.005)


# -- phases ------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, channel: Channel, commands: Commands, baseline: Baseline) -> None:
        self.controller = ControllerStub(channel)
        self.identity = IdentityStub(channel)
        self.commands = commands
        self.baseline = baseline
        self.results: dict[str, Any] = {
            "settings": {
                "volumes": VOLUMES,
                "disks": DISKS,
                "disk_bytes": DISK_SIZE,
                "concurrency": CONCURRENCY,
                "levels": LEVELS,
                "repeats": REPEATS,
                "calls": CALLS,
                "size_bytes": SIZE,
            }
        }

    async def create(self, name: str) -> str:
        response = await self.controller.create_volume(create_request(name, SIZE, "partition", POOL))
        assert response.volume is not None
        return response.volume.volume_id

    async def create_nth(self, names: list[str], ids: list[str], i: int) -> None:
        ids[i] = await self.create(names[i])

    async def delete(self, ids: list[str], i: int) -> None:
        await self.controller.delete_volume(DeleteVolumeRequest(volume_id=ids[i]))

    async def provisioning(self) -> None:
        baseline_commands = Commands()
        self.baseline.runner.observers.append(baseline_commands)
        out: dict[str, Any] = {}
        for concurrency in CONCURRENCY:
            ours, ours_delete, peers, peers_delete = [], [], [], []
            ours_procs, ours_real, peer_procs = [], [], []
            for repeat in range(REPEATS):
                names = [f"p-{concurrency}-{repeat}-{i}" for i in range(VOLUMES)]
                ids = [""] * VOLUMES
                before, tools, real = self.commands.count, self.commands.tools.copy(), self.commands.processes
                ours.append(
                    summary(*await timed_all(VOLUMES, concurrency, functools.partial(self.create_nth, names, ids)))
                )
                ours_procs.append((self.commands.count - before) / VOLUMES)
                ours_real.append((self.commands.processes - real) / VOLUMES)
                by_tool = {tool: round(n / VOLUMES, 2) for tool, n in (self.commands.tools - tools).most_common()}
                ours_delete.append(summary(*await timed_all(VOLUMES, concurrency, functools.partial(self.delete, ids))))

                base = [f"b-{concurrency}-{repeat}-{i}" for i in range(VOLUMES)]
                before = baseline_commands.count
                make = functools.partial(self.baseline.create, base)
                peers.append(summary(*await timed_all(VOLUMES, concurrency, make)))
                peer_procs.append((baseline_commands.count - before) / VOLUMES)
                remove = functools.partial(self.baseline.delete, base)
                peers_delete.append(summary(*await timed_all(VOLUMES, concurrency, remove)))
            mine, theirs = median_of(ours), median_of(peers)
            row: dict[str, Any] = {
                "localdisk": mine,
                "baseline": theirs,
                "localdisk_delete": median_of(ours_delete),
                "baseline_delete": median_of(peers_delete),
                "localdisk_processes_per_create": round(sorted(ours_procs)[len(ours_procs) // 2], 2),
                "baseline_processes_per_create": round(sorted(peer_procs)[len(peer_procs) // 2], 2),
                "localdisk_real_processes_per_create": round(sorted(ours_real)[len(ours_real) // 2], 2),
                "localdisk_processes_per_create_by_tool": by_tool,  # of the last repeat
                "time_ratio": round(mine["seconds"] / theirs["seconds"], 3),
            }
            out[f"c{concurrency}"] = row
            log(
                f"provisioning c={concurrency}: ours {mine['seconds']}s baseline {theirs['seconds']}s"
                f" -> ours/baseline {row['time_ratio']}"
            )
        self.baseline.runner.observers.remove(baseline_commands)
        self.results["provisioning"] = out

    async def overhead(self) -> None:
        probes = []
        for _ in range(CALLS * 4):
            start = time.monotonic()
            await self.identity.probe(ProbeRequest())
            probes.append(time.monotonic() - start)
        totals, overheads = [], []
        for i in range(min(VOLUMES, 20)):
            spent, start = self.commands.seconds, time.monotonic()
            volume_id = await self.create(f"o-{i}")
            total = time.monotonic() - start
            totals.append(total)
            overheads.append(total - (self.commands.seconds - spent))
            await self.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))
        self.results["csi_overhead"] = {
            "probe_p50_ms": ms(pct(probes, 0.5)),
            "probe_p95_ms": ms(pct(probes, 0.95)),
            "create_p50_ms": ms(pct(totals, 0.5)),
            "create_minus_commands_p50_ms": ms(pct(overheads, 0.5)),
            "create_minus_commands_p95_ms": ms(pct(overheads, 0.95)),
        }
        log(f"csi overhead: {self.results['csi_overhead']}")

    async def levels(self) -> None:
        out: dict[str, Any] = {}
        ids: list[str] = []
        names = [f"l-{i}" for i in range(VOLUMES)]
        request = GetCapacityRequest(parameters={"backend": "partition", "pool": POOL})
        for level in LEVELS:
            if level > len(ids):
                start, first = time.monotonic(), len(ids)
                created = [""] * (level - first)
                await timed_all(level - first, 8, functools.partial(self.create_nth, names[first:level], created))
                ids += created
                log(f"filled the pool to {level} volumes in {time.monotonic() - start:.1f}s")
            capacity, listing = [], []
            before = self.commands.count
            for _ in range(CALLS):
                start = time.monotonic()
                await self.controller.get_capacity(request)
                capacity.append(time.monotonic() - start)
            capacity_commands = self.commands.count - before
            before = self.commands.count
            for _ in range(max(CALLS // 5, 3)):
                start = time.monotonic()
                listed = await self.controller.list_volumes(ListVolumesRequest())
                listing.append(time.monotonic() - start)
            out[str(level)] = {
                "get_capacity_p50_ms": ms(pct(capacity, 0.5)),
                "get_capacity_p95_ms": ms(pct(capacity, 0.95)),
                "processes_per_get_capacity": round(capacity_commands / len(capacity), 2),
                "list_volumes_p50_ms": ms(pct(listing, 0.5)),
                "list_volumes_p95_ms": ms(pct(listing, 0.95)),
                "processes_per_list_volumes": round((self.commands.count - before) / len(listing), 2),
                "listed": len(listed.entries),
            }
            log(f"at {level} volumes: {out[str(level)]}")
        await timed_all(len(ids), 8, functools.partial(self.delete, ids))
        self.results["capacity_and_listing"] = out


def table(results: dict[str, Any]) -> str:
    lines = ["", "== provisioning (CreateVolume through the CSI socket; baseline: parted print+mkpart, wipefs) =="]
    lines.append(
        f"{'case':6s} {'ours s':>8s} {'base s':>8s} {'ours/base':>9s} {'ours vol/s':>10s} {'base vol/s':>10s}"
        f" {'ours p50':>9s} {'ours p95':>9s} {'base p50':>9s} {'base p95':>9s} {'procs/vol (real)':>16s}"
        f" {'del ours s':>10s} {'del base s':>10s}"
    )
    for case, row in results.get("provisioning", {}).items():
        ours, base = row["localdisk"], row["baseline"]
        procs = f"{row['localdisk_processes_per_create']:g}/{row['baseline_processes_per_create']:g}"
        if "localdisk_real_processes_per_create" in row:  # without the in-process ioctls
            procs += f" ({row['localdisk_real_processes_per_create']:g})"
        lines.append(
            f"{case:6s} {ours['seconds']:8.2f} {base['seconds']:8.2f} {row['time_ratio']:9.3f}"
            f" {ours['volumes_per_second']:10.2f} {base['volumes_per_second']:10.2f} {ours['p50_ms']:9.1f}"
            f" {ours['p95_ms']:9.1f} {base['p50_ms']:9.1f} {base['p95_ms']:9.1f} {procs:>16s}"
            f" {row['localdisk_delete']['seconds']:10.2f} {row['baseline_delete']['seconds']:10.2f}"
        )
    lines.append("== GetCapacity / ListVolumes over the socket (ms; processes the server spawned per call) ==")
    lines.append(
        f"{'volumes':>8s} {'cap p50':>8s} {'cap p95':>8s} {'cap procs':>9s}"
        f" {'list p50':>9s} {'list p95':>9s} {'list procs':>10s}"
    )
    for level, row in results.get("capacity_and_listing", {}).items():
        lines.append(
            f"{level:>8s} {row['get_capacity_p50_ms']:8.2f} {row['get_capacity_p95_ms']:8.2f}"
            f" {row['processes_per_get_capacity']:9g} {row['list_volumes_p50_ms']:9.2f}"
            f" {row['list_volumes_p95_ms']:9.2f} {row['processes_per_list_volumes']:10g}"
        )
    lines.append(f"== CSI overhead (ms) == {results.get('csi_overhead')}")
    for case, row in results.get("provisioning", {}).items():
        lines.append(
            f"== localdisk processes per CreateVolume at {case} == {row['localdisk_processes_per_create_by_tool']}"
        )
    lines.append(f"== processes the server spawned in the whole run, by tool == {results.get('server_commands')}")
    for case, row in results.get("provisioning", {}).items():
        lines.append(
            f"HEADLINE partition {case}: localdisk time / baseline time = {row['time_ratio']:.3f}"
            f" ({row['localdisk']['volumes_per_second']:.1f} vs {row['baseline']['volumes_per_second']:.1f} volumes/s)"
        )
    return "\n".join(lines)


async def main(out_path: Path) -> None:
    if reason := loop_unavailable():
        sys.exit(f"partbench: {reason}")
    if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        sys.exit(f"partbench: missing tools: {', '.join(missing)} (install parted util-linux)")
    if not 1 <= PER_DISK <= GPT_ENTRIES or DISKS > MAX_DISKS:
        sys.exit(f"partbench: BENCH_PART_VOLUMES must be 1..{DISKS * GPT_ENTRIES} (a GPT holds {GPT_ENTRIES} entries)")
    log(f"{VOLUMES} volumes of {SIZE // MiB} MiB on {DISKS} loop disks of {DISK_SIZE // MiB} MiB")
    commands = Commands()
    runner = CommandRunner(observers=[commands])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="partbench-") as tmp:
        socket = Path(tmp) / "csi.sock"
        async with loop_disks(DISKS, DISK_SIZE) as disks:
            pools = {"partition": {POOL: {"disks": disks, "default": True}}}
            manager = VolumeManager.from_config(node_config.parse({"pools": pools}, "partbench"), runner)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(serve, manager, "bench", f"unix://{socket}")
                with anyio.fail_after(60):
                    while not socket.exists():
                        await anyio.sleep(0.05)
                async with Channel(path=str(socket)) as channel:
                    bench = Bench(channel, commands, Baseline(CommandRunner(), disks))
                    await bench.overhead()
                    await bench.provisioning()
                    await bench.levels()
                results = bench.results
                results["server_commands"] = dict(commands.tools.most_common())
                tasks.cancel_scope.cancel()
    out_path.write_text(json.dumps(results, indent=2))
    print(table(results), flush=True)
    print(f"\nwritten to {out_path}", flush=True)


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1] if len(sys.argv) > 1 else "bench-partition.json").resolve())
