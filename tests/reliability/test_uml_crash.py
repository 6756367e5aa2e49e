"""SIGKILL crash loops for `lvm` and `thin` together, on real LVM inside the UML sandbox (`nox -s e2e`).

One `localdisk serve` serves both pools, and one client loop per backend works on it at the same time, so each
kill interrupts the call in flight of both: under UML a server restart costs seconds, and this halves the restarts
that 100 kills per backend need. Servers are forked from a zygote that imported localdisk once (see `zygote.py`).
Measured on this 2-core host with a second UML guest running: 103 kills (lvm) and 104 (thin) during RPCs plus 16
during start-up took 984 s, median server start 5.8 s; the time limit is generous so that 100 kills finish under
more load too.

Why a cut operation converges (lvm.py): an LV or thin snapshot is created with its identity tags (and, for a thick
LV that still has to be zeroed or a restored volume that still has to grow, the pending tag) in one lvcreate, so a
kill leaves no LV or a tagged one, never an untagged LV nobody can see. A pending LV is not found by name, and the
retried create finishes it (zero, grow, drop the tag: each step can be repeated). lvextend and lvremove are single
metadata commits. An LV committed but not activated is activated by the restart's `open`. The end checks use
`lvs`: exactly one tagged LV per acknowledged volume or snapshot, none pending, nothing else of ours.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.reliability.tally import TALLY
from tests.reliability.test_crash import check, record
from tests.reliability.uml import crash_loops

pytestmark = [pytest.mark.uml, pytest.mark.anyio]
KILLS = int(os.environ.get("LOCALDISK_CRASH_KILLS", "100"))


@pytest.mark.slow
@pytest.mark.timeout(3300)
async def test_lvm_and_thin_survive_sigkill(tmp_path: Path) -> None:
    seed = int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))
    reports = await crash_loops(tmp_path, KILLS, seed, seconds=3000)
    for report in reports:
        record(report, f"crash {report.backend} (UML)")
        print(report.summary())
    TALLY.startup_kills["thin"] = 0  # one server for both: count its start-up kills once, under lvm
    for report in reports:
        check(report, KILLS, seed)
