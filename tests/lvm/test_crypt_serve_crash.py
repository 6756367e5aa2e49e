"""SIGKILL of a real `localdisk serve` while a client stages, publishes, unpublishes and unstages encrypted volumes
through its CSI socket, with real LUKS2 headers, dm-crypt mappings and ext4 mounts, in the UML sandbox.

Not in CI (`nox -s crypt-crash`). The client plays kubelet and the provisioner: it creates an encrypted volume,
then repeats rounds of NodeStageVolume (format on first use, open, mkfs on first use, mount), NodePublishVolume,
a write of the next generation of a file through the published mount, NodeUnpublishVolume and NodeUnstageVolume;
every fourth round its Secret rotates (the new passphrase as `passphrase`, the old one as `previousPassphrase`),
and every seventh the volume is deleted (a crypto-erase) and a new one created. A timer armed at a random delay
kills the server's whole process group (it and the cryptsetup, mkfs, mount or lvm child it runs) with SIGKILL, as
a container runtime does. The server is restarted (forked from a zygote, `tests/reliability/zygote.py`) and the
client converges as kubelet would: it repeats the call that was cut off, then stages and publishes again and checks:

* nothing lost: the file holds the generation written last (or, cut off while writing, the one before);
* no header formatted twice: the volume's LUKS UUID and its filesystem's UUID are those seen at its first stage;
* the Secret wins: after a rotation converges, only the current passphrase opens the header, in one keyslot;
* nothing leaked: after unpublish and unstage, no mount under the kubelet root, no localdisk dm-crypt mapping, and
  the LV can be opened exclusively (nothing holds it).

`LOCALDISK_CRYPT_SERVE_KILLS` (default 50) and `LOCALDISK_CRASH_SEED` choose the run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from localdisk._proto.csi.v1 import (
    ControllerStub,
    CreateVolumeRequest,
    DeleteVolumeRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    NodeStub,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
)
from localdisk.backends.lvmcmd import Lvm
from localdisk.blockdev import open_exclusive
from localdisk.crypt import MAPPING_PREFIX, Crypt, Passphrase, mapping_name, parse_dump
from localdisk.mounts import Mounter
from localdisk.runner import CommandRunner
from tests.csi_helpers import MiB, create_request, mount_cap
from tests.lvm.conftest import LINEAR_VG, reset_vg
from tests.lvm.helpers import require_dm_crypt
from tests.node_lifecycle import kubelet_paths, release_mounts
from tests.reliability.crashloop import Server

pytestmark = [pytest.mark.uml, pytest.mark.anyio, pytest.mark.slow]
KILLS = int(os.environ.get("LOCALDISK_CRYPT_SERVE_KILLS", "50"))
ROTATE_EVERY, FRESH_EVERY = 4, 7
T = TypeVar("T")


class Killed(Exception):
    """The call in flight was cut off by our SIGKILL of the server."""


@dataclass
class Tracked:
    """What the client knows about its current volume."""

    name: str
    volume_id: str = ""
    state: tuple[str, int] = ("none", 0)  # ("data", N): generation N written; ("writing", N): N-1 or N is there
    luks_uuid: str = ""
    fs_uuid: str = ""
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return f"/dev/{LINEAR_VG}/{self.volume_id.rsplit(':', 1)[1]}"


class Client:
    def __init__(self, server: Server, root: Path, rng: random.Random) -> None:
        self.server = server
        self.root = root
        self.rng = rng
        self.runner = CommandRunner(default_timeout=300)
        self.channel: Channel | None = None
        self.in_flight = "idle"
        self.rounds = 0
        self.volumes = 0
        self.passphrases = 0
        self.volume = self._new_volume()
        self.paths = kubelet_paths(root, "pvc-crypt-crash", block=False)
        self.cap = mount_cap("ext4")

    def _new_volume(self) -> Tracked:
        self.volumes += 1
        return Tracked(f"pvc-crypt-crash-{self.volumes}", secrets={"passphrase": self._passphrase()})

    def _passphrase(self) -> str:
        self.passphrases += 1
        return f"crash loop passphrase {self.passphrases:04d} 0f3c"

    # -- calls ---------------------------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.server.spawn()
        await self.server.wait_ready()
        self.channel = Channel(path=str(self.server.socket))

    async def call(self, what: str, send: Callable[[], Awaitable[T]]) -> T:
        self.in_flight = what
        try:
            return await send()
        except (OSError, StreamTerminatedError, GRPCError) as exc:
            if self.server.killed_by_us and not self.server.alive():
                raise Killed(what) from None
            if isinstance(exc, GRPCError):
                raise AssertionError(f"{what}: {exc.status.name}: {exc.message}\n{self.server.log_tail()}") from None
            raise
        finally:
            self.in_flight = "client"

    def _node(self) -> NodeStub:
        assert self.channel is not None
        return NodeStub(self.channel, timeout=300)

    def _controller(self) -> ControllerStub:
        assert self.channel is not None
        return ControllerStub(self.channel, timeout=300)

    async def create(self) -> None:
        request: CreateVolumeRequest = create_request(self.volume.name, 48 * MiB, "lvm", "crash")
        request.parameters["encrypted"] = "true"
        response = await self.call("CreateVolume", lambda: self._controller().create_volume(request))
        assert response.volume is not None
        self.volume.volume_id = response.volume.volume_id

    async def delete(self) -> None:
        request = DeleteVolumeRequest(volume_id=self.volume.volume_id)
        await self.call("DeleteVolume", lambda: self._controller().delete_volume(request))
        self.volume = self._new_volume()

    async def stage_publish(self) -> None:
        stage = NodeStageVolumeRequest(
            volume_id=self.volume.volume_id,
            staging_target_path=self.paths.staging,
            volume_capability=self.cap,
            secrets=dict(self.volume.secrets),
        )
        await self.call("NodeStageVolume", lambda: self._node().node_stage_volume(stage))
        publish = NodePublishVolumeRequest(
            volume_id=self.volume.volume_id,
            staging_target_path=self.paths.staging,
            target_path=self.paths.target,
            volume_capability=self.cap,
        )
        await self.call("NodePublishVolume", lambda: self._node().node_publish_volume(publish))

    async def unpublish_unstage(self) -> None:
        unpublish = NodeUnpublishVolumeRequest(volume_id=self.volume.volume_id, target_path=self.paths.target)
        await self.call("NodeUnpublishVolume", lambda: self._node().node_unpublish_volume(unpublish))
        unstage = NodeUnstageVolumeRequest(volume_id=self.volume.volume_id, staging_target_path=self.paths.staging)
        await self.call("NodeUnstageVolume", lambda: self._node().node_unstage_volume(unstage))

    # -- a round and its checks ------------------------------------------------------------------------------------
    async def round(self) -> None:
        """One round as kubelet would run it; Killed when a kill cut a call off."""
        self.rounds += 1
        if not self.volume.volume_id:
            await self.create()
        if self.rounds % ROTATE_EVERY == 0:
            self.volume.secrets = {
                "passphrase": self._passphrase(),
                "previousPassphrase": self.volume.secrets["passphrase"],
            }
        await self.stage_publish()
        await self.seen_first()
        number = self.volume.state[1] + 1
        self.volume.state = ("writing", number)
        write_generation(self.data_file, number)
        self.volume.state = ("data", number)
        await self.unpublish_unstage()
        if self.rounds % FRESH_EVERY == 0:
            await self.delete()

    @property
    def data_file(self) -> str:
        return os.path.join(self.paths.target, "data.bin")

    async def seen_first(self) -> None:
        """Record the volume's LUKS and filesystem UUIDs at its first stage; later ones must find the same."""
        luks = (await self.runner.run(["cryptsetup", "luksUUID", "--", self.volume.device])).text.strip()
        mapped = f"/dev/mapper/{mapping_name(self.volume.volume_id)}"
        fs = (await self.runner.run(["blkid", "-p", "-o", "value", "-s", "UUID", "--", mapped])).text.strip()
        if not self.volume.luks_uuid:
            self.volume.luks_uuid, self.volume.fs_uuid = luks, fs
        assert (luks, fs) == (self.volume.luks_uuid, self.volume.fs_uuid), "a header or filesystem was made again"

    async def converge(self, cut: str) -> None:
        """After a restart: repeat what was cut off, stage and publish again, check, unpublish and unstage."""
        if cut == "DeleteVolume":
            await self.delete()
            return
        if not self.volume.volume_id:
            await self.create()
        await self.stage_publish()
        await self.seen_first()
        self.check_data()
        await self.check_secret()
        await self.unpublish_unstage()
        await self.check_nothing_leaked()

    def check_data(self) -> None:
        kind, number = self.volume.state
        found = read_generation(self.data_file)
        wanted = {number} if kind == "data" else {number, number - 1} if kind == "writing" else {0}
        assert found in wanted, f"LOST: state {kind} {number}, the volume holds generation {found}"

    async def check_secret(self) -> None:
        crypt = Crypt(Mounter(self.runner))
        dump = (await self.runner.run(["cryptsetup", "luksDump", "--", self.volume.device])).text
        assert parse_dump(dump) == 1, "a rotation left a keyslot behind"
        current = Passphrase(self.volume.secrets["passphrase"].encode())
        assert await crypt.unlocking_slot(self.volume.device, current) is not None
        previous = self.volume.secrets.get("previousPassphrase")
        if previous:
            assert await crypt.unlocking_slot(self.volume.device, Passphrase(previous.encode())) is None

    async def check_nothing_leaked(self) -> None:
        mounter = Mounter(self.runner)
        assert not mounter.mounts_under(os.path.realpath(self.root)), "a mount was left under the kubelet root"
        mappings = [e.name for e in Path("/dev/mapper").iterdir() if e.name.startswith(MAPPING_PREFIX)]
        assert not mappings, f"dm-crypt mappings were left: {mappings}"
        os.close(open_exclusive(self.volume.device))  # Busy if anything still holds the LV


