"""Zero-touch LVM pools from disk rules, on real LVM under UML with several blank ubd disks (issue 15, parts 3-5).

Needs the sandbox's blank disks: `localdisk sandbox run <E2E_SANDBOX> --disk 256M --disk 128M --disk 192M -- ...`
(`BLANK_ARGS`). Every rule names the kernel names of those disks, so the VGs of the other suites are never in play;
each test puts the blank disks back as they were (VGs removed, labels wiped, rotational flags reset).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from localdisk import config as node_config
from localdisk.availability import Available
from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, ThinBackend, ThinPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.backends.lvmsetup import BUILDING_TAG, OURS_TAG, RulesPool, marked_for
from localdisk.discovery import HOST, Claims, Roots
from localdisk.errors import FailedPrecondition
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.model import VolumeSpec
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.uml, pytest.mark.timeout(600)]
BLANK_ARGS = ["--disk", "256M", "--disk", "128M", "--disk", "192M"]
RUNNER = CommandRunner(default_timeout=120)
VG_A, VG_B = "ldzt-a", "ldzt-b"


@dataclass(frozen=True)
class Blank:
    device: str
    size: int

    @property
    def name(self) -> str:
        return Path(self.device).name


def blank_disks() -> list[Blank]:
    found = []
    for entry in filter(None, os.environ.get("LOCALDISK_SANDBOX_DISKS", "").split(",")):
        device, size, _serial = entry.split(":")
        found.append(Blank(device, int(size)))
    return found


def digest(device: str) -> str:
    hasher = hashlib.sha256()
    with open(device, "rb") as handle:
        while chunk := handle.read(4 * MiB):
            hasher.update(chunk)
    return hasher.hexdigest()


async def lvm_json(*args: str) -> Any:
    import json

    command, rest = args[0], args[1:]
    options = ["--reportformat", "json", "--units", "b", "--nosuffix"]
    return json.loads((await RUNNER.run(["lvm", command, *options, *rest])).text)


async def pvs() -> dict[str, tuple[str, str]]:
    """Kernel name -> (VG, PV UUID) of every PV LVM sees."""
    rows = (await lvm_json("pvs", "-o", "pv_name,vg_name,pv_uuid"))["report"][0]["pv"]
    return {Path(r["pv_name"]).name: (r["vg_name"], r["pv_uuid"]) for r in rows}


async def vg_tags(vg: str) -> set[str]:
    rows = (await lvm_json("vgs", "-o", "vg_name,vg_tags"))["report"][0]["vg"]
    return {t for r in rows if r["vg_name"] == vg for t in r["vg_tags"].split(",") if t}


async def reset_disks(disks: list[Blank]) -> None:
    """Every VG on the blank disks removed, every label wiped: the disks blank again."""
    ours = {d.name for d in disks}
    seen = await pvs()
    for vg in sorted({vg for name, (vg, _uuid) in seen.items() if vg and name in ours}):
        await RUNNER.run(["lvm", "vgremove", "-ff", "-y", "--", vg], check=False)
    for disk in disks:
        if disk.name in seen:
            await RUNNER.run(["lvm", "pvremove", "-ff", "-y", "--", disk.device], check=False)
        fd = os.open(disk.device, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(MiB), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    await RUNNER.run(["udevadm", "settle", "--timeout=30"], check=False)


@pytest.fixture
async def disks() -> AsyncIterator[list[Blank]]:
    found = blank_disks()
    if len(found) < 3:
        pytest.skip(f"needs three blank sandbox disks: pass {' '.join(BLANK_ARGS)} to localdisk sandbox run")
    found = found[:3]  # `nox -s zerotouch-crash` attaches a fourth disk for its crash loop
    await reset_disks(found)
    yield found
    await reset_disks(found)


@contextmanager
def visible(names: list[str]) -> Iterator[tuple[Roots, list[str]]]:
    """A sysfs root showing only the disks in the returned list (append to it, then `refresh`): a disk "appears"."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        block = Path(tmp) / "block"
        block.mkdir()
        shown = list(names)

        def refresh() -> None:
            for name in shown:
                if not (block / name).exists():
                    (block / name).symlink_to(HOST.sys / "block" / name)

        refresh()
        roots = Roots(sys=Path(tmp), dev=HOST.dev, udev_data=HOST.udev_data, proc=HOST.proc)
        yield roots, shown
        shown.clear()


def show(roots: Roots, name: str) -> None:
    (roots.sys / "block" / name).symlink_to(HOST.sys / "block" / name)


