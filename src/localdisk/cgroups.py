"""The kubelet's pod cgroups on cgroup v2, and their `io.max` and `io.stat` files.

localdisk limits a volume's I/O by writing an `io.max` line for the volume's device into the cgroup of the pod that
uses it: the kernel's block throttling then applies to every container of the pod, whatever filesystem or raw block
access the pod makes. This module finds a pod's cgroup from its UID under either layout the kubelet uses:

- systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice` (`<qos>` burstable or
  besteffort; a guaranteed pod sits right under `kubepods.slice` as `kubepods-pod<uid>.slice`);
- cgroupfs driver: `kubepods/<qos>/pod<uid>` (a guaranteed pod as `kubepods/pod<uid>`).

The root is a setting (`node.cgroup_root`), so tests point it at a fake kubelet tree made under the real cgroup2
mount. cgroup v1 has no `io.max`: a host on v1 (or without the io controller) is refused with `FailedPrecondition`.
No gRPC, no Kubernetes: the CSI and Kubernetes layers call this through `localdisk.qos`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from localdisk.errors import FailedPrecondition, InvalidArgument

IO_MAX_FIELDS = ("rbps", "wbps", "riops", "wiops")
"""The keys of an `io.max` line, in the kernel's order."""
Device = tuple[int, int]  # (major, minor)
_UID = re.compile(r"^[0-9a-fA-F-]{1,64}$")
_QOS_CLASSES = ("burstable", "besteffort")


def device_key(device: Device) -> str:
    return f"{device[0]}:{device[1]}"


def parse_device(text: str) -> Device:
    major, _, minor = text.partition(":")
    if not major.isdigit() or not minor.isdigit():
        raise InvalidArgument(f"device {text!r} is not MAJ:MIN")
    return int(major), int(minor)


class CgroupTree:
    """A cgroup v2 hierarchy mounted at `root` (the real `/sys/fs/cgroup`, or a test's fake kubelet tree)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def problem(self) -> str | None:
        """Why I/O limits cannot be enforced under this root (cgroup v1, no io controller), or None."""
        controllers = self.root / "cgroup.controllers"
        try:
            available = controllers.read_text().split()
        except FileNotFoundError:
            return (
                f"{self.root} is not a cgroup v2 hierarchy (no cgroup.controllers): this host runs cgroup v1, whose"
                " blkio controller localdisk does not drive; I/O limits need cgroup v2"
            )
        except OSError as exc:
            return f"cannot read {controllers}: {exc.strerror}"
        if "io" not in available:
            return f"the io controller is not available in {self.root} (cgroup.controllers: {' '.join(available)})"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise FailedPrecondition(f"I/O limits cannot be enforced on this node: {problem}")

    def candidates(self, pod_uid: str) -> list[Path]:
        """Where the kubelet may have put the cgroup of pod `pod_uid`, systemd layout first."""
        if not _UID.match(pod_uid):
            raise InvalidArgument(f"pod UID {pod_uid!r} is not a UID")
        under = pod_uid.replace("-", "_")
        systemd = self.root / "kubepods.slice"
        cgroupfs = self.root / "kubepods"
        return [
            systemd / f"kubepods-pod{under}.slice",
            *(systemd / f"kubepods-{q}.slice" / f"kubepods-{q}-pod{under}.slice" for q in _QOS_CLASSES),
            cgroupfs / f"pod{pod_uid}",
            *(cgroupfs / q / f"pod{pod_uid}" for q in _QOS_CLASSES),
        ]

    def pod_cgroup(self, pod_uid: str) -> Path | None:
        """The cgroup of pod `pod_uid`, or None when there is none (the pod is gone, or not started yet)."""
        return next((path for path in self.candidates(pod_uid) if path.is_dir()), None)

    @staticmethod
    def io_max(cgroup: Path) -> dict[Device, dict[str, int]]:
        """The limits set in `cgroup`'s io.max, per device; a field at `max` (no limit) is left out."""
        return {device: values for device, values in _read_keyed(cgroup / "io.max").items() if values}

    @staticmethod
    def set_io_max(cgroup: Path, device: Device, limits: Mapping[str, int | None]) -> None:
        """Write one io.max line for `device`: each field of `IO_MAX_FIELDS` at its limit, `max` where None or
        absent. All four at `max` removes the device's line."""
        fields = " ".join(f"{key}={limits.get(key) or 'max'}" for key in IO_MAX_FIELDS)
        path = cgroup / "io.max"
        try:
            # O_APPEND: on cgroupfs each write is one command whatever the offset; a plain file (a unit test's
            # fake tree) keeps the history, which `_read_keyed` reads as the kernel would (the last line wins).
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"{cgroup} has no io.max: the io controller is not enabled for it (add +io to cgroup.subtree_control"
                " of its parents)"
            ) from None
        try:
            os.write(fd, f"{device_key(device)} {fields}\n".encode())
        except OSError as exc:
            raise FailedPrecondition(f"writing {path} for device {device_key(device)}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def clear_io_max(self, cgroup: Path, device: Device) -> None:
        """Remove `device`'s limits from `cgroup`; a cgroup that is gone has none left."""
        if cgroup.is_dir():
            try:
                self.set_io_max(cgroup, device, {})
            except FailedPrecondition:
                if cgroup.is_dir():
                    raise

    @staticmethod
    def io_stat(cgroup: Path) -> dict[Device, dict[str, int]]:
        """io.stat per device: rbytes, wbytes, rios, wios, ... and, where the kernel reports them (iocost),
        the throttled time `cost.wait` and `cost.indelay` in microseconds."""
        return _read_keyed(cgroup / "io.stat")


def _read_keyed(path: Path) -> dict[Device, dict[str, int]]:
    """Lines `MAJ:MIN key=value ...` to a dict per device, a later line for a device replacing an earlier one
    (how a plain file in a fake tree records writes); `max` values are left out."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found: dict[Device, dict[str, int]] = {}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        try:
            device = parse_device(words[0])
        except InvalidArgument:
            continue
        values: dict[str, int] = {}
        for word in words[1:]:
            key, _, value = word.partition("=")
            if value.isdigit():
                values[key] = int(value)
            else:
                try:
                    values[key] = int(float(value))
                except ValueError:
                    continue  # `max`
        found[device] = values
    return found
