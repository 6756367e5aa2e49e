"""Every LVM command localdisk runs, in one place: the `Lvm` class.

Each method is one LVM invocation with a fixed argument list: names are checked against LVM's own rules and passed
after `--`, sizes in bytes, tags checked against LVM's tag alphabet; nothing a user typed reaches argv unchecked.
State is read with ONE report command per call (`lvm fullreport` in JSON, bytes, no suffixes), never one command per
volume. A failing command becomes a domain error through small pure classifiers of LVM's (LC_ALL=C) messages:
not found, insufficient space, already exists, in use; anything else is a `CommandFailed` that keeps argv and stderr.

Commands go through an `LvmExecutor`: one `lvm <command>` process per call (`ProcessExecutor`), or the same argument
lists fed to one long-lived `lvm` shell (`lvmshell.ShellExecutor`) without the backends noticing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from localdisk.errors import (
    AlreadyExists,
    BackendFailure,
    Busy,
    CommandFailed,
    InsufficientCapacity,
    InvalidArgument,
    LocalDiskError,
    NotFound,
    PoolGone,
)
from localdisk.runner import CommandResult, CommandRunner

REPORT_OPTIONS = ("--reportformat", "json", "--units", "b", "--nosuffix")
VG_FIELDS = ("vg_name", "vg_uuid", "vg_size", "vg_free", "vg_extent_size")
CACHE_FIELDS = (  # a cached volume's counters: dm-cache hits, misses and dirty blocks; dm-writecache's dirty blocks
    "cache_read_hits",
    "cache_read_misses",
    "cache_write_hits",
    "cache_write_misses",
    "cache_dirty_blocks",
    "writecache_writeback_blocks",
)
LV_FIELDS = (
    "lv_name",
    "lv_uuid",
    "lv_size",
    "lv_tags",
    "lv_attr",
    "pool_lv",
    "origin",
    "data_percent",
    "metadata_percent",
    "lv_time",
    "lv_path",
    "lv_layout",
    "lv_health_status",
    "sync_percent",
    *CACHE_FIELDS,
)
PV_FIELDS = ("pv_name", "pv_size", "pv_free", "pv_tags", "pv_attr")
# fullreport always prints its five subreports; the two we do not read are kept down to one short column each.
FULLREPORT_ARGS = (
    "fullreport",
    *REPORT_OPTIONS,
    *("--configreport", "vg", "-o", ",".join(VG_FIELDS)),
    *("--configreport", "lv", "-o", ",".join(LV_FIELDS)),
    *("--configreport", "pv", "-o", ",".join(PV_FIELDS)),
    *("--configreport", "pvseg", "-o", "pvseg_start"),
    *("--configreport", "seg", "-o", "seg_start"),
)

NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")  # LVM's VG/LV name alphabet; never starts with '-'
RESERVED_LV = re.compile(
    r"^(snapshot|pvmove)$|_(cdata|cmeta|corig|cpool|cvol|imeta|iorig|mimage|mlog|pmspare|rimage|rmeta|tdata|tmeta|vdata|vorigin|wcorig)"
)
DEVNAME = re.compile(r"^IDTYPE=\S+ .*\bDEVNAME=(\S+)", re.MULTILINE)
SAFE_DEVICE = re.compile(r"/dev/[A-Za-z0-9_+.:/-]+")  # a PV path fit for a devices file and an lvm shell line
TAG = re.compile(r"[A-Za-z0-9_+.\-/=!:&#]{1,1024}")

# Failures a devices file can cause (it hides a VG or one of its PVs): the command runs again, scanning everything.
_SCOPE_SUSPECT = re.compile(
    r"Volume group \"[^\"]*\" not found|Cannot process volume group|Couldn't find device|PV .* missing"
    r"|devices file|devicesfile",
    re.IGNORECASE,
)

# Classifiers of LVM's messages (LC_ALL=C), checked against messages recorded from LVM 2.03 in tests/lvm/data.
_NOT_FOUND = re.compile(
    r"Failed to find logical volume|not found in volume group|Volume group \"[^\"]*\" not found",
    re.IGNORECASE,
)
_NO_SPACE = re.compile(
    r"insufficient free space|Insufficient free space|Insufficient suitable allocatable extents"
    r"|free space in thin[- ]pool \S+ reached threshold|Thin pool \S+ is out of (data|metadata) space"
)
_EXISTS = re.compile(r"already exists in volume group")
_VG_GONE = re.compile(r"Volume group \"[^\"]*\" not found")
_IN_USE = re.compile(
    r" in use\b|Can't remove open logical volume|is used by another device"
    r"|remove ioctl on .* failed: Device or resource busy"
)


def is_not_found(stderr: str) -> bool:
    return bool(_NOT_FOUND.search(stderr))


def is_insufficient_space(stderr: str) -> bool:
    return bool(_NO_SPACE.search(stderr))


def is_already_exists(stderr: str) -> bool:
    return bool(_EXISTS.search(stderr))


def is_in_use(stderr: str) -> bool:
    return bool(_IN_USE.search(stderr))


def _detail(stderr: str) -> str:
    """The lines of LVM's stderr that explain the failure, without its WARNINGs and usage hints."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("WARNING:", "Run `"))]
    return "; ".join(useful[-3:] or lines[-3:])


