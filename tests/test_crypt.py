"""Encrypted volumes on the host: what needs no device-mapper.

The host kernel has no device-mapper, so a LUKS2 mapping is never opened here (the sandbox suite
`tests/lvm/test_crypt_lvm.py` does that); cryptsetup still formats, checks passphrases, re-wraps keys and erases
headers on loop devices, and the partition backend records and crypto-erases encrypted volumes. The passphrase is
checked to travel only through a pipe, never in argv, the environment, a log line or an error.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import CreateRequest
from localdisk._proto.csi.v1 import DeleteVolumeRequest, NodeStageVolumeRequest
from localdisk.backends.partition import LUKS_TYPE
from localdisk.config import NodeConfig, NodeSettings
from localdisk.crypt import (
    HEADER_BYTES,
    LABEL,
    Crypt,
    Passphrase,
    Pbkdf,
    Rotation,
    erase,
    key_pipe,
    mapping_name,
    parse_dump,
)
from localdisk.csi import validate
from localdisk.errors import BackendFailure, FailedPrecondition, InvalidArgument
from localdisk.mounts import Mounter
from localdisk.runner import CommandResult, CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import block_cap, create_request, csi_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.test_partition_backend import partition_pool, read_direct, read_table, write_synced

FAST = Pbkdf(kind="pbkdf2", force_iterations=1000)
SECRET = "s3cret-passphrase-do-not-log"
OTHER = "another-passphrase-2"
PATTERN = b"LOCALDISK-PLAINTEXT-PATTERN"
needs_cryptsetup = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup-bin is not installed")


# -- pure ------------------------------------------------------------------------------------------------------
def test_mapping_name_is_short_safe_and_stable() -> None:
    for volume_id in ("lvm:fast:ldv-0123", "partition:p:" + "x" * 110, "thin:a:../../etc", "thin:a:é/\n"):
        name = mapping_name(volume_id)
        assert re.fullmatch(r"localdisk-[0-9a-f]{32}", name)
        assert name == mapping_name(volume_id)
    assert mapping_name("lvm:a:b") != mapping_name("lvm:a:c")


def test_passphrase_never_shows() -> None:
    secret = Passphrase(SECRET.encode())
    for shown in (repr(secret), str(secret), f"{secret}", f"{[secret]}"):
        assert SECRET not in shown
    assert secret.reveal() == SECRET.encode()
    with pytest.raises(InvalidArgument):
        Passphrase(b"")
    with pytest.raises(InvalidArgument) as info:
        Passphrase(b"x" * 513)
    assert "x" * 20 not in info.value.message


def test_encrypted_parameter() -> None:
    assert validate.encrypted({}) is False
    assert validate.encrypted({"encrypted": "true"}) is True
    assert validate.encrypted({"encrypted": "False"}) is False
    with pytest.raises(InvalidArgument):
        validate.encrypted({"encrypted": "yes"})
    validate.check_parameters({"backend": "lvm", "encrypted": "true"})


class Recorder(CommandRunner):
    """Records every command (argv, stdin, env) and answers from a script instead of running anything."""

    def __init__(self, answers: Mapping[str, tuple[int, str, str]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[tuple[list[str], bytes | None, Mapping[str, str] | None]] = []
        self.piped: list[bytes] = []  # what each call could read from the descriptors passed to it

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        input: bytes | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> CommandResult:
        args = list(argv)
        self.calls.append((args, input, env))
        self.piped.append(b"".join(os.read(fd, 4096) for fd in pass_fds))
        key = args[0] if args[0] != "cryptsetup" else f"cryptsetup {args[1]}"
        code, out, err = self.answers.get(key, (0, "", ""))
        result = CommandResult(args, code, out.encode(), err.encode(), 0.0)
        if check and code:
            from localdisk.errors import CommandFailed

            raise CommandFailed(args, code, err)
        return result


DUMP = f"LUKS header information\nVersion:       \t2\nLabel:         \t{LABEL}\nSubsystem:     \tlocaldisk.csi.io\n"


@pytest.mark.anyio
async def test_passphrase_goes_through_a_pipe_only_and_a_wrong_one_is_failed_precondition(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="localdisk")
    runner = Recorder(
        {
            "blkid": (2, "", ""),
            "cryptsetup luksDump": (0, DUMP, ""),
            "cryptsetup open": (2, "", "No key available with this passphrase.\n"),
        }
    )
    crypt = Crypt(Mounter(runner), FAST, mapper_dir=str(tmp_path))
    secret = Passphrase(SECRET.encode())
    os.environ.pop("LOCALDISK_TEST_NOTHING", None)
    assert await crypt.ensure_format("/dev/fake0", secret) is True
    with pytest.raises(FailedPrecondition) as info:
        await crypt.open("lvm:a:ldv-1", "/dev/fake0", secret)
    assert SECRET not in info.value.message
    formats = [i for i, c in enumerate(runner.calls) if c[0][:2] == ["cryptsetup", "luksFormat"]]
    opens = [i for i, c in enumerate(runner.calls) if c[0][:2] == ["cryptsetup", "open"]]
    assert len(formats) == len(opens) == 1
    for index in formats + opens:
        argv, stdin, env = runner.calls[index]
        assert any(re.fullmatch(r"--key-file=/proc/self/fd/\d+", a) for a in argv) and stdin is None
        assert runner.piped[index] == SECRET.encode()
        assert not any(SECRET in a for a in argv) and not any(SECRET in v for v in (env or {}).values())
    assert runner.calls[formats[0]][0][-2:] == ["--", "/dev/fake0"]
    assert "--label" in runner.calls[formats[0]][0] and "--offset" in runner.calls[formats[0]][0]
    assert SECRET not in caplog.text


@pytest.mark.anyio
async def test_a_device_with_anything_on_it_is_not_formatted() -> None:
    for probe, dump in (
        ((0, "TYPE=ext4\nUSAGE=filesystem\n", ""), (1, "", "")),
        ((0, "PTTYPE=gpt\n", ""), (1, "", "")),
        ((0, "TYPE=crypto_LUKS\nUSAGE=crypto\nVERSION=2\n", ""), (0, DUMP.replace(LABEL, "theirs"), "")),
    ):
        runner = Recorder({"blkid": probe, "cryptsetup luksDump": dump})
        with pytest.raises(FailedPrecondition):
            await Crypt(Mounter(runner), FAST).ensure_format("/dev/fake0", Passphrase(b"x"))
        assert not any(c[0][:2] == ["cryptsetup", "luksFormat"] for c in runner.calls)


# -- loop devices: real headers ----------------------------------------------------------------------------------
async def opens_with(runner: CommandRunner, device: str, secret: str) -> bool:
    with key_pipe(Passphrase(secret.encode())) as key:
        argv = ["cryptsetup", "open", "--test-passphrase", f"--key-file=/proc/self/fd/{key}", "--", device]
        done = await runner.run(argv, pass_fds=[key], check=False)
    return done.returncode == 0


@needs_loop_devices
@needs_cryptsetup
@pytest.mark.anyio
async def test_format_guard_rotation_and_crypto_erase_on_a_loop_device() -> None:
    runner = CommandRunner(default_timeout=120)
    crypt = Crypt(Mounter(runner), FAST)
    async with loop_disks(1, 48 * MiB) as (disk,):
        assert await crypt.ensure_format(disk, Passphrase(SECRET.encode())) is True
        assert await crypt.is_ours(disk)
        header = read_direct(disk, 0, HEADER_BYTES)
        assert await crypt.ensure_format(disk, Passphrase(SECRET.encode())) is False  # kept, never reformatted
        assert read_direct(disk, 0, HEADER_BYTES) == header
        assert await opens_with(runner, disk, SECRET)
        assert not await opens_with(runner, disk, OTHER)

        write_synced(disk, PATTERN * 1000, HEADER_BYTES)  # stands for the data segment
        with pytest.raises(FailedPrecondition) as info:  # neither the old nor the new one opens it
            await crypt.change_passphrase(disk, Passphrase(OTHER.encode()), Passphrase(b"third"))
        assert SECRET not in info.value.message and OTHER not in info.value.message
        assert await crypt.change_passphrase(disk, Passphrase(SECRET.encode()), Passphrase(OTHER.encode())) is (
            Rotation.REWRAPPED
        )
        assert await opens_with(runner, disk, OTHER)
        assert not await opens_with(runner, disk, SECRET)
        assert read_direct(disk, HEADER_BYTES, MiB).startswith(PATTERN * 1000), "a rotation does not touch data"

        await erase(runner, disk)
        assert read_direct(disk, 0, HEADER_BYTES) == bytes(HEADER_BYTES)
        assert (await Mounter(runner).probe(disk)).empty
        assert not await opens_with(runner, disk, OTHER)
        await erase(runner, disk)  # again: nothing left to erase is success

        # A LUKS header that is not ours: refused, never opened or reformatted.
        await runner.run(
            ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST.argv(), "--key-file=-", disk],
            input=b"theirs",
        )
        with pytest.raises(FailedPrecondition):
            await crypt.ensure_format(disk, Passphrase(SECRET.encode()))
        assert await opens_with(runner, disk, "theirs")


@needs_loop_devices
@needs_cryptsetup
@pytest.mark.anyio
async def test_partition_records_encryption_and_delete_is_a_crypto_erase(capsys: pytest.CaptureFixture[str]) -> None:
    """An encrypted partition has the LUKS partition type; its delete destroys the header and skips the zeroing
    pass that a plain partition's delete makes. Prints both delete times. `LOCALDISK_CRYPT_DELETE_MIB` sets the
    volume size and `LOCALDISK_CRYPT_DISK_DIR` where the disk image lives (on ramfs, the loop device cannot offload
    zeroing, so the kernel writes every zero, as on a disk without WRITE ZEROES)."""
    runner = CommandRunner(default_timeout=600)
    crypt = Crypt(Mounter(runner), FAST)
    size = int(os.environ.get("LOCALDISK_CRYPT_DELETE_MIB", "96")) * MiB
    directory = os.environ.get("LOCALDISK_CRYPT_DISK_DIR") or None
    disks = loop_disks(1, size + 32 * MiB, directory=directory)
    async with disks as (disk,), partition_pool([disk]) as backend:
        manager = manager_for(backend)
        timings = {}
        for encrypted in (False, True):
            name = f"pvc-{'enc' if encrypted else 'plain'}"
            request = CreateRequest(name, "partition", "test", required_bytes=size, encrypted=encrypted)
            volume = await manager.create_volume(request)
            assert volume.encrypted is encrypted and volume.device_path is not None
            part = (await read_table(disk)).by_uuid(volume.ref.handle)
            assert part is not None and (part.type == LUKS_TYPE) is encrypted
            assert (await manager.get_volume(volume.id)).encrypted is encrypted
            if encrypted:
                await crypt.ensure_format(volume.device_path, Passphrase(SECRET.encode()))
            # Data all over the volume (ciphertext, as far as the disk can tell), flushed.
            chunk = os.urandom(MiB)
            fd = os.open(volume.device_path, os.O_WRONLY)
            try:
                for offset in range(HEADER_BYTES if encrypted else 0, size, MiB):
                    os.pwrite(fd, chunk, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            start = part.start * 512
            started = time.monotonic()
            await manager.delete_volume(volume.id)
            timings[name] = time.monotonic() - started
            head = read_direct(disk, start, HEADER_BYTES)
            assert head == bytes(HEADER_BYTES), "the header area is erased"
            rest = read_direct(disk, start + HEADER_BYTES, MiB)
            assert rest == (chunk if encrypted else bytes(MiB)), "crypto-erase skips the zeroing; plain is zeroed"
    with capsys.disabled():
        where = f" (disk image in {directory})" if directory else ""
        shown = ", ".join(f"{k} {v:.3f}s" for k, v in timings.items())
        print(f"\npartition delete of {size // MiB} MiB{where}: {shown}")


def test_erase_refuses_an_unknown_device() -> None:
    import anyio

    with pytest.raises((BackendFailure, Exception)):
        anyio.run(erase, CommandRunner(), "/dev/localdisk-no-such-device")


def test_parse_dump_counts_keyslots_of_our_headers_only() -> None:
    text = (
        "LUKS header information\nVersion:       \t2\nLabel:         \tlocaldisk\nSubsystem:     \tlocaldisk.csi.io\n"
        "\nData segments:\n  0: crypt\n\toffset: 16777216 [bytes]\n\nKeyslots:\n  0: luks2\n\tKey:        512 bits\n"
        "  3: luks2\n\tKey:        512 bits\nTokens:\nDigests:\n  0: pbkdf2\n"
    )
    assert parse_dump(text) == 2
    assert parse_dump(text.replace("  0: luks2\n\tKey:        512 bits\n  3: luks2\n\tKey:        512 bits\n", "")) == 0
    assert parse_dump(text.replace("localdisk\n", "theirs\n", 1)) is None
    assert parse_dump(text.replace("Version:       \t2", "Version:       \t1")) is None


@needs_loop_devices
@needs_cryptsetup
@pytest.mark.anyio
async def test_csi_encrypted_partition_refusals_on_the_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through the CSI servicers: the parameter is checked, the volume is recorded encrypted, and NodeStageVolume
    refuses a missing or empty secret (INVALID_ARGUMENT, nothing formatted), quoting no secret. A wrong passphrase is
    found when the mapping is opened, which needs dm-crypt: the sandbox suite shows that one."""
    caplog.set_level(logging.DEBUG, logger="localdisk")
    runner = CommandRunner(default_timeout=120)
    root = tmp_path / "kubelet"
    staging = root / "plugins/kubernetes.io/csi/volumeDevices/staging/pvc-enc"
    staging.mkdir(parents=True)
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(root)))
    disks = loop_disks(1, 64 * MiB)
    async with disks as (disk,), partition_pool([disk]) as backend, csi_for(manager_for(backend), config=config) as csi:
        bad = create_request("pvc-enc", 32 * MiB, "partition", "test", volume_capabilities=[block_cap()])
        bad.parameters["encrypted"] = "yes"
        with pytest.raises(GRPCError) as refused:
            await csi.controller.create_volume(bad)
        assert refused.value.status == Status.INVALID_ARGUMENT
        bad.parameters["encrypted"] = "true"
        created = await csi.controller.create_volume(bad)
        assert created.volume is not None
        volume = await csi.manager.get_volume(created.volume.volume_id)
        assert volume.encrypted and volume.device_path is not None

        def stage(secrets: dict[str, str]) -> NodeStageVolumeRequest:
            return NodeStageVolumeRequest(
                volume_id=volume.id,
                staging_target_path=str(staging),
                volume_capability=block_cap(),
                secrets=secrets,
            )

        messages = []
        for secrets in ({}, {"key": SECRET}, {"passphrase": ""}):
            with pytest.raises(GRPCError) as info:
                await csi.node.node_stage_volume(stage(secrets))
            assert info.value.status == Status.INVALID_ARGUMENT
            messages.append(info.value.message or "")
        assert (await Mounter(runner).probe(volume.device_path)).empty, "nothing formatted"

        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume.id))
    for message in messages:
        assert message and SECRET not in message and OTHER not in message
    assert SECRET not in caplog.text and OTHER not in caplog.text
