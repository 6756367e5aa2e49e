"""Disks found by rules instead of listed by path, and the checks that keep discovery off disks holding anything.

A `/dev/disk/by-id` path names one physical disk, so a pool listing paths describes one machine. Rules (`DiskRules`:
by-id glob, kernel name glob, size range, rotational, transport, model, serial) describe a node group instead: "the
4 TB rotational SATA disks", "every NVMe namespace of at least 1 TB". One config then serves unlike nodes.

Matching a rule is not enough to be used. Discovery looks at every disk the kernel shows (sysfs, read from an
injectable root so tests can hand it a fake tree) and sorts each into

* `blank`: nothing on it that anyone could miss: no signature of any kind (wipefs probes filesystems, RAID and LVM
  labels, swap, partition tables), no partitions, not mounted, not swap, not held by md, LVM or dm (its sysfs
  `holders`), not read-only, not claimed by another pool of this process;
* `partitioned`: carrying a partition table and nothing else that is in use: only the backend can tell whether the
  table is one it made for this pool (the partition backend's label marker), so it decides;
* `refused`, with the reason: everything else. A refused disk is never written to, by this module or by a backend.

Nothing here writes to a disk: sysfs and /proc are read, `wipefs` only lists. A disk a pool names explicitly is not
discovered at all; it keeps that backend's adopt rules.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from localdisk.errors import CommandFailed, InvalidArgument
from localdisk.runner import CommandRunner
from localdisk.sizes import human, parse_size

log = logging.getLogger(__name__)

Transport = Literal["nvme", "sata", "sas", "scsi", "virtio", "usb", "mmc", "iscsi", "xen", "ubd", "loop", "unknown"]
# Kernel devices that are never a disk to partition or to make a PV of: RAM disks, compressed swap, device-mapper
# and md devices (made *from* disks), optical drives, floppies, network block devices.
NOT_DISKS = ("ram*", "zram*", "dm-*", "md*", "sr*", "fd*", "nbd*")
PARTITION_SIGNATURES = frozenset({"gpt", "PMBR"})


def _size(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from exc
    return value


ByteSize = Annotated[int, BeforeValidator(_size), Field(ge=0)]


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


Globs = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]


class DiskRules(BaseModel):
    """Which disks a pool takes, every given rule at once (a list offers alternatives). An empty rule set matches
    nothing: at least one rule must be given, so a typo cannot hand every blank disk of a node to a pool.

        [pools.partition.fast.match]
        transport = "nvme"
        min_size = "1T"
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    by_id: Globs = ()
    """Globs on the names under /dev/disk/by-id (`ata-ST4000NM*`, `nvme-Samsung_SSD_990*`, `wwn-0x5000c5*`)."""
    names: Globs = ()
    """Globs on kernel names (`sd*`, `nvme*n1`). Kernel names change across reboots; use them with other rules."""
    min_size: ByteSize | None = None
    """Smallest disk taken: bytes or a size like 500G, 4T, 512Gi."""
    max_size: ByteSize | None = None
    """Largest disk taken."""
    rotational: bool | None = None
    """true: spinning disks only; false: SSDs and NVMe only."""
    transport: Annotated[tuple[Transport, ...], BeforeValidator(_as_tuple)] = ()
    """How the disk is attached: nvme, sata, sas, scsi, virtio, usb, mmc, iscsi, xen, ubd, loop. Loop devices match
    only a rule that names the loop transport."""
    model: str | None = None
    """Glob on the model the disk reports (sysfs `device/model`, or udev's ID_MODEL)."""
    serial: str | None = None
    """Glob on the serial number the disk reports."""

    @model_validator(mode="after")
    def _sensible(self) -> DiskRules:
        if self == DiskRules.model_construct():
            raise ValueError("give at least one rule (by_id, names, min_size, max_size, rotational, transport, ...)")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min_size {human(self.min_size)} is larger than max_size {human(self.max_size)}")
        return self

    def mismatch(self, disk: SysDisk) -> str | None:
        """Why `disk` does not match, or None when it does."""
        if disk.transport == "loop" and "loop" not in self.transport:
            return "a loop device (only a rule with transport = loop takes those)"
        if self.by_id and not any(fnmatch.fnmatchcase(i, g) for i in disk.by_id for g in self.by_id):
            return f"no /dev/disk/by-id name matches {list(self.by_id)}"
        if self.names and not any(fnmatch.fnmatchcase(disk.name, g) for g in self.names):
            return f"kernel name not in {list(self.names)}"
        if self.min_size is not None and disk.size_bytes < self.min_size:
            return f"{human(disk.size_bytes)} is smaller than min_size {human(self.min_size)}"
        if self.max_size is not None and disk.size_bytes > self.max_size:
            return f"{human(disk.size_bytes)} is larger than max_size {human(self.max_size)}"
        if self.rotational is not None and disk.rotational != self.rotational:
            return "rotational" if disk.rotational else "not rotational"
        if self.transport and disk.transport not in self.transport:
            return f"transport {disk.transport} not in {list(self.transport)}"
        if self.model is not None and not fnmatch.fnmatchcase(disk.model, self.model):
            return f"model {disk.model!r} does not match {self.model!r}"
        if self.serial is not None and not fnmatch.fnmatchcase(disk.serial, self.serial):
            return f"serial {disk.serial!r} does not match {self.serial!r}"
        return None


