"""LVM commands through one long-lived `lvm` shell instead of one process per command.

Starting an `lvm` process costs more than many of the commands it runs (under User-Mode Linux ~0.2 s of a 0.3 s
`lvcreate`, and a report at 1,000 LVs is dominated by start-up and the device scan). `lvm` without arguments is a
shell that reads one command per line; lvmdbusd drives LVM this way. `ShellExecutor` does the same:

- The shell runs with `LVM_COMMAND_PROFILE=lvmdbusd` (the profile LVM ships for lvmdbusd: JSON reports, bytes
  without suffixes, and a command log) and `LVM_REPORT_FD` pointing at a pipe of ours. After every command LVM writes
  one JSON document to that pipe: the command's reports, if any, and a log whose `"log_type":"status"` entry of
  context `shell` carries the command's return code. That entry is how we know a command has finished.
- LVM's messages go into that log instead of stderr. After a failed command `lastlog` fetches them, and they are
  turned back into the text `lvm` would have printed, so the classifiers of `lvmcmd` work unchanged.
- One command at a time (a lock). A timeout or a cancellation kills the shell (it may be half-way through the
  command, and its output could no longer be matched to commands); the next command starts a new one.
- Anything the shell cannot carry safely runs as one process instead (`ProcessExecutor`): an argument the shell's
  line splitter would change (spaces, quotes, `#`), a missing profile, a shell that will not start or keeps dying.
  A read-only command the shell dies under is retried as a process; a changing one is not (it may have happened):
  it fails with `CommandFailed`, and the caller's idempotent retry sorts it out.

The shell process is started with `subprocess.Popen` rather than `CommandRunner.run`, which waits for a process to
exit: it is still an argument list (`["lvm"]`), never a shell, with the C locale. Every command it runs is reported
to the runner's observers like a process would be.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from localdisk.backends.lvmcmd import LvmExecutor, ProcessExecutor
from localdisk.errors import CommandFailed, CommandTimeout
from localdisk.runner import CommandResult, CommandRunner

log = logging.getLogger(__name__)

PROFILE = "lvmdbusd"
SAFE_ARG = re.compile(r"[A-Za-z0-9_+.,:=/%@-]+")  # survives the shell's splitter (no blanks, quotes, '#', '!')
MAX_ARGS = 60  # the shell splits a line into at most 64 words
READ_ONLY = frozenset({"fullreport", "lvs", "vgs", "pvs", "version"})
SUCCESS = 1  # LVM's ECMD_PROCESSED; other return codes are also the process exit status
CHUNK = 1 << 16
STATUS_MARK = b'"log_type":"status"'


class ShellBroken(Exception):
    """The shell died or printed something that is not the protocol; the executor restarts or falls back."""


# -- framing (pure) ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """One command's JSON document from the report pipe."""

    raw: bytes
    document: Mapping[str, Any]

    @property
    def status(self) -> Mapping[str, Any]:
        entries = [e for e in self.document.get("log") or [] if isinstance(e, Mapping)]
        statuses = [e for e in entries if e.get("log_type") == "status" and e.get("log_context") == "shell"]
        if not statuses:
            raise ShellBroken(f"lvm shell printed a log without a shell status entry: {self.raw[:300]!r}")
        return statuses[-1]

    @property
    def returncode(self) -> int:
        """The exit status `lvm <command>` would have had."""
        try:
            code = int(str(self.status.get("log_ret_code")))
        except ValueError:
            raise ShellBroken(f"lvm shell status has no return code: {dict(self.status)}") from None
        return 0 if code == SUCCESS else code

    @property
    def has_report(self) -> bool:
        return "report" in self.document

    def messages(self) -> str:
        """The log's errors and warnings as `lvm` prints them on stderr (for a `lastlog` frame)."""
        lines = []
        for entry in self.document.get("log") or []:
            kind, message = entry.get("log_type"), str(entry.get("log_message", ""))
            if kind == "error":
                lines.append(f"  {message}")
            elif kind == "warn":
                lines.append(f"  WARNING: {message}")
        return "".join(line + "\n" for line in lines)


