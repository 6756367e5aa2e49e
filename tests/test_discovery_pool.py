"""A partition pool with [match] rules on real loop disks, backend to backend (issue 15, parts 3 and 4): what it
takes, what it leaves, whose label is whose, and that a label write cut off at any of its writes converges.

Every rule names this test's own loop devices (`names`): loop devices are shared with the rest of the machine.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from localdisk import config
from localdisk.availability import Available
from localdisk.backends.gpt import parse_sfdisk
from localdisk.backends.partition import LABEL_MARK, PartitionBackend, PartitionPoolConfig
from localdisk.commands.doctor import run_checks
from localdisk.discovery import Claims
from localdisk.manager import VolumeManager
from localdisk.model import VolumeSpec
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.test_discovery_loop import digest, growable_disk, signatures

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]
RUNNER = CommandRunner(default_timeout=60)


def pool(
    name: str, disks: Sequence[str], claims: Claims, *, rules: dict[str, Any] | None = None, **settings: Any
) -> PartitionBackend:
    rules = {"transport": "loop", "names": [Path(d).name for d in disks], **(rules or {})}
    config = PartitionPoolConfig.model_validate({"match": rules, **settings})
    return PartitionBackend(name, config, RUNNER, claims=claims)


async def label_of(device: str) -> str:
    return parse_sfdisk((await RUNNER.run(["sfdisk", "--json", "--", device])).text, device).label_id


@needs_loop_devices
async def test_without_setup_a_blank_disk_is_reported_and_left_alone() -> None:
    async with loop_disks(1, 64 * MiB) as (blank,):
        before = digest(blank)
        backend = Available(pool("idle", [blank], Claims()))
        await backend.open()
        assert not backend.up
        assert backend.state.reason is not None and "blank: left alone, set setup = true" in backend.state.reason
        verdict = "blank: left alone, set setup = true to let localdisk label it"
        assert backend.inner.discovered == {Path(blank).name: verdict}  # type: ignore[attr-defined]
        assert digest(blank) == before


@needs_loop_devices
async def test_a_label_names_its_pool_and_survives_a_restart() -> None:
    async with loop_disks(2, 64 * MiB) as disks:
        claims = Claims()
        first = pool("alpha", disks, claims, setup=True)
        await first.open()
        volume = await first.create_volume(VolumeSpec(name="pvc-kept", size_bytes=16 * MiB))
        await first.aclose()
        assert all(label.startswith(LABEL_MARK) for label in [await label_of(d) for d in disks])

        other = Available(pool("beta", disks, Claims(), setup=True))  # same disks, another pool's rules
        await other.open()
        assert not other.up
        assert set(other.inner.discovered.values()) == {"refused: labelled by localdisk for another pool"}  # type: ignore[attr-defined]  # fmt: skip

        again = pool("alpha", disks, Claims(), setup=True)  # alpha restarted: its disks and volume are back
        await again.open()
        assert set(again.discovered.values()) == {"used"}
        assert [v.id for v in await again.list_volumes()] == [volume.id]


@needs_loop_devices
async def test_overlapping_pools_never_share_a_disk_nor_take_an_explicit_one() -> None:
    async with loop_disks(3, 64 * MiB) as (one, two, listed):
        claims = Claims()
        explicit = PartitionBackend("listed", PartitionPoolConfig(disks=(listed,)), RUNNER, claims=claims)
        first = pool("first", [one, two, listed], claims, setup=True)
        second = pool("second", [one, two, listed], claims, setup=True)
        async with anyio.create_task_group() as tasks:  # both discover at once
            tasks.start_soon(first.open)
            tasks.start_soon(second.open)
        await explicit.open()
        taken = {
            name: owner for owner in (first, second) for name, v in owner.discovered.items() if v.startswith("used")
        }
        assert sorted(taken) == sorted(Path(d).name for d in (one, two))  # each once, the listed one by no one
        assert {v for o in (first, second) for n, v in o.discovered.items() if n == Path(listed).name} == {
            "refused: taken by partition pool 'listed'"
        }


@needs_loop_devices
async def test_a_label_cut_off_after_any_of_its_writes_converges(tmp_path: Path) -> None:
    """sfdisk writes a label as five writes (backup entries, backup header, primary entries, primary header,
    protective MBR; checked with strace). A crash can leave any prefix of them on the disk: each prefix must read
    as blank or as this pool's GPT, so the next start finishes the pool without touching anything else."""
    async with loop_disks(2, 64 * MiB) as (reference, disk):
        await pool("crashy", [reference], Claims(), setup=True).open()
        size = 64 * MiB
        writes = [(size - 33 * 512, 32 * 512), (size - 512, 512), (1024, 32 * 512), (512, 512), (0, 512)]
        fd = os.open(reference, os.O_RDONLY)
        try:
            pieces = [(offset, os.pread(fd, length, offset)) for offset, length in writes]
        finally:
            os.close(fd)
        for done in range(len(writes) + 1):
            subprocess.run(["wipefs", "--all", "--quiet", "--", disk], check=True, timeout=60)
            fd = os.open(disk, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes(MiB), 0)
                os.pwrite(fd, bytes(MiB), size - MiB)
                for offset, data in pieces[:done]:
                    os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            backend = pool("crashy", [disk], Claims(), setup=True)
            await backend.open()
            assert [v.split(":")[0] for v in backend.discovered.values()] == ["used"], (done, backend.discovered)
            assert (await label_of(disk)).startswith(LABEL_MARK)
            assert set(await signatures(disk)) == {"gpt", "PMBR"}


