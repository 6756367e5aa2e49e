"""A fake kubelet cgroup tree for the I/O limit tests: pod cgroups in the systemd or the cgroupfs layout.

`plain=True` makes it of ordinary files (any host, no root): `cgroup.controllers` says `io` and each pod cgroup has an
empty `io.max`, to which `localdisk.cgroups` appends its lines as it would write them to the kernel. Otherwise it is
made under a real cgroup2 mount with the io controller enabled down to the pods, and `remove` takes it away again
(moving out any process left in it first).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from localdisk import VolumeBackend
from localdisk._proto.csi.v1 import (
    ControllerModifyVolumeRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    VolumeCapability,
)
from localdisk.mounts import device_number
from localdisk.qos import POD_UID_KEY
from tests.csi_helpers import Csi, MiB, create_request
from tests.node_lifecycle import kubelet_paths

SYSTEMD = "systemd"
CGROUPFS = "cgroupfs"
CGROUP2 = Path("/sys/fs/cgroup")
SECONDS = 3.0  # each measurement moves about this long at the limit: the throttle's first slice is under 5% of it
COPIED = re.compile(rb"^(\d+) bytes .* copied, ([\d.]+) s", re.MULTILINE)


@contextlib.contextmanager
def real_tree(where: str) -> Iterator[Path]:
    """A fake kubelet tree under the real cgroup2 mount, removed afterwards; skips, saying why, where the host's
    cgroups do not allow one (cgroup v1, or no io controller delegated to the root's children)."""
    if not (CGROUP2 / "cgroup.controllers").exists():
        pytest.skip(f"{where}: {CGROUP2} is not cgroup v2 (a cgroup v1 host): I/O limits cannot be shown here")
    if "io" not in (CGROUP2 / "cgroup.subtree_control").read_text().split():
        pytest.skip(f"{where}: the io controller is not enabled in {CGROUP2}/cgroup.subtree_control")
    root = CGROUP2 / f"ldtest-kubelet-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        yield root
    finally:
        remove(root, CGROUP2)


def pod_dir(root: Path, layout: str, qos_class: str, uid: str) -> Path:
    under = uid.replace("-", "_")
    if layout == SYSTEMD:
        base = root / "kubepods.slice"
        if qos_class == "guaranteed":
            return base / f"kubepods-pod{under}.slice"
        return base / f"kubepods-{qos_class}.slice" / f"kubepods-{qos_class}-pod{under}.slice"
    base = root / "kubepods"
    return base / f"pod{uid}" if qos_class == "guaranteed" else base / qos_class / f"pod{uid}"


def make_pod(root: Path, layout: str, qos_class: str, uid: str, *, plain: bool) -> Path:
    """The pod's cgroup, made with its parents; with a real cgroup2 tree also a `container` child to run in."""
    path = pod_dir(root, layout, qos_class, uid)
    if plain:
        root.mkdir(parents=True, exist_ok=True)
        (root / "cgroup.controllers").write_text("cpu io memory pids\n")
        path.mkdir(parents=True, exist_ok=True)
        (path / "io.max").touch()
        (path / "io.stat").touch()
        return path
    parts = path.relative_to(root).parts
    current = root
    for part in parts:
        enable_io(current)
        current = current / part
        current.mkdir(exist_ok=True)
    (path / "container").mkdir(exist_ok=True)
    return path


def enable_io(cgroup: Path) -> None:
    if "io" not in (cgroup / "cgroup.subtree_control").read_text().split():
        (cgroup / "cgroup.subtree_control").write_text("+io")


def io_max_line(pod: Path, device: tuple[int, int]) -> dict[str, str]:
    """The fields of `device`'s io.max line in `pod` as the kernel shows them ({} without one): the last line
    written for it in a plain tree."""
    found: dict[str, str] = {}
    for line in (pod / "io.max").read_text().splitlines():
        words = line.split()
        if words and words[0] == f"{device[0]}:{device[1]}":
            found = dict(word.split("=", 1) for word in words[1:])
    return {} if all(v == "max" for v in found.values()) else found


def remove(root: Path, home: Path) -> None:
    """Remove a real fake tree, leaves first; processes left in it move to the cgroup `home`."""
    if not root.exists():
        return
    for path in sorted([*(p for p in root.rglob("*") if p.is_dir()), root], key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (home / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            os.rmdir(path)


# -- measuring through the CSI services ------------------------------------------------------------------------
def dd_in(cgroup: Path, *argv: str) -> float:
    """Run dd in `cgroup`; the bytes per second it measured."""

    def join() -> None:
        (cgroup / "cgroup.procs").write_text("0")

    done = subprocess.run(["dd", *argv], capture_output=True, preexec_fn=join, check=True, timeout=120)
    found = COPIED.search(done.stderr)
    assert found is not None, done.stderr
    return int(found.group(1)) / float(found.group(2))


async def write_rate(cgroup: Path, path: str, rate: int, *, block: int = 128 * 1024) -> float:
    count = max(int(rate * SECONDS) // block, 1)
    argv = ("if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct", "conv=notrunc")
    return await anyio.to_thread.run_sync(lambda: dd_in(cgroup, *argv))


async def read_rate(cgroup: Path, path: str, rate: int, *, block: int = 128 * 1024) -> float:
    count = max(int(rate * SECONDS) // block, 1)
    argv = (f"if={path}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct")
    return await anyio.to_thread.run_sync(lambda: dd_in(cgroup, *argv))


def near(measured: float, limit: float) -> bool:
    return abs(measured - limit) <= 0.1 * limit


async def publish(
    csi: Csi,
    kubelet_root: Path,
    volume_id: str,
    name: str,
    cap: VolumeCapability,
    pod_uid: str,
    secrets: dict[str, str] | None = None,
) -> str:
    paths = kubelet_paths(kubelet_root, name, cap.block is not None, pod=pod_uid)
    await csi.node.node_stage_volume(
        NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=paths.staging, volume_capability=cap, secrets=secrets or {}
        )
    )
    await csi.node.node_publish_volume(
        NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=paths.staging,
            target_path=paths.target,
            volume_capability=cap,
            volume_context={POD_UID_KEY: pod_uid},
        )
    )
    return paths.target


async def create(csi: Csi, backend: VolumeBackend, name: str, cap: VolumeCapability, **limits: str) -> str:
    request = create_request(name, 64 * MiB, backend.kind, backend.pool, volume_capabilities=[cap])
    request.parameters |= limits
    response = await csi.controller.create_volume(request)
    assert response.volume is not None
    return response.volume.volume_id


async def modify(csi: Csi, volume_id: str, **limits: str) -> None:
    await csi.controller.controller_modify_volume(
        ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=limits)
    )


async def device_of(csi: Csi, volume_id: str) -> tuple[int, int]:
    path = (await csi.manager.get_volume(volume_id)).device_path
    assert path is not None
    number = device_number(path)
    return os.major(number), os.minor(number)