class Framer:
    """Cuts the report pipe's byte stream into one `Frame` per command.

    LVM prints each command's document pretty-printed, ending with a line `  }`. A document is complete when the
    buffer, stripped, ends with `}`, has seen a status entry and parses as JSON; the status entry comes last, so a
    report that merely ends a line with `}` is not mistaken for the end.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._seen_status = False

    def feed(self, data: bytes) -> Frame | None:
        search_from = max(len(self.buffer) - len(STATUS_MARK), 0)
        self.buffer += data
        if not self._seen_status:
            self._seen_status = self.buffer.find(STATUS_MARK, search_from) >= 0
        if not self._seen_status or not self.buffer.rstrip().endswith(b"}"):
            return None
        raw = bytes(self.buffer).strip()  # the newline after the last document may arrive with this one
        try:
            document = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            return None  # a status line was seen but the document is not closed yet
        if not isinstance(document, dict):
            raise ShellBroken(f"lvm shell printed a JSON value that is not an object: {raw[:200]!r}")
        self.buffer.clear()
        self._seen_status = False
        return Frame(raw, document)


def shell_line(args: Sequence[str]) -> str | None:
    """The shell input line for `args`, or None if the shell's splitter would not give back exactly these args."""
    if not args or len(args) > MAX_ARGS or not all(SAFE_ARG.fullmatch(a) for a in args):
        return None
    return " ".join(args) + "\n"


def profile_available(env: Mapping[str, str]) -> bool:
    """Whether LVM will find the lvmdbusd command profile (it ships with lvm2, under the LVM system directory)."""
    system_dir = Path(env.get("LVM_SYSTEM_DIR") or "/etc/lvm")
    return (system_dir / "profile" / f"{PROFILE}.profile").is_file()


# -- the shell process -------------------------------------------------------------------------------------------
class _Shell:
    def __init__(self, binary: str, env: Mapping[str, str]) -> None:
        report_read, report_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [binary],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(report_write,),
                env={**env, "LVM_REPORT_FD": str(report_write), "LVM_COMMAND_PROFILE": PROFILE},
                start_new_session=True,  # a signal to our process group (Ctrl-C) must not kill it mid-command
            )
        except BaseException:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)
        assert self.process.stdin and self.process.stdout and self.process.stderr
        self.stdin = self.process.stdin.fileno()
        self.stdout = self.process.stdout.fileno()
        self.stderr = self.process.stderr.fileno()
        self.report = report_read
        for fd in (self.stdout, self.stderr, self.report):
            os.set_blocking(fd, False)
        self.framer = Framer()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _drain(self, fd: int) -> bytes:
        chunks = []
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    async def execute(self, line: str) -> tuple[Frame, bytes, bytes]:
        """Send one command line; its frame, stdout and stderr once the shell reports its status."""
        stale = self._drain(self.stdout) + self._drain(self.stderr)
        if stale:
            log.debug("lvm shell output between commands: %r", stale[:500])
        data = line.encode()
        try:
            while data:
                written = os.write(self.stdin, data)
                data = data[written:]
        except OSError as exc:
            raise ShellBroken(f"lvm shell does not take input: {exc}") from None
        stdout, stderr = bytearray(), bytearray()
        frame: Frame | None = None
        broken: ShellBroken | None = None

        async def pump(fd: int, into: bytearray) -> None:
            while True:
                await anyio.wait_readable(fd)
                chunk = self._drain(fd)
                if not chunk:
                    return  # end of file: the report reader notices the death
                into += chunk

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(pump, self.stdout, stdout)
            tasks.start_soon(pump, self.stderr, stderr)
            while frame is None:
                await anyio.wait_readable(self.report)
                try:
                    chunk = os.read(self.report, CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    break  # raised outside the task group, which would wrap it in an ExceptionGroup
                try:
                    frame = self.framer.feed(chunk)
                except ShellBroken as exc:
                    broken = exc
                    break
            tasks.cancel_scope.cancel()
        if broken is not None:
            raise broken
        if frame is None:
            raise ShellBroken("lvm shell exited" + (f": {bytes(stderr)[-300:]!r}" if stderr else ""))
        stdout += self._drain(self.stdout)
        stderr += self._drain(self.stderr)
        assert frame is not None
        return frame, bytes(stdout), bytes(stderr)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self._close()

    def _close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(OSError):
            os.close(self.report)

    async def aclose(self, grace: float = 2.0) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]  # end of input: the shell exits by itself
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(functools.partial(self.process.wait, grace))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await anyio.to_thread.run_sync(self.process.wait)
        self._close()


