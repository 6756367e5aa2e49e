"""Zero-touch set-up of a partition pool under SIGKILL (issue 15, part 4): a process labelling a blank disk found by
rules is killed at random moments of its set-up, at least 50 times; every next start converges (the disk ends up
labelled for the pool, in use), and the foreign disks the same rules match are never touched.

Each round resets the target disk to blank, starts a process that discovers and labels it, and kills it with
SIGKILL a random moment after it reports it is about to open the pool (so kills land in wipefs, sfdisk and the
settle that follows, not in Python's start-up). What the kill left is recorded (blank, a label cut off, a whole
label), then a second process must finish the pool.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from localdisk.backends.partition import LABEL_MARK, unfinished_label
from localdisk.sizes import MiB
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.test_discovery_loop import RUNNER, digest, signatures

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(600), pytest.mark.slow]
KILLS = 50
SIZE = 64 * MiB
SETUP = """
import json, sys, anyio
from localdisk.backends.partition import PartitionBackend, PartitionPoolConfig
from localdisk.discovery import Claims
from localdisk.runner import CommandRunner

config = PartitionPoolConfig.model_validate({"match": {"transport": "loop", "names": sys.argv[1:]}, "setup": True})
backend = PartitionBackend("crashloop", config, CommandRunner(), claims=Claims())

async def main() -> None:
    print("opening", flush=True)
    await backend.open()
    print(json.dumps(backend.discovered), flush=True)

anyio.run(main)
"""


def reset(device: str) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(MiB), 0)
        os.pwrite(fd, bytes(MiB), SIZE - MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def start(names: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SETUP, *names], stdout=subprocess.PIPE, text=True, start_new_session=True
    )


async def left_by_kill(device: str) -> str:
    found = await signatures(device)
    if not found:
        return "blank"
    if unfinished_label(device, "crashloop"):
        return "label cut off"
    return "labelled" if found == ["PMBR", "gpt"] else f"other: {found}"


@needs_loop_devices
async def test_label_setup_converges_through_50_sigkills() -> None:
    async with loop_disks(3, SIZE) as (target, ext4_data, foreign_gpt):
        await RUNNER.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", ext4_data])
        await RUNNER.run(
            ["parted", "--script", "--", foreign_gpt, "mklabel", "gpt", "mkpart", "theirs", "1MiB", "9MiB"]
        )
        foreign = {d: digest(d) for d in (ext4_data, foreign_gpt)}
        names = [Path(d).name for d in (target, ext4_data, foreign_gpt)]
        outcomes: Counter[str] = Counter()
        window = 0.15  # seconds after "opening" in which a kill lands: the last measured set-up time
        for round_ in range(KILLS):
            reset(target)
            victim = start(names)
            try:
                assert victim.stdout is not None
                assert victim.stdout.readline().strip() == "opening"
                await anyio.sleep(random.uniform(0, window))
                os.killpg(victim.pid, signal.SIGKILL)
            finally:
                victim.wait(timeout=60)
            outcomes[await left_by_kill(target)] += 1
            finisher = start(names)
            assert finisher.stdout is not None
            assert finisher.stdout.readline().strip() == "opening"
            began = time.monotonic()
            out, _ = finisher.communicate(timeout=120)
            window = time.monotonic() - began  # how long a whole set-up takes now: the next kill lands within it
            assert finisher.returncode == 0, (round_, out)
            verdicts = json.loads(out.splitlines()[-1])
            assert verdicts[Path(target).name].startswith("used"), (round_, verdicts)
            assert all(verdicts[Path(d).name].startswith("refused") for d in foreign), verdicts
            label = (await RUNNER.run(["sfdisk", "--json", "--", target])).text
            assert f'"id": "{LABEL_MARK}' in label, (round_, label)
        assert {d: digest(d) for d in foreign} == foreign  # 0 foreign disks touched
        print(f"\n{KILLS} kills; state each kill left: {dict(outcomes)}")
        assert not [k for k in outcomes if k.startswith("other")], outcomes
