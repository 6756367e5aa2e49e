"""Crash consistency: a CSI client that keeps working while its server is SIGKILLed at random moments.

The client behaves like the external-provisioner, external-resizer and csi-snapshotter together: it creates,
expands, snapshots and deletes volumes, and retries every call whose answer it did not get (the connection dropped,
ABORTED, UNAVAILABLE) with the same arguments until it gets one. Meanwhile a timer armed at a random delay after a
request is sent kills the server's whole process group with SIGKILL, as a container runtime does when the driver's
container dies: the server and the lvm/parted/wipefs child it was running die together, wherever they were. The
client restarts the server (`localdisk serve`, the real binary) and goes on. Some restarts are killed again while
the server is still opening its pools, which is where it finishes or drops what a crash left half done.

A create whose answer was lost is, as CSI wants, retried by name until acknowledged; sometimes the client then
changes its mind (the PVC was deleted meanwhile) and deletes the volume, which is how a provisioner cleans up. At the
end the client knows exactly which volumes and snapshots it wants. `verify` restarts the server once more and checks
that it lists exactly those (ListVolumes, ListSnapshots, ControllerGetVolume of each, CreateVolume of each name
returning the same ID), and that the backend's own on-disk view (`DiskView`: the GPT tables, `lvs`) holds exactly
one object per acknowledged name and nothing else: no volume lost, none leaked, nothing left pending.

Runs on the host for the partition backend (`test_crash.py`) and inside one long-running User-Mode Linux guest for
LVM, where starting a process is slow: `python -m tests.reliability.crashloop --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerGetVolumeRequest,
    ControllerStub,
    CreateSnapshotRequest,
    CreateVolumeRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    IdentityStub,
    ListSnapshotsRequest,
    ListVolumesRequest,
    ProbeRequest,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityAccessModeMode,
    VolumeCapabilityMountVolume,
)

T = TypeVar("T")
MiB = 1024 * 1024
RETRY = {Status.ABORTED, Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED}
CALL_TIMEOUT = 120.0
START_TIMEOUT = 120.0
CAPABILITY = VolumeCapability(
    mount=VolumeCapabilityMountVolume(fs_type="ext4"),
    access_mode=VolumeCapabilityAccessMode(mode=VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER),
)


class ServerDied(AssertionError):
    """The server exited on its own: a crash left state it cannot start from, which is what this test hunts."""


class Server:
    """One `localdisk serve` process at a time, killed and restarted on demand."""

    def __init__(self, config: Path, workdir: Path, node_id: str = "crash-node") -> None:
        self.config = config
        self.socket = workdir / "csi.sock"
        self.log = workdir / "server.log"
        self.node_id = node_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    def spawn(self) -> None:
        argv = [sys.executable, "-m", "localdisk.cli", "serve", "--endpoint", f"unix://{self.socket}"]
        argv += ["--node-id", self.node_id, "--config", str(self.config), "--log-format", "text"]
        with self.log.open("ab") as log:
            log.write(f"\n==== start {self.starts + 1} ====\n".encode())
            log.flush()
            # A session of its own, so a kill takes the server's children (parted, lvm, ...) with it.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1

    async def wait_ready(self) -> None:
        """Until Probe answers on the new process; the old socket file may still be there until it binds."""
        assert self.proc is not None
        began = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServerDied(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() - began > START_TIMEOUT:
                raise AssertionError(f"the server did not answer within {START_TIMEOUT}s:\n{self.log_tail()}")
            channel = Channel(path=str(self.socket))
            try:
                await IdentityStub(channel).probe(ProbeRequest(), timeout=5)
            except (OSError, GRPCError, StreamTerminatedError, TimeoutError):
                await asyncio.sleep(0.02)
                continue
            finally:
                channel.close()
            self.start_seconds.append(time.monotonic() - began)
            return

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server's process group and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        _reap_group(self.proc.pid)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as a rolling update does; SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server ignored SIGTERM for 30s:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _reap_group(pgid: int) -> None:
    """Wait until every process of the killed group is dead, so the next server never races a dying child.

    Dead means gone or a zombie: a killed child is reparented to PID 1, which may be slow to reap it, and a zombie
    holds no file or device any more.
    """
    deadline = time.monotonic() + 10
    while (left := _running_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.005)
    if left:
        raise AssertionError(f"processes {left} of group {pgid} survived SIGKILL for 10s")


def _running_in_group(pgid: int) -> list[int]:
    running = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            running.append(int(entry.name))
    return running


class DiskView(Protocol):
    """The backend's own view of what exists, read without localdisk: `{storage name: (handle, size bytes)}`."""

    def objects(self) -> dict[str, tuple[str, int]]: ...

    def volume_name(self, csi_name: str) -> str: ...

    def snapshot_name(self, csi_name: str) -> str: ...

    def problems(self) -> list[str]:
        """Anything else wrong on disk (the kernel disagreeing with the table, say)."""