# -- the executor ------------------------------------------------------------------------------------------------
class ShellExecutor:
    """An `LvmExecutor` that runs commands in one persistent `lvm` shell, with one process per command as fallback."""

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        binary: str = "lvm",
        timeout: float = 120.0,
        start_timeout: float = 30.0,
        max_failures: int = 3,
        fallback: LvmExecutor | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.runner = runner or CommandRunner()
        self.binary = binary
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.max_failures = max_failures
        self.fallback = fallback or ProcessExecutor(self.runner, binary=binary, timeout=timeout)
        self.env = {**(env if env is not None else os.environ), "LC_ALL": "C", "LANG": "C"}
        self._lock = anyio.Lock()
        self._shell: _Shell | None = None
        self._failures = 0
        self.disabled: str | None = None if profile_available(self.env) else f"no {PROFILE} profile for LVM"
        self.shell_commands = 0  # counters, for tests and the benchmark
        self.fallback_commands = 0
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._shell.process.pid if self._shell is not None and self._shell.alive else None

    async def aclose(self) -> None:
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        shell, self._shell = self._shell, None
        if shell is not None:
            await shell.aclose()

    def _kill(self) -> None:
        shell, self._shell = self._shell, None
        if shell is not None:
            shell.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                shell.process.wait(timeout=5)  # SIGKILL: reaped at once

    def _failed(self, why: str) -> None:
        self._kill()
        self._failures += 1
        self.restarts += 1
        if self._failures >= self.max_failures and self.disabled is None:
            self.disabled = f"the lvm shell failed {self._failures} times in a row (last: {why})"
            log.warning("%s; running LVM commands as one process each from now on", self.disabled)
        else:
            log.warning("lvm shell failed (%s); it is restarted for the next command", why)

    async def _ensure(self) -> _Shell:
        if self._shell is not None and self._shell.alive:
            return self._shell
        if self._shell is not None:
            self.restarts += 1
            log.warning(
                "the lvm shell exited between commands (status %s); starting another", self._shell.process.poll()
            )
        self._kill()
        shell = await anyio.to_thread.run_sync(_Shell, self.binary, self.env)
        self._shell = shell
        try:
            with anyio.fail_after(self.start_timeout):
                frame, _, stderr = await shell.execute("version\n")
            if frame.returncode != 0:
                raise ShellBroken(f"`version` failed in the lvm shell: {stderr[-300:]!r}")
        except TimeoutError:
            raise ShellBroken(f"the lvm shell did not answer within {self.start_timeout:g}s") from None
        return shell

    async def _fallback(self, args: Sequence[str]) -> CommandResult:
        self.fallback_commands += 1
        return await self.fallback.run(args)

    async def run(self, args: Sequence[str]) -> CommandResult:
        line = shell_line(args)
        if line is None or self.disabled is not None:
            return await self._fallback(args)
        argv = [self.binary, *args]
        async with self._lock:
            if self.disabled is not None:
                return await self._fallback(args)
            try:
                shell = await self._ensure()
            except (OSError, ShellBroken) as exc:
                self._failed(f"start: {exc}")
                return await self._fallback(args)
            started = time.monotonic()
            try:
                with anyio.fail_after(self.timeout):
                    frame, stdout, stderr = await shell.execute(line)
                    returncode = frame.returncode
                    if returncode != 0:
                        details, _, _ = await shell.execute("lastlog\n")
                        stderr += details.messages().encode()
            except TimeoutError:
                self._kill()
                self._observe(argv, started, ok=False)
                raise CommandTimeout(
                    argv, None, "", f"lvm {args[0]} timed out after {self.timeout:g}s; the lvm shell was killed"
                ) from None
            except ShellBroken as exc:
                self._failed(str(exc))
                self._observe(argv, started, ok=False)
                if args[0] in READ_ONLY:
                    return await self._fallback(args)
                raise CommandFailed(
                    argv,
                    None,
                    f"the lvm shell died while running the command ({exc}); whether it took effect is unknown:"
                    " retry the request",
                ) from None
            except BaseException:  # cancelled half-way: the shell's next output would belong to this command
                self._kill()
                raise
            self._failures = 0
            self.shell_commands += 1
            duration = self._observe(argv, started, ok=returncode == 0)
            return CommandResult(argv, returncode, frame.raw if frame.has_report else stdout, stderr, duration)

    def _observe(self, argv: list[str], started: float, *, ok: bool) -> float:
        duration = time.monotonic() - started
        for observe in self.runner.observers:
            observe(argv, duration, ok)
        return duration