def linear_pool(
    vg: str,
    rules: dict[str, Any],
    *,
    roots: Roots = HOST,
    claims: Claims | None = None,
    runner: CommandRunner = RUNNER,
    **settings: Any,
) -> RulesPool:
    config = LinearPoolConfig.model_validate({"volume_group": vg, "match": rules, **settings})
    backend = LinearBackend("zt", config, Lvm(runner), runner)
    return RulesPool(backend, config, runner, claims=claims or Claims(), roots=roots)


def thin_pool(vg: str, rules: dict[str, Any], **settings: Any) -> RulesPool:
    config = ThinPoolConfig.model_validate({"volume_group": vg, "thin_pool": "tp", "match": rules, **settings})
    backend = ThinBackend("ztt", config, Lvm(RUNNER), RUNNER)
    return RulesPool(backend, config, RUNNER, thin_pool="tp", claims=Claims())


def names(disks: list[Blank]) -> list[str]:
    return [d.name for d in disks]


async def test_setup_makes_a_tagged_vg_from_the_blank_disks_the_rules_select(disks: list[Blank]) -> None:
    big, small, middle = disks
    untouched = digest(small.device)
    pool = linear_pool(VG_A, {"names": names(disks), "min_size": "150M"}, setup=True)
    await pool.open()
    try:
        assert pool.discovered == {big.name: "used: made a PV now", middle.name: "used: made a PV now"}
        seen = await pvs()
        assert {n for n, (vg, _) in seen.items() if vg == VG_A} == {big.name, middle.name}
        assert all(marked_for(uuid, VG_A) for vg, uuid in seen.values() if vg == VG_A)
        assert OURS_TAG in await vg_tags(VG_A)
        assert small.name not in seen and digest(small.device) == untouched
        assert (await pool.capacity()).total_bytes > 400 * MiB  # both disks
        volume = await pool.create_volume(VolumeSpec(name="zt-vol", size_bytes=8 * MiB))
        await pool.delete_volume(volume.ref.handle)
    finally:
        await pool.aclose()
    again = linear_pool(VG_A, {"names": names(disks), "min_size": "150M"})  # without setup: taken as it is
    await again.open()
    try:
        assert set(again.discovered.values()) == {"used"}
    finally:
        await again.aclose()


async def test_setup_works_with_lvms_devices_file_on(disks: list[Blank]) -> None:
    """Where LVM keeps a devices file (`use_devicesfile = 1`, RHEL 9's default) and it lists none of the blank
    disks, set-up still makes the VG, LVM adds its disks to the file, and the pool serves and reopens."""
    big, _, middle = disks
    system_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "lvm-devicesfile"
    shutil.rmtree(system_dir, ignore_errors=True)
    shutil.copytree(os.environ.get("LVM_SYSTEM_DIR") or "/etc/lvm", system_dir)
    conf = system_dir / "lvm.conf"
    conf.write_text(conf.read_text().replace("use_devicesfile = 0", "use_devicesfile = 1"))
    (system_dir / "devices").mkdir(exist_ok=True)
    (system_dir / "devices" / "system.devices").write_text("")
    runner = CommandRunner(default_timeout=120, env={"LVM_SYSTEM_DIR": str(system_dir)})
    rules = {"names": [big.name, middle.name]}
    pool = linear_pool(VG_A, rules, runner=runner, setup=True)
    await pool.open()
    try:
        assert pool.discovered == {big.name: "used: made a PV now", middle.name: "used: made a PV now"}
        listed = (system_dir / "devices" / "system.devices").read_text()
        assert f"DEVNAME={big.device}" in listed and f"DEVNAME={middle.device}" in listed
        volume = await pool.create_volume(VolumeSpec(name="zt-devfile", size_bytes=8 * MiB))
        await pool.delete_volume(volume.ref.handle)
    finally:
        await pool.aclose()
    again = linear_pool(VG_A, rules, runner=runner)
    await again.open()
    try:
        assert set(again.discovered.values()) == {"used"}
    finally:
        await again.aclose()


