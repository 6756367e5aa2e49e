"""Key rotation of encrypted volumes on the host, on loop devices (cryptsetup needs no device-mapper for headers).

What is shown: a rotation re-wraps the same volume key (the data segment is byte for byte what it was, and the key
cryptsetup unwraps is the same) so the new passphrase opens the header and the previous one no longer does; a rotation
cut off between its two steps is finished by the next one; neither passphrase opening is a refusal that changes
nothing; and SIGKILL at random moments of a rotation loop never leaves a header that neither passphrase opens. The
`localdisk volume rekey` command rotates from passphrase files or stdin, never argv. Stage-time rotation through
the CSI Node service needs dm-crypt: `tests/lvm/test_crypt_lvm.py` shows it in the sandbox.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from localdisk import CreateRequest
from localdisk.crypt import HEADER_BYTES, Crypt, Passphrase, Pbkdf, Rotation, WrongPassphrase, key_pipe
from localdisk.mounts import Mounter
from localdisk.runner import CommandResult, CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.reliability.rekeyloop import FIRST, SECOND
from tests.test_crypt import needs_cryptsetup
from tests.test_partition_backend import partition_pool

FAST = Pbkdf(kind="pbkdf2", force_iterations=1000)
OLD = Passphrase(b"the passphrase before 2c9e")
NEW = Passphrase(b"the passphrase after 77ad")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [needs_cryptsetup]


def digest(device: str, offset: int, length: int) -> str:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buffer = mmap.mmap(-1, length)
        os.preadv(fd, [buffer], offset)
        return hashlib.sha256(buffer).hexdigest()
    finally:
        os.close(fd)


async def volume_key(runner: CommandRunner, device: str, passphrase: Passphrase) -> str:
    """The volume key as cryptsetup unwraps it with `passphrase` (test only: it prints the key)."""
    with key_pipe(passphrase) as key:
        argv = ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", f"--key-file=/proc/self/fd/{key}"]
        result = await runner.run([*argv, "--", device], pass_fds=[key])
    return result.text.split("MK dump:", 1)[1]


async def keyslots(crypt: Crypt, device: str) -> int:
    result = await crypt.runner.run(["cryptsetup", "luksDump", "--", device])
    from localdisk.crypt import parse_dump

    count = parse_dump(result.text)
    assert count is not None
    return count


def fill_data_segment(device: str, size: int) -> None:
    """Random bytes over the data segment (what ciphertext looks like), flushed."""
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset in range(HEADER_BYTES, size, MiB):
            os.pwrite(fd, os.urandom(MiB), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class Spy(CommandRunner):
    """Records the argv and environment of every command it runs."""

    def __init__(self) -> None:
        super().__init__(default_timeout=120)
        self.seen: list[str] = []

    async def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult:
        self.seen.append(" ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in (kwargs.get("env") or {}).items()))
        assert kwargs.get("input") is None, "a passphrase went through stdin"
        return await super().run(argv, **kwargs)


@needs_loop_devices
@pytest.mark.anyio
async def test_rotation_rewraps_the_same_key_and_leaves_the_data() -> None:
    runner = Spy()
    crypt = Crypt(Mounter(runner), FAST)
    size = 48 * MiB
    async with loop_disks(1, size) as (disk,):
        await crypt.ensure_format(disk, OLD)
        fill_data_segment(disk, size)
        data_before = digest(disk, HEADER_BYTES, size - HEADER_BYTES)
        key_before = await volume_key(runner, disk, OLD)

        assert await crypt.rotate(disk, NEW, OLD) is Rotation.REWRAPPED
        assert digest(disk, HEADER_BYTES, size - HEADER_BYTES) == data_before, "a rotation touched the data"
        assert await volume_key(runner, disk, NEW) == key_before, "the same volume key, wrapped anew"
        assert await crypt.unlocking_slot(disk, NEW) is not None
        assert await crypt.unlocking_slot(disk, OLD) is None, "the previous passphrase still opens the header"
        assert await keyslots(crypt, disk) == 1

        # Again (a retried stage, a repeated command): nothing to do, nothing changed.
        header = digest(disk, 0, HEADER_BYTES)
        assert await crypt.rotate(disk, NEW, OLD) is Rotation.CURRENT
        assert digest(disk, 0, HEADER_BYTES) == header

        # Neither opens: refused, nothing changed, no secret in the message.
        with pytest.raises(WrongPassphrase) as refused:
            await crypt.rotate(disk, Passphrase(b"third one"), Passphrase(b"fourth one"))
        assert "third" not in refused.value.message and "fourth" not in refused.value.message
        assert digest(disk, 0, HEADER_BYTES) == header

        # Cut off between its steps: the new keyslot added, the old one still there. The next rotation finishes.
        with key_pipe(NEW) as new_key, key_pipe(OLD) as old_key:
            argv = ["cryptsetup", "luksAddKey", "--batch-mode", *FAST.argv(), f"--key-file=/proc/self/fd/{new_key}"]
            await runner.run([*argv, "--", disk, f"/proc/self/fd/{old_key}"], pass_fds=[new_key, old_key])
        assert await keyslots(crypt, disk) == 2
        assert await crypt.rotate(disk, OLD, NEW) is Rotation.FINISHED
        assert await keyslots(crypt, disk) == 1
        assert await crypt.unlocking_slot(disk, NEW) is None
        assert await crypt.unlocking_slot(disk, OLD) is not None
        assert digest(disk, HEADER_BYTES, size - HEADER_BYTES) == data_before
        assert await volume_key(runner, disk, OLD) == key_before
    assert any("luksAddKey" in c for c in runner.seen) and any("luksKillSlot" in c for c in runner.seen)
    for secret in (OLD, NEW):
        assert not any(secret.reveal().decode() in command for command in runner.seen), "a passphrase in argv/env"


def session_alive(session: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            return True
    return False


@needs_loop_devices
@pytest.mark.anyio
async def test_sigkill_mid_rotation_leaves_a_header_one_of_the_two_opens(capsys: pytest.CaptureFixture[str]) -> None:
    """`LOCALDISK_REKEY_KILLS` kills (default 30) of a worker rotating back and forth; `LOCALDISK_CRASH_SEED`."""
    runner = CommandRunner(default_timeout=120)
    crypt = Crypt(Mounter(runner), FAST)
    kills = int(os.environ.get("LOCALDISK_REKEY_KILLS", "30"))
    seed = int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    hit: Counter[str] = Counter()
    opened_by: Counter[str] = Counter()
    size = 40 * MiB
    async with loop_disks(1, size) as (disk,):
        await crypt.ensure_format(disk, FIRST)
        fill_data_segment(disk, size)
        data = digest(disk, HEADER_BYTES, size - HEADER_BYTES)
        key = await volume_key(runner, disk, FIRST)
        for kill in range(kills):
            worker = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.rekeyloop", disk],
                cwd=ROOT,
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + rng.uniform(0.3, 2.5)
                while worker.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert worker.poll() is None, worker.stdout.read() if worker.stdout else b""
                hit[running_command(worker.pid)] += 1
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
                end = time.monotonic() + 30
                while session_alive(worker.pid):  # a cryptsetup of the killed session may still be exiting
                    assert time.monotonic() < end, "processes of the killed worker are left"
                    time.sleep(0.02)
            finally:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
                if worker.stdout:
                    worker.stdout.close()
            first = await crypt.unlocking_slot(disk, FIRST)
            second = await crypt.unlocking_slot(disk, SECOND)
            assert first is not None or second is not None, f"kill {kill + 1} (seed {seed}): neither opens"
            opened_by[
                "both" if first is not None and second is not None else "first" if first is not None else "second"
            ] += 1
            assert await crypt.is_ours(disk)
            opener = FIRST if first is not None else SECOND
            assert await volume_key(runner, disk, opener) == key
        assert digest(disk, HEADER_BYTES, size - HEADER_BYTES) == data, "a rotation touched the data"
    with capsys.disabled():
        print(
            f"\nrotation kill loop: {kills} kills (seed {seed}); killed while running {dict(hit.most_common())};"
            f" opened afterwards by {dict(opened_by.most_common())}"
        )


def running_command(session: int) -> str:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == session:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if os.path.basename(argv[0].decode()) == "cryptsetup":
            return f"cryptsetup {argv[1].decode()}"
    return "python"


def rekey(config: Path, volume_id: str, *options: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "localdisk.cli", "volume", "rekey", volume_id, "--config", str(config), *options]
    return subprocess.run(argv, input=stdin, capture_output=True, cwd=ROOT, timeout=300, check=False)


@needs_loop_devices
@pytest.mark.anyio
async def test_rekey_command_reads_passphrases_from_files_or_stdin(tmp_path: Path) -> None:
    """`localdisk volume rekey` on an encrypted volume of a partition pool, as an administrator runs it: the key is
    re-wrapped, the passphrases come from files or stdin (never argv), a wrong one is a clear error naming no
    secret, and a plain volume is refused."""
    runner = CommandRunner(default_timeout=120)
    crypt = Crypt(Mounter(runner), FAST)
    cheap = ["--iter-time", "50", "--pbkdf-memory", "8192"]
    async with loop_disks(1, 96 * MiB) as (disk,):
        async with partition_pool([disk]) as backend:
            manager = manager_for(backend)
            volume = await manager.create_volume(
                CreateRequest("pvc-rekey", "partition", "test", 32 * MiB, encrypted=True)
            )
            plain = await manager.create_volume(CreateRequest("pvc-plain", "partition", "test", 32 * MiB))
        assert volume.device_path is not None
        await crypt.ensure_format(volume.device_path, OLD)
        config = tmp_path / "node.toml"
        config.write_text(f'[pools.partition.test]\ndisks = ["{disk}"]\ndefault = true\n')
        old_file, new_file = tmp_path / "old", tmp_path / "new"
        old_file.write_bytes(OLD.reveal() + b"\n")  # as `echo` writes it: one trailing newline is dropped
        new_file.write_bytes(NEW.reveal())

        done = rekey(
            config, volume.id, "--old-passphrase-file", str(old_file), "--new-passphrase-file", str(new_file), *cheap
        )
        assert done.returncode == 0, done.stderr
        assert b"key re-wrapped" in done.stdout
        assert await crypt.unlocking_slot(volume.device_path, NEW) is not None
        assert await crypt.unlocking_slot(volume.device_path, OLD) is None
        again = rekey(config, volume.id, "--old-passphrase-file", str(old_file), "--new-passphrase-file", str(new_file))
        assert again.returncode == 0 and b"already uses the new passphrase" in again.stdout

        # Both from stdin, one a line: back to the first one.
        both = NEW.reveal() + b"\n" + OLD.reveal() + b"\n"
        back = rekey(config, volume.id, "--old-passphrase-file", "-", "--new-passphrase-file", "-", *cheap, stdin=both)
        assert back.returncode == 0, back.stderr
        assert await crypt.unlocking_slot(volume.device_path, OLD) is not None
        assert await crypt.unlocking_slot(volume.device_path, NEW) is None

        # Wrong passphrases: refused, exit 1, no secret quoted; a plain volume: refused.
        wrong = tmp_path / "wrong"
        wrong.write_bytes(b"wrong passphrase 31f0")
        refused = rekey(
            config, volume.id, "--old-passphrase-file", str(wrong), "--new-passphrase-file", str(wrong) + "x"
        )
        assert refused.returncode == 2 and b"cannot read the new passphrase file" in refused.stderr
        (tmp_path / "wrongx").write_bytes(b"another wrong one 8c1d")
        refused = rekey(
            config, volume.id, "--old-passphrase-file", str(wrong), "--new-passphrase-file", str(wrong) + "x"
        )
        assert refused.returncode == 1 and b"neither the passphrase nor the previous" in refused.stderr
        for secret in (b"wrong passphrase", b"another wrong", OLD.reveal(), NEW.reveal()):
            assert secret not in refused.stdout + refused.stderr
        assert await crypt.unlocking_slot(volume.device_path, OLD) is not None
        not_encrypted = rekey(
            config, plain.id, "--old-passphrase-file", str(old_file), "--new-passphrase-file", str(new_file)
        )
        assert not_encrypted.returncode == 1 and b"is not encrypted" in not_encrypted.stderr
