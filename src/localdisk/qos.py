"""I/O limits per volume: read and write IOPS and bytes per second, enforced with cgroup v2 `io.max`.

Limits come from StorageClass parameters at creation and from a VolumeAttributesClass later (ControllerModifyVolume);
`parse_parameters` reads both, naming the key of any bad value. They are kept on the node, in a small JSON file per
volume under the node's state directory (`node.state_dir`), together with the volume's publications (target path,
pod UID, device number). That record is what lets the node

- apply the limits at NodePublishVolume to the pod's cgroup (`localdisk.cgroups`), for the device the pod's I/O
  really goes to (the LV, the partition, or the dm-crypt mapping of an encrypted volume);
- re-apply them live to every pod using the volume when they change, without a remount;
- remove them at NodeUnpublishVolume, and re-apply every recorded publication after a restart (`restore`).

Two pods publishing one volume each get the limit in their own cgroup. Every method is synchronous and short (a few
small file reads and writes), so on the event loop a publish and a change of limits never interleave.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from localdisk.cgroups import CgroupTree, Device, device_key, parse_device
from localdisk.config import NodeSettings
from localdisk.errors import FailedPrecondition, InvalidArgument
from localdisk.sizes import parse_size

log = logging.getLogger(__name__)
UNLIMITED = ("max", "unlimited")
MAX_LIMIT = 2**63 - 1
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"  # in volume_context with podInfoOnMount: true


@dataclass(frozen=True)
class IoLimits:
    """A volume's limits; None is no limit. Field names are the StorageClass parameter names' meaning; `IO_MAX`
    gives the io.max key of each."""

    read_iops: int | None = None
    write_iops: int | None = None
    read_bytes_per_second: int | None = None
    write_bytes_per_second: int | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def to_json(self) -> dict[str, int]:
        """Set limits by parameter name (`readIOPS`, ...): for the state file, the LocalVolume, the CLI."""
        return {key: value for key, attr in PARAMETERS.items() if (value := getattr(self, attr)) is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> IoLimits:
        values: dict[str, int] = {}
        for key, value in (data or {}).items():
            if key not in PARAMETERS:
                raise InvalidArgument(f"I/O limit {key!r} is not known; use {', '.join(PARAMETERS)}")
            if value is not None:
                values[PARAMETERS[key]] = _checked(key, int(value))
        return cls(**values)

    def io_max(self) -> dict[str, int | None]:
        return {IO_MAX[attr]: getattr(self, attr) for attr in IO_MAX}

    def changed(self, changes: Mapping[str, int | None]) -> IoLimits:
        """These limits with `changes` (attribute name: new value, None removing the limit) applied."""
        return replace(self, **changes)

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.to_json().items())
        return shown or "none"


PARAMETERS = {
    "readIOPS": "read_iops",
    "writeIOPS": "write_iops",
    "readBytesPerSecond": "read_bytes_per_second",
    "writeBytesPerSecond": "write_bytes_per_second",
}
"""StorageClass and VolumeAttributesClass parameter: `IoLimits` attribute."""
IO_MAX = {
    "read_bytes_per_second": "rbps",
    "write_bytes_per_second": "wbps",
    "read_iops": "riops",
    "write_iops": "wiops",
}


def _checked(key: str, value: int) -> int:
    if value <= 0 or value > MAX_LIMIT:
        raise InvalidArgument(f"parameter {key!r} is {value}; use a positive number, or 'max' for no limit")
    return value


def parse_parameters(parameters: Mapping[str, str], *, only_limits: bool = False) -> dict[str, int | None]:
    """The I/O limits among `parameters`, as attribute name: value (None for `max`/`unlimited`: no limit).

    IOPS are whole numbers; bytes per second are bytes or a quantity (`10Mi`, `50M`). With `only_limits`, any other
    key is an error (a VolumeAttributesClass may carry nothing else). Every error names its key."""
    changes: dict[str, int | None] = {}
    for key, text in parameters.items():
        attr = PARAMETERS.get(key)
        if attr is None:
            if only_limits:
                raise InvalidArgument(
                    f"mutable_parameters key {key[:64]!r} is not known; a VolumeAttributesClass of localdisk may set"
                    f" {', '.join(PARAMETERS)}"
                )
            continue
        value = text.strip()
        if value.lower() in UNLIMITED:
            changes[attr] = None
            continue
        try:
            number = int(value) if attr.endswith("iops") else parse_size(value)
        except (ValueError, InvalidArgument):
            unit = "a whole number of I/Os per second" if attr.endswith("iops") else "bytes per second (or 10Mi, 50M)"
            raise InvalidArgument(f"parameter {key!r} is {value[:64]!r}; use {unit}, or 'max' for no limit") from None
        changes[attr] = _checked(key, number)
    return changes


def limits_of(parameters: Mapping[str, str]) -> IoLimits:
    """The limits a CreateVolume asks for (StorageClass parameters, then VolumeAttributesClass ones over them)."""
    return IoLimits().changed(parse_parameters(parameters))


@dataclass(frozen=True)
class Publication:
    target: str
    pod_uid: str
    device: Device


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    limits: IoLimits = IoLimits()
    publications: tuple[Publication, ...] = field(default=())


@dataclass(frozen=True)
class Applied:
    """One publication of a volume as the kernel sees it: what io.max holds for its device in its pod's cgroup."""

    volume_id: str
    pod_uid: str
    device: Device
    cgroup: Path | None
    io_max: dict[str, int]
    throttled_usec: int | None  # io.stat's cost.wait + cost.indelay, where the kernel reports them


