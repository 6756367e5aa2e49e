"""The one way localdisk runs an external command.

Every call to lvm, parted, mkfs, mount, blkid and friends goes through `CommandRunner.run`: an argument list (never
a shell), `LC_ALL=C` so messages can be classified, a timeout, the child killed when the caller is cancelled, and
on failure a `CommandFailed` that keeps argv, exit code and stderr. Observers see every command's duration, which is
where metrics and logs hook in without the backends knowing about them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio

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
                done = await anyio.run_process(
                    args,
                    input=input,
                    stdin=None if input is not None else subprocess.DEVNULL,  # never wait on a prompt
                    check=False,
                    env={**self._env, **(env or {})},
                    pass_fds=pass_fds,
                )
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
