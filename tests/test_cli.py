"""The `localdisk` CLI, driven through typer's test runner (library commands) and against a live server (csi)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localdisk import VolumeManager, development_default
from localdisk.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def manager() -> VolumeManager:
    return VolumeManager.from_config(development_default())


def cli(manager: VolumeManager, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), obj=manager)
    return result.exit_code, result.stdout, result.stderr


def test_version_and_fast_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("localdisk ")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "localdisk.cli", "--help"], capture_output=True, text=True, check=True, timeout=30
    )
    assert "volume" in done.stdout
    assert time.monotonic() - start < 3
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, localdisk.cli; print(sorted(m for m in sys.modules if m in "
            "('pydantic', 'grpclib', 'kubernetes_asyncio', 'prometheus_client', 'localdisk.manager')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert heavy.stdout.strip() == "[]", "the CLI entry point must import heavy modules lazily"


def test_volume_lifecycle_tables_and_json(manager: VolumeManager) -> None:
    code, out, _ = cli(manager, "volume", "create", "pvc-cli", "--size", "64Mi", "--json")
    assert code == 0
    created = json.loads(out)
    assert created["size_bytes"] == 64 * 1024 * 1024
    volume_id = created["id"]
    assert volume_id.startswith("fake:default:")

    code, out, _ = cli(manager, "volume", "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["ID", "NAME", "SIZE", "DEVICE", "CONDITION"]
    assert volume_id in out
    assert "64 MiB" in out

    code, out, _ = cli(manager, "volume", "expand", volume_id, "128Mi")
    assert (code, out.strip()) == (0, f"{volume_id} is 128 MiB")
    code, out, _ = cli(manager, "volume", "show", volume_id, "--json")
    assert json.loads(out)["size_bytes"] == 128 * 1024 * 1024

    code, out, _ = cli(manager, "snapshot", "create", volume_id, "snap-cli")
    assert code == 0
    snapshot_id = out.split()[1]
    code, out, _ = cli(manager, "snapshot", "list", "--json")
    assert [s["id"] for s in json.loads(out)] == [snapshot_id]
    assert cli(manager, "snapshot", "delete", snapshot_id)[0] == 0

    code, out, _ = cli(manager, "capacity", "--json")
    pools = json.loads(out)
    assert pools[0]["backend"] == "fake"
    assert pools[0]["available_bytes"] == 100 * 1024**3 - 128 * 1024 * 1024

    assert cli(manager, "volume", "delete", volume_id)[0] == 0
    assert cli(manager, "volume", "list")[1].strip() == "no volumes"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("volume", "show", "fake:default:nothing"), 3, "not found"),
        (("volume", "show", "garbage"), 3, "not a localdisk volume id"),
        (("volume", "create", "x", "--size", "lots"), 2, "size 'lots' is not a number"),
        (("volume", "create", "x", "--size", "5Qi"), 2, "not understood"),
        (("volume", "create", "x", "--size", "1Ti", "--backend", "fake"), 5, "bytes free"),
        (("volume", "create", "x", "--backend", "lvm"), 2, "not configured"),
        (("snapshot", "create", "fake:default:nothing", "s"), 3, "not found"),
    ],
)
def test_errors_are_one_line_with_stable_exit_codes(
    manager: VolumeManager, args: tuple[str, ...], code: int, words: str
) -> None:
    got, out, err = cli(manager, *args)
    assert got == code
    assert words in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")
    assert "Traceback" not in out + err


def test_already_exists_exit_code(manager: VolumeManager) -> None:
    assert cli(manager, "volume", "create", "dup", "--size", "1Mi")[0] == 0
    code, _, err = cli(manager, "volume", "create", "dup", "--size", "2Mi")
    assert code == 4
    assert "already exists" in err


def test_doctor_reports_each_check() -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert {"device-mapper", "lvm2", "parted", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs", "cgroup"} <= set(checks)
    assert checks["mkfs.ext4"]["ok"] is True
    failed_required = [c for c in checks.values() if c["required"] and not c["ok"]]
    assert result.exit_code == (1 if failed_required else 0)
    for check in failed_required:
        assert check["fix"]


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[str]:
    sock = tmp_path / "csi.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "localdisk.cli", "serve", "--endpoint", f"unix://{sock}", "--node-id", "cli-node"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, f"localdisk serve exited with {proc.returncode} before listening"
            assert time.monotonic() < deadline, "localdisk serve did not create its socket within 30 s"
            time.sleep(0.05)
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_csi_commands_against_a_running_server(live_server: str) -> None:
    def csi(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(app, ["csi", *args, "--endpoint", live_server])
        return result.exit_code, result.stdout, result.stderr

    assert csi("probe")[:2] == (0, "ready\n")
    code, out, _ = csi("info", "--json")
    assert json.loads(out) == {
        "name": "localdisk.csi.io",
        "node_id": "cli-node",
        "topology": {"topology.localdisk.io/node": "cli-node"},
        "version": json.loads(out)["version"],
    }
    assert "CREATE_DELETE_VOLUME" in csi("capabilities")[1]
    code, out, _ = csi("create", "pvc-csi-cli", "--size", "32Mi")
    assert code == 0
    volume_id = out.split()[1]
    assert volume_id in csi("list")[1]
    assert csi("expand", volume_id, "64Mi")[1].strip() == f"{volume_id} is 64 MiB"
    assert "available 99.9 GiB" in csi("capacity", "--backend", "fake")[1]
    code, _, err = csi("create", "", "--size", "1Mi")
    assert code == 2
    assert err.startswith("error: INVALID_ARGUMENT: name is required")
    assert csi("delete", volume_id)[0] == 0
    assert csi("list")[1].strip() == "no volumes"


def test_csi_commands_without_a_server_fail_clearly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["csi", "probe", "--endpoint", f"unix://{tmp_path}/none.sock"])
    assert result.exit_code == 7
    assert "cannot reach the CSI server" in result.stderr