class VolumeQos:
    """The node's record of limits and publications (`state_dir`), and their enforcement in `cgroups`."""

    def __init__(self, state_dir: str | Path, cgroups: CgroupTree) -> None:
        self.state_dir = Path(state_dir)
        self.cgroups = cgroups

    # -- the record -----------------------------------------------------------------------------------------------
    def _path(self, volume_id: str) -> Path:
        return self.state_dir / (hashlib.sha256(volume_id.encode()).hexdigest()[:32] + ".json")

    def record(self, volume_id: str) -> VolumeRecord:
        """The volume's record; none (no limits, no publications) when it has no file or an unreadable one."""
        return self._read(self._path(volume_id)) or VolumeRecord(volume_id)

    @staticmethod
    def _read(path: Path) -> VolumeRecord | None:
        try:
            data = json.loads(path.read_text())
            return VolumeRecord(
                str(data["volume"]),
                IoLimits.from_json(data.get("limits")),
                tuple(
                    Publication(str(p["target"]), str(p["podUID"]), parse_device(str(p["device"])))
                    for p in data.get("publications", [])
                ),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidArgument) as exc:
            log.warning("%s: unreadable I/O limit record (%s); treated as none", path, exc)
            return None

    def _write(self, record: VolumeRecord) -> None:
        path = self._path(record.volume_id)
        if record.limits.empty and not record.publications:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        data = {
            "volume": record.volume_id,
            "limits": record.limits.to_json(),
            "publications": [
                {"target": p.target, "podUID": p.pod_uid, "device": device_key(p.device)} for p in record.publications
            ],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.state_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def records(self) -> list[VolumeRecord]:
        return [found for path in sorted(self.state_dir.glob("*.json")) if (found := self._read(path)) is not None]

    def limits(self, volume_id: str) -> IoLimits:
        return self.record(volume_id).limits

    # -- changes --------------------------------------------------------------------------------------------------
    def check(self, limits: IoLimits) -> None:
        """Refuse limits this node cannot enforce (cgroup v1, no io controller) before anything is recorded."""
        if not limits.empty:
            self.cgroups.check()

    def set_limits(self, volume_id: str, limits: IoLimits) -> list[str]:
        """Record `limits` for the volume and apply them to every pod that has it published; returns the problems
        met applying them live (a pod whose cgroup is gone, say), which do not undo the record."""
        self.check(limits)
        record = replace(self.record(volume_id), limits=limits)
        self._write(record)
        problems = []
        for publication in record.publications:
            try:
                self._apply(publication, limits)
            except FailedPrecondition as exc:
                problems.append(exc.message)
        return problems

    def forget(self, volume_id: str) -> None:
        """The volume is deleted: its record goes (a new volume of the same ID starts without limits)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(volume_id).unlink()

    def publish(self, volume_id: str, target: str, pod_uid: str | None, device: Device) -> IoLimits:
        """Record a publication and apply the volume's limits to the pod's cgroup; returns the limits applied.

        A volume with limits and no pod UID (podInfoOnMount off), no cgroup v2 or no cgroup for the pod is refused
        with `FailedPrecondition`: its limits would silently not hold."""
        limits = self.limits(volume_id)
        if pod_uid is None:
            if not limits.empty:
                raise FailedPrecondition(
                    f"volume {volume_id} has I/O limits ({limits}) and NodePublishVolume carries no pod UID"
                    f" ({POD_UID_KEY}): set podInfoOnMount: true in the CSIDriver"
                )
            return limits
        self.check(limits)
        publication = Publication(target, pod_uid, device)
        record = self.record(volume_id)
        others = tuple(p for p in record.publications if p.target != target)
        self._write(replace(record, publications=(*others, publication)))
        if not limits.empty:
            try:
                self._apply(publication, limits)
            except FailedPrecondition:
                self._write(replace(record, publications=others))
                raise
        return limits

    def unpublish(self, volume_id: str, target: str) -> None:
        """Remove the limits a publication at `target` put on its pod's cgroup (unless another publication of the
        same device in the same pod remains) and forget the publication."""
        record = self.record(volume_id)
        gone = [p for p in record.publications if p.target == target]
        if not gone:
            return
        kept = tuple(p for p in record.publications if p.target != target)
        for publication in gone:
            if any((p.pod_uid, p.device) == (publication.pod_uid, publication.device) for p in kept):
                continue
            cgroup = self.cgroups.pod_cgroup(publication.pod_uid)
            if cgroup is not None:
                self.cgroups.clear_io_max(cgroup, publication.device)
        self._write(replace(record, publications=kept))

    def _apply(self, publication: Publication, limits: IoLimits) -> None:
        cgroup = self.cgroups.pod_cgroup(publication.pod_uid)
        if cgroup is None:
            raise FailedPrecondition(
                f"no cgroup for pod {publication.pod_uid} under {self.cgroups.root} (looked for the systemd and the"
                " cgroupfs layouts of the kubelet); is node.cgroup_root right?"
            )
        self.cgroups.set_io_max(cgroup, publication.device, limits.io_max())

    def restore(self, still_published: Callable[[str], bool]) -> int:
        """After a restart: re-apply the limits of every recorded publication whose target `still_published`, and
        forget the others (unpublished while we were down). Returns the publications re-applied."""
        applied = 0
        for record in self.records():
            kept = []
            for publication in record.publications:
                if not still_published(publication.target):
                    log.info("volume %s: publication at %s is gone; forgotten", record.volume_id, publication.target)
                    continue
                kept.append(publication)
                try:
                    self._apply(publication, record.limits)
                    applied += 1
                except FailedPrecondition as exc:
                    log.warning("volume %s: re-applying I/O limits: %s", record.volume_id, exc.message)
            if len(kept) != len(record.publications):
                self._write(replace(record, publications=tuple(kept)))
        return applied

    # -- what the kernel holds ------------------------------------------------------------------------------------
    def applied(self, record: VolumeRecord) -> list[Applied]:
        out = []
        for publication in record.publications:
            cgroup = self.cgroups.pod_cgroup(publication.pod_uid)
            io_max = self.cgroups.io_max(cgroup).get(publication.device, {}) if cgroup is not None else {}
            stat = self.cgroups.io_stat(cgroup).get(publication.device, {}) if cgroup is not None else {}
            waits = [stat[key] for key in ("cost.wait", "cost.indelay") if key in stat]
            out.append(
                Applied(
                    record.volume_id,
                    publication.pod_uid,
                    publication.device,
                    cgroup,
                    io_max,
                    sum(waits) if waits else None,
                )
            )
        return out


def for_node(settings: NodeSettings) -> VolumeQos:
    """The `VolumeQos` of a node's settings (`node.state_dir`, `node.cgroup_root`)."""
    return VolumeQos(settings.node_state_dir, CgroupTree(settings.cgroup_root))
