"""SIGKILL crash loop through laid-out, cached volumes on real LVM in the UML sandbox (`nox -s layout-crash`, not CI).

A `localdisk serve` with an lvm pool on the sandbox's VG of tagged PVs (`--vg ldtest-raid:128Mx3@hdd,64M@ssd`) gets
creates, expansions and deletes of raid1 volumes with an SSD cache (writethrough, writeback or writecache, chosen per
volume), and is killed during them: in lvcreate of the mirror, while zeroing, between making the cache LV and attaching
it, during the detach, extend and re-attach of an expansion, during the uncache and lvremove of a delete. Each step can
be repeated (lvmcache.py), so a retried call converges; what a retry cannot see (an expansion cut after the growth: its
retry finds the size reached) the next start mends (the cache is attached again). The end checks (crashloop.py) use
`lvs`: exactly one LV per acknowledged volume, none pending, and no other LV of ours (a cache LV left unattached would
show there as a leak); on a failure they print `lvs -a` with segment types and tags.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.lvm.conftest import reset_vg
from tests.lvm.test_layout import RAID_SANDBOX_ARGS, RAID_VG
from tests.reliability.crashloop import CrashLoop, Server, Settings, Supervisor, run_together
from tests.reliability.test_crash import check
from tests.reliability.views import LvmView

pytestmark = [pytest.mark.uml, pytest.mark.anyio]
KILLS = int(os.environ.get("LOCALDISK_LAYOUT_KILLS", "50"))
SECONDS = float(os.environ.get("LOCALDISK_LAYOUT_SECONDS", "3000"))
PARAMETERS = {"backend": "lvm", "pool": "dense", "mirrors": "2", "cacheSize": "8Mi"}
CACHES = ({"cache": "writethrough"}, {"cache": "writeback"}, {"cache": "writecache"})  # each volume one, by name


async def all_lvs() -> str:
    """Every LV of the VG, hidden ones too, with what tells a half-made cache or mirror: for a failure's message."""
    fields = "lv_name,lv_attr,segtype,lv_size,pool_lv,lv_tags,devices"
    result = await CommandRunner().run(["lvs", "-a", "-o", fields, "--", RAID_VG], check=False)
    return f"lvs -a -o {fields}:\n{result.text}{result.error_text}"


@pytest.mark.slow
@pytest.mark.timeout(3300)
async def test_mirrored_cached_volumes_survive_sigkill(tmp_path: Path) -> None:
    if f"{RAID_VG}:" not in os.environ.get("LOCALDISK_SANDBOX_VGS", ""):
        pytest.skip(f"the sandbox was started without VG {RAID_VG}: pass {' '.join(RAID_SANDBOX_ARGS)}")
    seed = int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))
    lvm = Lvm(CommandRunner())
    await reset_vg(lvm, RAID_VG)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nkubelet_dir = "{tmp_path}/kubelet"\n\n[pools.lvm.dense]\nvolume_group = "{RAID_VG}"\n'
        'pv_tags = ["hdd"]\ncache_pv_tags = ["ssd"]\n'
    )
    supervisor = Supervisor(Server(config, tmp_path, fork=True), seed, startup_kill_probability=0.1)
    settings = Settings(
        kills=KILLS,
        max_seconds=SECONDS,
        seed=seed,
        kill_probability=0.9,
        first_guess_seconds=4.0,
        sizes=(8 * MiB, 12 * MiB + 12345),
        growth=(4 * MiB, 8 * MiB - 4096),
        max_live=5,  # 5 caches of 8 MiB on the 60 MiB SSD, 5 mirrors of up to ~28 MiB twice on 3 x 124 MiB
        parameters=PARAMETERS,
        variants=CACHES,
        id_prefix="lvm:dense:",  # the loop is named lvm-layout; its IDs are those of lvm pool dense
    )
    try:
        [report] = await run_together([CrashLoop("lvm-layout", supervisor, LvmView(RAID_VG), settings)])
        print(f"{report.summary()}, seed {seed}")
        if report.lost or report.leaked or report.problems:
            print(await all_lvs())
        check(report, KILLS, seed)
        leftovers = [lv for lv in (await lvm.report(RAID_VG)).lvs if lv.startswith("ldc-")]
        assert not leftovers, f"cache LVs left unattached: {leftovers}\n{await all_lvs()}"
    finally:
        await reset_vg(lvm, RAID_VG)
