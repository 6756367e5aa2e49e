"""Test hygiene shared by every suite: anyio on asyncio, and a failure when a test leaks asyncio tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
async def no_leaked_tasks(anyio_backend: str) -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [
        t
        for t in asyncio.all_tasks() - before
        if not t.done() and t is not asyncio.current_task() and not _is_runner(t)
    ]
    if leaked:
        pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {[t.get_coro() for t in leaked]}")


def _is_runner(task: asyncio.Task[object]) -> bool:
    """anyio's pytest plugin runs tests and fixtures from long-lived tasks of its own."""
    coro = task.get_coro()
    module = getattr(getattr(coro, "cr_code", None), "co_filename", "")
    return "anyio" in module


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """csi-sanity's counts per backend (`tests/sanity.py`), when this run had any."""
    from tests import sanity

    if sanity.RESULTS:
        terminalreporter.section("csi-sanity")
        for line in sanity.summary_lines(sanity.RESULTS):
            terminalreporter.write_line(line)