@contextmanager
def spinning(names: list[str], rotational: set[str]) -> Iterator[Roots]:
    """A sysfs root showing the disks `names` as the kernel does, but those in `rotational` as spinning disks.

    UML's ubd driver lets the guest write /sys/block/ubdX/queue/rotational, but sets it back to 0 the next time the
    device is opened (any LVM scan, wipefs), so a rotational rule is shown through discovery's injectable root."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            real, fake = HOST.sys / "block" / name, Path(tmp) / "block" / name
            fake.mkdir(parents=True)
            for entry in real.iterdir():
                if entry.name != "queue":
                    (fake / entry.name).symlink_to(entry)
            (fake / "queue").mkdir()
            (fake / "queue" / "rotational").write_text("1\n" if name in rotational else "0\n")
        yield Roots(sys=Path(tmp), dev=HOST.dev, udev_data=HOST.udev_data, proc=HOST.proc)


async def test_rotational_rule_selects_the_spinning_disk(disks: list[Blank]) -> None:
    with spinning(names(disks), {disks[2].name}) as roots:
        pool = linear_pool(VG_A, {"names": names(disks), "rotational": True}, roots=roots, setup=True)
        await pool.open()
        try:
            assert pool.discovered == {disks[2].name: "used: made a PV now"}
            assert {n for n, (vg, _) in (await pvs()).items() if vg == VG_A} == {disks[2].name}
        finally:
            await pool.aclose()


async def test_thin_setup_makes_the_pool_from_a_share_of_the_vg(disks: list[Blank]) -> None:
    pool = thin_pool(VG_B, {"names": [disks[0].name]}, setup=True, thin_percent=50, overprovision_ratio=1.0)
    await pool.open()
    try:
        tags = await vg_tags(VG_B)
        assert OURS_TAG in tags and BUILDING_TAG not in tags
        capacity = await pool.capacity()
        assert 100 * MiB <= capacity.total_bytes <= 140 * MiB  # half of 256M, less LVM's own metadata
        volume = await pool.create_volume(VolumeSpec(name="zt-thin", size_bytes=64 * MiB))
        await pool.delete_volume(volume.ref.handle)
    finally:
        await pool.aclose()


async def test_a_vg_of_that_name_not_made_by_localdisk_is_never_touched(disks: list[Blank]) -> None:
    await RUNNER.run(["lvm", "vgcreate", "-y", "--", VG_A, disks[0].device])
    before = {d.device: digest(d.device) for d in disks}
    backend = Available(linear_pool(VG_A, {"names": names(disks)}, setup=True))
    await backend.open()
    assert not backend.up
    assert backend.state.reason is not None and "not made by localdisk" in backend.state.reason
    assert (await backend.capacity()).available_bytes == 0
    with pytest.raises(FailedPrecondition, match="not made by localdisk"):
        await backend.create_volume(VolumeSpec(name="nope", size_bytes=8 * MiB))
    assert {d.device: digest(d.device) for d in disks} == before
    await backend.aclose()


async def test_a_disk_appearing_later_joins_the_vg_without_a_restart(disks: list[Blank]) -> None:
    with visible([disks[2].name]) as (roots, _):
        pool = linear_pool(VG_A, {"names": names(disks)}, roots=roots, setup=True, discover_seconds=0.01)
        await pool.open()
        try:
            first = (await pool.capacity()).total_bytes
            show(roots, disks[0].name)
            await anyio.sleep(0.02)
            await pool.refresh_state()
            assert pool.discovered[disks[0].name] == "used: made a PV now"
            assert {n for n, (vg, _) in (await pvs()).items() if vg == VG_A} == {disks[0].name, disks[2].name}
            assert (await pool.capacity()).total_bytes > first + 200 * MiB
        finally:
            await pool.aclose()


async def test_missing_disk_at_start_then_the_pool_comes_up_without_a_restart(disks: list[Blank]) -> None:
    with visible([]) as (roots, _):
        inner = linear_pool(VG_A, {"names": [disks[0].name]}, roots=roots, setup=True)
        manager = VolumeManager({("lvm", "zt"): inner}, {"lvm": "zt"})
        await manager.open()
        try:
            state = manager.pool_states()[("lvm", "zt")]
            assert not state.up and state.reason is not None and "no disk to make it from" in state.reason
            assert (await manager.capacity("lvm", "zt")).available_bytes == 0
            with pytest.raises(FailedPrecondition, match="unavailable on this node"):
                await manager.create_volume(CreateRequest(name="early", backend="lvm", required_bytes=8 * MiB))
            show(roots, disks[0].name)
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(manager.retry_unavailable, 0.05)
                    while not manager.pool_states()[("lvm", "zt")].up:
                        await anyio.sleep(0.05)
                    tasks.cancel_scope.cancel()
            assert (await manager.capacity("lvm", "zt")).available_bytes > 200 * MiB
            volume = await manager.create_volume(CreateRequest(name="late", backend="lvm", required_bytes=8 * MiB))
            await manager.delete_volume(str(volume.ref))
        finally:
            await manager.aclose()


async def test_a_vanished_pv_refuses_new_volumes_and_keeps_the_others(disks: list[Blank]) -> None:
    big, _, middle = disks
    pool = linear_pool(VG_A, {"names": [big.name, middle.name]}, setup=True)
    backend = Available(pool)
    await backend.open()
    try:
        volume = await backend.create_volume(VolumeSpec(name="stays", size_bytes=16 * MiB))
        segments = (await lvm_json("lvs", "-o", "lv_name,devices", "--", VG_A))["report"][0]["lv"]
        assert all(Path(row["devices"].split("(")[0]).name == big.name for row in segments), segments
        # The other disk vanishes: its PV label is gone, as when a disk dies or is pulled.
        fd = os.open(middle.device, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(MiB), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        await pool.discover()
        assert pool.missing_pvs == 1
        with pytest.raises(FailedPrecondition, match="missing 1 physical volume"):
            await backend.create_volume(VolumeSpec(name="refused", size_bytes=8 * MiB))
        assert (await backend.capacity()).available_bytes == 0
        assert (await backend.get_volume(volume.ref.handle)).abnormal is None  # still active, still served
        with open(f"/dev/{VG_A}/{volume.ref.handle}", "rb") as device:
            assert len(device.read(4096)) == 4096
    finally:
        await backend.aclose()


async def test_a_vg_that_vanishes_under_a_running_pool_fails_only_that_pool(disks: list[Blank]) -> None:
    """A pool's whole VG vanishes under it (its only disk's label gone, as when the disk dies or is pulled): its
    calls are FAILED_PRECONDITION saying the VG is gone and it goes down, while a second pool, ListVolumes and name
    lookups across pools go on (before, LVM's "Volume group not found" was NOT_FOUND and broke every listing)."""
    gone_vg = "ldzt-gone"
    disk = disks[1]
    await RUNNER.run(["lvm", "vgcreate", "-qq", "--", gone_vg, disk.device])
    config = LinearPoolConfig.model_validate({"volume_group": gone_vg})
    doomed = LinearBackend("doomed", config, Lvm(RUNNER), RUNNER)
    survivor = linear_pool(VG_A, {"names": [disks[0].name]}, setup=True)
    manager = VolumeManager({("lvm", "doomed"): doomed, ("lvm", "survivor"): survivor}, {})
    await manager.open()
    try:
        lost = await manager.create_volume(CreateRequest("pvc-doomed", "lvm", "doomed", required_bytes=8 * MiB))
        kept = await manager.create_volume(CreateRequest("pvc-kept", "lvm", "survivor", required_bytes=8 * MiB))
        fd = os.open(disk.device, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(MiB), 0)  # the PV label, and with it the only copy of the VG's metadata on disk
            os.fsync(fd)
        finally:
            os.close(fd)
        with pytest.raises(FailedPrecondition, match="the volume group is gone"):
            await manager.create_volume(CreateRequest("pvc-after", "lvm", "doomed", required_bytes=8 * MiB))
        assert not manager.pool_states()[("lvm", "doomed")].up
        assert [v.id for v in await manager.list_volumes()] == [kept.id]
        with pytest.raises(FailedPrecondition):
            await manager.delete_volume(lost.id)
        again = await manager.create_volume(CreateRequest("pvc-kept", "lvm", "survivor", required_bytes=8 * MiB))
        assert again.id == kept.id  # the name lookup across pools passes the dead one by
        await manager.delete_volume(kept.id)
    finally:
        await manager.aclose()
        mapped = (await RUNNER.run(["dmsetup", "ls"], check=False)).text.split()
        for name in [m for m in mapped if m.startswith(gone_vg.replace("-", "--") + "-")]:  # its LVs, still mapped
            await RUNNER.run(["dmsetup", "remove", "--force", name], check=False)


async def test_one_config_read_as_two_nodes_gives_each_its_own_pools(disks: list[Blank]) -> None:
    big, small, middle = disks
    text = f"""
[pools.lvm.bulk]
volume_group = "{VG_A}"
setup = true
node_labels = {{ "localdisk.io/disks" = "big" }}
[pools.lvm.bulk.match]
names = {names(disks)!r}
min_size = "220M"

[pools.lvm.small]
volume_group = "{VG_B}"
setup = true
node_labels = {{ "localdisk.io/disks" = "small" }}
[pools.lvm.small.match]
names = {names(disks)!r}
max_size = "220M"
"""
    import tomllib

    parsed = node_config.parse(tomllib.loads(text.replace("'", '"')))
    for node, label, vg, expected in (
        ("n1", "big", VG_A, {big.name}),
        ("n2", "small", VG_B, {small.name, middle.name}),
    ):
        mine = parsed.for_node(node, {"localdisk.io/disks": label})
        assert len(mine.pools) == 1 and mine.pools[0].config.volume_group == vg  # type: ignore[attr-defined]
        manager = VolumeManager.from_config(mine, RUNNER)
        await manager.open()
        try:
            assert all(state.up for state in manager.pool_states().values()), manager.pool_states()
            assert {n for n, (group, _) in (await pvs()).items() if group == vg} == expected
        finally:
            await manager.aclose()
        await reset_disks(disks)
