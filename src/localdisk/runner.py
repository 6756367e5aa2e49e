"""The one way localdisk runs an external command.

Every call to lvm, parted, mkfs, mount, blkid and friends goes through `CommandRunner.run`: an argument list (never
a shell), `LC_ALL=C` so messages can be classified, a timeout, the child killed when the caller is cancelled (and
waited for: see `_run_process`), and on failure a `CommandFailed` that keeps argv, exit code and stderr. Observers
see every command's duration, which is where metrics and logs hook in without the backends knowing about them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from localdisk.errors import CommandFailed, CommandTimeout, InvalidArgument

log = logging.getLogger(__name__)

Observer = Callable[[Sequence[str], float, bool], None]


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


class CommandRunner:
    """Runs external commands as argument lists, with a timeout and a fixed C locale."""

    def __init__(
        self,
        *,
        default_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.default_timeout = default_timeout
        self._env = {**os.environ, **(env or {}), "LC_ALL": "C", "LANG": "C"}
        self.observers: list[Observer] = list(observers)

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        input: bytes | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> CommandResult:
        args = [str(a) for a in argv]
        if not args or any("\0" in a for a in args):
            raise InvalidArgument("refusing to run a command with an empty argv or a NUL byte in an argument")
        start = time.monotonic()
        try:
            with anyio.fail_after(timeout or self.default_timeout):
                done = await _run_process(args, input, {**self._env, **(env or {})}, pass_fds)
        except TimeoutError as exc:
            self._observe(args, start, ok=False)
            limit = timeout or self.default_timeout
            raise CommandTimeout(args, None, "", f"{args[0]} timed out after {limit}s and was killed") from exc
        except FileNotFoundError as exc:
            self._observe(args, start, ok=False)
            raise CommandFailed(args, None, "", f"{args[0]} is not installed (not found on PATH)") from exc
        duration = self._observe(args, start, ok=done.returncode == 0)
        result = CommandResult(args, done.returncode, done.stdout or b"", done.stderr or b"", duration)
        log.debug("ran %s rc=%s in %.3fs", args, result.returncode, duration)
        if check and result.returncode != 0:
            raise CommandFailed(args, result.returncode, result.error_text)
        return result

    def _observe(self, args: list[str], start: float, *, ok: bool) -> float:
        duration = time.monotonic() - start
        for observe in self.observers:
            observe(args, duration, ok)
        return duration


REAP_LIMIT = 60.0  # seconds a killed child is waited for before the caller goes on without it (a disk hung in D state)


async def _run_process(
    args: list[str], input: bytes | None, env: Mapping[str, str], pass_fds: Sequence[int]
) -> subprocess.CompletedProcess[bytes]:
    """Run `args` to its end, feeding `input` (stdin is /dev/null without it: never wait on a prompt); its exit code
    and output. Cancelled, it kills the child and returns only once the child is gone.

    `anyio.run_process` kills and waits too, but its wait is shielded only against anyio's cancellation: a second
    native `Task.cancel()` (grpclib cancels a handler at its deadline and again at the client's reset) cuts the wait
    short. The caller then goes on (releases a disk's lock, say) while the killed child may still be inside its
    last write (an `sfdisk` finishing its table), and the next writer works from a table read too early."""
    process = await anyio.open_process(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        pass_fds=pass_fds,
    )
    output: list[bytes] = [b"", b""]

    async def drain(stream: anyio.abc.ByteReceiveStream | None, index: int) -> None:
        if stream is not None:
            async for chunk in stream:
                output[index] += chunk

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(drain, process.stdout, 0)
            tasks.start_soon(drain, process.stderr, 1)
            if process.stdin is not None and input is not None:
                async with process.stdin:
                    with contextlib.suppress(anyio.BrokenResourceError):  # it exited without reading it all
                        await process.stdin.send(input)
            await process.wait()
    finally:  # also when cancelled: the child is killed and gone before the call ends
        await _reap(process, args)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await stream.aclose()
    return subprocess.CompletedProcess(args, process.returncode or 0, output[0], output[1])


async def _reap(process: anyio.abc.Process, args: list[str]) -> None:
    """Kill `process` if it still runs and wait until it is gone, through any number of cancellations."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    deadline = time.monotonic() + REAP_LIMIT
    cancelled: BaseException | None = None
    while process.returncode is None and time.monotonic() < deadline:
        try:
            with anyio.CancelScope(shield=True):
                await process.wait()
        except anyio.get_cancelled_exc_class() as exc:  # cancelled natively again: keep waiting, then re-raise
            cancelled = exc
    if process.returncode is None:
        log.error("%s was killed but had not exited after %.0f s; going on without it", args[0], REAP_LIMIT)
    if cancelled is not None:
        raise cancelled
