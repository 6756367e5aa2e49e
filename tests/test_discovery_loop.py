"""Disks by rules on real block devices (issue 15, parts 3 and 4 for partition pools): a real `localdisk serve`
discovers loop disks, labels the blank ones it may, leaves hostile disks byte for byte as they were, and takes a
matching disk that appears while it runs without a restart.

Loop devices are shared with the rest of the machine, so every rule here names this test's own loop devices
(`names`) besides the size range: discovery never even looks at anyone else's.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel

from localdisk._proto.csi.v1 import ControllerStub, GetCapacityRequest
from localdisk.backends.gpt import parse_sfdisk, parse_wipefs
from localdisk.backends.partition import LABEL_MARK
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.csi_helpers import create_request
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.sanity import running_server
from tests.test_wire import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]
IN_RANGE = 64 * MiB  # the rules take 48..100 MiB
TOO_SMALL = 32 * MiB
RUNNER = CommandRunner(default_timeout=60)


def md_superblock(size: int) -> bytes:
    """An md v1.2 superblock (as `mdadm --create --metadata=1.2` writes at 4 KiB) of a 2-disk RAID1 member, with a
    valid checksum, so blkid and wipefs see a `linux_raid_member`; written by hand because the kernel here has no md
    driver for mdadm to create an array with."""
    max_dev = 2
    sb = bytearray(256 + 2 * max_dev)
    struct.pack_into("<IIII", sb, 0, 0xA92B4EFC, 1, 0, 0)  # magic, major_version, feature_map, pad
    sb[16:32] = uuid.uuid4().bytes  # set_uuid
    sb[32:45] = b"hostile:data0"  # set_name
    struct.pack_into("<QIIQIII", sb, 64, 1_700_000_000, 1, 0, size // 512 - 2048, 0, 2, 0)  # ctime..bitmap_offset
    struct.pack_into("<QQQQ", sb, 128, 2048, size // 512 - 2048, 8, 0)  # data_offset, data_size, super_offset
    sb[168:184] = uuid.uuid4().bytes  # device_uuid
    struct.pack_into("<QQQ", sb, 192, 1_700_000_000, 1, 2**64 - 1)  # utime, events, resync_offset (clean)
    struct.pack_into("<I", sb, 220, max_dev)
    struct.pack_into("<HH", sb, 256, 0, 1)  # dev_roles
    total = sum(struct.unpack_from(f"<{len(sb) // 4}I", sb))
    struct.pack_into("<I", sb, 216, ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF)
    return bytes(sb)


def digest(device: str) -> str:
    hasher = hashlib.sha256()
    with open(device, "rb") as handle:
        while chunk := handle.read(4 * MiB):
            hasher.update(chunk)
    return hasher.hexdigest()


async def signatures(device: str) -> list[str]:
    return sorted({s.type for s in parse_wipefs((await RUNNER.run(["wipefs", "--json", "--", device])).text)})


@contextmanager
def mounted(device: str, *, read_only: bool = False) -> Iterator[Path]:
    target = Path(tempfile.mkdtemp(prefix="localdisk-discover-mnt-"))
    subprocess.run(["mount", *(["-o", "ro"] if read_only else []), device, str(target)], check=True, timeout=60)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60)
        target.rmdir()


@asynccontextmanager
async def growable_disk(size: int) -> AsyncIterator[tuple[str, Callable[[int], None]]]:
    """A loop disk whose image can grow while attached (`grow(size)`): to the kernel, a disk appearing at that
    size (its sysfs size changes, as when a disk is attached). Detached and deleted at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="localdisk-discover-late-"))
    image = workdir / "late.img"
    image.write_bytes(b"")
    with image.open("r+b") as handle:
        handle.truncate(size)
    device = (await RUNNER.run(["losetup", "--find", "--show", "--partscan", "--", str(image)])).text.strip()

    def grow(new_size: int) -> None:
        with image.open("r+b") as handle:
            handle.truncate(new_size)
        subprocess.run(["losetup", "--set-capacity", device], check=True, timeout=60)

    try:
        yield device, grow
    finally:
        with anyio.CancelScope(shield=True):
            await RUNNER.run(["losetup", "--detach", device], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


@needs_loop_devices
async def test_discovery_takes_blank_disks_and_never_touches_hostile_ones(tmp_path: Path) -> None:
    async with (
        loop_disks(3, IN_RANGE) as (blank, ext4_data, md_member),
        loop_disks(3, IN_RANGE) as (mounted_fs, foreign_pv, foreign_gpt),
        loop_disks(1, TOO_SMALL) as (small,),
        growable_disk(8 * MiB) as (late, grow_late),
    ):
        # The hostile disks, each holding something discovery must never write to.
        await RUNNER.run(["mkfs.ext4", "-q", "-F", ext4_data])
        with mounted(ext4_data) as root:
            (root / "precious.txt").write_text("do not lose me\n" * 1000)
        with open(md_member, "r+b") as handle:
            handle.seek(4096)
            handle.write(md_superblock(IN_RANGE))
        await RUNNER.run(["mkfs.ext4", "-q", "-F", mounted_fs])
        await RUNNER.run(["pvcreate", "-q", foreign_pv])
        theirs = ["mklabel", "gpt", "mkpart", "theirs", "1MiB", "9MiB"]
        await RUNNER.run(["parted", "--script", "--", foreign_gpt, *theirs])
        assert await signatures(md_member) == ["linux_raid_member"], "the hand-made md superblock is not recognised"
        assert await signatures(foreign_pv) == ["LVM2_member"]
        hostile = [ext4_data, md_member, mounted_fs, foreign_pv, foreign_gpt, small]
        names = [Path(d).name for d in [blank, *hostile, late]]

        config = tmp_path / "config.toml"
        config.write_text(
            f'[node]\nkubelet_dir = "{tmp_path / "kubelet"}"\npool_retry_seconds = 0.5\n\n'
            "[pools.partition.found]\ndefault = true\nsetup = true\ndiscover_seconds = 0.5\n"
            f'[pools.partition.found.match]\ntransport = "loop"\nnames = {names!r}\n'
            'min_size = "48Mi"\nmax_size = "100Mi"\n'.replace("'", '"')
        )
        with mounted(mounted_fs, read_only=True):
            before = {device: digest(device) for device in hostile}
            port = free_port()
            with running_server(tmp_path, config, ["--metrics-address", f"127.0.0.1:{port}"]) as sock:
                channel = Channel(path=str(sock))
                try:
                    controller = ControllerStub(channel)

                    async def capacity() -> int:
                        request = GetCapacityRequest(parameters={"backend": "partition", "pool": "found"})
                        return (await controller.get_capacity(request)).available_capacity

                    first = await capacity()
                    assert 0 < first < IN_RANGE  # the one blank disk in range, labelled
                    text = _metrics(port)
                    assert 'localdisk_disks_discovered{backend="partition",outcome="used",pool="found"} 1.0' in text
                    assert 'localdisk_disks_discovered{backend="partition",outcome="refused",pool="found"} 5.0' in text

                    grow_late(IN_RANGE)  # a matching blank disk appears while the server runs
                    with anyio.fail_after(60):
                        while await capacity() <= first:
                            await anyio.sleep(0.2)
                    made = await controller.create_volume(create_request("pvc-found", 40 * MiB, "partition"))
                    assert made.volume is not None
                finally:
                    channel.close()
            after = {device: digest(device) for device in hostile}
        assert after == before  # every hostile disk (and the blank one too small) byte for byte as it was

        for device in (blank, late):
            table = parse_sfdisk((await RUNNER.run(["sfdisk", "--json", "--", device])).text, device)
            assert table.label_id.startswith(LABEL_MARK)
        log = (tmp_path / "serve.log").read_text()
        for name, why in (
            (ext4_data, "carries ext4 signature(s)"),
            (md_member, "carries linux_raid_member signature(s)"),
            (mounted_fs, "/dev/" + Path(mounted_fs).name + " (64 MiB, loop, rotational): refused: mounted"),
            (foreign_pv, "carries LVM2_member signature(s)"),
            (foreign_gpt, "a GPT localdisk did not write"),
        ):
            assert why in log, (name, why)


@needs_loop_devices
async def test_one_config_as_two_nodes_finds_each_its_own_disks(tmp_path: Path) -> None:
    """One file, two node groups: the `big` group takes disks of 96 MiB or more, the `small` group disks up to
    48 MiB; served as a node of each group on the same disks, each labels and offers only its own."""
    async with loop_disks(2, 128 * MiB) as bigs, loop_disks(1, TOO_SMALL) as smalls:
        names = [Path(d).name for d in [*bigs, *smalls]]
        rules = f'transport = "loop"\nnames = {names!r}\n'.replace("'", '"')
        config = tmp_path / "config.toml"
        config.write_text(
            f'[node]\nkubelet_dir = "{tmp_path / "kubelet"}"\n\n'
            '[pools.partition.big]\nsetup = true\nnode_labels = { "localdisk.io/disks" = "big" }\n'
            f'[pools.partition.big.match]\n{rules}min_size = "96Mi"\n\n'
            '[pools.partition.small]\nsetup = true\nnode_labels = { "localdisk.io/disks" = "small" }\n'
            f'[pools.partition.small.match]\n{rules}max_size = "48Mi"\n'
        )
        offered: dict[str, dict[str, int]] = {}
        for group in ("big", "small"):
            workdir = tmp_path / group
            workdir.mkdir()
            extra = ["--node-id", f"{group}-1", "--node-labels", f"localdisk.io/disks={group}"]
            with running_server(workdir, config, extra) as sock:
                channel = Channel(path=str(sock))
                try:
                    controller = ControllerStub(channel)
                    offered[group] = {}
                    for pool in ("big", "small"):
                        request = GetCapacityRequest(parameters={"backend": "partition", "pool": pool})
                        offered[group][pool] = (await controller.get_capacity(request)).available_capacity
                finally:
                    channel.close()
        assert offered["big"]["small"] == 0 and offered["small"]["big"] == 0
        assert 2 * 120 * MiB < offered["big"]["big"] < 2 * 128 * MiB
        assert 24 * MiB < offered["small"]["small"] < TOO_SMALL
        for device in [*bigs, *smalls]:
            table = parse_sfdisk((await RUNNER.run(["sfdisk", "--json", "--", device])).text, device)
            assert table.label_id.startswith(LABEL_MARK)
