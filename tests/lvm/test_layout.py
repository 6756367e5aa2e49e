"""Striped, mirrored and PV-tag-restricted thick volumes on real LVM, in the UML sandbox (`nox -s e2e`).

The sandbox needs a VG of several PVs: `--vg ldtest-raid:128Mx3@hdd,64M@ssd` (`RAID_SANDBOX_ARGS`), three "HDD" PVs
and one "SSD" PV, tagged. Capacity is checked to the byte against what `pvs` says each PV lost.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from localdisk import CreateRequest
from localdisk.backends.lvm import LinearBackend, LinearPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.backends.lvmlayout import Layout
from localdisk.errors import InsufficientCapacity, InvalidArgument
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.lvm.conftest import reset_vg
from tests.lvm.helpers import device_size, pattern, read, write

RAID_VG = "ldtest-raid"
RAID_SANDBOX_ARGS = ["--vg", f"{RAID_VG}:128Mx3@hdd,64M@ssd"]
EXTENT = 4 * MiB

pytestmark = [pytest.mark.uml, pytest.mark.anyio]


@pytest.fixture(autouse=True)
def _needs_raid_vg() -> None:
    if f"{RAID_VG}:" not in os.environ.get("LOCALDISK_SANDBOX_VGS", ""):
        pytest.skip(f"the sandbox was started without VG {RAID_VG}: pass {' '.join(RAID_SANDBOX_ARGS)}")


@pytest.fixture
async def clean_raid(lvm: Lvm) -> AsyncIterator[None]:
    yield
    await reset_vg(lvm, RAID_VG)


async def open_pool(runner: CommandRunner, lvm: Lvm, **layout: object) -> LinearBackend:
    config = LinearPoolConfig.model_validate({"volume_group": RAID_VG, **layout})
    backend = LinearBackend("dense", config, lvm, runner)
    await backend.open()
    return backend


@pytest.fixture
async def dense(runner: CommandRunner, lvm: Lvm, clean_raid: None) -> AsyncIterator[LinearBackend]:
    backend = await open_pool(runner, lvm)
    yield backend
    await backend.aclose()


def ask(backend: LinearBackend, name: str, size: int, **parameters: str) -> CreateRequest:
    return CreateRequest(name=name, backend="lvm", pool=backend.pool, required_bytes=size, parameters=parameters)


async def pv_free(lvm: Lvm) -> dict[str, int]:
    return {pv.name: pv.free for pv in (await lvm.report(RAID_VG)).physical}


async def tagged(lvm: Lvm, tag: str) -> list[str]:
    """The PVs of the VG with `tag` (the sandbox's disk names depend on the other VGs it was given)."""
    return sorted(pv.name for pv in (await lvm.report(RAID_VG)).physical if tag in pv.tags)


async def segments(runner: CommandRunner, lv: str) -> list[str]:
    """`segtype stripes devices` of each segment of `lv` (hidden sub-LVs included)."""
    result = await runner.run(
        ["lvs", "--noheadings", "-a", "-o", "lv_name,segtype,stripes,devices", "--", f"{RAID_VG}"], check=True
    )
    return [" ".join(line.split()) for line in result.stdout.decode().splitlines() if lv in line]


# -- what each layout takes, to the byte ------------------------------------------------------------------------------
async def test_a_striped_volume_takes_a_share_on_each_pv_and_keeps_its_stripes_when_grown(
    dense: LinearBackend, lvm: Lvm, runner: CommandRunner
) -> None:
    manager = manager_for(dense)
    before = await pv_free(lvm)
    want = {"stripes": "3", "stripeSize": "64Ki", "pvTags": "hdd"}
    hdds, ssds = await tagged(lvm, "hdd"), await tagged(lvm, "ssd")
    capacity = await manager.capacity("lvm", dense.pool, want)
    assert capacity.maximum_volume_bytes == 3 * min(before[d] for d in hdds)
    volume = await manager.create_volume(ask(dense, "pvc-striped", 10 * MiB, **want))
    assert volume.size_bytes == 12 * MiB  # one whole extent on each of three PVs
    after = await pv_free(lvm)
    assert {d: before[d] - after[d] for d in before} == {**dict.fromkeys(hdds, EXTENT), **dict.fromkeys(ssds, 0)}
    assert (await manager.capacity("lvm", dense.pool, want)).available_bytes == capacity.available_bytes - 12 * MiB
    grown = await manager.expand_volume(volume.id, 30 * MiB)
    assert grown.size_bytes == 36 * MiB
    assert all(" striped 3 " in seg for seg in await segments(runner, volume.ref.handle))
    assert device_size(grown.device_path or "") == 36 * MiB
    await manager.delete_volume(volume.id)
    assert await pv_free(lvm) == before
    assert (await manager.capacity("lvm", dense.pool, want)) == capacity


async def test_a_mirror_takes_its_size_twice_on_two_pvs_and_grows_as_a_mirror(
    dense: LinearBackend, lvm: Lvm, runner: CommandRunner
) -> None:
    manager = manager_for(dense)
    before = await pv_free(lvm)
    want = {"mirrors": "2", "pvTags": "hdd"}
    capacity = await manager.capacity("lvm", dense.pool, want)
    # three 128 MiB HDD PVs (less LVM's metadata area): one extent of each image goes to RAID metadata
    assert capacity.maximum_volume_bytes == before[(await tagged(lvm, "hdd"))[0]] - EXTENT
    volume = await manager.create_volume(ask(dense, "pvc-mirror", 20 * MiB, **want))
    after = await pv_free(lvm)
    lost = sorted(before[d] - after[d] for d in before)
    assert lost == [0, 0, 20 * MiB + EXTENT, 20 * MiB + EXTENT]
    grown = await manager.expand_volume(volume.id, 40 * MiB)
    assert grown.size_bytes == 40 * MiB
    kinds = await segments(runner, volume.ref.handle)
    assert any(" raid1 2 " in seg for seg in kinds), kinds
    assert sum(before[d] - free for d, free in (await pv_free(lvm)).items()) == 2 * (40 * MiB + EXTENT)
    await manager.delete_volume(volume.id)
    assert await pv_free(lvm) == before


async def test_layouts_the_pool_cannot_make_are_refused_clearly(dense: LinearBackend) -> None:
    manager = manager_for(dense)
    with pytest.raises(InvalidArgument, match="needs 2 PVs; volume group ldtest-raid has 1"):
        await manager.create_volume(ask(dense, "pvc-x", 8 * MiB, mirrors="2", pvTags="ssd"))
    with pytest.raises(InvalidArgument, match="needs 5 PVs"):
        await manager.create_volume(ask(dense, "pvc-x", 8 * MiB, stripes="5"))
    with pytest.raises(InvalidArgument, match="'mirrors' is 'two'"):
        await manager.create_volume(ask(dense, "pvc-x", 8 * MiB, mirrors="two"))
    with pytest.raises(InsufficientCapacity, match="at most"):
        await manager.create_volume(ask(dense, "pvc-x", 200 * MiB, mirrors="2"))
    assert (await manager.capacity("lvm", dense.pool, {"mirrors": "2", "pvTags": "ssd"})).available_bytes == 0
    assert await manager.list_volumes() == []


async def test_ssd_only_volumes_stay_on_the_ssd(dense: LinearBackend, lvm: Lvm) -> None:
    manager = manager_for(dense)
    before = await pv_free(lvm)
    [ssd] = await tagged(lvm, "ssd")
    capacity = await manager.capacity("lvm", dense.pool, {"pvTags": "ssd"})
    assert capacity.available_bytes == capacity.maximum_volume_bytes == before[ssd]
    await manager.create_volume(ask(dense, "pvc-ssd", 16 * MiB, pvTags="ssd"))
    after = await pv_free(lvm)
    assert {d for d in before if before[d] != after[d]} == {ssd}
    assert (await manager.capacity("lvm", dense.pool, {"pvTags": "ssd"})).available_bytes == before[ssd] - 16 * MiB
    with pytest.raises(InsufficientCapacity):
        await manager.create_volume(ask(dense, "pvc-ssd-2", before[ssd], pvTags="ssd"))


async def test_layout_tag_records_what_expansion_keeps(dense: LinearBackend, lvm: Lvm) -> None:
    manager = manager_for(dense)
    volume = await manager.create_volume(ask(dense, "pvc-tag", 8 * MiB, stripes="2", stripeSize="32Ki"))
    lv = (await lvm.report(RAID_VG)).lvs[volume.ref.handle]
    assert Layout.from_tag(lv.tags) == Layout(stripes=2, stripe_size=32 * 1024)
    assert lv.layout == "striped"
    data = pattern(1 * MiB)
    write(volume.device_path or "", data)
    assert hashlib.sha256(read(volume.device_path or "", len(data))).digest() == hashlib.sha256(data).digest()
