"""A fake kubelet cgroup tree for the I/O limit tests: pod cgroups in the systemd or the cgroupfs layout.

`plain=True` makes it of ordinary files (any host, no root): `cgroup.controllers` says `io` and each pod cgroup has an
empty `io.max`, to which `localdisk.cgroups` appends its lines as it would write them to the kernel. Otherwise it is
made under a real cgroup2 mount with the io controller enabled down to the pods, and `remove` takes it away again
(moving out any process left in it first).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SYSTEMD = "systemd"
CGROUPFS = "cgroupfs"


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
