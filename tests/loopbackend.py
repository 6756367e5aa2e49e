"""A test-only backend: each volume is a sparse image file attached as a loop device.

It gives the Node service tests real block devices without the partition or LVM backends: `device_path` is the
`/dev/loopN` of the volume's image, expansion grows the file and tells the loop driver (`losetup -c`). It keeps
its state on disk (`<handle>.img` and `<handle>.json` with the CSI name) like the real backends, and passes the
same `BackendContract`. At most `max_volumes` loop devices are attached at once (the machine's loop devices are
shared); `detach_all` releases every loop device whose image lies in the pool directory, for fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from localdisk.errors import InsufficientCapacity, NotFound, Unsupported
from localdisk.model import Capacity, Features, ObjectRef, Snapshot, Volume, VolumeSpec
from localdisk.runner import CommandRunner
from localdisk.sizes import GiB, MiB

HANDLE = re.compile(r"^v[0-9a-f]{24}$")
TOOLS = ("losetup", "blkid", "blockdev", "mount", "umount", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs")


def require_loop_devices() -> None:
    """Skip the calling test unless this process may attach loop devices and mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root to attach loop devices and mount filesystems")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: this kernel or container offers no loop devices")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (install util-linux e2fsprogs xfsprogs btrfs-progs)")


class LoopBackend:
    kind = "loop"

    def __init__(
        self,
        pool: str,
        directory: Path,
        runner: CommandRunner | None = None,
        size_bytes: int = 4 * GiB,
        max_volumes: int = 3,
    ) -> None:
        self.pool = pool
        self.directory = directory
        self.runner = runner or CommandRunner()
        self.size_bytes = size_bytes
        self.max_volumes = max_volumes
        self.features = Features(alignment=MiB, minimum_size=MiB, default_size=64 * MiB)

    async def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    async def aclose(self) -> None:
        return None

    # -- files and loop devices -------------------------------------------------------------------------------
    def _handle(self, name: str) -> str:
        return "v" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:24]

    def _image(self, handle: str) -> Path:
        if not HANDLE.match(handle):  # a handle comes from a volume ID: never let it name another file
            raise NotFound(f"volume {handle!r} not found in loop pool {self.pool!r}")
        return self.directory / f"{handle}.img"

    async def _loops(self) -> list[dict[str, Any]]:
        result = await self.runner.run(["losetup", "--json", "--list"])
        if not result.text.strip():
            return []
        devices: list[dict[str, Any]] = json.loads(result.text).get("loopdevices", [])
        return devices

    async def _loops_of(self, image: Path) -> list[str]:
        wanted = str(image)
        return [
            d["name"] for d in await self._loops() if str(d.get("back-file", "")).removesuffix(" (deleted)") == wanted
        ]

    async def detach_all(self) -> None:
        """Detach every loop device backed by an image in this pool's directory (test teardown)."""
        prefix = str(self.directory) + "/"
        for device in await self._loops():
            if str(device.get("back-file", "")).startswith(prefix):
                await self.runner.run(["losetup", "-d", device["name"]], check=False)

    async def _volume(self, handle: str) -> Volume:
        image = self._image(handle)
        try:
            meta = json.loads((self.directory / f"{handle}.json").read_text())
            size = image.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"volume {handle!r} not found in loop pool {self.pool!r}") from None
        loops = await self._loops_of(image)
        return Volume(
            ObjectRef(self.kind, self.pool, handle),
            meta["name"],
            size,
            device_path=loops[0] if loops else None,
            abnormal=None if loops else f"image {image.name} is not attached to a loop device",
        )

    def _handles(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("v*.json") if HANDLE.match(p.stem))

    def _used(self) -> int:
        return sum(self._image(h).stat().st_size for h in self._handles() if self._image(h).exists())

    # -- VolumeBackend ----------------------------------------------------------------------------------------
    async def create_volume(self, spec: VolumeSpec) -> Volume:
        handle = self._handle(spec.name)
        if (self.directory / f"{handle}.json").exists():
            return await self._volume(handle)
        if spec.source is not None:
            raise Unsupported("the loop backend cannot create volumes from a source")
        free = self.size_bytes - self._used()
        if spec.size_bytes > free:
            raise InsufficientCapacity(f"loop pool {self.pool!r} has {free} bytes free, {spec.size_bytes} asked")
        if len(self._handles()) >= self.max_volumes:
            raise InsufficientCapacity(f"loop pool {self.pool!r} holds at most {self.max_volumes} volumes at once")
        image = self._image(handle)
        with image.open("xb") as f:
            f.truncate(spec.size_bytes)  # sparse
        try:
            await self.runner.run(["losetup", "--find", "--show", "--", str(image)])
        except BaseException:
            image.unlink()
            raise
        (self.directory / f"{handle}.json").write_text(json.dumps({"name": spec.name}))
        return await self._volume(handle)

    async def delete_volume(self, handle: str) -> None:
        try:
            image = self._image(handle)
        except NotFound:
            return
        for device in await self._loops_of(image):
            # A mounted loop device is only marked for detach (autoclear); it goes away at the last unmount.
            await self.runner.run(["losetup", "-d", device])
        (self.directory / f"{handle}.json").unlink(missing_ok=True)
        image.unlink(missing_ok=True)

    async def expand_volume(self, handle: str, size_bytes: int) -> Volume:
        volume = await self._volume(handle)
        if size_bytes <= volume.size_bytes:
            return volume
        free = self.size_bytes - self._used()
        if size_bytes - volume.size_bytes > free:
            raise InsufficientCapacity(f"loop pool {self.pool!r} has {free} bytes free")
        image = self._image(handle)
        with image.open("r+b") as f:
            f.truncate(size_bytes)
        for device in await self._loops_of(image):
            await self.runner.run(["losetup", "-c", device])  # -c takes the device as its argument: no `--`
        return await self._volume(handle)

    async def get_volume(self, handle: str) -> Volume:
        return await self._volume(handle)

    async def find_volume(self, name: str) -> Volume | None:
        try:
            return await self._volume(self._handle(name))
        except NotFound:
            return None

    async def list_volumes(self) -> list[Volume]:
        return [await self._volume(h) for h in self._handles()]

    async def capacity(self) -> Capacity:
        free = max(self.size_bytes - self._used(), 0)
        return Capacity(self.size_bytes, free, free)

    async def create_snapshot(self, source_handle: str, name: str) -> Snapshot:
        raise Unsupported("the loop backend has no snapshots")

    async def delete_snapshot(self, handle: str) -> None:
        raise Unsupported("the loop backend has no snapshots")

    async def get_snapshot(self, handle: str) -> Snapshot:
        raise Unsupported("the loop backend has no snapshots")

    async def find_snapshot(self, name: str) -> Snapshot | None:
        raise Unsupported("the loop backend has no snapshots")

    async def list_snapshots(self) -> list[Snapshot]:
        raise Unsupported("the loop backend has no snapshots")
