"""Block-device helpers shared by the LVM suites: write and read volumes directly, bypassing the page cache."""

from __future__ import annotations

import os
from pathlib import Path

from localdisk import ContentSource, CreateRequest, VolumeManager
from localdisk.backends.lvm import LinearBackend, ThinBackend
from localdisk.sizes import MiB


def require_dm_crypt() -> None:
    """The sandbox loads dm-crypt at boot (`localdisk.sandbox.GUEST_MODULES`); elsewhere the encrypted suites skip."""
    import pytest

    if not Path("/dev/mapper/control").exists():
        pytest.skip("needs device-mapper (the UML sandbox)")
    assert Path("/sys/module/dm_crypt").is_dir(), "the sandbox booted without dm-crypt"


def write(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str, size: int, offset: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the device, not what the page cache kept
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def pattern(size: int, seed: bytes = b"tenant-a ") -> bytes:
    return (seed * (size // len(seed) + 1))[:size]


def request(
    backend: LinearBackend | ThinBackend, name: str, size: int, source: ContentSource | None = None
) -> CreateRequest:
    return CreateRequest(name=name, backend=backend.kind, pool=backend.pool, required_bytes=size, source=source)


async def make(manager: VolumeManager, backend: LinearBackend | ThinBackend, name: str, size: int = 8 * MiB) -> str:
    volume = await manager.create_volume(request(backend, name, size))
    return volume.id
