"""`localdisk doctor`: does this host have what localdisk needs, and if not, how to fix it.

Checks are cheap probes (a version flag, a file in /proc or /sys, one ioctl); what is required depends on the
configured backends: a node with only partition pools does not need device-mapper.

Device-mapper is asked for its version (DM_VERSION on /dev/mapper/control) rather than looked for: the control node
can exist on a kernel without the driver (`dmsetup` creates it), and only the ioctl proves the driver answers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
import typer

from localdisk.commands.output import emit_json, table
from localdisk.errors import CommandFailed, LocalDiskError
from localdisk.runner import CommandRunner

if TYPE_CHECKING:
    from localdisk.config import NodeConfig


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


@dataclass(frozen=True)
class Tool:
    name: str
    argv: tuple[str, ...]
    package: str
    backends: frozenset[str]  # the check is required when one of these backends is configured ("*" = always)


TOOLS = (
    Tool("lvm2", ("lvm", "version"), "lvm2", frozenset({"lvm", "thin"})),
    Tool("thin-provisioning-tools", ("thin_check", "-V"), "thin-provisioning-tools", frozenset({"thin"})),
    Tool("udev", ("udevadm", "--version"), "udev", frozenset({"lvm", "thin", "partition"})),
    Tool("parted", ("parted", "--version"), "parted", frozenset({"partition"})),
    Tool("sgdisk", ("sgdisk", "--version"), "gdisk", frozenset({"partition"})),
    Tool("blkid", ("blkid", "-V"), "util-linux", frozenset({"*"})),
    Tool("wipefs", ("wipefs", "--version"), "util-linux", frozenset({"*"})),
    Tool("mkfs.ext4", ("mke2fs", "-V"), "e2fsprogs", frozenset({"*"})),
    Tool("resize2fs", ("resize2fs", "-P", "/dev/null"), "e2fsprogs", frozenset({"*"})),
    Tool("mkfs.xfs", ("mkfs.xfs", "-V"), "xfsprogs", frozenset({"*"})),
    Tool("mkfs.btrfs", ("mkfs.btrfs", "--version"), "btrfs-progs", frozenset({"*"})),
    Tool("user-mode-linux (sandbox)", ("linux.uml", "--version"), "user-mode-linux", frozenset()),
)
VERSION = re.compile(r"\d+\.\d+(\.\d+)?")


def _needed(tool: Tool, backends: set[str]) -> bool:
    return "*" in tool.backends or bool(tool.backends & backends)


async def _tool(runner: CommandRunner, tool: Tool, backends: set[str]) -> Check:
    required = _needed(tool, backends)
    try:
        result = await runner.run(list(tool.argv), timeout=15, check=False)
    except CommandFailed:
        return Check(tool.name, False, "not installed", f"apt-get install {tool.package}", required)
    output = result.text + result.error_text
    found = VERSION.search(output)
    return Check(tool.name, True, found.group(0) if found else "present", required=required)


DM_CONTROL = "/dev/mapper/control"
# struct dm_ioctl (linux/dm-ioctl.h) is 312 bytes and starts with version[3], data_size, data_start (all __u32).
DM_IOCTL_SIZE = 312
DM_IOCTL_HEAD = struct.Struct("=5I")
DM_VERSION = (3 << 30) | (DM_IOCTL_SIZE << 16) | (0xFD << 8) | 0  # _IOWR(DM_IOCTL, DM_VERSION_CMD, struct dm_ioctl)
NO_DEVICE_MAPPER = "no device-mapper in this kernel; LVM volumes cannot be activated"
WITHOUT_DEVICE_MAPPER = (
    "use the partition backend or run under `localdisk sandbox` (a kernel that has it as a module: modprobe dm_mod)"
)


def dm_version(
    control: str = DM_CONTROL,
    *,
    open_file: Callable[[str, int], int] = os.open,
    ioctl: Callable[[int, int, bytearray], object] = fcntl.ioctl,
) -> tuple[int, int, int]:
    """The kernel device-mapper driver's interface version, from DM_VERSION; OSError if the driver does not answer."""
    fd = open_file(control, os.O_RDWR | os.O_CLOEXEC)
    try:
        request = bytearray(DM_IOCTL_SIZE)
        DM_IOCTL_HEAD.pack_into(request, 0, 4, 0, 0, DM_IOCTL_SIZE, DM_IOCTL_SIZE)  # we speak 4.0.0, or later
        ioctl(fd, DM_VERSION, request)
        major, minor, patch = DM_IOCTL_HEAD.unpack_from(request)[:3]
        return major, minor, patch
    finally:
        os.close(fd)


def _proc_misc() -> str:
    try:
        return Path("/proc/misc").read_text()
    except OSError:
        return ""


