"""The library example runs against the fake backend, as a separate process, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_library_example_runs_on_the_fake_backend() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "library_use.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "capacity before: 100 GiB free"
    assert lines[1].startswith("created fake:default:")
    assert "expanded to 128 MiB" in lines
    assert any(line.startswith("snapshot fake:default:") for line in lines)
    assert lines[-1] == "deleted; capacity after: 100 GiB free"
