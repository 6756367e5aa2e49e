"""Crash consistency of encrypted volumes: format, open and close of a LUKS2 volume, SIGKILLed at random moments.

`python -m tests.reliability.cryptloop loop|check DEVICE VOLUME_ID STATE` is one process working on one encrypted
volume through `localdisk.crypt`, as the node plugin does; the test (`tests/lvm/test_crypt_crash.py`) kills its whole
process group (it and the cryptsetup it runs) with SIGKILL and then runs `check`, which must open the volume with
the same passphrase and find what the state file says is there.

`loop` repeats: open, verify, write the next generation of a known 4 KiB block, close; and every third round (the
first one for a third of the workers) a fresh volume: crypto-erase the header, format, open, write. Before anything
that changes the data it records the intent in the state file (written, fsynced and renamed), so a kill anywhere
leaves one of: `data N` (generation N is
on the volume), `writing N` (N-1 or N is there), `fresh N` (the volume was being erased: its old data may be gone,
but it must format and open again). `check` opens the volume (a refusal is a failure: a kill must never leave a
volume that cannot be staged again), verifies, and leaves it in state `data N` again, closed.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import anyio

from localdisk.crypt import Crypt, Passphrase, Pbkdf, erase
from localdisk.mounts import Mounter
from localdisk.runner import CommandRunner

FAST = Pbkdf(kind="argon2id", force_iterations=4, memory_kib=32 * 1024)
PASSPHRASE = Passphrase(b"crash loop passphrase 5e1f")
OFFSET = 1024 * 1024
BLOCK = 4096


def block(generation: int) -> bytes:
    line = f"LOCALDISK-GENERATION-{generation:08d}\n".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


def record(state: Path, text: str) -> None:
    temporary = state.with_suffix(".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, state)


def read_state(state: Path) -> tuple[str, int]:
    kind, number = state.read_text().split() if state.exists() else ("fresh", "1")
    return kind, int(number)


def read_block(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buffer = mmap.mmap(-1, BLOCK)
        os.preadv(fd, [buffer], OFFSET)
        return bytes(buffer)
    finally:
        os.close(fd)


def write_block(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


async def open_volume(crypt: Crypt, device: str, volume_id: str) -> str:
    await crypt.ensure_format(device, PASSPHRASE)
    return await crypt.open(volume_id, device, PASSPHRASE)


async def verify(crypt: Crypt, device: str, volume_id: str, state: Path) -> tuple[str, int]:
    """Open the volume and check it holds what the state says; returns (mapped path, generation found)."""
    kind, number = read_state(state)
    mapped = await open_volume(crypt, device, volume_id)
    found = read_block(mapped)
    if kind == "data" and found != block(number):
        raise SystemExit(f"LOST: state data {number}, the volume holds {found[:40]!r}")
    if kind == "writing" and found not in (block(number), block(number - 1)):
        raise SystemExit(f"LOST: state writing {number}, the volume holds {found[:40]!r}")
    if kind == "fresh":
        return mapped, number - 1
    return mapped, number if found == block(number) else number - 1


async def write(mapped: str, state: Path, number: int) -> None:
    record(state, f"writing {number}")
    write_block(mapped, block(number))
    record(state, f"data {number}")


async def fresh(crypt: Crypt, device: str, volume_id: str, state: Path, number: int) -> None:
    await crypt.close(volume_id)
    record(state, f"fresh {number}")
    await erase(crypt.runner, device)
    mapped = await open_volume(crypt, device, volume_id)
    write_block(mapped, block(number))
    record(state, f"data {number}")


async def main(mode: str, device: str, volume_id: str, state_file: str) -> None:
    state = Path(state_file)
    crypt = Crypt(Mounter(CommandRunner(default_timeout=300)), FAST)
    if mode == "check":
        kind, number = read_state(state)
        print(f"found {kind} {number}")
        if kind == "fresh":
            await fresh(crypt, device, volume_id, state, number)
        else:
            mapped, found = await verify(crypt, device, volume_id, state)
            await write(mapped, state, found + 1)
        await crypt.close(volume_id)
        print(f"ok {state.read_text()}")
        return
    rounds = random.randrange(3)  # a third of the workers start with a fresh round: kills land in erase and format too
    while True:
        rounds += 1
        if rounds % 3 == 0:
            _, number = read_state(state)
            await fresh(crypt, device, volume_id, state, number + 1)
        else:
            mapped, found = await verify(crypt, device, volume_id, state)
            await write(mapped, state, found + 1)
        await crypt.close(volume_id)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
