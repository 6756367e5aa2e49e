"""Prints the reliability numbers (`tally.TALLY`) in pytest's terminal summary, visible in `nox -s tests` output."""

from __future__ import annotations

import sys

import pytest

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
