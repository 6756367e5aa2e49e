"""Zero-touch LVM set-up under SIGKILL (issue 15, part 4): a process making a thin pool's VG from blank disks found by
rules is killed at random moments of its set-up, at least 50 times; every next start converges (one VG tagged as
localdisk's over both target disks, its thin pool made, nothing half-made left) and the foreign disks the same rules
match (an ext4 filesystem holding data, a VG someone else made) are never touched, checked byte for byte each round.

Rounds alternate between a set-up from a blank disk (pvcreate, vgcreate, thin pool creation) and the growth of the
VG just made by a second blank disk (pvcreate, vgextend, the thin pool's growth to its share of the VG). Runs in the
UML sandbox with four blank disks; `nox -s zerotouch-crash` (not CI):

    localdisk sandbox run --disk 256M --disk 128M --disk 192M --disk 64M -- \\
        python -m pytest -p no:cacheprovider -q -s tests/lvm/test_zerotouch_crash.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from localdisk.backends.lvmsetup import BUILDING_TAG, OURS_TAG, marked_for
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.lvm.test_zerotouch import Blank, blank_disks, digest

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(5400), pytest.mark.slow]
KILLS = int(os.environ.get("ZEROTOUCH_KILLS", "50"))
VG, POOL, FOREIGN_VG = "ldzt-crash", "tp", "theirs"
RUNNER = CommandRunner(default_timeout=180)
SETUP = """
import json, sys, anyio
from localdisk.backends.lvm import ThinBackend, ThinPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.backends.lvmsetup import RulesPool
from localdisk.discovery import Claims
from localdisk.runner import CommandRunner

runner = CommandRunner(default_timeout=180)
config = ThinPoolConfig.model_validate(
    {"volume_group": sys.argv[1], "thin_pool": sys.argv[2], "setup": True, "thin_percent": 80,
     "match": {"transport": "ubd", "names": sys.argv[3:]}}
)
backend = ThinBackend("crash", config, Lvm(runner), runner)
pool = RulesPool(backend, config, runner, thin_pool=sys.argv[2], claims=Claims())

async def main() -> None:
    print("opening", flush=True)
    await pool.open()
    print(json.dumps(pool.discovered), flush=True)
    await pool.aclose()

anyio.run(main)
"""


async def report(command: str, fields: str, *args: str) -> list[dict[str, Any]]:
    options = ["--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields]
    text = (await RUNNER.run(["lvm", command, *options, *args])).text
    key = {"pvs": "pv", "vgs": "vg", "lvs": "lv"}[command]
    return [row for entry in json.loads(text)["report"] for row in entry.get(key) or []]


def wipe_label(device: str) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(MiB), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


async def reset(targets: list[Blank]) -> None:
    """Back to blank targets."""
    if VG in {row["vg_name"] for row in await report("vgs", "vg_name")}:
        await RUNNER.run(["lvm", "vgremove", "-ff", "-y", "--", VG])
    for disk in targets:
        wipe_label(disk.device)
    await RUNNER.run(["udevadm", "settle", "--timeout=30"], check=False)


async def left_by_kill(targets: list[Blank]) -> str:
    pvs = {Path(row["pv_name"]).name: row for row in await report("pvs", "pv_name,vg_name,pv_uuid")}
    ours = [pvs[d.name] for d in targets if d.name in pvs]
    if not ours:
        return "no PV"
    vgs = {row["vg_name"]: row["vg_tags"] for row in await report("vgs", "vg_name,vg_tags")}
    if VG not in vgs:
        return f"{len(ours)} orphan PV(s), no VG"
    in_vg = sum(1 for row in ours if row["vg_name"] == VG)
    if BUILDING_TAG in vgs[VG]:
        lvs = [row["lv_name"] for row in await report("lvs", "lv_name", "--", VG)]
        return f"VG building ({in_vg} PV), LVs {sorted(lvs)}"
    return f"VG made, {in_vg} of {len(targets)} PVs in it"


async def converged(targets: list[Blank]) -> None:
    pvs = {Path(row["pv_name"]).name: row for row in await report("pvs", "pv_name,vg_name,pv_uuid")}
    assert all(pvs[d.name]["vg_name"] == VG and marked_for(pvs[d.name]["pv_uuid"], VG) for d in targets), pvs
    tags = {row["vg_name"]: set(row["vg_tags"].split(",")) for row in await report("vgs", "vg_name,vg_tags")}
    assert OURS_TAG in tags[VG] and BUILDING_TAG not in tags[VG], tags
    lvs = {row["lv_name"]: row["lv_attr"] for row in await report("lvs", "lv_name,lv_attr", "--", VG)}
    assert list(lvs) == [POOL] and lvs[POOL].startswith("t"), lvs  # the thin pool, and nothing half-made


def start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SETUP, *argv], stdout=subprocess.PIPE, text=True, start_new_session=True
    )


async def test_zero_touch_setup_converges_through_sigkills() -> None:
    disks = blank_disks()
    if len(disks) < 4 or os.environ.get("LOCALDISK_SANDBOX") != "1":
        pytest.skip("runs in the UML sandbox with four blank disks: nox -s zerotouch-crash")
    target_a, ext4_data, target_b, foreign_pv = disks[:4]
    targets = [target_a, target_b]
    await RUNNER.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", ext4_data.device])
    await RUNNER.run(["lvm", "vgcreate", "-y", "--", FOREIGN_VG, foreign_pv.device])
    await RUNNER.run(["lvm", "vgchange", "-a", "n", "--", FOREIGN_VG])
    foreign = {d.device: digest(d.device) for d in (ext4_data, foreign_pv)}
    outcomes: Counter[str] = Counter()
    windows = {False: 0.0, True: 0.0}  # how long an uncut set-up takes: from blank, growing a made VG
    touched = 0
    started = time.monotonic()
    for round_ in range(KILLS):
        grow = round_ % 2 == 1  # odd rounds grow the VG the even round before made on the first target
        if not grow:
            await reset(targets)
        mine = targets if grow else targets[:1]
        argv = [VG, POOL, *(d.name for d in (*mine, ext4_data, foreign_pv))]
        victim = start(argv)
        try:
            assert victim.stdout is not None
            assert victim.stdout.readline().strip() == "opening"
            await anyio.sleep(random.uniform(0, windows[grow] or 20.0))
            os.killpg(victim.pid, signal.SIGKILL)
        finally:
            victim.wait(timeout=60)
        outcome = ("grow: " if grow else "from blank: ") + await left_by_kill(mine)
        outcomes[outcome] += 1
        finisher = start(argv)
        assert finisher.stdout is not None
        assert finisher.stdout.readline().strip() == "opening"
        began = time.monotonic()
        out, _ = finisher.communicate(timeout=600)
        windows[grow] = max(windows[grow], time.monotonic() - began)
        assert finisher.returncode == 0, (round_, out)
        verdicts = json.loads(out.splitlines()[-1])
        assert all(verdicts[d.name].startswith("used") for d in mine), (round_, verdicts)
        assert all(verdicts[d.name].startswith("refused") for d in (ext4_data, foreign_pv)), (round_, verdicts)
        await converged(mine)
        now = {d: digest(d) for d in foreign}
        touched += sum(1 for d in foreign if now[d] != foreign[d])
        assert now == foreign, f"round {round_}: a foreign disk changed"
        print(f"round {round_}: kill left {outcome}; converged in {time.monotonic() - began:.1f}s", flush=True)
    minutes = (time.monotonic() - started) / 60
    print(f"\nzerotouch-crash: {KILLS} kills, {KILLS} converged, {touched} foreign disks touched, {minutes:.1f} min")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:3d}  {outcome}")
