# ruff: noqa: ASYNC110, ASYNC220, ASYNC240 - a benchmark driver: a blocking stat or Popen between phases costs nothing
"""The LVM benchmark: runs INSIDE the User-Mode Linux sandbox (`nox -s bench` starts it there).

What it measures, each against the same pools in the same run:

- provisioning: CreateVolume through the CSI unix socket at several concurrencies, per backend (thin, lvm), then
  DeleteVolume; volumes per second and p50/p95 CreateVolume latency;
- the baseline, the way other LVM CSI drivers do it: per volume one `lvs` and one `vgs` process (their state read)
  and one `lvcreate` process, plus `blkdiscard -z` for thick LVs, as localdisk does (its no-leak zeroing), at the same
  concurrency; the headline is localdisk's time over the baseline's;
- GetCapacity and ListVolumes p50/p95 at several numbers of existing volumes (thin pool);
- the CSI overhead: Probe round trip, and CreateVolume time minus the time spent in LVM commands (sequential);
- memory: resident set of an idle `localdisk serve`, and of one serving the largest number of volumes after it has
  listed them.

Experiments (BENCH_EXPERIMENT, bench only, the library untouched): `no-confirm-refresh` also measures localdisk's
creates with the backends' re-read of the VG after each change (when no other writer waits) left out, in the same
guest right after the unchanged run, as `<backend>/c<N>/experiment`; BENCH_BASELINE=0 skips the baseline's runs.

Results are printed as a table and written as JSON. Counts come from the environment (BENCH_VOLUMES,
BENCH_CONCURRENCY, BENCH_LEVELS, BENCH_REPEATS, BENCH_CALLS) so a quick run and a full one use the same code.
Numbers are medians over BENCH_REPEATS repeats. Nothing here asserts a time: a benchmark is not a test.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
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
from localdisk.backends import lvm as lvm_backend
from localdisk.backends.lvm import PENDING_TAG, identity_tags, lv_name_for, shared_lvm
from localdisk.backends.lvmshell import ShellExecutor
from localdisk.csi.server import serve
from localdisk.manager import VolumeManager
from localdisk.runner import CommandRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.csi_helpers import create_request

LIN_VG, THIN_VG, THIN_POOL = "ldbench-lin", "ldbench-thin", "pool"
MiB = 1024 * 1024
SIZE = 4 * MiB
CONFIG = f"""
[pools.thin.tp]
volume_group = "{THIN_VG}"
thin_pool = "{THIN_POOL}"
overprovision_ratio = 100.0
default = true

[pools.lvm.lin]
volume_group = "{LIN_VG}"
default = true
"""
BACKENDS = {"thin": ("tp", THIN_VG), "lvm": ("lin", LIN_VG)}
PEER_TIMEOUT = 1800.0  # at concurrency 32 a peer's lvcreate waits for up to 31 others on LVM's VG lock


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


VOLUMES = _ints("BENCH_VOLUMES", "200")[0]
CONCURRENCY = _ints("BENCH_CONCURRENCY", "1,8,32")
LEVELS = _ints("BENCH_LEVELS", "0,100,1000")
# `nox -s bench` runs two guests at once: one provisions on the thin pool and measures the rest, one provisions on
# the linear VG (each compares against its own baseline, in the same guest, in the same run).
PROVISION = [b for b in os.environ.get("BENCH_BACKENDS", "thin,lvm").split(",") if b]
PHASES = frozenset(os.environ.get("BENCH_PHASES", "overhead,provisioning,levels,memory").split(","))
REPEATS = _ints("BENCH_REPEATS", "1")[0]
CALLS = _ints("BENCH_CALLS", "50")[0]
EXPERIMENT = os.environ.get("BENCH_EXPERIMENT", "")
BASELINE = os.environ.get("BENCH_BASELINE", "1") != "0"


@contextlib.asynccontextmanager
async def _writing_unconfirmed(self: Any) -> AsyncIterator[Any]:
    """`_LvmBackend._writing` without the VG re-read it makes after a change when no other writer is queued."""
    async with self._lock:
        try:
            yield await self._report()
        except BaseException:
            self.view.invalidate()
            raise


@contextlib.contextmanager
def experiment() -> Iterator[None]:
    """BENCH_EXPERIMENT's change to the backends, for the duration of one measured run."""
    if EXPERIMENT != "no-confirm-refresh":
        raise SystemExit(f"lvmbench: unknown BENCH_EXPERIMENT {EXPERIMENT!r} (known: no-confirm-refresh)")
    backend: Any = lvm_backend._LvmBackend
    original = backend._writing
    backend._writing = _writing_unconfirmed
    try:
        yield
    finally:
        backend._writing = original