def classify(argv: Sequence[str], returncode: int | None, stderr: str) -> LocalDiskError:
    """The domain error for a failed LVM command (pure: decided from its stderr alone)."""
    command = " ".join(argv[:2])
    detail = _detail(stderr)
    if _VG_GONE.search(stderr):  # every command of a pool names its own VG: the pool's storage is gone
        return PoolGone(f"{command}: {detail}: the volume group is gone (its disks died or were removed?)")
    if is_not_found(stderr):
        return NotFound(f"{command}: {detail}")
    if is_insufficient_space(stderr):
        return InsufficientCapacity(f"{command}: {detail}")
    if is_already_exists(stderr):
        return AlreadyExists(f"{command}: {detail}")
    if is_in_use(stderr):
        return Busy(f"{command}: {detail}; retry once it is no longer in use")
    return CommandFailed(list(argv), returncode, stderr)


# -- parsed state --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    uuid: str
    size: int
    tags: frozenset[str]
    attr: str
    pool: str  # the thin pool of a thin LV, "" otherwise
    origin: str
    data_percent: float | None
    metadata_percent: float | None
    created_at: datetime | None
    path: str
    layout: str = ""  # LVM's lv_layout: "linear", "striped", "raid,raid1", "cache", ...
    health: str = ""  # LVM's lv_health_status: "" when fine, "partial", "refresh needed", "mismatches exist"
    sync_percent: float | None = None  # a mirror's copy in sync, in percent
    cache_stats: tuple[tuple[str, int], ...] = ()  # a cached volume's `CACHE_FIELDS` that LVM reported

    def _attr(self, index: int) -> str:
        return self.attr[index] if len(self.attr) > index else "-"

    @property
    def hidden(self) -> bool:
        return self.name.startswith("[")

    @property
    def is_thin_pool(self) -> bool:
        return self._attr(0) == "t"

    @property
    def is_thin(self) -> bool:
        return self._attr(0) == "V"

    @property
    def active(self) -> bool:
        return self._attr(4) == "a"

    @property
    def open(self) -> bool:
        return self._attr(5) == "o"

    @property
    def zeroing(self) -> bool:
        """For a thin pool: newly provisioned blocks are zeroed before use."""
        return self._attr(7) == "z"

    @property
    def skip_activation(self) -> bool:
        return self._attr(9) == "k"

    @property
    def cached(self) -> bool:
        """A volume with a cache attached (dm-cache or dm-writecache): `pool` names its cache."""
        return self._attr(0) == "C"

    @property
    def partial(self) -> bool:
        """Some of its PVs are missing (a mirror that lost a leg still serves; a plain LV has lost data)."""
        return self._attr(8) == "p" or "partial" in self.health


@dataclass(frozen=True)
class PhysicalVolume:
    name: str  # its device, "[unknown]" when missing
    size: int
    free: int
    tags: frozenset[str]
    attr: str

    @property
    def allocatable(self) -> bool:
        return self.attr[:1] == "a"

    @property
    def missing(self) -> bool:
        return self.attr[2:3] == "m" or self.name == "[unknown]"


