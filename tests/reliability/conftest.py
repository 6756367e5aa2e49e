"""Prints the reliability numbers (`tally.TALLY`) in pytest's terminal summary, visible in `nox -s tests` output."""

from __future__ import annotations

import pytest

from tests.reliability.tally import TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.empty():
        return
    terminalreporter.section("localdisk reliability")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
