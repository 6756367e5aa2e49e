"""Re-record the real LVM output the parser tests read (tests/lvm/data), from inside the sandbox:

    localdisk sandbox run --vg ldrec:512M --vg ldrec2:256M --thin ldrec/pool:128M -- python -m tests.lvm.record

Each sample is what LVM 2.03 printed for a situation the backends meet: reports of linear, thin, snapshot, inactive
and empty volume groups, and the stderr of each failure the classifiers must recognise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from localdisk.backends.lvmcmd import FULLREPORT_ARGS, Lvm
from localdisk.errors import LocalDiskError
from localdisk.runner import CommandRunner

DATA = Path(__file__).parent / "data"
VG, EMPTY_VG = "ldrec", "ldrec2"


async def record() -> None:
    runner = CommandRunner()
    lvm = Lvm(runner)

    async def report(name: str, vg: str = VG) -> None:
        result = await runner.run(["lvm", *FULLREPORT_ARGS, "--", vg])
        (DATA / f"fullreport-{name}.json").write_text(result.text)

    async def failure(name: str, argv: list[str]) -> None:
        result = await runner.run(argv, check=False)
        assert result.returncode != 0, argv
        (DATA / f"stderr-{name}.txt").write_text(result.error_text)

    await report("empty", EMPTY_VG)
    owned = ["localdisk.csi.io/owned", "localdisk.csi.io/kind=volume", "localdisk.csi.io/name.0=MFRGG"]
    await lvm.create_linear(VG, "lin1", 8 << 20, owned, wipe=True)
    await lvm.create_linear(VG, "foreign", 8 << 20, ["someone.else"], wipe=True)
    await lvm.create_thin(VG, "pool", "thin1", 1 << 30, owned)
    await lvm.create_thin_snapshot(VG, "thin1", "snap1", ["localdisk.csi.io/kind=snapshot"], activate=False)
    await lvm.create_thin_snapshot(VG, "snap1", "clone1", ["localdisk.csi.io/kind=volume"], activate=True)
    await lvm.create_thin_pool(VG, "nozero", 16 << 20, zero=False)
    await runner.run(["dd", "if=/dev/urandom", f"of=/dev/{VG}/thin1", "bs=1M", "count=24", "oflag=direct"])
    await report("mixed")
    await failure("lv-exists", ["lvm", "lvcreate", "-y", "-L", "8m", "-n", "lin1", "--", VG])
    await failure("create-no-space", ["lvm", "lvcreate", "-y", "-L", "80g", "-n", "big", "--", VG])
    await failure("extend-no-space", ["lvm", "lvextend", "-L", "80g", "--", f"{VG}/lin1"])
    await failure("remove-not-found", ["lvm", "lvremove", "-y", "--", f"{VG}/nothere"])
    await failure("extend-not-found", ["lvm", "lvextend", "-L", "16m", "--", f"{VG}/nothere"])
    await failure("change-not-found", ["lvm", "lvchange", "--addtag", "x", "--", f"{VG}/nothere"])
    await failure("vg-not-found", ["lvm", *FULLREPORT_ARGS, "--", "nosuchvg"])
    await failure("pool-not-found", ["lvm", "lvcreate", "-y", "-V", "1g", "--thinpool", "nopool", "-n", "t", "--", VG])
    await failure("snapshot-origin-not-found", ["lvm", "lvcreate", "-y", "-s", "-n", "s", "--", f"{VG}/nothere"])
    with open(f"/dev/{VG}/lin1", "rb"):
        await failure("remove-in-use", ["lvm", "lvremove", "-y", "--", f"{VG}/lin1"])
    await failure("bad-name", ["lvm", "lvcreate", "-y", "-L", "8m", "-n", "bad name", "--", VG])
    await runner.run(["lvm", "vgchange", "-a", "n", "--", VG])
    await report("inactive")
    try:
        await lvm.activate_vg(VG)
    except LocalDiskError as exc:
        print(f"activate failed: {exc}", file=sys.stderr)
        raise


if __name__ == "__main__":
    if not os.environ.get("LOCALDISK_SANDBOX"):
        sys.exit("run this inside `localdisk sandbox run` (see the module docstring)")
    anyio.run(record)
    print(f"recorded into {DATA}")