def _device_mapper(
    backends: set[str],
    version: Callable[[], tuple[int, int, int]] = dm_version,
    proc_misc: Callable[[], str] = _proc_misc,
) -> Check:
    def check(ok: bool, detail: str, fix: str = "") -> Check:
        return Check("device-mapper", ok, detail, fix, required=bool(backends & {"lvm", "thin"}))

    try:
        major, minor, patch = version()
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return check(False, NO_DEVICE_MAPPER, WITHOUT_DEVICE_MAPPER)
        if exc.errno == errno.ENOENT:
            if "device-mapper" in proc_misc():
                return check(False, f"the driver is loaded but {DM_CONTROL} is missing", "create it: dmsetup mknodes")
            return check(False, f"{NO_DEVICE_MAPPER} (no {DM_CONTROL})", WITHOUT_DEVICE_MAPPER)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return check(False, f"cannot ask {DM_CONTROL}: permission denied", "run `localdisk doctor` as root")
        return check(False, f"{DM_CONTROL} does not answer DM_VERSION: {exc.strerror}", "see the kernel log (dmesg)")
    return check(True, f"kernel driver {major}.{minor}.{patch}")


def _cgroup() -> Check:
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    return Check("cgroup", True, "v2 (unified)" if v2 else "v1 or hybrid", required=False)


async def _pools(runner: CommandRunner, config: NodeConfig) -> list[Check]:
    from localdisk.discovery import Claims, DiskRules, summary, survey  # pydantic: kept out of `localdisk --help`

    checks: list[Check] = []
    claims = Claims()  # the disks every partition pool lists, so discovery reports them as taken
    for pool in config.pools:
        claims.name(f"partition pool {pool.name!r}", getattr(pool.config, "disks", ()))
    for pool in config.pools:
        where = f"pool {pool.backend}/{pool.name}"
        settings = pool.config.model_dump()
        if pool.backend in ("lvm", "thin"):
            vg = str(settings.get("volume_group", ""))
            result = await _quiet(runner, ["vgs", "--noheadings", "-o", "vg_name", "--", vg])
            rules = getattr(pool.config, "match", None)
            if result or not isinstance(rules, DiskRules):
                fix = "" if result else f"create it: vgcreate {vg} <disks>"
                checks.append(Check(where, result, f"volume group {vg}" + ("" if result else " not found"), fix))
                continue
            # Not made yet, but the pool finds its disks by rules: what set-up would make it from (read-only).
            found = await survey(rules, f"{pool.backend} pool {pool.name!r}", runner, claims=claims)
            blank = [f.disk.name for f in found.findings if f.state == "blank"]
            if not settings.get("setup"):
                fix = f"set setup = true to let localdisk make it from the blank disks matched, or vgcreate {vg}"
                detail = f"volume group {vg} not found; the rules match {len(blank)} blank disk(s)"
                checks.append(Check(where, False, detail, fix))
            elif blank:
                detail = f"volume group {vg} not made yet: set-up makes it from {', '.join(blank)}"
                checks.append(Check(where, True, detail))
            else:
                fix = "no disk the rules match is blank: attach one, or see docs/deploy.md, LVM pools from rules"
                checks.append(Check(where, False, f"volume group {vg} not made yet and nothing to make it from", fix))
            checks.append(Check(f"{where} rules", bool(blank), summary(found, {}), "" if blank else fix))
        elif pool.backend == "partition":
            disks = [str(d) for d in settings.get("disks", [])]
            missing = [d for d in disks if not _is_block(d)]
            rules = getattr(pool.config, "match", None)
            if disks or rules is None:
                checks.append(
                    Check(
                        where,
                        not missing,
                        f"{len(disks)} disk(s)" + (f", missing: {missing}" if missing else ""),
                        "" if not missing else "fix the disk paths (use /dev/disk/by-id/...)",
                    )
                )
            if isinstance(rules, DiskRules):  # what discovery would make of the disks, read-only
                found = await survey(rules, f"partition pool {pool.name!r}", runner, claims=claims)
                usable = any(f.state != "refused" for f in found.findings)
                fix = "no disk the rules match is blank or this pool's: see docs/deploy.md, Disks by rules"
                checks.append(Check(f"{where} rules", usable, summary(found, {}), "" if usable else fix))
    return checks


async def _quiet(runner: CommandRunner, argv: list[str]) -> bool:
    try:
        return (await runner.run(argv, timeout=30, check=False)).returncode == 0
    except CommandFailed:
        return False


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


async def run_checks(config: NodeConfig | None) -> list[Check]:
    runner = CommandRunner()
    backends = {p.backend for p in config.pools} if config else {"lvm", "thin", "partition"}
    checks = [_device_mapper(backends), _cgroup()]
    checks += [await _tool(runner, tool, backends) for tool in TOOLS]
    if config is not None:
        checks += await _pools(runner, config)
    return checks


def doctor(
    config: Annotated[str | None, typer.Option("--config", "-c", envvar="LOCALDISK_CONFIG")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check this host for what localdisk needs and say how to fix what is missing."""
    from localdisk.config import load

    try:
        node_config = load(config) if config else None
    except LocalDiskError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    checks = anyio.run(run_checks, node_config)
    failed = [c for c in checks if not c.ok and c.required]
    if as_json:
        emit_json(checks)
    else:
        rows = [
            (c.name, "ok" if c.ok else ("MISSING" if c.required else "optional, missing"), c.detail) for c in checks
        ]
        typer.echo(table(("CHECK", "STATUS", "DETAIL"), rows))
        fixes = [f"- {c.name}: {c.fix}" for c in checks if not c.ok and c.fix]
        if fixes:
            typer.echo("\nTo fix:\n" + "\n".join(fixes))
        typer.echo(f"\n{len(failed)} required check(s) failed" if failed else "\nall required checks passed")
    if failed:
        raise typer.Exit(1)
