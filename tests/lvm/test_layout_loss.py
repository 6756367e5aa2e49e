"""Losing a disk under a mirror or under a writethrough cache, on real LVM in the UML sandbox: no data is lost.

How a disk is lost here: the sandbox's disks are sparse image files on the host, which the guest sees through
hostfs; the test empties the image of one PV (`truncate -s 0`). LVM then finds no label on it and reports the PV
missing (`[unknown]`, the LVs on it partial), exactly as after a disk failure. The UML block driver, though, answers
reads past the end of an image with zeros rather than with I/O errors, so the kernel's dm-raid does not notice by
itself as it would with a dead disk; the test reloads the mirror (`lvchange --refresh`, which activates it without
the missing leg) the way a failed leg would be dropped. Each test puts the disk back (pvcreate, vgextend, tag) so
the VG is whole for the tests after it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.lvm.conftest import reset_vg
from tests.lvm.helpers import read, write
from tests.lvm.test_layout import RAID_SANDBOX_ARGS, RAID_VG, ask, tagged

pytestmark = [pytest.mark.uml, pytest.mark.anyio]


@pytest.fixture(autouse=True)
def _needs_raid_vg() -> None:
    if f"{RAID_VG}:" not in os.environ.get("LOCALDISK_SANDBOX_VGS", ""):
        pytest.skip(f"the sandbox was started without VG {RAID_VG}: pass {' '.join(RAID_SANDBOX_ARGS)}")


def image_of(device: str) -> Path:
    """The host image file behind sandbox disk /dev/ubdX (the sandbox's files sit next to its LVM directory)."""
    index = ord(device.removeprefix("/dev/ubd")) - ord("a")
    return Path(os.environ["LVM_SYSTEM_DIR"]).parent / f"disk{index}.img"


def lose(device: str) -> None:
    os.truncate(image_of(device), 0)


async def restore(runner: CommandRunner, lvm: Lvm, device: str, tag: str) -> None:
    """Put a lost disk back as a fresh PV of the VG (what an administrator does with a replacement)."""
    await runner.run(["vgreduce", "--removemissing", "--force", "--", RAID_VG], check=False)
    await runner.run(["pvcreate", "-ff", "-y", "--", device], check=True)
    await runner.run(["vgextend", "--", RAID_VG, device], check=True)
    await lvm.tag_pv(device, [tag])


@pytest.fixture
async def pool(runner: CommandRunner, lvm: Lvm) -> AsyncIterator[LinearBackend]:
    config = LinearPoolConfig(volume_group=RAID_VG, pv_tags=("hdd",), cache_pv_tags=("ssd",))
    backend = LinearBackend("dense", config, lvm, runner)
    await backend.open()
    yield backend
    await backend.aclose()
    await reset_vg(lvm, RAID_VG)


async def legs(runner: CommandRunner, lv: str) -> list[str]:
    """The PVs of a raid1 LV's images, in image order."""
    result = await runner.run(["lvs", "--noheadings", "-a", "-o", "lv_name,devices", "--", RAID_VG], check=True)
    rows = [line.split() for line in result.stdout.decode().splitlines()]
    return [row[1].split("(")[0] for row in sorted(rows) if len(row) == 2 and row[0].startswith(f"[{lv}_rimage_")]


async def test_a_mirror_serves_its_data_after_losing_a_disk_and_is_repaired(
    pool: LinearBackend, lvm: Lvm, runner: CommandRunner
) -> None:
    manager = manager_for(pool)
    volume = await manager.create_volume(ask(pool, "pvc-mirror", 24 * MiB, mirrors="2"))
    path = volume.device_path or ""
    data = os.urandom(16 * MiB)
    write(path, data)
    checksum = hashlib.sha256(data).hexdigest()
    first, second = await legs(runner, volume.ref.handle)
    [spare] = sorted(set(await tagged(lvm, "hdd")) - {first, second})
    lose(second)
    try:
        await runner.run(["lvchange", "--refresh", "--", f"{RAID_VG}/{volume.ref.handle}"], check=False)
        seen = await manager.get_volume(volume.id)
        assert seen.abnormal is None  # still usable: the node stages it
        assert seen.degraded is not None and "degraded" in seen.degraded and "[unknown]" in seen.degraded
        assert (await pool.capacity()).details["degraded_volumes"] == 1
        assert hashlib.sha256(read(path, len(data))).hexdigest() == checksum
        more = os.urandom(4 * MiB)
        write(path, more, 16 * MiB)  # and still takes writes
        repaired = await pool.repair_volume(volume.ref.handle, [spare])
        assert repaired.degraded is None and repaired.abnormal is None
        assert await legs(runner, volume.ref.handle) == [first, spare]
        assert hashlib.sha256(read(path, len(data))).hexdigest() == checksum
        assert read(path, len(more), 16 * MiB) == more
        assert "[unknown]" not in (await lvm.report(RAID_VG)).pvs  # the lost PV left the VG
    finally:
        await restore(runner, lvm, second, "hdd")


async def test_a_writethrough_cache_loses_its_ssd_and_no_data(
    pool: LinearBackend, lvm: Lvm, runner: CommandRunner
) -> None:
    manager = manager_for(pool)
    volume = await manager.create_volume(ask(pool, "pvc-cached", 32 * MiB, cache="writethrough", cacheSize="16Mi"))
    path = volume.device_path or ""
    data = os.urandom(16 * MiB)
    write(path, data)
    assert read(path, len(data)) == data  # read back once: the blocks are in the cache now
    checksum = hashlib.sha256(data).hexdigest()
    [ssd] = await tagged(lvm, "ssd")
    lose(ssd)
    try:
        seen = await manager.get_volume(volume.id)
        parts = (await lvm.report(RAID_VG)).physical
        assert seen.abnormal is not None and "writethrough mode its data is whole" in seen.abnormal, parts
        dropped = await pool.repair_volume(volume.ref.handle, [])
        assert dropped.abnormal is None
        assert not (await lvm.report(RAID_VG)).lvs[volume.ref.handle].cached
        assert hashlib.sha256(read(path, len(data))).hexdigest() == checksum
    finally:
        await restore(runner, lvm, ssd, "ssd")
