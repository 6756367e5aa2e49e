"""The command runner: argument lists, C locale, errors that keep exit code and stderr, kills on timeout."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from localdisk.errors import CommandFailed, CommandTimeout, InvalidArgument
from localdisk.runner import CommandRunner

pytestmark = pytest.mark.anyio


async def test_success_output_and_locale() -> None:
    result = await CommandRunner().run(["sh", "-c", 'echo "$LC_ALL"; echo err >&2'])
    assert result.text == "C\n"
    assert result.error_text == "err\n"
    assert result.returncode == 0


async def test_failure_keeps_exit_code_and_stderr() -> None:
    with pytest.raises(CommandFailed) as info:
        await CommandRunner().run(["sh", "-c", "echo 'Volume group \"vg0\" not found' >&2; exit 5"])
    assert info.value.returncode == 5
    assert "not found" in info.value.stderr
    assert "exit 5" in info.value.message
    unchecked = await CommandRunner().run(["false"], check=False)
    assert unchecked.returncode == 1


async def test_arguments_are_not_interpreted_by_a_shell() -> None:
    result = await CommandRunner().run(["echo", "$(id)", ";", "`reboot`", "|", "x"])
    assert result.text == "$(id) ; `reboot` | x\n"


async def test_refuses_nul_and_empty_argv() -> None:
    with pytest.raises(InvalidArgument):
        await CommandRunner().run(["echo", "a\0b"])
    with pytest.raises(InvalidArgument):
        await CommandRunner().run([])


async def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(CommandFailed, match="not installed"):
        await CommandRunner().run(["localdisk-no-such-tool"])


async def test_timeout_kills_the_child() -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout, match="timed out"):
        await CommandRunner().run(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - start < 5


async def test_cancellation_kills_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    with anyio.move_on_after(0.3):
        await CommandRunner().run(["sh", "-c", f"sleep 1; touch {marker}"])
    await anyio.sleep(1.2)
    assert not marker.exists()


async def test_observers_see_every_command() -> None:
    seen: list[tuple[Sequence[str], bool]] = []
    runner = CommandRunner(observers=[lambda argv, duration, ok: seen.append((argv, ok))])
    await runner.run(["true"])
    await runner.run(["false"], check=False)
    assert seen == [(["true"], True), (["false"], False)]


async def test_a_child_cancelled_twice_natively_is_gone_before_the_call_ends(tmp_path: Path) -> None:
    """grpclib cancels a handler's task natively twice (at its deadline, then at the client's reset). The second
    cancellation must not cut short the wait for the killed child: the call ends only once the child is gone, so a
    caller's lock is never released while a command it started (an sfdisk writing a table) may still write."""
    import asyncio
    import os

    pidfile = tmp_path / "pid"

    async def call() -> None:
        await CommandRunner().run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"])

    task = asyncio.ensure_future(call())
    with anyio.fail_after(10):
        while not pidfile.exists() or not pidfile.read_text().strip():
            await anyio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    await asyncio.sleep(0)  # the first cancellation reaches the call: it kills the child and waits
    task.cancel()
    with anyio.fail_after(10), pytest.raises(asyncio.CancelledError):  # killed, not left to run its 30 s
        await task
    with pytest.raises(ProcessLookupError):  # not running, and not a zombie left to reap either
        os.kill(pid, 0)
