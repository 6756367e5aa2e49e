"""SIGKILL crash loop through LUKS2 format, open and close of an encrypted volume, in the UML sandbox.

Not in CI (`nox -s crypt_crash`): each kill costs a restart of cryptsetup under UML. `tests/reliability/cryptloop.py`
says what the worker does and what `check` demands after each kill: the volume opens again with its passphrase
(never a refusal, never a reformat of data) and holds the generation its state file promises.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from localdisk.backends.lvm import LinearBackend
from localdisk.crypt import Crypt, Pbkdf
from localdisk.manager import CreateRequest
from localdisk.mounts import Mounter
from localdisk.runner import CommandRunner
from tests.contract import manager_for
from tests.lvm.helpers import require_dm_crypt

pytestmark = [pytest.mark.uml, pytest.mark.anyio, pytest.mark.slow]
KILLS = int(os.environ.get("LOCALDISK_CRYPT_KILLS", "50"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def volume(linear: LinearBackend) -> AsyncIterator[tuple[str, str]]:
    require_dm_crypt()
    manager = manager_for(linear)
    made = await manager.create_volume(
        CreateRequest("pvc-crash", "lvm", linear.pool, required_bytes=32 * 1024 * 1024, encrypted=True)
    )
    assert made.device_path is not None
    try:
        yield made.device_path, made.id
    finally:
        await Crypt(Mounter(CommandRunner()), Pbkdf()).close(made.id)
        await manager.delete_volume(made.id)


def worker(mode: str, device: str, volume_id: str, state: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.reliability.cryptloop", mode, device, volume_id, str(state)]
    return subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def reap(child: subprocess.Popen[bytes], deadline: float, hit: Counter[str] | None = None) -> int:
    """Wait for `child` until `deadline`; kill its group if it is not done by then, counting in `hit` the command
    its session was running at that moment (which cryptsetup step the kill cut off)."""
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if child.poll() is None:
        if hit is not None:
            hit[running(child.pid)] += 1
        os.killpg(child.pid, signal.SIGKILL)
    return child.wait()


def running(session: int) -> str:
    """What the worker's session is running: 'cryptsetup <action>', another command, or 'python' (its own work)."""
    for pid in session_members(session):
        if pid == session:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [os.path.basename(argv[0].decode())] + [a.decode() for a in argv[1:2]]
        return " ".join(words) if words[0] == "cryptsetup" else words[0]
    return "python"


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes of `session`, from /proc/<pid>/stat."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


async def gone(session: int, seconds: float = 30.0) -> None:
    """Wait until no process of the killed worker's session (it, cryptsetup) is left."""
    deadline = time.monotonic() + seconds
    while True:
        left = session_members(session)
        if not left:
            return
        assert time.monotonic() < deadline, f"processes of the killed worker are left: {left!r}"
        await anyio.sleep(0.05)


@pytest.mark.timeout(3300)
async def test_format_open_close_survive_sigkill(volume: tuple[str, str], tmp_path: Path) -> None:
    device, volume_id = volume
    state = tmp_path / "state"
    seed = int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    kills = checks = 0
    hit: Counter[str] = Counter()
    found: Counter[str] = Counter()
    started = time.monotonic()
    first = worker("check", device, volume_id, state)  # formats and writes generation 1
    assert await anyio.to_thread.run_sync(reap, first, time.monotonic() + 300) == 0, first.stdout
    while kills < KILLS:
        loop = worker("loop", device, volume_id, state)
        delay = rng.uniform(0.2, 6.0)
        code = await anyio.to_thread.run_sync(reap, loop, time.monotonic() + delay, hit)
        if code != -signal.SIGKILL:
            output = loop.stdout.read().decode() if loop.stdout else ""
            pytest.fail(f"the worker stopped on its own (rc {code}, seed {seed}): {output}")
        await gone(loop.pid)
        kills += 1
        check = worker("check", device, volume_id, state)
        code = await anyio.to_thread.run_sync(reap, check, time.monotonic() + 300)
        output = check.stdout.read().decode() if check.stdout else ""
        assert code == 0, f"after kill {kills} (delay {delay:.2f}s, seed {seed}): {output}"
        found[output.split()[1] if output.startswith("found ") else "?"] += 1
        checks += 1
    seconds = time.monotonic() - started
    print(f"\ncrypt crash loop: {kills} kills, {checks} checks passed in {seconds:.0f}s, seed {seed}")
    print(f"killed while running: {dict(hit.most_common())}; state found after the kill: {dict(found.most_common())}")