class LvmClock:
    """Sums the time spent in LVM (and blkdiscard) commands, the server's runner reports every command here."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, argv: Sequence[str], seconds: float, ok: bool) -> None:
        self.seconds += seconds


# -- the peers' way ----------------------------------------------------------------------------------------------
async def peer_create(runner: CommandRunner, backend: str, vg: str, name: str) -> None:
    """What a one-process-per-command driver does for one CreateVolume: read state, create, zero a thick LV."""
    lv = lv_name_for("volume", name)
    report = ["--reportformat", "json", "--units", "b", "--nosuffix"]
    await runner.run(["lvm", "lvs", *report, "-o", "lv_name,lv_size,lv_tags,pool_lv", "--", vg])
    await runner.run(["lvm", "vgs", *report, "-o", "vg_name,vg_size,vg_free", "--", vg])
    tags = [a for t in identity_tags("volume", name) for a in ("--addtag", t)]
    if backend == "thin":
        await runner.run(
            ["lvm", "lvcreate", "-y", "-W", "n", "-a", "y", "-V", f"{SIZE}b", "--thinpool", THIN_POOL, "-n", lv]  # noqa: RUF005
            + [*tags, "--", vg]
        )
    else:
        await runner.run(
            ["lvm", "lvcreate", "-y", "-W", "y", "-Z", "y", "-a", "y", "-L", f"{SIZE}b", "-n", lv, *tags]  # noqa: RUF005
            + ["--addtag", PENDING_TAG, "--", vg]
        )
        await runner.run(["blkdiscard", "-z", "--", f"/dev/{vg}/{lv}"])


async def peer_delete_all(runner: CommandRunner, vg: str) -> None:
    await runner.run(["lvm", "lvremove", "-y", "--select", "lv_name=~^ldv-", "--", vg])


async def peer_create_nth(runner: CommandRunner, backend: str, vg: str, names: list[str], i: int) -> None:
    await peer_create(runner, backend, vg, names[i])


# -- phases ------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(
        self, controller: ControllerStub, identity: IdentityStub, clock: LvmClock, manager: VolumeManager
    ) -> None:
        self.manager = manager
        self.controller = controller
        self.identity = identity
        self.clock = clock
        self.results: dict[str, Any] = {
            "settings": {
                "volumes": VOLUMES,
                "concurrency": CONCURRENCY,
                "levels": LEVELS,
                "repeats": REPEATS,
                "calls": CALLS,
                "size_bytes": SIZE,
            }
        }

    async def create(self, backend: str, name: str) -> str:
        pool = BACKENDS[backend][0]
        response = await self.controller.create_volume(create_request(name, SIZE, backend, pool))
        assert response.volume is not None
        return response.volume.volume_id

    async def create_nth(self, backend: str, names: list[str], ids: list[str], i: int) -> None:
        ids[i] = await self.create(backend, names[i])

    async def delete(self, ids: list[str], i: int) -> None:
        await self.controller.delete_volume(DeleteVolumeRequest(volume_id=ids[i]))

    async def ours(self, backend: str, concurrency: int, label: str) -> dict[str, float]:
        names = [f"p-{backend}-{concurrency}-{label}-{i}" for i in range(VOLUMES)]
        ids: list[str] = [""] * VOLUMES
        make = functools.partial(self.create_nth, backend, names, ids)
        mine = summary(*await timed_all(VOLUMES, concurrency, make))
        wall, _ = await timed_all(VOLUMES, concurrency, functools.partial(self.delete, ids))
        return mine | {"deletes_per_second": round(VOLUMES / wall, 3)}

    async def provisioning(self) -> None:
        runner = CommandRunner(default_timeout=PEER_TIMEOUT)
        out: dict[str, Any] = {}
        for backend in PROVISION:
            vg = BACKENDS[backend][1]
            for concurrency in CONCURRENCY:
                ours, peers, tried = [], [], []
                for repeat in range(REPEATS):
                    ours.append(await self.ours(backend, concurrency, str(repeat)))
                    if EXPERIMENT:
                        with experiment():
                            tried.append(await self.ours(backend, concurrency, f"x{repeat}"))
                    if not BASELINE:
                        continue
                    base = [f"b-{backend}-{concurrency}-{repeat}-{i}" for i in range(VOLUMES)]
                    create = functools.partial(peer_create_nth, runner, backend, vg, base)
                    peers.append(summary(*await timed_all(VOLUMES, concurrency, create)))
                    await peer_delete_all(runner, vg)  # not measured: one lvremove for all, to save time
                mine = median_of(ours)
                theirs = median_of(peers) if peers else {"seconds": float("nan"), "volumes_per_second": float("nan")}
                theirs |= {k: float("nan") for k in ("p50_ms", "p95_ms") if k not in theirs}
                row: dict[str, Any] = {"localdisk": mine, "baseline": theirs}
                row["time_ratio"] = round(mine["seconds"] / theirs["seconds"], 3)
                row["speedup"] = round(theirs["seconds"] / mine["seconds"], 2)
                out[f"{backend}/c{concurrency}"] = row
                log(
                    f"provisioning {backend} c={concurrency}: ours {row['localdisk']['seconds']}s"
                    f" baseline {row['baseline']['seconds']}s -> ours/baseline {row['time_ratio']}"
                )
                if tried:
                    changed = median_of(tried)
                    out[f"{backend}/c{concurrency}/{EXPERIMENT}"] = {
                        "localdisk": changed,
                        "baseline": theirs,
                        "time_ratio": round(changed["seconds"] / theirs["seconds"], 3),
                        "speedup": round(theirs["seconds"] / changed["seconds"], 2),
                        "versus_unchanged": round(changed["seconds"] / mine["seconds"], 3),
                    }
                    log(f"  {EXPERIMENT}: ours {changed['seconds']}s ({changed['seconds'] / mine['seconds']:.3f}x)")
        self.results["provisioning"] = out

    async def overhead(self) -> None:
        self.results["syscall_us"] = syscall_cost()
        log(f"one system call here costs (us): {self.results['syscall_us']}")
        probes = []
        for _ in range(CALLS * 4):
            start = time.monotonic()
            await self.identity.probe(ProbeRequest())
            probes.append(time.monotonic() - start)
        overheads, totals = [], []
        for i in range(min(VOLUMES, 20)):
            before, start = self.clock.seconds, time.monotonic()
            volume_id = await self.create("thin", f"o-{i}")
            total = time.monotonic() - start
            totals.append(total)
            overheads.append(total - (self.clock.seconds - before))
            await self.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))
        self.results["csi_overhead"] = {
            "probe_p50_ms": ms(pct(probes, 0.5)),
            "probe_p95_ms": ms(pct(probes, 0.95)),
            "create_p50_ms": ms(pct(totals, 0.5)),
            "create_minus_lvm_p50_ms": ms(pct(overheads, 0.5)),
            "create_minus_lvm_p95_ms": ms(pct(overheads, 0.95)),
        }
        log(f"csi overhead: {self.results['csi_overhead']}")

    async def fill(self, first: int, i: int) -> None:
        await self.create("thin", f"l-{first + i}")

    async def levels(self, lvm_count: Callable[[], int]) -> None:
        out: dict[str, Any] = {}
        existing = 0
        for level in LEVELS:
            if level > existing:
                start = time.monotonic()
                await timed_all(level - existing, 32, functools.partial(self.fill, existing))
                log(f"filled the thin pool to {level} volumes in {time.monotonic() - start:.1f}s")
                existing = level
            capacity, listing = [], []
            commands = lvm_count()
            request = GetCapacityRequest(parameters={"backend": "thin", "pool": "tp"})
            for _ in range(CALLS):
                start = time.monotonic()
                await self.controller.get_capacity(request)
                capacity.append(time.monotonic() - start)
            in_process = []  # the same question asked of the library, without gRPC and the socket
            for _ in range(CALLS):
                start = time.monotonic()
                await self.manager.capacity("thin", "tp")
                in_process.append(time.monotonic() - start)
            for _ in range(max(CALLS // 5, 3)):
                start = time.monotonic()
                listed = await self.controller.list_volumes(ListVolumesRequest())
                listing.append(time.monotonic() - start)
            out[str(level)] = {
                "get_capacity_p50_ms": ms(pct(capacity, 0.5)),
                "get_capacity_p95_ms": ms(pct(capacity, 0.95)),
                "get_capacity_in_process_p50_ms": ms(pct(in_process, 0.5)),
                "get_capacity_in_process_p95_ms": ms(pct(in_process, 0.95)),
                "list_volumes_p50_ms": ms(pct(listing, 0.5)),
                "list_volumes_p95_ms": ms(pct(listing, 0.95)),
                "listed": len(listed.entries),
                "lvm_commands_during": lvm_count() - commands,
            }
            log(f"at {level} volumes: {out[str(level)]}")
        self.results["capacity_and_listing"] = out


def syscall_cost() -> dict[str, float]:
    """What one system call costs on this machine, the unit every socket round trip is paid in: in the UML guest
    every call traps to the guest kernel through the host (and CLOCK_MONOTONIC has no vDSO there)."""
    out = {}
    for name, call in (("getpid", os.getpid), ("clock_gettime", time.monotonic)):
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(1000):
                call()
            rounds.append((time.perf_counter() - start) / 1000)
        out[name] = round(sorted(rounds)[2] * 1e6, 2)
    return out


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def serve_rss(config_path: Path, socket: Path, *, work: bool) -> dict[str, float]:
    """Resident set of a `localdisk serve` process, idle or after GetCapacity + ListVolumes; and of its lvm shell."""
    argv = [sys.executable, "-m", "localdisk.cli", "serve", "--endpoint", f"unix://{socket}"]
    process = subprocess.Popen(
        [*argv, "--config", str(config_path), "--node-id", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with anyio.fail_after(120):
            while not socket.exists():
                await anyio.sleep(0.1)
        async with Channel(path=str(socket)) as channel:
            await IdentityStub(channel).probe(ProbeRequest())
            if work:
                controller = ControllerStub(channel)
                await controller.get_capacity(GetCapacityRequest(parameters={"backend": "thin", "pool": "tp"}))
                await controller.list_volumes(ListVolumesRequest())
            await anyio.sleep(1)
            shell = sum(rss_kib(child) for child in children_of(process.pid))
            return {"serve_rss_mib": round(rss_kib(process.pid) / 1024, 1), "lvm_shell_rss_mib": round(shell / 1024, 1)}
    finally:
        process.terminate()
        process.wait(timeout=30)


def table(results: dict[str, Any]) -> str:
    lines = ["", "== provisioning (CreateVolume through the CSI socket; baseline: lvs+vgs+lvcreate processes) =="]
    lines.append(
        f"{'case':32s} {'ours s':>8s} {'base s':>8s} {'ours/base':>9s} {'ours vol/s':>10s} {'base vol/s':>10s}"
        f" {'ours p50':>9s} {'ours p95':>9s} {'base p50':>9s} {'base p95':>9s}"
    )
    for case, row in results.get("provisioning", {}).items():
        ours, base = row["localdisk"], row["baseline"]
        lines.append(
            f"{case:32s} {ours['seconds']:8.2f} {base['seconds']:8.2f} {row['time_ratio']:9.3f}"
            f" {ours['volumes_per_second']:10.2f} {base['volumes_per_second']:10.2f} {ours['p50_ms']:9.0f}"
            f" {ours['p95_ms']:9.0f} {base['p50_ms']:9.0f} {base['p95_ms']:9.0f}"
        )
    lines.append("== GetCapacity / ListVolumes (thin pool; ms; socket = through the CSI socket, lib = in-process) ==")
    lines.append(
        f"{'volumes':>8s} {'cap p50':>8s} {'cap p95':>8s} {'lib p50':>8s} {'lib p95':>8s} {'list p50':>9s}"
        f" {'list p95':>9s} {'lvm cmds':>8s}"
    )
    for level, row in results.get("capacity_and_listing", {}).items():
        lines.append(
            f"{level:>8s} {row['get_capacity_p50_ms']:8.2f} {row['get_capacity_p95_ms']:8.2f}"
            f" {row['get_capacity_in_process_p50_ms']:8.2f} {row['get_capacity_in_process_p95_ms']:8.2f}"
            f" {row['list_volumes_p50_ms']:9.2f} {row['list_volumes_p95_ms']:9.2f} {row['lvm_commands_during']:8d}"
        )
    lines.append(f"== CSI overhead (ms) == {results.get('csi_overhead')}")
    lines.append(f"== one system call (us) == {results.get('syscall_us')}")
    lines.append(f"== memory == {results.get('memory')}")
    lines.append(f"== lvm shell == {results.get('lvm_shell')}")
    top = max(CONCURRENCY)
    for backend in BACKENDS:
        row = results.get("provisioning", {}).get(f"{backend}/c{top}")
        if row:
            lines.append(
                f"HEADLINE {backend} c={top}: localdisk time / baseline time = {row['time_ratio']:.3f}"
                f" ({row['speedup']:.2f}x the baseline's throughput)"
            )
    return "\n".join(lines)


async def main(out_path: Path) -> None:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    config_path = tmp / "bench.toml"
    config_path.write_text(CONFIG)
    memory: dict[str, Any] = {}
    if "memory" in PHASES:
        memory["idle"] = await serve_rss(config_path, tmp / "idle.sock", work=False)
        log(f"idle serve: {memory['idle']}")

    clock = LvmClock()
    runner = CommandRunner(observers=[clock])
    manager = VolumeManager.from_config(node_config.load(config_path), runner)
    executor = shared_lvm(runner).executor
    assert isinstance(executor, ShellExecutor)
    socket = tmp / "bench.sock"
    results: dict[str, Any] = {}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(serve, manager, "bench", f"unix://{socket}")
        with anyio.fail_after(120):
            while not socket.exists():
                await anyio.sleep(0.05)
        async with Channel(path=str(socket)) as channel:
            bench = Bench(ControllerStub(channel), IdentityStub(channel), clock, manager)
            if "overhead" in PHASES:
                await bench.overhead()
            if "provisioning" in PHASES:
                await bench.provisioning()
            if "levels" in PHASES:
                await bench.levels(lambda: executor.shell_commands + executor.fallback_commands)
        results = bench.results
        results["lvm_shell"] = {
            "shell_commands": executor.shell_commands,
            "fallback_commands": executor.fallback_commands,
            "restarts": executor.restarts,
        }
        tasks.cancel_scope.cancel()
    if "memory" in PHASES:
        memory[f"after_{max(LEVELS)}_volumes"] = await serve_rss(config_path, tmp / "full.sock", work=True)
        results["memory"] = memory
    out_path.write_text(json.dumps(results, indent=2))
    print(table(results), flush=True)
    print(f"\nwritten to {out_path}", flush=True)


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The results of the guests of one run as one: their sections side by side, provisioning rows together."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged.setdefault(key, value)
    return merged


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:  # bench/lvmbench.py --merge OUT PART...: one table and file for the run
        out = Path(sys.argv[2])
        results = merge([json.loads(Path(part).read_text()) for part in sys.argv[3:]])
        out.write_text(json.dumps(results, indent=2))
        print(table(results), flush=True)
        print(f"\nwritten to {out}", flush=True)
    else:
        anyio.run(main, Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results.json").resolve())
