"""`localdisk.blockdev.zero_out` on a real loop device: all zeroed, a device in use refused, a missing one named,
a claim handed over always closed."""

from __future__ import annotations

import os
from collections.abc import Sequence

import anyio
import pytest

from localdisk.backends.gpt import Signature, parse_wipefs
from localdisk.blockdev import erase_signatures, open_exclusive, zero_out
from localdisk.errors import Busy, NotFound
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.loopdisks import loop_disks, needs_loop_devices

pytestmark = pytest.mark.anyio
runner = CommandRunner(default_timeout=60)
SIZE = 8 * MiB + 512  # not a multiple of the 4 KiB pages: the tail sector must be zeroed too


def _fill(device: str, size: int = SIZE) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, b"\xa5" * size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(device: str) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, SIZE, 0)
    finally:
        os.close(fd)


@needs_loop_devices
async def test_every_byte_is_zeroed_and_the_call_is_observed() -> None:
    seen: list[tuple[Sequence[str], bool]] = []
    async with loop_disks(1, SIZE) as (device,):
        _fill(device)
        assert _read(device).count(0) == 0
        size = await zero_out(device, [lambda argv, _seconds, ok: seen.append((argv, ok))])
        assert size == SIZE
        assert _read(device) == bytes(SIZE)
    assert seen == [(["BLKZEROOUT", device], True)]


@needs_loop_devices
async def test_a_device_open_exclusively_is_not_zeroed() -> None:
    async with loop_disks(1, SIZE) as (device,):
        _fill(device)
        holder = os.open(device, os.O_RDONLY | os.O_EXCL)  # what a mount or a device-mapper holder does
        try:
            with pytest.raises(Busy, match="in use"):
                await zero_out(device)
        finally:
            os.close(holder)
        assert _read(device).count(0) == 0, "a refused device must keep its data"


async def test_a_missing_device_is_not_found(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        await zero_out(os.path.join(tmp_path, "no-such-device"))


@needs_loop_devices
async def test_a_claim_handed_over_is_zeroed_through_and_released() -> None:
    async with loop_disks(1, SIZE) as (device,):
        _fill(device)
        claim = open_exclusive(device)
        with pytest.raises(Busy):
            open_exclusive(device)  # held: nobody else gets the device meanwhile
        assert await zero_out(device, fd=claim) == SIZE
        assert _read(device) == bytes(SIZE)
        os.close(open_exclusive(device))  # released


@needs_loop_devices
async def test_a_claim_is_released_when_the_zeroing_is_cancelled() -> None:
    async with loop_disks(1, SIZE) as (device,):
        claim = open_exclusive(device)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await zero_out(device, fd=claim)
        for _ in range(200):  # the thread, had it started, closes the claim when done
            try:
                os.close(open_exclusive(device))
                break
            except Busy:
                await anyio.sleep(0.05)
        else:
            raise AssertionError("the claim was never released")


@needs_loop_devices
async def test_signatures_are_erased_at_both_ends_and_nothing_else_is_touched() -> None:
    size = 32 * MiB
    async with loop_disks(1, size) as (device,):
        _fill(device, size)
        # A protective MBR and a GPT at the start, the GPT's backup in the last sectors:
        await runner.run(["sfdisk", "--quiet", "--", device], input=b"label: gpt\n")
        assert {s.type for s in await signatures(device)} == {"gpt", "PMBR"}
        seen: list[Sequence[str]] = []
        assert await erase_signatures(device, [lambda argv, _seconds, _ok: seen.append(argv)]) == size
        assert await signatures(device) == []
        assert seen == [["BLKZEROOUT", "--ends", device]]
        fd = os.open(device, os.O_RDONLY)
        try:
            assert os.pread(fd, 8 * MiB, 0) == bytes(8 * MiB)
            assert os.pread(fd, MiB, size - MiB) == bytes(MiB)
            assert os.pread(fd, MiB, size - 2 * MiB) == b"\xa5" * MiB  # the middle is left as it was
        finally:
            os.close(fd)


async def signatures(device: str) -> list[Signature]:
    return parse_wipefs((await runner.run(["wipefs", "--json", "--", device])).text)