@needs_loop_devices
async def test_doctor_shows_what_the_rules_would_find_without_writing() -> None:
    async with loop_disks(2, 64 * MiB) as (blank, ext4):
        await RUNNER.run(["mkfs.ext4", "-q", "-F", ext4])
        before = {d: digest(d) for d in (blank, ext4)}
        rules = {"transport": "loop", "names": [Path(blank).name, Path(ext4).name]}
        parsed = config.parse({"pools": {"partition": {"found": {"match": rules, "setup": True}}}})
        checks = {c.name: c for c in await run_checks(parsed)}
        assert "pool partition/found" not in checks  # no listed disks to check
        found = checks["pool partition/found rules"]
        assert found.ok
        assert f"/dev/{Path(blank).name} (64 MiB, loop, rotational): blank" in found.detail
        assert f"/dev/{Path(ext4).name} (64 MiB, loop, rotational): refused: carries ext4 signature(s)" in found.detail
        assert {d: digest(d) for d in (blank, ext4)} == before


@needs_loop_devices
async def test_doctor_says_what_set_up_would_make_an_lvm_pool_from() -> None:
    """An LVM pool with rules whose VG is not made yet: doctor names the blank disks set-up would take (and says
    to turn set-up on, or that nothing matches), instead of advising a vgcreate by hand. Nothing is written."""
    async with loop_disks(2, 64 * MiB) as (blank, ext4):
        await RUNNER.run(["mkfs.ext4", "-q", "-F", ext4])
        before = {d: digest(d) for d in (blank, ext4)}
        vg = "ld-doctor-" + Path(blank).name  # no such VG anywhere
        rules = {"transport": "loop", "names": [Path(blank).name, Path(ext4).name]}

        async def check(backend: str, **settings: Any) -> Any:
            pools = {backend: {"bulk": {"volume_group": vg, "match": rules, **settings}}}
            checks = {c.name: c for c in await run_checks(config.parse({"pools": pools}))}
            return checks[f"pool {backend}/bulk"], checks[f"pool {backend}/bulk rules"]

        made, found = await check("thin", thin_pool="pool", setup=True)
        assert made.ok and made.detail == f"volume group {vg} not made yet: set-up makes it from {Path(blank).name}"
        assert found.ok and "refused: carries ext4 signature(s)" in found.detail
        off, _ = await check("lvm")
        assert not off.ok and "set setup = true" in off.fix and "1 blank disk(s)" in off.detail
        rules["names"] = [Path(ext4).name]
        nothing, found = await check("lvm", setup=True)
        assert not nothing.ok and not found.ok and "no disk the rules match is blank" in nothing.fix
        assert {d: digest(d) for d in (blank, ext4)} == before


@needs_loop_devices
async def test_a_pool_with_no_matching_disk_is_down_and_comes_up_when_one_appears() -> None:
    async with growable_disk(8 * MiB) as (late, grow):
        backend = pool("later", [late], Claims(), rules={"min_size": "48Mi"}, setup=True)
        manager = VolumeManager({("partition", "later"): backend}, {})
        await manager.open()
        state = manager.pool_states()[("partition", "later")]
        assert not state.up and state.reason is not None and "no disk yet: no disk matches the rules" in state.reason
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(manager.retry_unavailable, 0.1)
            grow(64 * MiB)
            with anyio.fail_after(60):
                while not manager.pool_states()[("partition", "later")].up:
                    await anyio.sleep(0.05)
            tasks.cancel_scope.cancel()
        assert (await manager.capacity("partition", "later")).available_bytes > 48 * MiB
        await manager.aclose()