def write_generation(path: str, number: int) -> None:
    line = f"LOCALDISK-GENERATION-{number:08d}\n".encode()
    with open(path, "wb") as f:
        f.write(line * 4096)
        f.flush()
        os.fsync(f.fileno())


def read_generation(path: str) -> int:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    line = data[: data.find(b"\n") + 1]
    assert data == line * 4096 and line.startswith(b"LOCALDISK-GENERATION-"), f"torn file: {data[:64]!r}"
    return int(line[21:29])


def server_child(session: int) -> str:
    """What the server's session runs besides the server: 'cryptsetup <action>', another command, or 'python'."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == session:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session or fields[0] == "Z":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        name = os.path.basename(argv[0].decode())
        if name in ("cryptsetup", "lvm") and len(argv) > 1:
            return f"{name} {argv[1].decode()}"
        return name or "(exec)"
    return "python"


@pytest.fixture
async def kubelet_root(tmp_path: Path) -> AsyncIterator[Path]:
    require_dm_crypt()
    runner = CommandRunner(default_timeout=300)
    lvm = Lvm(runner)
    await reset_vg(lvm, LINEAR_VG)
    root = tmp_path / "kubelet"
    root.mkdir()
    try:
        yield root
    finally:
        await release_mounts(root, runner)
        for entry in Path("/dev/mapper").iterdir():
            if entry.name.startswith(MAPPING_PREFIX):
                await runner.run(["cryptsetup", "close", "--", entry.name], check=False)
        await reset_vg(lvm, LINEAR_VG)


@pytest.mark.timeout(3300)
async def test_serve_survives_sigkill_through_encrypted_stage_and_unstage(kubelet_root: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nkubelet_dir = "{kubelet_root}"\nluks_iter_time_ms = 100\nluks_pbkdf_memory_kib = 16384\n\n'
        f'[pools.lvm.crash]\nvolume_group = "{LINEAR_VG}"\ndefault = true\n'
    )
    server = Server(config, tmp_path, node_id="node-1", fork=True)
    client = Client(server, kubelet_root, rng)
    kills = checks = 0
    cut: Counter[str] = Counter()
    running: Counter[str] = Counter()
    round_seconds: list[float] = []
    started = time.monotonic()
    loop = asyncio.get_running_loop()

    def kill() -> None:
        cut[client.in_flight] += 1
        running[server_child(server.pid or 0)] += 1
        server.kill()

    try:
        await client.connect()
        for _ in range(2):  # the first round formats; the second shows how long a round takes from then on
            began = time.monotonic()
            await client.round()
            round_seconds.append(time.monotonic() - began)
        while kills < KILLS:
            typical = sorted(round_seconds)[len(round_seconds) // 2]
            timer = loop.call_later(rng.uniform(0.05, 1.2 * typical), kill)
            try:
                while True:
                    began = time.monotonic()
                    await client.round()
                    round_seconds.append(time.monotonic() - began)
            except Killed as exc:
                what = str(exc)
            finally:
                timer.cancel()
            kills += 1
            await client.connect()
            try:
                await client.converge(what)
            except AssertionError as exc:
                raise AssertionError(f"after kill {kills} (cut {what}, seed {seed}): {exc}") from None
            checks += 1
        if client.volume.volume_id:
            await client.delete()
    finally:
        if client.channel is not None:
            client.channel.close()
        server.kill()
        server.close()
    seconds = time.monotonic() - started
    print(
        f"\ncrypt serve crash loop: {kills} kills, {checks} converge checks passed, {client.rounds} rounds,"
        f" {client.volumes} volumes, {client.passphrases} passphrases, {server.starts} server starts in"
        f" {seconds:.0f}s, seed {seed}; a round takes {sorted(round_seconds)[len(round_seconds) // 2]:.1f}s (median)"
    )
    print(f"call cut off: {dict(cut.most_common())}")
    print(f"server child at the kill: {dict(running.most_common())}")
