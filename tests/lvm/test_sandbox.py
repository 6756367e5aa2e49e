"""The sandbox itself, on the host: what it refuses before booting, and that a boot carries a command's status and
output back and leaves nothing behind (no run directory, no UML process, nothing in the host's /etc/lvm), also when
the command outlives its timeout; and that in the guest `localdisk doctor` finds device-mapper answering (the host's
kernel may have none).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from localdisk.errors import FailedPrecondition, InvalidArgument
from localdisk.sandbox import ThinPoolRequest, VolumeGroupRequest, check_requirements, parse_size, run_sandbox
from tests.lvm.conftest import in_sandbox

needs_uml = pytest.mark.skipif(
    shutil.which("linux.uml") is None or in_sandbox(), reason="needs the user-mode-linux package, on the host"
)


def test_missing_packages_are_named(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as missing:
        check_requirements(path=str(tmp_path))
    message = missing.value.message
    for package in ("user-mode-linux", "lvm2", "thin-provisioning-tools", "udev"):
        assert package in message
    assert "apt-get install" in message


@pytest.mark.parametrize(
    ("text", "size"), [("512M", 512 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), ("4096", 4096), ("2t", 2 << 40)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "1Q", "-1G", "1.5G", "1 G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_requests_are_parsed_and_checked() -> None:
    assert VolumeGroupRequest.parse("vg0:1G") == VolumeGroupRequest("vg0", 1 << 30)
    assert ThinPoolRequest.parse("vg0/pool:256M") == ThinPoolRequest("vg0", "pool", 256 << 20)
    assert ThinPoolRequest.parse("vg0/pool:1G:64M") == ThinPoolRequest("vg0", "pool", 1 << 30, 64 << 20)
    for bad in ("vg0", "-vg:1G", "a b:1G", "vg:"):
        with pytest.raises(InvalidArgument):
            VolumeGroupRequest.parse(bad)
    for bad in ("vg0:1G", "vg0/:1G", "vg0/-p:1G", "vg0/pool:1G:lots", "vg0/pool:1G:64M:1"):
        with pytest.raises(InvalidArgument):
            ThinPoolRequest.parse(bad)


@pytest.mark.anyio
async def test_refused_before_booting() -> None:
    with pytest.raises(InvalidArgument, match="after --"):
        await run_sandbox([])
    with pytest.raises(InvalidArgument, match="--vg other:SIZE"):
        await run_sandbox(["true"], thin=[ThinPoolRequest("other", "pool", 1 << 30)])
    with pytest.raises(InvalidArgument, match="unique"):
        await run_sandbox(["true"], vgs=[VolumeGroupRequest("a", 1 << 30)] * 2)


def _sandbox(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`localdisk sandbox run` as a user runs it, with its run directory under tmp_path so leftovers are visible."""
    env = os.environ | {"TMPDIR": str(tmp_path)}
    argv = [sys.executable, "-m", "localdisk.cli", "sandbox", "run", *args]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)


def _left_behind(tmp_path: Path) -> list[str]:
    leftovers = [str(p) for p in tmp_path.glob("localdisk-sandbox-*")]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and str(tmp_path).encode() in cmdline:
            leftovers.append(f"process {proc.name}: {cmdline[:120]!r}")
    return leftovers


def _etc_lvm() -> list[str]:
    return sorted(str(p) for p in Path("/etc/lvm").rglob("*"))


@needs_uml
def test_run_carries_status_and_output_and_cleans_up(tmp_path: Path) -> None:
    etc_lvm = _etc_lvm()
    doctor = f"{shlex.quote(sys.executable)} -m localdisk.cli doctor --json > doctor.json"  # written to tmp_path
    script = (
        f"lvm vgs --noheadings -o vg_name,vg_size --units m; echo sandbox=$LOCALDISK_SANDBOX; pwd; {doctor}; exit 7"
    )
    done = _sandbox(tmp_path, "--vg", "ldsandbox:64M", "--", "sh", "-c", script)
    assert done.returncode == 7, done.stderr
    assert "ldsandbox" in done.stdout and "sandbox=1" in done.stdout and str(tmp_path) in done.stdout
    [device_mapper] = [c for c in json.loads((tmp_path / "doctor.json").read_text()) if c["name"] == "device-mapper"]
    assert device_mapper["ok"] and device_mapper["detail"].startswith("kernel driver 4."), "the guest's driver answers"
    assert "booted in" in done.stderr and "command exited 7" in done.stderr
    assert _left_behind(tmp_path) == []
    assert _etc_lvm() == etc_lvm


@needs_uml
def test_timeout_kills_the_guest(tmp_path: Path) -> None:
    done = _sandbox(tmp_path, "--timeout", "25", "--", "sh", "-c", "echo started; sleep 600")
    assert done.returncode == 2
    assert "did not finish within 25s" in done.stderr
    assert _left_behind(tmp_path) == []


@needs_uml
def test_sigterm_kills_the_guest(tmp_path: Path) -> None:
    """A sandbox run that is terminated (a cancelled CI job) must not leave its UML processes running."""
    env = os.environ | {"TMPDIR": str(tmp_path)}
    argv = [sys.executable, "-m", "localdisk.cli", "sandbox", "run", "--", "sh", "-c", "echo started; sleep 600"]
    run = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        assert run.stdout.readline().strip() == "started"  # the guest is up and running the command
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 2, stderr
    assert "stopped by SIGTERM" in stderr
    assert _left_behind(tmp_path) == []
