"""Fixtures for the LVM suites.

Tests marked `uml` need real LVM, which only the User-Mode Linux sandbox gives here; they skip elsewhere with the
command that runs them (`nox -s e2e`). The sandbox creates the volume groups named below; `SANDBOX_ARGS` is what
the e2e session passes to `localdisk sandbox run`. After every test the fixtures put the VGs back as the sandbox made
them (every LV removed but the thin pool), so tests are independent even when one fails half-way.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, ThinBackend, ThinPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner

LINEAR_VG = "ldtest-lin"
THIN_VG = "ldtest-thin"
THIN_POOL = "pool"
SANDBOX_ARGS = ["--vg", f"{LINEAR_VG}:512M", "--vg", f"{THIN_VG}:768M", "--thin", f"{THIN_VG}/{THIN_POOL}:256M"]
DATA = Path(__file__).parent / "data"


def in_sandbox() -> bool:
    return os.environ.get("LOCALDISK_SANDBOX") == "1" and Path("/dev/mapper/control").exists()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("uml") is None:
        return
    if not in_sandbox():
        pytest.skip("needs real LVM (device-mapper): runs inside the UML sandbox, `nox -s e2e`")
    made = os.environ.get("LOCALDISK_SANDBOX_VGS", "")
    for vg in (LINEAR_VG, THIN_VG):
        if f"{vg}:" not in made:
            pytest.skip(f"the sandbox was started without VG {vg}: pass {' '.join(SANDBOX_ARGS)}")


COMMAND_SECONDS: dict[str, list[float]] = {}


def _observe(argv: Sequence[str], seconds: float, ok: bool) -> None:
    key = " ".join(argv[:2]) if argv[0] == "lvm" else argv[0]
    COMMAND_SECONDS.setdefault(key, []).append(seconds)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Where the time of the LVM suites goes: the commands they ran, by count and total seconds."""
    if not COMMAND_SECONDS:
        return
    terminalreporter.section("external commands (count, total s, mean s)")
    for key, times in sorted(COMMAND_SECONDS.items(), key=lambda kv: -sum(kv[1])):
        terminalreporter.write_line(f"{key:24s} {len(times):5d} {sum(times):8.1f} {sum(times) / len(times):6.2f}")


@pytest.fixture
def runner() -> CommandRunner:
    return CommandRunner(observers=[_observe])


@pytest.fixture
def lvm(runner: CommandRunner) -> Lvm:
    return Lvm(runner)


async def reset_vg(lvm: Lvm, vg: str, keep: frozenset[str] = frozenset()) -> None:
    """Remove every visible LV of `vg` but those in `keep`: thin LVs first, then the rest (extra pools too)."""
    report = await lvm.report(vg)
    doomed = [lv for lv in report.lvs.values() if not lv.hidden and lv.name not in keep]
    for lv in sorted(doomed, key=lambda lv: not lv.pool):
        await lvm.remove(vg, lv.name)


@pytest.fixture
async def clean_linear(lvm: Lvm) -> AsyncIterator[None]:
    yield
    await reset_vg(lvm, LINEAR_VG)


@pytest.fixture
async def clean_thin(lvm: Lvm) -> AsyncIterator[None]:
    yield
    await reset_vg(lvm, THIN_VG, keep=frozenset({THIN_POOL}))


@pytest.fixture
async def linear(runner: CommandRunner, lvm: Lvm, clean_linear: None) -> AsyncIterator[LinearBackend]:
    backend = LinearBackend("fast", LinearPoolConfig(volume_group=LINEAR_VG), lvm, runner)
    await backend.open()
    yield backend
    await backend.aclose()


def thin_backend(
    runner: CommandRunner, lvm: Lvm, *, pool: str = THIN_POOL, ratio: float = 1.0, threshold: float = 90.0
) -> ThinBackend:
    config = ThinPoolConfig(
        volume_group=THIN_VG, thin_pool=pool, overprovision_ratio=ratio, threshold_percent=threshold
    )
    return ThinBackend("tp", config, lvm, runner)


@pytest.fixture
async def thin(runner: CommandRunner, lvm: Lvm, clean_thin: None) -> AsyncIterator[ThinBackend]:
    """Overprovision ratio 1: the ratio, not the real free space, bounds capacity, as the contract expects."""
    backend = thin_backend(runner, lvm)
    await backend.open()
    yield backend
    await backend.aclose()
