"""Prints the reliability numbers (`tally.TALLY`) in pytest's terminal summary, visible in `nox -s tests` output
(and in `nox -s e2e` output for the LVM parts, which run inside the UML sandbox)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.lvm.conftest import LINEAR_VG, SANDBOX_ARGS, THIN_VG, in_sandbox
from tests.reliability.tally import TALLY


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`uml` tests run inside the sandbox that `nox -s e2e` starts, with the VGs of tests/lvm; skipped elsewhere."""
    if item.get_closest_marker("uml") is None:
        return
    if not in_sandbox():
        pytest.skip("needs real LVM (device-mapper): runs inside the UML sandbox, `nox -s e2e`")
    made = os.environ.get("LOCALDISK_SANDBOX_VGS", "")
    for vg in (LINEAR_VG, THIN_VG):
        if f"{vg}:" not in made:
            pytest.skip(f"the sandbox was started without VG {vg}: pass {' '.join(SANDBOX_ARGS)}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    controller_hostile = sys.modules.get("tests.test_hostile")  # the controller RPCs on the fake backend
    tried = getattr(controller_hostile, "TRIED", {}).get("inputs", 0)
    if tried:
        TALLY.hostile["controller rpcs, fake backend (tests/test_hostile.py)"] = tried
    if TALLY.empty():
        return
    terminalreporter.section("localdisk reliability")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