@dataclass(frozen=True)
class VgReport:
    """One volume group and all its logical volumes (hidden ones keep their [brackets]), as one report saw them."""

    vg: VolumeGroup
    lvs: Mapping[str, LogicalVolume]
    pvs: tuple[str, ...] = ()  # its physical volumes' device paths ("[unknown]" for a missing one)
    physical: tuple[PhysicalVolume, ...] = ()  # the same PVs, with their free space and tags

    def lv(self, name: str) -> LogicalVolume | None:
        return self.lvs.get(name)

    def in_pool(self, pool: str) -> list[LogicalVolume]:
        return [lv for lv in self.lvs.values() if lv.pool == pool]


def _int(value: Any, what: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise BackendFailure(f"lvm report: {what} is {value!r}, not a number of bytes") from None


def _percent(value: Any) -> float | None:
    text = str(value or "").strip()
    return float(text) if text else None


def parse_time(value: str) -> datetime | None:
    """`lv_time` as LVM prints it (`2026-11-27 08:39:45 +0000`, or seconds since the epoch under the lvmdbusd
    profile the lvm shell runs with), or None when LVM has none."""
    if not value:
        return None
    if value.isdigit():
        return datetime.fromtimestamp(int(value), UTC)
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S %z").astimezone(UTC)
    except ValueError:
        return None


def parse_lv(row: Mapping[str, Any]) -> LogicalVolume:
    tags = str(row.get("lv_tags", ""))
    return LogicalVolume(
        name=str(row["lv_name"]),
        uuid=str(row.get("lv_uuid", "")),
        size=_int(row.get("lv_size", "0"), "lv_size"),
        tags=frozenset(t for t in tags.split(",") if t),
        attr=str(row.get("lv_attr", "")),
        pool=str(row.get("pool_lv", "")),
        origin=str(row.get("origin", "")),
        data_percent=_percent(row.get("data_percent")),
        metadata_percent=_percent(row.get("metadata_percent")),
        created_at=parse_time(str(row.get("lv_time", ""))),
        path=str(row.get("lv_path", "")),
        layout=str(row.get("lv_layout", "")),
        health=str(row.get("lv_health_status", "")),
        sync_percent=_percent(row.get("sync_percent")),
        cache_stats=tuple(
            (key, int(str(row[key]))) for key in CACHE_FIELDS if str(row.get(key, "")).lstrip("-").isdigit()
        ),
    )


def parse_pv(row: Mapping[str, Any]) -> PhysicalVolume:
    return PhysicalVolume(
        name=str(row.get("pv_name", "")),
        size=_int(row.get("pv_size") or "0", "pv_size"),
        free=_int(row.get("pv_free") or "0", "pv_free"),
        tags=frozenset(t for t in str(row.get("pv_tags", "")).split(",") if t),
        attr=str(row.get("pv_attr", "")),
    )


def parse_report_json(text: str) -> list[dict[str, Any]]:
    """The `report` list of an LVM JSON report; BackendFailure if the output is not one."""
    try:
        data = json.loads(text)
        reports = data["report"]
        if not isinstance(reports, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise BackendFailure(f"lvm printed something that is not a JSON report: {text[:200]!r}") from None
    return reports


def target_vg(args: Sequence[str]) -> str | None:
    """The VG a command works on: every command of `Lvm` names it (`vg` or `vg/lv`) right after `--`."""
    if "--" not in args[:-1]:
        return None
    return args[list(args).index("--") + 1].split("/", 1)[0]


def usable_pvs(pvs: Sequence[str]) -> bool:
    """Whether a report's PVs can go into a devices file: all present (no `[unknown]`) and named by a /dev path."""
    return bool(pvs) and all(SAFE_DEVICE.fullmatch(pv) for pv in pvs)


def devices_in_file(path: Path) -> frozenset[str] | None:
    """The device names an LVM devices file lists (its `DEVNAME=` fields); None if there is no such file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return frozenset(DEVNAME.findall(text))


def devices_dir(env: Mapping[str, str]) -> Path:
    """Where LVM looks for devices files: `$LVM_SYSTEM_DIR/devices`, by default /etc/lvm/devices."""
    return Path(env.get("LVM_SYSTEM_DIR") or "/etc/lvm") / "devices"


def parse_fullreport(text: str, vg: str) -> VgReport:
    """The state of `vg` from `lvm fullreport` JSON output; NotFound if the report does not contain that VG."""
    for entry in parse_report_json(text):
        vgs = entry.get("vg") or []
        if not vgs or vgs[0].get("vg_name") != vg:
            continue
        row = vgs[0]
        group = VolumeGroup(
            name=vg,
            uuid=str(row.get("vg_uuid", "")),
            size=_int(row.get("vg_size"), "vg_size"),
            free=_int(row.get("vg_free"), "vg_free"),
            extent_size=_int(row.get("vg_extent_size"), "vg_extent_size"),
        )
        lvs = {lv.name: lv for lv in (parse_lv(r) for r in entry.get("lv") or [])}
        physical = tuple(parse_pv(r) for r in entry.get("pv") or [])
        return VgReport(group, lvs, tuple(pv.name for pv in physical), physical)
    raise NotFound(f"volume group {vg!r} not found")


# -- checks on what goes into argv ------------------------------------------------------------------------------------
def check_name(name: str, what: str = "name") -> str:
    if not NAME.fullmatch(name) or name in {".", ".."}:
        raise InvalidArgument(f"{what} {name!r} is not a valid LVM name ([A-Za-z0-9+_.-], not starting with '-')")
    return name


def check_lv_name(name: str) -> str:
    check_name(name, "logical volume name")
    if RESERVED_LV.search(name):
        raise InvalidArgument(f"logical volume name {name!r} uses a name LVM reserves for itself")
    return name


def check_tags(tags: Iterable[str]) -> list[str]:
    checked = list(tags)
    for tag in checked:
        if not TAG.fullmatch(tag):
            raise InvalidArgument(f"LVM tag {tag!r} has characters outside [A-Za-z0-9_+.-/=!:&#] or is too long")
    return checked


def _tag_args(option: str, tags: Iterable[str]) -> list[str]:
    return [arg for tag in check_tags(tags) for arg in (option, tag)]


def check_devices(devices: Sequence[str]) -> list[str]:
    """PV paths for a command line: /dev paths only, never something LVM would read as an option or a tag."""
    for device in devices:
        if not SAFE_DEVICE.fullmatch(device):
            raise InvalidArgument(f"device {device!r} is not a /dev path LVM can be given")
    return list(devices)


CACHE_MODES = frozenset({"writethrough", "writeback", "writecache"})


def layout_args(stripes: int, stripe_size: int, mirrors: int) -> list[str]:
    """lvcreate's options for a striped (`stripes` > 1), raid1 (`mirrors` copies > 1) or raid10 (both) LV."""
    if stripes < 1 or mirrors < 1 or (stripes > 1 and mirrors > 2):
        raise InvalidArgument(f"no LVM layout has {stripes} stripes and {mirrors} copies")
    size = ["-I", f"{stripe_size // 1024}k"] if stripe_size and stripes > 1 else []
    if mirrors > 1 and stripes > 1:
        return ["--type", "raid10", "-i", str(stripes), "-m", "1", *size]
    if mirrors > 1:
        return ["--type", "raid1", "-m", str(mirrors - 1)]
    if stripes > 1:
        return ["--type", "striped", "-i", str(stripes), *size]
    return []


def _size(size: int) -> str:
    if size <= 0:
        raise InvalidArgument(f"size {size} must be positive")
    return f"{size}b"


# -- executing -----------------------------------------------------------------------------------------------------
class LvmExecutor(Protocol):
    """Runs one LVM command (`["lvcreate", ...]`) and returns its result, whatever its exit code."""

    async def run(self, args: Sequence[str]) -> CommandResult: ...


@runtime_checkable
class ClosableExecutor(LvmExecutor, Protocol):
    async def aclose(self) -> None: ...


class ProcessExecutor:
    """One `lvm <command> ...` process per call, through the shared CommandRunner."""

    def __init__(self, runner: CommandRunner, *, binary: str = "lvm", timeout: float | None = None) -> None:
        self.runner = runner
        self.binary = binary
        self.timeout = timeout

    async def run(self, args: Sequence[str]) -> CommandResult:
        return await self.runner.run([self.binary, *args], check=False, timeout=self.timeout)


class Lvm:
    """The LVM commands localdisk uses, one method per command."""

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        executor: LvmExecutor | None = None,
        devices_file: str | None = None,
    ) -> None:
        if executor is None:
            executor = ProcessExecutor(runner or CommandRunner())
        self.executor = executor
        # Scanning devices is much of what an LVM command costs on a node with many disks. With `devices_file`,
        # once the VGs we work on have been reported, every command scans only their PVs: an LVM devices file of
        # that name (in LVM's devices directory) is written for them by `vgimportdevices` and passed as
        # `--devicesfile`. Not `--devices`: in the lvm shell of LVM 2.03.16 it makes later commands crash. A devices
        # file, once given, stays in force for the rest of a shell's life, so every command carries the same one
        # and a command that fails under it (a PV added, devices renamed at boot, a VG not yet in the file) runs
        # again in a fresh shell scanning everything; the next report rewrites the file.
        self.devices_file = devices_file
        self.pvs: dict[str, frozenset[str]] = {}  # VG -> its PVs, as its last report listed them
        self.scoped = False  # whether commands carry the devices file (written for exactly `pvs`)
        self._rewrite = True  # the next report writes the devices file (none yet, or it failed a command)

    async def aclose(self) -> None:
        """Stop what the executor keeps running (the lvm shell); a later command starts it again."""
        if isinstance(self.executor, ClosableExecutor):
            await self.executor.aclose()

    async def _unscope(self) -> None:
        if self.scoped:
            self.scoped = False
            await self.aclose()  # the shell would keep the devices file: the next command starts a fresh one

    async def _run(self, args: list[str]) -> CommandResult:
        if self.devices_file is not None:
            vg = target_vg(args)
            if vg is not None and vg in self.pvs:
                if self._rewrite:
                    await self._write_devices_file()
            elif self.scoped:
                await self._unscope()  # a VG not in the devices file (a pool being opened): scan everything
        if self.scoped and self.devices_file:
            result = await self.executor.run([args[0], "--devicesfile", self.devices_file, *args[1:]])
            if result.returncode != 0 and _SCOPE_SUSPECT.search(result.error_text):
                # A VG or PV not found may be the devices file's doing: once more, seeing every device.
                await self._unscope()
                self._rewrite = True
                result = await self.executor.run(args)
        else:
            result = await self.executor.run(args)
        if result.returncode != 0:
            raise classify(result.argv, result.returncode, result.error_text)
        return result

    # state
    async def report(self, vg: str) -> VgReport:
        """Everything about one VG and its LVs, from one `lvm fullreport`."""
        argv = [*FULLREPORT_ARGS, "--", check_name(vg, "volume group")]
        report = parse_fullreport((await self._run(argv)).text, vg)
        if self.devices_file is None:
            return report
        if self.scoped and not usable_pvs(report.pvs):
            await self._unscope()  # a PV of the VG was outside the devices file: read it again, seeing every device
            report = parse_fullreport((await self._run(argv)).text, vg)
        pvs = frozenset(report.pvs) if usable_pvs(report.pvs) else frozenset()
        if self.pvs.get(vg) != pvs:
            self.pvs[vg] = pvs
            self._rewrite = True  # written before the next command on a known VG: once for all pools at start-up
        return report

    async def _write_devices_file(self) -> None:
        """(Re)write the devices file for the PVs of every VG reported so far; unscoped if that cannot be done."""
        assert self.devices_file is not None
        await self._unscope()
        self._rewrite = False  # a failure here is not retried until the PVs change or a command fails scoped
        if not self.pvs or not all(self.pvs.values()):
            return  # a VG whose PVs we cannot name: keep scanning everything
        vgs = sorted(self.pvs)
        directory = devices_dir(self.executor_env())
        wanted = frozenset().union(*self.pvs.values())
        try:
            if devices_in_file(directory / self.devices_file) == wanted:
                self.scoped = True  # written by an earlier server for the same PVs (a restart): keep it
                return
            directory.mkdir(parents=True, exist_ok=True)
            (directory / self.devices_file).unlink(missing_ok=True)
        except OSError:
            return  # LVM's directory is read-only here (a container without /etc/lvm): scan everything
        result = await self.executor.run(["vgimportdevices", "--devicesfile", self.devices_file, "--", *vgs])
        self.scoped = result.returncode == 0

    def executor_env(self) -> Mapping[str, str]:
        env = getattr(self.executor, "env", None)
        return env if isinstance(env, Mapping) else os.environ

    # logical volumes
    async def create_linear(
        self,
        vg: str,
        lv: str,
        size: int,
        tags: Iterable[str],
        *,
        wipe: bool,
        stripes: int = 1,
        stripe_size: int = 0,
        mirrors: int = 1,
        pvs: Sequence[str] = (),
        active: bool = True,
    ) -> None:
        """A thick LV: linear, or striped over `stripes` PVs, or raid1 with `mirrors` copies, or raid10 (both), on
        the PVs `pvs` (every PV of the VG if empty). `wipe` clears old signatures and its first 4 KiB (`-W y -Z y`);
        either way the choice is explicit, because an LVM left to decide asks "Wipe it? [y/n]" and, with no
        terminal, fails. An inactive LV (`active` False: a cache LV before it is attached) is neither wiped nor
        zeroed: LVM can do neither without activating it."""
        choice = "y" if wipe and active else "n"
        await self._run(
            [
                *("lvcreate", "-y", "-W", choice, "-Z", choice, "-a", "y" if active else "n", "-L", _size(size)),
                *layout_args(stripes, stripe_size, mirrors),
                *("-n", check_lv_name(lv), *_tag_args("--addtag", tags)),
                *("--", check_name(vg, "volume group"), *check_devices(pvs)),
            ]
        )

    async def create_thin(self, vg: str, pool: str, lv: str, size: int, tags: Iterable[str]) -> None:
        # A new thin LV reads as zeros (unprovisioned blocks): no signature to wipe, and -W n saves a write.
        await self._run(
            [
                *("lvcreate", "-y", "-W", "n", "-a", "y", "-V", _size(size)),
                *("--thinpool", check_name(pool, "thin pool"), "-n", check_lv_name(lv), *_tag_args("--addtag", tags)),
                *("--", check_name(vg, "volume group")),
            ]
        )

    async def create_thin_snapshot(self, vg: str, origin: str, lv: str, tags: Iterable[str], *, activate: bool) -> None:
        """A thin snapshot of `origin`; `activate` also clears the activation-skip flag LVM sets on snapshots."""
        activation = ("-k", "n", "-a", "y") if activate else ("-k", "y", "-a", "n")
        await self._run(
            [
                *("lvcreate", "-y", "-s", *activation, "-n", check_lv_name(lv), *_tag_args("--addtag", tags)),
                *("--", f"{check_name(vg, 'volume group')}/{check_name(origin, 'origin')}"),
            ]
        )

    async def extend(self, vg: str, lv: str, size: int, pvs: Sequence[str] = ()) -> None:
        """Grow `lv` to `size` (a striped or RAID LV keeps its stripes and copies), on `pvs` if given."""
        target = f"{check_name(vg, 'volume group')}/{check_name(lv)}"
        await self._run(["lvextend", "-L", _size(size), "--", target, *check_devices(pvs)])

    # caches
    async def attach_cache(self, vg: str, lv: str, cachevol: str, mode: str) -> None:
        """Put LV `cachevol` in front of `lv`: dm-cache in `mode` writethrough or writeback, or dm-writecache
        (`mode` writecache). LVM renames `cachevol` to a hidden `<cachevol>_cvol` inside `lv`."""
        if mode not in CACHE_MODES:
            raise InvalidArgument(f"cache mode {mode!r} is not one of {sorted(CACHE_MODES)}")
        kind = ["--type", "writecache"] if mode == "writecache" else ["--type", "cache", "--cachemode", mode]
        target = f"{check_name(vg, 'volume group')}/{check_name(lv)}"
        await self._run(["lvconvert", "-y", *kind, "--cachevol", check_name(cachevol, "cache LV"), "--", target])

    async def detach_cache(self, vg: str, lv: str, *, keep: bool) -> None:
        """Flush `lv`'s cache and take it away: kept as an LV of its own (`--splitcache`) or removed (`--uncache`)."""
        target = f"{check_name(vg, 'volume group')}/{check_name(lv)}"
        await self._run(["lvconvert", "-y", "--splitcache" if keep else "--uncache", "--", target])

    async def tag_pv(self, device: str, tags: Iterable[str]) -> None:
        await self._run(["pvchange", *_tag_args("--addtag", tags), "--", *check_devices([device])])

    async def remove(self, vg: str, lv: str) -> None:
        await self._run(["lvremove", "-y", "--", f"{check_name(vg, 'volume group')}/{check_name(lv)}"])

    async def change_tags(self, vg: str, lv: str, *, add: Iterable[str] = (), delete: Iterable[str] = ()) -> None:
        target = f"{check_name(vg, 'volume group')}/{check_name(lv)}"
        await self._run(["lvchange", *_tag_args("--addtag", add), *_tag_args("--deltag", delete), "--", target])

    async def drop_tag(self, vg: str, lvs: Sequence[str], tag: str) -> None:
        """Remove `tag` from several LVs of `vg` in one lvchange (one metadata commit)."""
        targets = [f"{check_name(vg, 'volume group')}/{check_name(lv)}" for lv in lvs]
        await self._run(["lvchange", *_tag_args("--deltag", [tag]), "--", *targets])

    async def activate_lv(self, vg: str, lv: str, *, ignore_skip: bool = False) -> None:
        """Activate `lv`; `ignore_skip` also activates an LV with the activation-skip flag (a thin snapshot)."""
        skip = ["-K"] if ignore_skip else []
        await self._run(["lvchange", "-a", "y", *skip, "--", f"{check_name(vg, 'volume group')}/{check_name(lv)}"])

    async def deactivate_lv(self, vg: str, lv: str) -> None:
        await self._run(["lvchange", "-a", "n", "--", f"{check_name(vg, 'volume group')}/{check_name(lv)}"])

    async def repair(self, vg: str, lv: str, pvs: Sequence[str]) -> None:
        """Replace the images of RAID LV `lv` on missing PVs with new ones on `pvs` (resynced from the others)."""
        target = f"{check_name(vg, 'volume group')}/{check_name(lv)}"
        await self._run(["lvconvert", "-y", "--repair", "--", target, *check_devices(pvs)])

    async def remove_missing(self, vg: str) -> None:
        """Drop missing PVs that no LV uses any more from `vg` (never forced: an LV still on one keeps it)."""
        await self._run(["vgreduce", "--removemissing", "--", check_name(vg, "volume group")])

    async def activate_vg(self, vg: str) -> None:
        await self._run(["vgchange", "-a", "y", "--", check_name(vg, "volume group")])

    # volume groups and pools (set-up: the sandbox, tests, an administrator's tooling)
    async def create_vg(self, vg: str, devices: Sequence[str]) -> None:
        """A VG on fresh devices (vgcreate initialises them as PVs itself)."""
        if not devices or any(not d.startswith("/dev/") for d in devices):
            raise InvalidArgument(f"devices {list(devices)} must be paths under /dev")
        await self._run(["vgcreate", "-y", "--", check_name(vg, "volume group"), *devices])

    async def create_thin_pool(
        self, vg: str, pool: str, size: int, *, zero: bool = True, metadata: int | None = None
    ) -> None:
        zeroing = "y" if zero else "n"
        metadata_size = ("--poolmetadatasize", _size(metadata)) if metadata else ()
        await self._run(
            [
                *("lvcreate", "-y", "--type", "thin-pool", "-Z", zeroing, "-L", _size(size), *metadata_size),
                *("-n", check_lv_name(pool), "--", check_name(vg, "volume group")),
            ]
        )
