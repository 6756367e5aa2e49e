"""Prints the reliability numbers (`tally.TALLY`) in pytest's terminal summary, visible in `nox -s tests` output
(and in `nox -s e2e` output for the LVM parts, which run inside the UML sandbox)."""

from __future__ import annotations

import sys

import pytest

# The same rule as tests/lvm: `uml` tests run inside the sandbox `nox -s e2e` starts, with its VGs; skipped elsewhere.
from tests.lvm.conftest import pytest_runtest_setup  # noqa: F401 - re-exported so pytest runs it here too
from tests.reliability.tally import TALLY


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
