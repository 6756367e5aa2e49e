"""Real block devices for tests: sparse image files attached as loop devices with partition scanning.

Any suite that needs disks (the partition backend, the node service formatting and mounting volumes) uses
`loop_disks`, so every one of them releases what it attached the same way: each device is detached and each image
deleted when the context ends, also when the test fails or is cancelled by a timeout. Loop devices are shared with
whatever else runs on the machine, so a context may hold at most `MAX_DISKS` of them.

    @needs_loop_devices
    async def test_something() -> None:
        async with loop_disks(2, 64 * MiB) as (first, second):
            ...
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from localdisk.errors import CommandFailed
from localdisk.runner import CommandRunner

MAX_DISKS = 3
T = TypeVar("T", bound=Callable[..., object])


def loop_unavailable() -> str | None:
    """Why loop-device tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to attach loop devices"
    if shutil.which("losetup") is None:
        return "losetup (util-linux) is not installed"
    if not Path("/dev/loop-control").exists():
        return "the kernel offers no loop devices (/dev/loop-control is missing)"
    return None


def needs_loop_devices(test: T) -> T:
    """Mark a test (or class) as needing root and loop devices, and skip it with the reason when they are missing."""
    reason = loop_unavailable()
    marked: T = pytest.mark.root(pytest.mark.skipif(reason is not None, reason=reason or "")(test))
    return marked


@asynccontextmanager
async def loop_disks(
    count: int, size: int, *, runner: CommandRunner | None = None, directory: str | None = None
) -> AsyncIterator[list[str]]:
    """Attach `count` blank disks of `size` bytes; yields their device paths (/dev/loopN).

    The images are sparse files in a fresh temporary directory (under `directory` if given), attached with
    `losetup --partscan` so the kernel creates /dev/loopNpM nodes for their partitions.
    """
    if not 1 <= count <= MAX_DISKS:
        raise ValueError(f"loop_disks: count must be 1..{MAX_DISKS} (loop devices are shared), not {count}")
    if size <= 0 or size % 512:
        raise ValueError(f"loop_disks: size must be a positive multiple of 512 bytes, not {size}")
    runner = runner or CommandRunner(default_timeout=30)
    workdir = Path(tempfile.mkdtemp(prefix="localdisk-loop-", dir=directory))
    attached: list[str] = []
    try:
        for index in range(count):
            image = workdir / f"disk{index}.img"
            with image.open("wb") as handle:
                handle.truncate(size)
            result = await runner.run(["losetup", "--find", "--show", "--partscan", "--", str(image)])
            attached.append(result.text.strip())
        yield list(attached)
    finally:
        with anyio.CancelScope(shield=True):
            for device in attached:
                try:
                    await runner.run(["losetup", "--detach", device])
                except CommandFailed as exc:  # still report the rest; a busy device is auto-cleared once released
                    warnings.warn(f"could not detach {device}: {exc.message}", stacklevel=2)
        shutil.rmtree(workdir, ignore_errors=True)