@dataclass
class Settings:
    kills: int = 100  # SIGKILLs during RPCs to reach before reconciling
    max_seconds: float = 600.0  # stop earlier if this much time has passed (the test then fails on `kills`)
    seed: int = 0
    kill_probability: float = 0.6  # of arming the kill timer for an RPC attempt
    startup_kill_probability: float = 0.1  # of killing a restart while it opens its pools
    sizes: tuple[int, ...] = (1 * MiB, 2 * MiB, 3 * MiB + 12345, 4 * MiB)
    growth: tuple[int, ...] = (1 * MiB, 2 * MiB - 4096)
    max_live: int = 10
    snapshots: bool = False
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class Live:
    id: str
    size: int
    request_bytes: int


@dataclass
class Report:
    backend: str
    kills: int = 0
    startup_kills: int = 0
    late_kills: int = 0  # the timer fired after the answer had arrived
    restarts: int = 0
    rpcs: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)  # one example message per non-OK status
    live: int = 0
    deleted: int = 0
    snapshots: int = 0
    lost: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    median_start_seconds: float = 0.0

    def summary(self) -> str:
        ops = sum(self.operations.values())
        return (
            f"[{self.backend}] {self.kills} kills during RPCs + {self.startup_kills} during start-up,"
            f" {self.restarts} restarts, {ops} operations acknowledged ({dict(self.operations)}), {self.rpcs} RPCs"
            f" sent, answers {dict(self.answers)}, {self.live} volumes + {self.snapshots} snapshots live at the end,"
            f" {self.deleted} deleted, lost {len(self.lost)}, leaked {len(self.leaked)}, {self.seconds:.0f}s,"
            f" median server start {self.median_start_seconds:.2f}s"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Report:
        raw = json.loads(text)
        raw["operations"] = Counter(raw["operations"])
        raw["answers"] = Counter(raw["answers"])
        return cls(**raw)


class Refused(Exception):
    """A final answer the client accepts (no room, out of range): the operation did not happen."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


class CrashLoop:
    def __init__(self, backend: str, server: Server, view: DiskView, settings: Settings) -> None:
        self.server = server
        self.view = view
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.report = Report(backend)
        self.live: dict[str, Live] = {}
        self.deleted: dict[str, str] = {}
        self.refused: set[str] = set()
        self.snaps: dict[str, tuple[str, str]] = {}  # snapshot name -> (id, source volume id)
        self.deleted_snaps: dict[str, str] = {}
        self.duration: dict[str, float] = {}  # running mean of each RPC's duration, for the kill delays
        self.killing = True
        self._channel: Channel | None = None
        self._counter = 0

    # -- plumbing ---------------------------------------------------------------------------------------------
    async def _ensure_server(self) -> None:
        if self.server.alive() and self._channel is not None:
            return
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        while True:
            self.server.kill()
            self.server.spawn()
            self.report.restarts += 1
            timer = None
            if self.killing and self.rng.random() < self.settings.startup_kill_probability:
                typical = sorted(self.server.start_seconds)[len(self.server.start_seconds) // 2 :][:1] or [0.5]
                timer = asyncio.get_running_loop().call_later(self.rng.uniform(0, typical[0]), self._kill_at_start)
            try:
                await self.server.wait_ready()
            except ServerDied:
                if self.server.proc is not None and self.server.proc.returncode == -signal.SIGKILL:
                    continue  # our start-up kill landed
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            break
        self._channel = Channel(path=str(self.server.socket))

    def _kill_during_call(self, killed: list[bool]) -> None:
        if self.server.alive():
            killed.append(True)
            self.server.kill()

    def _kill_at_start(self) -> None:
        if self.server.alive():
            self.report.startup_kills += 1
            self.server.kill()

    async def call(self, kind: str, send: Callable[[ControllerStub], Awaitable[T]], final: set[Status]) -> T:
        """Send until answered: a lost answer (the server died) or a retryable status is sent again."""
        attempts = 0
        while True:
            attempts += 1
            if attempts > 200:
                raise AssertionError(f"{kind}: no final answer after 200 attempts; last: {self.report.messages}")
            await self._ensure_server()
            assert self._channel is not None
            killed: list[bool] = []
            timer = None
            if self.killing and self.rng.random() < self.settings.kill_probability:
                delay = self.rng.uniform(0, 1.2 * self.duration.get(kind, 0.3))
                timer = asyncio.get_running_loop().call_later(delay, self._kill_during_call, killed)
            began = time.monotonic()
            self.report.rpcs += 1
            try:
                answer = await send(ControllerStub(self._channel, timeout=CALL_TIMEOUT))
            except GRPCError as exc:
                if killed or not self.server.alive():
                    self._lost(kind, killed)
                    continue
                self.report.answers[exc.status.name] += 1
                self.report.messages.setdefault(exc.status.name, f"{kind}: {exc.message}")
                if exc.status in final:
                    raise Refused(exc.status, exc.message or "") from exc
                if exc.status in RETRY:
                    await asyncio.sleep(0.05)
                    continue
                raise AssertionError(
                    f"{kind}: unexpected {exc.status.name}: {exc.message}\n{self.server.log_tail()}"
                ) from exc
            except (OSError, StreamTerminatedError, TimeoutError):
                self._lost(kind, killed)
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            self.report.answers["OK"] += 1
            if killed:  # answered, then the timer fired before we could cancel it: a kill between two RPCs
                self.report.late_kills += 1
                return answer
            elapsed = time.monotonic() - began
            mean = self.duration.get(kind, elapsed)
            self.duration[kind] = 0.8 * mean + 0.2 * elapsed
            return answer

    def _lost(self, kind: str, killed: list[bool]) -> None:
        if killed:
            self.report.kills += 1
        elif self.server.alive():
            raise AssertionError(f"{kind}: the connection broke although the server runs:\n{self.server.log_tail()}")
        else:
            raise ServerDied(f"{kind}: the server died on its own:\n{self.server.log_tail()}")
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _name(self) -> str:
        self._counter += 1
        styles = [f"pvc-crash-{self._counter:05d}", f"crash {self._counter} ünï 🙂 --force $(id)", f"-{self._counter}"]
        return self.rng.choice(styles)

    def _create_request(self, name: str, size: int) -> CreateVolumeRequest:
        return CreateVolumeRequest(
            name=name,
            capacity_range=CapacityRange(required_bytes=size),
            volume_capabilities=[CAPABILITY],
            parameters=self.settings.parameters,
        )

    # -- operations -------------------------------------------------------------------------------------------
    async def create(self) -> None:
        name = self._name()
        size = self.rng.choice(self.settings.sizes)
        kills_before = self.report.kills
        try:
            answer = await self.call(
                "create", lambda c: c.create_volume(self._create_request(name, size)), {Status.RESOURCE_EXHAUSTED}
            )
        except Refused:
            self.refused.add(name)
            return
        volume = answer.volume
        assert volume is not None and volume.capacity_bytes >= size, (name, volume)
        assert all(other.id != volume.volume_id for other in self.live.values()), f"{name}: ID handed out twice"
        self.live[name] = Live(volume.volume_id, volume.capacity_bytes, size)
        self.report.operations["create"] += 1
        if self.report.kills > kills_before and self.rng.random() < 0.5:
            await self.delete(name)  # the PVC went away while its create was in flight: provisioner clean-up

    async def create_again(self) -> None:
        """A create retried long after it was acknowledged (a restarted provisioner) must answer the same ID."""
        name = self.rng.choice(sorted(self.live))
        live = self.live[name]
        request = self._create_request(name, live.request_bytes)
        answer = await self.call("create", lambda c: c.create_volume(request), set())
        assert answer.volume is not None and answer.volume.volume_id == live.id, (name, live, answer.volume)
        assert answer.volume.capacity_bytes == live.size, (name, live, answer.volume)
        self.report.operations["create-again"] += 1

    async def expand(self) -> None:
        name = self.rng.choice(sorted(self.live))
        live = self.live[name]
        wanted = live.size + self.rng.choice(self.settings.growth)
        request = ControllerExpandVolumeRequest(volume_id=live.id, capacity_range=CapacityRange(required_bytes=wanted))
        refusals = {Status.RESOURCE_EXHAUSTED, Status.OUT_OF_RANGE}
        try:
            answer = await self.call("expand", lambda c: c.controller_expand_volume(request), refusals)
        except Refused:
            return
        assert answer.capacity_bytes >= wanted, (name, wanted, answer)
        live.size = answer.capacity_bytes
        self.report.operations["expand"] += 1

    async def delete(self, name: str | None = None) -> None:
        name = name or self.rng.choice(sorted(self.live))
        live = self.live[name]
        for snap, (_, source) in sorted(self.snaps.items()):
            if source == live.id and self.rng.random() < 0.5:
                await self.delete_snapshot(snap)
        await self.call("delete", lambda c: c.delete_volume(DeleteVolumeRequest(volume_id=live.id)), set())
        del self.live[name]
        self.deleted[name] = live.id
        self.report.operations["delete"] += 1

    async def snapshot(self) -> None:
        source = self.live[self.rng.choice(sorted(self.live))]
        self._counter += 1
        name = f"snap-crash-{self._counter:05d}"
        request = CreateSnapshotRequest(source_volume_id=source.id, name=name)
        try:
            answer = await self.call("snapshot", lambda c: c.create_snapshot(request), {Status.RESOURCE_EXHAUSTED})
        except Refused:
            return
        snapshot = answer.snapshot
        assert snapshot is not None and snapshot.source_volume_id == source.id, (name, snapshot)
        self.snaps[name] = (snapshot.snapshot_id, source.id)
        self.report.operations["snapshot"] += 1

    async def delete_snapshot(self, name: str | None = None) -> None:
        name = name or self.rng.choice(sorted(self.snaps))
        snap_id, _ = self.snaps[name]
        request = DeleteSnapshotRequest(snapshot_id=snap_id)
        await self.call("delete-snapshot", lambda c: c.delete_snapshot(request), set())
        del self.snaps[name]
        self.deleted_snaps[name] = snap_id
        self.report.operations["delete-snapshot"] += 1

    async def step(self) -> None:
        choices: list[tuple[float, Callable[[], Awaitable[None]]]] = [(3.0, self.create)]
        if self.live:
            choices += [(2.0, self.expand), (2.0 if len(self.live) < self.settings.max_live else 6.0, self.delete)]
            choices.append((0.3, self.create_again))
            if self.settings.snapshots:
                choices.append((1.5, self.snapshot))
        if self.snaps:
            choices.append((1.0, self.delete_snapshot))
        if len(self.live) >= self.settings.max_live:
            choices = [c for c in choices if c[1] != self.create]
        weights = [w for w, _ in choices]
        operation = self.rng.choices([op for _, op in choices], weights)[0]
        await operation()

    # -- the run ----------------------------------------------------------------------------------------------
    async def run(self) -> Report:
        began = time.monotonic()
        try:
            while self.report.kills < self.settings.kills and time.monotonic() - began < self.settings.max_seconds:
                await self.step()
            self.killing = False
            await self.verify()
        finally:
            if self._channel is not None:
                self._channel.close()
            self.server.kill()
            self.report.seconds = time.monotonic() - began
            starts = sorted(self.server.start_seconds)
            self.report.median_start_seconds = starts[len(starts) // 2] if starts else 0.0
        return self.report

    async def verify(self) -> None:
        """A clean restart, then: the server and the disks hold exactly what the client was acknowledged."""
        self.server.kill()
        await self._ensure_server()
        report = self.report
        report.live, report.deleted, report.snapshots = len(self.live), len(self.deleted), len(self.snaps)
        wanted = {live.id: live.size for live in self.live.values()}

        listed: dict[str, int] = {}
        token = ""
        while True:
            listing = ListVolumesRequest(max_entries=7, starting_token=token)
            page = await self.call("list", lambda c, r=listing: c.list_volumes(r), set())  # type: ignore[misc]
            for entry in page.entries:
                assert entry.volume is not None
                assert entry.volume.volume_id not in listed, f"ListVolumes shows {entry.volume.volume_id} twice"
                listed[entry.volume.volume_id] = entry.volume.capacity_bytes
            token = page.next_token
            if not token:
                break
        report.lost += [f"volume {i} (acknowledged, not listed)" for i in sorted(set(wanted) - set(listed))]
        report.leaked += [f"volume {i} (listed, not wanted)" for i in sorted(set(listed) - set(wanted))]
        report.problems += [
            f"volume {i}: listed with {listed[i]} bytes, acknowledged {wanted[i]}"
            for i in sorted(set(wanted) & set(listed))
            if listed[i] != wanted[i]
        ]
        for volume_id in sorted(set(self.deleted.values())):
            get = ControllerGetVolumeRequest(volume_id=volume_id)
            try:
                await self.call("get", lambda c, r=get: c.controller_get_volume(r), {Status.NOT_FOUND})  # type: ignore[misc]
            except Refused:
                continue
            report.leaked.append(f"volume {volume_id} (deleted, still found)")
        for name in sorted(self.live):
            await self.create_again_of(name)

        wanted_snaps = {snap_id: source for snap_id, source in self.snaps.values()}
        if self.settings.snapshots:
            snaps = await self.call("list-snapshots", lambda c: c.list_snapshots(ListSnapshotsRequest()), set())
            listed_snaps = {e.snapshot.snapshot_id: e.snapshot.source_volume_id for e in snaps.entries if e.snapshot}
            for snap_id in sorted(set(wanted_snaps) - set(listed_snaps)):
                report.lost.append(f"snapshot {snap_id} (acknowledged, not listed)")
            for snap_id in sorted(set(listed_snaps) - set(wanted_snaps)):
                report.leaked.append(f"snapshot {snap_id} (listed, not wanted)")
            for snap_id in sorted(set(listed_snaps) & set(wanted_snaps)):
                if listed_snaps[snap_id] != wanted_snaps[snap_id]:
                    report.problems.append(f"snapshot {snap_id}: listed as taken of {listed_snaps[snap_id]}")

        on_disk = self.view.objects()
        expected = {self.view.volume_name(n): (live.id.split(":", 2)[2], live.size) for n, live in self.live.items()}
        expected |= {
            self.view.snapshot_name(n): (snap_id.split(":", 2)[2], -1) for n, (snap_id, _) in self.snaps.items()
        }
        for storage, (handle, size) in sorted(expected.items()):
            found = on_disk.get(storage)
            if found is None:
                report.lost.append(f"{storage} (acknowledged, not on disk)")
            elif found[0] != handle or (size >= 0 and found[1] != size):
                report.problems.append(f"{storage}: on disk as {found}, acknowledged as {(handle, size)}")
        report.leaked += [f"{s} {on_disk[s]} (on disk, not wanted)" for s in sorted(set(on_disk) - set(expected))]
        report.problems += self.view.problems()

    async def create_again_of(self, name: str) -> None:
        live = self.live[name]
        request = self._create_request(name, live.request_bytes)
        answer = await self.call("create", lambda c: c.create_volume(request), set())
        if answer.volume is None or answer.volume.volume_id != live.id:
            self.report.problems.append(f"CreateVolume {name!r} after restart answered {answer.volume}, not {live.id}")


# -- running in a guest -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the crash loop against a config; write a JSON report.")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--backend", required=True, choices=["lvm", "thin"])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=420.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tests.reliability.views import LvmView

    view = LvmView.from_config(args.config, args.backend)
    settings = Settings(
        kills=args.kills,
        max_seconds=args.seconds,
        seed=args.seed,
        snapshots=args.backend == "thin",
        parameters={"backend": args.backend},
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    loop = CrashLoop(args.backend, Server(args.config, args.workdir), view, settings)
    try:
        report = asyncio.run(loop.run())
    except AssertionError as exc:
        loop.report.problems.append(f"aborted: {exc}")
        report = loop.report
    args.report.write_text(report.to_json())
    print(report.summary())
    return 0 if not (report.lost or report.leaked or report.problems) else 1


if __name__ == "__main__":
    sys.exit(main())