@dataclass(frozen=True)
class SysDisk:
    """A whole disk as sysfs (and udev's database, where there is one) describe it."""

    name: str  # kernel name: sda, nvme0n1, vdb, loop3
    dev: str  # "major:minor"
    size_bytes: int
    rotational: bool
    transport: str
    model: str = ""
    serial: str = ""
    by_id: tuple[str, ...] = ()  # names under /dev/disk/by-id pointing at it
    read_only: bool = False
    holders: tuple[str, ...] = ()  # kernel names of the devices built on it (dm-0, md127)
    partitions: tuple[str, ...] = ()  # kernel names of its partitions
    partition_devs: tuple[str, ...] = ()  # their "major:minor"

    @property
    def path(self) -> str:
        """The stable path when udev made one (by-id, the first in sort order), else the kernel node."""
        return f"/dev/disk/by-id/{self.by_id[0]}" if self.by_id else f"/dev/{self.name}"

    def describe(self) -> str:
        facts = [human(self.size_bytes), self.transport, "rotational" if self.rotational else "non-rotational"]
        if self.model:
            facts.append(f"model {self.model!r}")
        return f"/dev/{self.name} ({', '.join(facts)})"


@dataclass(frozen=True)
class Roots:
    """Where the kernel's and udev's views are read from; tests point these at a fake tree."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    udev_data: Path = Path("/run/udev/data")
    proc: Path = Path("/proc")


HOST = Roots()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _udev_properties(roots: Roots, dev: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in _read(roots.udev_data / f"b{dev}").splitlines():
        if line.startswith("E:") and "=" in line:
            key, _, value = line[2:].partition("=")
            found[key] = value
    return found


def _transport(name: str, sysfs_path: str, udev: dict[str, str]) -> str:
    by_name = {"nvme": "nvme", "loop": "loop", "mmcblk": "mmc", "ubd": "ubd", "xvd": "xen", "vd": "virtio"}
    for prefix, transport in by_name.items():
        if name.startswith(prefix):
            return transport
    for marker, transport in (("/virtio", "virtio"), ("/usb", "usb"), ("/ata", "sata"), ("/end_device-", "sas")):
        if marker in sysfs_path:
            return transport
    if "/session" in sysfs_path:
        return "iscsi"
    bus = udev.get("ID_BUS", "")
    if bus in {"ata", "usb", "nvme"}:
        return "sata" if bus == "ata" else bus
    if bus == "scsi" or "/host" in sysfs_path:
        return "scsi"
    return "unknown"


def _serial(base: Path, udev: dict[str, str]) -> str:
    for candidate in (base / "device" / "serial", base / "serial"):
        if (text := _read(candidate)) and text != "(null)":  # UML's ubd prints "(null)" for a disk without one
            return text
    if serial := udev.get("ID_SERIAL_SHORT", ""):
        return serial
    try:  # SCSI: the unit serial number VPD page, a 4-byte header then ASCII
        page = (base / "device" / "vpd_pg80").read_bytes()
        return page[4:].decode("ascii", "replace").strip(" \x00")
    except OSError:
        return ""


def _by_id(roots: Roots) -> dict[str, list[str]]:
    """Kernel name -> the /dev/disk/by-id names pointing at it."""
    found: dict[str, list[str]] = {}
    directory = roots.dev / "disk" / "by-id"
    try:
        links = sorted(directory.iterdir())
    except OSError:
        return found
    for link in links:
        target = os.path.basename(os.path.realpath(link)) if link.is_symlink() else ""
        if target:
            found.setdefault(target, []).append(link.name)
    return found


def scan(roots: Roots = HOST) -> list[SysDisk]:
    """Every whole disk the kernel shows, with what rules look at; devices that are never disks are left out."""
    block = roots.sys / "block"
    try:
        names = sorted(p.name for p in block.iterdir())
    except OSError:
        return []
    ids = _by_id(roots)
    disks = []
    for name in names:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in NOT_DISKS):
            continue
        base = block / name
        dev = _read(base / "dev")
        try:
            sectors = int(_read(base / "size") or 0)
        except ValueError:
            continue
        if not dev or sectors == 0:
            continue  # a loop device with nothing attached, an empty card reader
        udev = _udev_properties(roots, dev)
        parts = sorted(c.name for c in base.iterdir() if (c / "partition").exists())
        try:
            holders = tuple(sorted(p.name for p in (base / "holders").iterdir()))
        except OSError:
            holders = ()
        disks.append(
            SysDisk(
                name=name,
                dev=dev,
                size_bytes=sectors * 512,  # sysfs counts 512-byte units whatever the logical sector size
                rotational=_read(base / "queue" / "rotational") == "1",
                transport=_transport(name, os.path.realpath(base), udev),
                model=_read(base / "device" / "model") or udev.get("ID_MODEL", "").replace("_", " "),
                serial=_serial(base, udev),
                by_id=tuple(ids.get(name, ())),
                read_only=_read(base / "ro") == "1",
                holders=holders,
                partitions=tuple(parts),
                partition_devs=tuple(_read(base / p / "dev") for p in parts),
            )
        )
    return disks


def in_use(roots: Roots = HOST) -> tuple[set[str], set[str]]:
    """The "major:minor" of every mounted device, and the kernel names of every active swap device."""
    mounted = set()
    for line in _read(roots.proc / "self" / "mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 2:
            mounted.add(fields[2])
    swaps = set()
    for line in _read(roots.proc / "swaps").splitlines()[1:]:
        if line.split():
            swaps.add(os.path.basename(os.path.realpath(line.split()[0])))
    return mounted, swaps


class Claims:
    """Which pool of this process has taken which disk, so two pools whose rules overlap never share one, and a
    disk another pool lists explicitly is never discovered. Keys are kernel names, resolved when asked."""

    def __init__(self) -> None:
        self._explicit: dict[str, str] = {}  # configured path -> owner
        self._taken: dict[str, str] = {}  # kernel name -> owner

    def name(self, owner: str, paths: Iterable[str]) -> None:
        """Note the disks `owner` lists by path (resolved at each check: the link may appear later)."""
        for path in paths:
            self._explicit[path] = owner

    def take(self, owner: str, kernel_name: str) -> bool:
        """Claim a discovered disk; False when another owner holds it."""
        holder = self.holder(kernel_name)
        if holder is not None and holder != owner:
            return False
        self._taken[kernel_name] = owner
        return True

    def holder(self, kernel_name: str) -> str | None:
        for path, owner in self._explicit.items():
            if os.path.basename(os.path.realpath(path)) == kernel_name:
                return owner
        return self._taken.get(kernel_name)

    def drop(self, owner: str, kernel_name: str) -> None:
        """Give back a discovered disk `owner` took and then did not use."""
        if self._taken.get(kernel_name) == owner:
            del self._taken[kernel_name]

    def release(self, owner: str) -> None:
        self._explicit = {p: o for p, o in self._explicit.items() if o != owner}
        self._taken = {n: o for n, o in self._taken.items() if o != owner}


CLAIMS = Claims()  # the process's pools share one; a test passes its own


@runtime_checkable
class Discovers(Protocol):
    """A backend whose pool finds its disks by rules: what its last pass made of each matching disk, by kernel
    name ("used...", "blank...", "refused: <why>"), for metrics and `doctor`."""

    discovered: dict[str, str]

    @property
    def finds_disks(self) -> bool:
        """Whether this pool has rules at all (a pool that only lists its disks reports nothing)."""
        ...

    def discover_soon(self) -> None:
        """Make the next `refresh_state` run a discovery pass, whatever its interval (a disk event came)."""
        ...


@dataclass(frozen=True)
class Finding:
    disk: SysDisk
    state: Literal["blank", "partitioned", "refused", "in the pool"]
    reason: str = ""  # why refused (or, for the other states, what the backend decided; filled in by it)


@dataclass
class Survey:
    """One discovery pass for one pool: the matching disks, sorted; and the disks the rules did not take."""

    findings: list[Finding] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)  # kernel name -> why the rules did not take it

    def of(self, state: str) -> list[Finding]:
        return [f for f in self.findings if f.state == state]


async def signatures_of(runner: CommandRunner, device: str) -> list[str] | str:
    """The signature types wipefs finds on `device` (listing only), or why it could not look."""
    try:
        text = (await runner.run(["wipefs", "--json", "--", device])).text
    except CommandFailed as exc:
        return f"wipefs could not probe it: {exc.stderr.strip() or exc.message}"
    if not text.strip():
        return []
    try:
        return sorted({str(s["type"]) for s in json.loads(text)["signatures"]})
    except (ValueError, KeyError, TypeError) as exc:
        return f"unexpected wipefs output ({exc})"


async def survey(
    rules: DiskRules,
    owner: str,
    runner: CommandRunner,
    *,
    claims: Claims = CLAIMS,
    roots: Roots = HOST,
    in_pool: Container[str] = (),
) -> Survey:
    """Sort the disks matching `rules` into blank, partitioned and refused (see the module docstring) for `owner`;
    the disks already `in_pool` (kernel names) are only listed, not looked at again.

    Only reads: sysfs, /proc, and `wipefs` listing signatures of the matching disks.
    """
    result = Survey()
    mounted, swaps = in_use(roots)
    for disk in scan(roots):
        why = rules.mismatch(disk)
        if why is not None:
            result.unmatched[disk.name] = why
            continue
        if disk.name in in_pool:
            result.findings.append(Finding(disk, "in the pool"))
            continue
        result.findings.append(await _sort(disk, owner, runner, claims, roots, mounted, swaps))
    return result


async def _sort(
    disk: SysDisk, owner: str, runner: CommandRunner, claims: Claims, roots: Roots, mounted: set[str], swaps: set[str]
) -> Finding:
    def refused(reason: str) -> Finding:
        return Finding(disk, "refused", reason)

    holder = claims.holder(disk.name)
    if holder is not None and holder != owner:
        return refused(f"taken by {holder}")
    if disk.read_only:
        return refused("read-only")
    if disk.holders:
        return refused(f"held by {', '.join(disk.holders)} (md, LVM or device-mapper)")
    if disk.name in swaps or any(p in swaps for p in disk.partitions):
        return refused("in use as swap")
    busy = sorted(d for d in (disk.dev, *disk.partition_devs) if d in mounted)
    if busy:
        return refused("mounted" if busy == [disk.dev] else "a partition of it is mounted")
    for part in disk.partitions:
        if any((roots.sys / "block" / disk.name / part / "holders").glob("*")):
            return refused(f"partition {part} is held by md, LVM or device-mapper")
    signatures = await signatures_of(runner, str(roots.dev / disk.name))
    if isinstance(signatures, str):
        return refused(signatures)
    if not signatures:
        if disk.partitions:
            return refused(f"the kernel shows partitions ({', '.join(disk.partitions)}) but no table: stale view")
        return Finding(disk, "blank")
    others = [s for s in signatures if s not in PARTITION_SIGNATURES]
    if others:
        return refused(f"carries {', '.join(others)} signature(s)")
    if "gpt" not in signatures:
        return refused("carries a partition table that is not GPT")
    return Finding(disk, "partitioned")


def summary(result: Survey, decided: dict[str, str]) -> str:
    """One line for the log: each matching disk and what became of it (`decided`: kernel name -> the backend's
    verdict, else the survey's own)."""

    def verdict(found: Finding) -> str:
        return decided.get(found.disk.name) or (f"refused: {found.reason}" if found.reason else found.state)

    parts = [f"{f.disk.describe()}: {verdict(f)}" for f in result.findings]
    return "; ".join(parts) or "no disk matches the rules"
