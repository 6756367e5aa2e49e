"""The README's main job, `localdisk demo`, runs end to end and its summary says every backend worked.

It needs root (loop devices, mounts) and User-Mode Linux for the LVM part; without them it skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_tells_the_whole_story() -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo needs root for loop devices and mounts")
    if not shutil.which("linux.uml"):
        pytest.skip("the demo's LVM part needs user-mode-linux (apt-get install user-mode-linux)")
    done = subprocess.run(
        [sys.executable, "-m", "localdisk.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    summary = out[out.index("== summary") :].splitlines()
    rows = {line.split()[0]: line for line in summary[2:5]}
    assert set(rows) == {"partition", "lvm", "thin"}, summary
    for backend, row in rows.items():
        assert row.rstrip().endswith("ok"), row
        assert " yes " in row, f"{backend}: data kept and space given back"
    assert "data matches" in rows["thin"]
    assert "3 backend(s)" in out
    assert "all good" in out
    assert "wrote" in out
    assert "data intact" in out
