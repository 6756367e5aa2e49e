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

Runs on the host for the partition backend (`test_crash.py`) and inside one User-Mode Linux guest for LVM and thin
together (`test_uml_crash.py`), where one server serves both pools and each kill interrupts both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
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
REAP_SECONDS = 60.0
CAPABILITY = VolumeCapability(
    mount=VolumeCapabilityMountVolume(fs_type="ext4"),
    access_mode=VolumeCapabilityAccessMode(mode=VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER),
)


class ServerDied(AssertionError):
    """The server exited on its own: a crash left state it cannot start from, which is what this test hunts."""


class Server:
    """One `localdisk serve` process at a time, killed and restarted on demand.

    By default each server is a fresh `python -m localdisk.cli serve`. With `fork=True` (for UML, where starting
    Python takes tens of seconds) each is forked from a zygote that has imported localdisk once (see `zygote.py`).
    """

    def __init__(self, config: Path, workdir: Path, node_id: str = "crash-node", *, fork: bool = False) -> None:
        self.config = config
        self.socket = workdir / "csi.sock"
        self.log = workdir / "server.log"
        self.node_id = node_id
        self.fork = fork
        self.pid: int | None = None
        self.killed_by_us = False  # whether the current (or last) server died of our SIGKILL
        self._popen: subprocess.Popen[bytes] | None = None
        self._zygote: subprocess.Popen[str] | None = None
        self.starts = 0
        self.start_seconds: list[float] = []
        self._socket_before: tuple[int, int] | None = None

    def _serve_args(self) -> list[str]:
        return [
            "--endpoint",
            f"unix://{self.socket}",
            "--node-id",
            self.node_id,
            "--config",
            str(self.config),
            "--log-format",
            "text",
        ]

    def spawn(self) -> None:
        self._socket_before = _inode(self.socket)  # the dead server's socket, until the new one binds
        with self.log.open("ab") as log:
            log.write(f"\n==== start {self.starts + 1} ====\n".encode())
            log.flush()
            if self.fork:
                self.pid = self._fork()
            else:
                argv = [sys.executable, "-m", "localdisk.cli", "serve", *self._serve_args()]
                # A session of its own, so a kill takes the server's children (parted, lvm, ...) with it.
                self._popen = subprocess.Popen(
                    argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
                )
                self.pid = self._popen.pid
        self.killed_by_us = False
        self.starts += 1

    def _fork(self) -> int:
        if self._zygote is None:
            argv = [sys.executable, "-m", "tests.reliability.zygote", *self._serve_args()]
            self._zygote = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self._zygote.stdout is not None
            assert self._zygote.stdout.readline().strip() == "ready", "the zygote did not start"
        assert self._zygote.stdin is not None and self._zygote.stdout is not None
        self._zygote.stdin.write(f"spawn {self.log}\n")
        self._zygote.stdin.flush()
        return int(self._zygote.stdout.readline())

    def close(self) -> None:
        """Stop the zygote, if any (after `kill`)."""
        if self._zygote is not None:
            assert self._zygote.stdin is not None
            self._zygote.stdin.close()
            self._zygote.wait(timeout=30)
            self._zygote = None

    async def wait_ready(self) -> None:
        """Until Probe answers on the new process; the old socket file may still be there until it binds."""
        began = time.monotonic()
        while True:
            if _inode(self.socket) in (None, self._socket_before):  # not bound yet: no probes to slow it down
                if not self.alive():
                    raise ServerDied(f"the server exited{self._exit_status()} while starting:\n{self.log_tail()}")
                if time.monotonic() - began > START_TIMEOUT:
                    raise AssertionError(f"the server did not bind within {START_TIMEOUT}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)
                continue
            if not self.alive():
                raise ServerDied(f"the server exited{self._exit_status()} while starting:\n{self.log_tail()}")
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

    def _exit_status(self) -> str:
        if self._popen is not None and self._popen.returncode is not None:
            return f" with {self._popen.returncode}"
        return ""

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        return _state(self.pid) not in (None, "Z", "X")

    def kill(self) -> None:
        """SIGKILL the server's process group and wait until every process of it is dead."""
        if self.pid is None:
            return
        if self.alive():
            self.killed_by_us = True
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                # A forked server killed this early has not called setsid() yet: no group of its own to kill.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait()
        _reap_group(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _inode(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (inode and change time: an inode number alone may be reused at once)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _reap_group(pgid: int) -> None:
    """Wait until every process of the killed group is dead, so the next server never races a dying child.

    Dead means gone or a zombie: a killed child is reparented to PID 1, which may be slow to reap it, and a zombie
    holds no file or device any more.
    """
    # Under UML on a loaded host, tearing down a killed Python server has once taken over 10 s (seen as a
    # failure of this wait at restart 118); a minute still catches a process that really survives SIGKILL.
    deadline = time.monotonic() + REAP_SECONDS
    while (left := _running_in_group(pgid)) and time.monotonic() < deadline:
        # Again and again: a process that made the group after the first kill (a forked server calling setsid()
        # just then, seen once as a server left sleeping in its new group) is killed too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.005)
    if left:
        states = {pid: _state(pid) for pid in left}
        raise AssertionError(f"processes of group {pgid} survived SIGKILL for {REAP_SECONDS}s (states {states})")


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
    kills_per_operation: int = 3  # then the operation is let through, so the loop makes progress
    first_guess_seconds: float = 0.3  # an RPC's duration before one has been measured
    startup_kill_probability: float = 0.1  # of killing a restart while it opens its pools
    sizes: tuple[int, ...] = (1 * MiB, 2 * MiB, 3 * MiB + 12345, 4 * MiB)
    growth: tuple[int, ...] = (1 * MiB, 2 * MiB - 4096)
    max_live: int = 10
    snapshots: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    variants: tuple[dict[str, str], ...] = ()  # over `parameters`, one per volume by its name (its retries ask alike)
    id_prefix: str = ""  # what this loop's volume IDs start with (`lvm:dense:`); "" for the backend's name and ':'


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
    variants: Counter[str] = field(default_factory=Counter)  # acknowledged creates per variant of the parameters

    def summary(self) -> str:
        ops = sum(self.operations.values())
        made = f", creates by variant {dict(self.variants)}" if self.variants else ""
        return (
            f"[{self.backend}] {self.kills} kills during RPCs + {self.startup_kills} during start-up,"
            f" {self.restarts} restarts, {ops} operations acknowledged ({dict(self.operations)}), {self.rpcs} RPCs"
            f" sent, answers {dict(self.answers)}, {self.live} volumes + {self.snapshots} snapshots live at the end,"
            f" {self.deleted} deleted, lost {len(self.lost)}, leaked {len(self.leaked)}, {self.seconds:.0f}s,"
            f" median server start {self.median_start_seconds:.2f}s{made}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Report:
        raw = json.loads(text)
        raw["operations"] = Counter(raw["operations"])
        raw["answers"] = Counter(raw["answers"])
        raw["variants"] = Counter(raw.get("variants", {}))
        return cls(**raw)


async def run_together(loops: list[CrashLoop]) -> list[Report]:
    """Run crash loops at once against their shared server (one restart then interrupts each loop's call in
    flight), then restart it cleanly and verify each loop's pool."""
    supervisor = loops[0].supervisor
    began = time.monotonic()
    try:
        await asyncio.gather(*(loop.churn() for loop in loops))
        supervisor.killing = False
        await supervisor.restart()
        for loop in loops:
            await loop.verify()
    finally:
        supervisor.close()
        starts = sorted(supervisor.server.start_seconds)
        for loop in loops:
            loop.report.seconds = time.monotonic() - began
            loop.report.restarts = supervisor.restarts
            loop.report.startup_kills = supervisor.startup_kills
            loop.report.median_start_seconds = starts[len(starts) // 2] if starts else 0.0
    return [loop.report for loop in loops]


class Refused(Exception):
    """A final answer the client accepts (no room, out of range): the operation did not happen."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


class Supervisor:
    """Keeps one server running for one or several crash loops, and kills it when their timers say so.

    Servers are numbered (`generation`); a kill names the generation it means, so a timer armed for one server
    never kills its successor, and a client whose call broke can tell a kill it should retry after from a crash.
    """

    def __init__(self, server: Server, seed: int, startup_kill_probability: float) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.startup_kill_probability = startup_kill_probability
        self.killing = True
        self.generation = 0
        self.killed: set[int] = set()
        self.restarts = 0
        self.startup_kills = 0
        self.channel: Channel | None = None
        self._lock = asyncio.Lock()

    async def ensure(self) -> int:
        """The generation of a running, answering server, starting one if there is none."""
        async with self._lock:
            if self.channel is not None and self.server.alive():
                return self.generation
            if self.channel is not None:
                self.channel.close()
                self.channel = None
            while True:
                self.server.kill()
                self.server.spawn()
                self.generation += 1
                self.restarts += 1
                timer = None
                if self.killing and self.rng.random() < self.startup_kill_probability:
                    starts = sorted(self.server.start_seconds) or [0.5]
                    delay = self.rng.uniform(0, starts[len(starts) // 2])
                    timer = asyncio.get_running_loop().call_later(delay, self._kill_at_start, self.generation)
                try:
                    await self.server.wait_ready()
                except ServerDied:
                    if self.generation in self.killed:
                        continue  # our start-up kill landed
                    raise
                finally:
                    if timer is not None:
                        timer.cancel()
                break
            self.channel = Channel(path=str(self.server.socket))
            return self.generation

    def kill(self, generation: int) -> None:
        if generation == self.generation and self.server.alive():
            self.killed.add(generation)
            self.server.kill()

    def _kill_at_start(self, generation: int) -> None:
        if generation == self.generation and self.server.alive():
            self.startup_kills += 1
            self.kill(generation)

    async def restart(self) -> None:
        """A deliberate restart (no kill counted): the state the next server finds is all on disk."""
        async with self._lock:
            self.server.kill()
        await self.ensure()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.server.kill()
        self.server.close()


class CrashLoop:
    def __init__(self, backend: str, supervisor: Supervisor, view: DiskView, settings: Settings) -> None:
        self.backend = backend
        self.supervisor = supervisor
        self.server = supervisor.server
        self.view = view
        self.settings = settings
        self.rng = random.Random(f"{settings.seed}-{backend}")
        self.report = Report(backend)
        self.live: dict[str, Live] = {}
        self.deleted: dict[str, str] = {}
        self.refused: set[str] = set()
        self.snaps: dict[str, tuple[str, str]] = {}  # snapshot name -> (id, source volume id)
        self.deleted_snaps: dict[str, str] = {}
        self.duration: dict[str, float] = {}  # running mean of each RPC's duration, for the kill delays
        self._counter = 0

    # -- plumbing ---------------------------------------------------------------------------------------------
    async def call(self, kind: str, send: Callable[[ControllerStub], Awaitable[T]], final: set[Status]) -> T:
        """Send until answered: a lost answer (the server was killed) or a retryable status is sent again.

        At most `kills_per_operation` kills are aimed at one operation, so each one is eventually answered."""
        attempts = kills = 0
        while True:
            attempts += 1
            if attempts > 200:
                raise AssertionError(f"{kind}: no final answer after 200 attempts; last: {self.report.messages}")
            generation = await self.supervisor.ensure()
            channel = self.supervisor.channel
            assert channel is not None
            timer = None
            aim = kills < self.settings.kills_per_operation and self.rng.random() < self.settings.kill_probability
            if self.supervisor.killing and aim:
                delay = self.rng.uniform(0, 1.2 * self.duration.get(kind, self.settings.first_guess_seconds))
                timer = asyncio.get_running_loop().call_later(delay, self.supervisor.kill, generation)
            began = time.monotonic()
            self.report.rpcs += 1
            try:
                answer = await send(ControllerStub(channel, timeout=CALL_TIMEOUT))
            except GRPCError as exc:
                if generation in self.supervisor.killed or not self.server.alive():
                    kills += self._lost(kind, generation)
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
                kills += self._lost(kind, generation)
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            self.report.answers["OK"] += 1
            if generation in self.supervisor.killed:  # answered, then killed before the timer was cancelled
                self.report.late_kills += 1
                return answer
            elapsed = time.monotonic() - began
            mean = self.duration.get(kind, elapsed)
            self.duration[kind] = 0.8 * mean + 0.2 * elapsed
            return answer

    def _lost(self, kind: str, generation: int) -> int:
        if generation in self.supervisor.killed:
            self.report.kills += 1
            return 1
        if self.server.alive():
            raise AssertionError(f"{kind}: the connection broke although the server runs:\n{self.server.log_tail()}")
        raise ServerDied(f"{kind}: the server died on its own:\n{self.server.log_tail()}")

    def _name(self) -> str:
        self._counter += 1
        n, b = self._counter, self.backend  # the backend in the name: names are unique across a node's pools
        styles = [f"pvc-{b}-crash-{n:05d}", f"crash {b} {n} ünï 🙂 --force $(id)", f"-{b}-{n}"]
        return self.rng.choice(styles)

    def _create_request(self, name: str, size: int) -> CreateVolumeRequest:
        return CreateVolumeRequest(
            name=name,
            capacity_range=CapacityRange(required_bytes=size),
            volume_capabilities=[CAPABILITY],
            parameters=self._parameters(name),
        )

    def _parameters(self, name: str) -> dict[str, str]:
        return {**self.settings.parameters, **self._variant(name)}

    def _variant(self, name: str) -> dict[str, str]:
        variants = self.settings.variants
        return variants[zlib.crc32(name.encode("utf-8", "surrogatepass")) % len(variants)] if variants else {}

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
        if self.settings.variants:
            self.report.variants[",".join(f"{k}={v}" for k, v in self._variant(name).items())] += 1
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
        name = f"snap-{self.backend}-crash-{self._counter:05d}"
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
    async def churn(self) -> None:
        """Random operations until this loop has seen its kills (or its time is up)."""
        began = time.monotonic()
        while self.report.kills < self.settings.kills and time.monotonic() - began < self.settings.max_seconds:
            await self.step()

    async def run(self) -> Report:
        return (await run_together([self]))[0]

    async def verify(self) -> None:
        """After a clean restart: the server and the disks hold exactly what the client was acknowledged."""
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
                if not entry.volume.volume_id.startswith(self.settings.id_prefix or f"{self.backend}:"):
                    continue  # another loop's pool on the same server
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
            listed_snaps = {
                e.snapshot.snapshot_id: e.snapshot.source_volume_id
                for e in snaps.entries
                if e.snapshot and e.snapshot.snapshot_id.startswith(self.settings.id_prefix or f"{self.backend}:")
            }
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
