"""Filesystems and mounts on the node: format once, mount, bind, grow and measure a volume's device.

The CSI Node service (or any library user that wants a volume mounted) gives this module a device path and the
paths where the device must appear; volumes, backends and gRPC are not its business. Two decisions shape it:

* Data safety. `mkfs` runs only on a device on which `blkid -p` finds no signature of any kind, and never with a
  force flag. The probe is the whole guard: mkfs.ext4 (e2fsprogs 1.47) formats over an existing XFS without asking
  when stdin is not a terminal. A device with a filesystem other than the one asked for is `FailedPrecondition`,
  never reformatted.
* The mount table comes from /proc/self/mountinfo, parsed here, not from `findmnt --json`: it is a stable kernel
  interface (proc(5)), reading it costs no process although every call looks at it several times, it names the
  mounted device by major:minor and gives the root of bind mounts, which is what tells mounts apart, and it is
  a dozen lines to parse.
"""

# stat, mkdir and rmdir of local paths are as quick as the in-memory work around them; a worker thread per call
# would cost more than the call. Only statvfs, which asks the filesystem itself, runs in a thread.
# ruff: noqa: ASYNC240

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import anyio

from localdisk.beneath import MOUNT_FLAGS, Beneath, fd_path
from localdisk.errors import (
    AlreadyExists,
    BackendFailure,
    CommandFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unsupported,
)
from localdisk.runner import CommandRunner

FILESYSTEMS = ("ext4", "xfs", "btrfs")
MKFS: dict[str, list[str]] = {  # quick and quiet, no discard (backends hand out wiped devices); never forced
    "ext4": ["mkfs.ext4", "-q", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-K"],
}
# The smallest device each mkfs accepts (mkfs.xfs of xfsprogs 6.1: 300 MiB; mkfs.btrfs 6.2: 109 MiB, rounded up to
# what every pool's alignment reaches); ext4 formats a device of 1 MiB.
MIN_FS_BYTES: dict[str, int] = {"xfs": 300 * 1024 * 1024, "btrfs": 112 * 1024 * 1024}
# Mount options a bind mount can carry: per-mount (VFS) flags. Filesystem options apply when staging only.
BIND_FLAGS = frozenset(
    {"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime", "nodiratime", "diratime"}
    | {"relatime", "norelatime", "strictatime", "nostrictatime", "nosymfollow", "symfollow"}
)
_FLAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+=/@-]*$")
# Options that make mount(8) do something else than mount this device here, or act on other files.
_REFUSED_FLAGS = frozenset(
    {"bind", "rbind", "move", "remount", "loop", "offset", "sizelimit", "encryption", "helper", "user", "users"}
    | {"owner", "group", "nofail", "defaults", "auto", "noauto", "_netdev"}
)
MAX_STACKED = 16  # unmount at most this many mounts stacked on one path before giving up
_OCTAL = re.compile(r"\\([0-7]{3})")


# -- the mount table --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    dev: int  # st_dev of files in the mount (os.makedev(major, minor))
    root: str  # the path inside the filesystem that is mounted here: "/" unless a bind mount
    mount_point: str
    options: frozenset[str]  # per-mount options
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse mountinfo text (see proc(5)); lines that do not have its shape are skipped."""
    mounts: list[MountInfo] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    dev=os.makedev(int(major), int(minor)),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fs_type=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=frozenset(fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


# -- checks -----------------------------------------------------------------------------------------------------
def mount_flags(flags: Iterable[str], field: str = "mount_flags") -> list[str]:
    """Check mount flags from a request before they reach mount(8) as one `-o` argument.

    A flag is one option: no commas (they would smuggle in more options), no spaces, and none of the options that
    turn a mount into something else (`bind`, `remount`, `loop=`, `X-mount.*`, ...).
    """
    checked: list[str] = []
    for flag in flags:
        name = flag.split("=", 1)[0].lower()
        if not _FLAG.match(flag):
            raise InvalidArgument(
                f"{field}: {flag!r} is not a single mount option; give one option per entry, made of letters, digits"
                " and _.:+=/@-"
            )
        if name in _REFUSED_FLAGS or name.startswith("x-"):
            raise InvalidArgument(f"{field}: mount option {flag!r} is not allowed for volumes")
        checked.append(flag)
    return checked


def _absolute(path: str, what: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return path


def device_number(device: str) -> int:
    """The device number (st_rdev) of a block device node; `FailedPrecondition` when it is not one."""
    _absolute(device, "device")
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise FailedPrecondition(f"device {device} does not exist; is the volume attached to this node?") from None
    if not stat.S_ISBLK(st.st_mode):
        raise FailedPrecondition(f"{device} is not a block device")
    return st.st_rdev


def _dev_name(number: int) -> str:
    return f"{os.major(number)}:{os.minor(number)}"


@dataclass(frozen=True)
class Signature:
    """What `blkid -p` found on a device: nothing, a filesystem, or some other signature."""

    fs_type: str | None = None
    description: str | None = None  # e.g. "an xfs filesystem", "a gpt partition table"

    @property
    def empty(self) -> bool:
        return self.description is None


def parse_probe(text: str) -> Signature:
    """Read `blkid -p -o export` output. On a partition blkid also describes the partition's own entry in the
    parent table (PART_ENTRY_*): that is not a signature on the device and says nothing about its content."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    fs_type = values.get("TYPE")
    usage = values.get("USAGE", "")
    if fs_type:
        kind = "filesystem" if usage == "filesystem" else f"{usage or 'unknown'} signature"
        return Signature(fs_type if usage == "filesystem" else None, f"{_article(fs_type)} {fs_type} {kind}")
    if values.get("PTTYPE"):
        return Signature(description=f"{_article(values['PTTYPE'])} {values['PTTYPE']} partition table")
    if any(key != "DEVNAME" and not key.startswith("PART_ENTRY_") for key in values):
        return Signature(description="an unidentified signature (" + ", ".join(sorted(values)) + ")")
    return Signature()


@dataclass(frozen=True)
class PathStats:
    """Usage of a staged or published volume, and what is wrong with it, if anything."""

    block: bool
    total_bytes: int = 0
    available_bytes: int = 0
    used_bytes: int = 0
    total_inodes: int = 0
    free_inodes: int = 0
    used_inodes: int = 0
    problem: str | None = None


class Mounter:
    """Formats, mounts and unmounts volume devices, through a `CommandRunner`."""

    def __init__(
        self, runner: CommandRunner | None = None, mountinfo: str = "/proc/self/mountinfo", root: str = "/"
    ) -> None:
        self.runner = runner or CommandRunner()
        self.mountinfo = mountinfo
        self.beneath = Beneath(root)

    def within(self, root: str) -> Mounter:
        """This mounter, working only beneath `root` (the kubelet root): what it makes, mounts onto, unmounts
        and removes there is reached without following a symlink (`localdisk.beneath`)."""
        return Mounter(self.runner, self.mountinfo, root)

    # -- reading the state ----------------------------------------------------------------------------------
    def mounts(self) -> list[MountInfo]:
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())

    def mount_at(self, path: str) -> MountInfo | None:
        """The mount visible at `path` (the last one stacked there), or None."""
        found = [m for m in self.mounts() if m.mount_point == path]
        return found[-1] if found else None

    def mounts_under(self, root: str) -> list[MountInfo]:
        prefix = root.rstrip("/") + "/"
        return [m for m in self.mounts() if m.mount_point == root or m.mount_point.startswith(prefix)]

    @staticmethod
    def mounted_from(mount: MountInfo, rdev: int) -> bool:
        """Whether `mount` is a filesystem on the device `rdev`. btrfs shows an anonymous major:minor, so its
        device is found through the mount source instead."""
        if mount.dev == rdev:
            return True
        if mount.source.startswith("/"):
            try:
                st = os.stat(mount.source)
            except OSError:
                return False
            return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev
        return False

    def block_binds(self, device: str) -> list[MountInfo]:
        """Bind mounts of the device node `device` (raw block publications), wherever they are."""
        node = os.path.realpath(device)
        try:
            node_stat = os.stat(node)
        except OSError:
            return []
        found = []
        for mount in self.mounts():
            if mount.dev != node_stat.st_dev or mount.mount_point == os.path.dirname(node):
                continue
            try:
                st = os.stat(mount.mount_point)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == node_stat.st_rdev:
                found.append(mount)
        return found

    async def probe(self, device: str) -> Signature:
        """Low-level probe (no cache) for any filesystem, partition table or other signature on `device`."""
        result = await self.runner.run(["blkid", "-p", "-o", "export", "--", _absolute(device, "device")], check=False)
        if result.returncode == 2:  # blkid: nothing was detected
            return Signature()
        if result.returncode == 8:
            return Signature(description="several conflicting signatures (blkid: ambivalent result)")
        if result.returncode != 0:
            raise CommandFailed(result.argv, result.returncode, result.error_text)
        return parse_probe(result.text)

    async def device_size(self, path: str) -> int:
        # blockdev takes no `--`; _absolute keeps the path from reading as an option.
        result = await self.runner.run(["blockdev", "--getsize64", _absolute(path, "device")])
        return int(result.text.strip())

    # -- formatting -----------------------------------------------------------------------------------------
    async def ensure_filesystem(self, device: str, fs_type: str | None, default_fs: str = "ext4") -> str:
        """Make sure `device` holds a filesystem and return its type.

        With `fs_type` given, the device must hold that filesystem or nothing at all (then it is formatted with
        it). Without, any supported filesystem on the device is kept, and an empty device gets `default_fs`.
        Anything else is refused: a device with data is never formatted."""
        for wanted in (fs_type, default_fs):
            if wanted is not None and wanted not in MKFS:
                raise InvalidArgument(f"filesystem {wanted!r} is not supported; use one of {', '.join(FILESYSTEMS)}")
        found = await self.probe(device)
        if found.fs_type is not None and found.fs_type == (fs_type or found.fs_type) and found.fs_type in MKFS:
            return found.fs_type
        if found.fs_type:
            raise FailedPrecondition(
                f"device {device} already holds {found.description}, not {fs_type}; localdisk never reformats a"
                f" device. Ask for fs_type {found.fs_type!r} if that is the volume's filesystem, or wipe the device"
                " yourself if its data is not needed"
                if fs_type
                else f"device {device} holds {found.description}, which localdisk does not mount"
                f" ({', '.join(FILESYSTEMS)}); localdisk never reformats a device"
            )
        if not found.empty:
            raise FailedPrecondition(
                f"device {device} holds {found.description}; localdisk formats only devices without any signature"
                " and never reformats one. Wipe the device yourself if its content is not needed"
            )
        published = self.block_binds(device)
        if published:
            raise FailedPrecondition(
                f"device {device} is published as a raw block volume at {published[0].mount_point}; its data is"
                " not a filesystem blkid can see, so it is not formatted"
            )
        chosen = fs_type or default_fs
        await self.runner.run([*MKFS[chosen], "--", device], timeout=600)
        again = await self.probe(device)
        if again.fs_type != chosen:
            raise BackendFailure(f"mkfs of {chosen} on {device} finished, but blkid now finds {again.description}")
        return chosen

    # -- stage / unstage ------------------------------------------------------------------------------------
    async def stage(
        self,
        device: str,
        staging: str,
        fs_type: str | None,
        flags: Sequence[str] = (),
        readonly: bool = False,
        default_fs: str = "ext4",
    ) -> str:
        """Mount `device` at the staging directory, formatted on first use; idempotent. `fs_type` None accepts
        the filesystem already on the device, or formats an empty one with `default_fs`. Returns the type."""
        rdev = device_number(device)
        existing = self.mount_at(staging)
        if existing is not None:
            if self.mounted_from(existing, rdev) and existing.fs_type == (fs_type or existing.fs_type):
                return existing.fs_type
            raise AlreadyExists(
                f"{staging} already has {existing.fs_type} from {existing.source} mounted, not"
                f" {fs_type or 'a filesystem'} from {device}; unstage it first"
            )
        options = list(mount_flags(flags))
        staging_fd = self.beneath.makedirs(staging)  # held from before the probe: nothing swapped in counts
        try:
            fs_type = await self.ensure_filesystem(device, fs_type, default_fs)
            if readonly:
                options.append("ro")
            if fs_type == "xfs" and "nouuid" not in options:
                options.append("nouuid")  # clones and snapshots share the UUID of their origin
            if self.mount_at(staging) is not None:
                raise AlreadyExists(f"{staging} got a mount while the volume was being prepared; unstage it first")
            fs_options = ["-o", ",".join(options)] if options else []
            argv = ["mount", "--no-canonicalize", "-t", fs_type, *fs_options, "--", device, fd_path(staging_fd)]
            await self._mount(argv, staging, (staging_fd,), user_flags=[f for f in flags if f])
        finally:
            os.close(staging_fd)
        return fs_type

    async def unstage(self, staging: str) -> None:
        """Unmount whatever is mounted at the staging directory; nothing mounted is success."""
        await self._unmount_all(staging)

    # -- publish / unpublish --------------------------------------------------------------------------------
    async def publish_filesystem(
        self, staging: str, target: str, readonly: bool = False, flags: Sequence[str] = ()
    ) -> None:
        """Bind-mount the staged filesystem at the target directory, read-only if asked; idempotent."""
        staged = self.mount_at(staging)
        if staged is None:
            raise FailedPrecondition(f"nothing is staged at {staging}; call NodeStageVolume first")
        options = [f for f in mount_flags(flags) if f in BIND_FLAGS and f not in ("ro", "rw")]
        want_ro = readonly or "ro" in flags or staged.readonly
        existing = self.mount_at(target)
        if existing is not None:
            if existing.dev == staged.dev and existing.root == staged.root and existing.readonly == want_ro:
                return
            raise AlreadyExists(
                f"{target} already has another mount ({existing.source}, {'ro' if existing.readonly else 'rw'});"
                " unpublish it first"
            )
        found = self.beneath.lstat(target)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            raise FailedPrecondition(f"target {target} exists and is not a directory")
        if want_ro:
            options.insert(0, "ro")
        with self.beneath.opened(staging, os.O_PATH | os.O_DIRECTORY) as source_fd:
            if self.mount_at(staging) != staged:
                raise FailedPrecondition(f"the mount at {staging} changed while publishing; try again")
            target_fd = self.beneath.makedirs(target)
            try:
                if _has_entries(target_fd):
                    raise FailedPrecondition(
                        f"target {target} is a directory that is not empty; its files would be hidden under the"
                        " volume and kept from being removed at unpublish. Publish onto an empty directory"
                    )
                argv = ["mount", "--no-canonicalize", "--bind", "--", fd_path(source_fd), fd_path(target_fd)]
                await self._mount(argv, target, (source_fd, target_fd))
            finally:
                os.close(target_fd)
        if options:  # what the bind carries from the staged mount, plus what was asked, set in one remount
            bits = 0
            for option in {*options, *(o for o in staged.options if o in MOUNT_FLAGS)}:
                bits |= MOUNT_FLAGS.get(option, 0)
            await self._settle_options(target, bits)

    async def _settle_options(self, target: str, flags: int) -> None:
        try:
            await anyio.to_thread.run_sync(self.beneath.remount_bind, target, flags)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._unmount_all(target)
            raise

    async def publish_block(self, device: str, target: str, readonly: bool = False) -> None:
        """Bind-mount the device node onto a file at the target path; idempotent.

        A read-only bind mount does not stop writes to a device node (the kernel checks mount read-only-ness for
        files, not for device special files), so read-only is enforced on the device itself (`blockdev --setro`);
        a device cannot then be published writable and read-only at the same time.
        """
        rdev = device_number(device)
        existing = self.mount_at(target)
        if existing is not None:
            if self._is_node_of(target, rdev) and existing.readonly == readonly:
                return
            raise AlreadyExists(f"{target} already has another mount ({existing.source}); unpublish it first")
        others = self.block_binds(device)
        clash = [m.mount_point for m in others if m.readonly != readonly]
        if clash:
            raise FailedPrecondition(
                f"device {device} is published {'writable' if readonly else 'read-only'} at {clash[0]}; a raw block"
                " volume is read-only for every user or for none, unpublish that first"
            )
        found = self.beneath.lstat(target)
        if found is not None and not stat.S_ISREG(found.st_mode):
            raise FailedPrecondition(f"target {target} exists and is not a regular file")
        target_fd = self.beneath.make_file(target)
        try:
            if readonly:
                await self.runner.run(["blockdev", "--setro", device])
            argv = ["mount", "--no-canonicalize", "--bind", "--", device, fd_path(target_fd)]
            try:
                await self._mount(argv, target, (target_fd,))
                if readonly:
                    await self._settle_options(target, MOUNT_FLAGS["ro"])
            except BaseException:
                if readonly and not others:
                    with anyio.CancelScope(shield=True):
                        await self.runner.run(["blockdev", "--setrw", device], check=False)
                raise
        finally:
            os.close(target_fd)

    async def unpublish(self, target: str, device: str | None = None) -> None:
        """Unmount the target and remove the file or directory there; already gone is success.

        `device`, when known, is the volume's device: once its last read-only block publication is gone it is
        made writable again."""
        mount = self.mount_at(target)
        was_readonly_block = mount is not None and mount.readonly and _is_block_node(target)
        await self._unmount_all(target)
        self.beneath.remove(target)
        if was_readonly_block and device is not None and not any(m.readonly for m in self.block_binds(device)):
            await self.runner.run(["blockdev", "--setrw", device], check=False)  # the device may be gone

    # -- stats / expansion ----------------------------------------------------------------------------------
    async def stats(self, path: str, device: str | None) -> PathStats:
        """Usage of the volume mounted or published at `path`, and a problem description when `path` is not
        the volume's device any more (device gone, nothing mounted, filesystem not answering)."""
        if not os.path.lexists(path):
            raise NotFound(f"volume path {path} does not exist")
        mount = self.mount_at(path)
        block = _is_block_node(path)
        if mount is None:
            return PathStats(block=block, problem=f"nothing is mounted at {path}: the mount is gone")
        rdev = os.stat(path).st_rdev if block else None
        problem = self._device_problem(device, mount, rdev)
        if block:
            try:
                size = await self.device_size(path)
            except CommandFailed as exc:  # ENXIO: the node names a device number that no longer exists
                return PathStats(block=True, problem=problem or f"the device published at {path} is gone: {exc}")
            if size == 0 and problem is None:
                problem = f"the device published at {path} has size 0: it was detached"
            return PathStats(block=True, total_bytes=size, problem=problem)
        try:
            vfs = await anyio.to_thread.run_sync(os.statvfs, path)
        except OSError as exc:
            return PathStats(block=False, problem=problem or f"the filesystem at {path} does not answer: {exc}")
        return PathStats(
            block=False,
            total_bytes=vfs.f_blocks * vfs.f_frsize,
            available_bytes=vfs.f_bavail * vfs.f_frsize,
            used_bytes=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
            total_inodes=vfs.f_files,
            free_inodes=vfs.f_ffree,
            used_inodes=vfs.f_files - vfs.f_ffree,
            problem=problem,
        )

    def holds(self, path: str, device: str, mount: MountInfo | None = None) -> bool:
        """Whether `path` is where `device` is staged or published: a mount of its filesystem (or a bind of one),
        or a bind of the device node itself. `mount` is what is mounted at `path`, when the caller has read it."""
        rdev = device_number(device)
        mount = mount or self.mount_at(path)
        if mount is None:
            return False
        return self._is_node_of(path, rdev) if _is_block_node(path) else self.mounted_from(mount, rdev)

    def publications(self, staged: MountInfo) -> list[MountInfo]:
        """The bind mounts of the staged filesystem `staged` elsewhere (its publications)."""
        return [
            m for m in self.mounts() if m.mount_id != staged.mount_id and m.dev == staged.dev and m.root == staged.root
        ]

    async def expand(self, path: str, device: str) -> int:
        """Grow the filesystem mounted at `path` online to the size of `device`; returns the device size.
        A raw block volume needs nothing."""
        if not os.path.lexists(path):
            raise NotFound(f"volume path {path} does not exist")
        rdev = device_number(device)
        if _is_block_node(path):
            if not self._is_node_of(path, rdev):
                raise FailedPrecondition(
                    f"{path} no longer refers to {device} ({_dev_name(rdev)}): the device was removed or renumbered"
                    " while published; unpublish and publish the volume again"
                )
            return await self.device_size(device)
        mount = self.mount_at(path)
        if mount is None:
            raise FailedPrecondition(f"nothing is mounted at {path}; stage and publish the volume first")
        if not self.mounted_from(mount, rdev):
            raise FailedPrecondition(f"{path} is not a mount of {device} ({mount.source} is mounted there)")
        if mount.fs_type == "ext4":
            argv = ["resize2fs", "--", device]
        elif mount.fs_type == "xfs":
            argv = ["xfs_growfs", "-d", "--", path]
        elif mount.fs_type == "btrfs":
            argv = ["btrfs", "filesystem", "resize", "max", path]  # btrfs takes no `--`; path is absolute
        else:
            raise Unsupported(f"cannot grow a {mount.fs_type} filesystem; localdisk grows {', '.join(FILESYSTEMS)}")
        try:
            await self.runner.run(argv, timeout=600)
        except CommandFailed as exc:
            if "Permission denied to resize" in exc.stderr:
                raise FailedPrecondition(
                    f"resize2fs may not grow the mounted ext4 on {device}: online ext4 resizing needs the"
                    " CAP_SYS_RESOURCE capability; run the node plugin privileged or with that capability"
                ) from exc
            raise
        return await self.device_size(device)

    # -- helpers --------------------------------------------------------------------------------------------
    def _is_node_of(self, path: str, rdev: int) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev

    def _device_problem(self, device: str | None, mount: MountInfo, block_rdev: int | None) -> str | None:
        if device is None:
            return "the backend reports no device for this volume"
        try:
            rdev = device_number(device)
        except (FailedPrecondition, InvalidArgument) as exc:
            return f"the volume's device is gone: {exc.message}"
        if block_rdev is not None:
            if block_rdev != rdev:
                return f"the device published at {mount.mount_point} ({_dev_name(block_rdev)}) is not {device}"
        elif not self.mounted_from(mount, rdev):
            return f"{mount.mount_point} is a mount of {mount.source}, not of the volume's device {device}"
        return None

    async def _mount(self, argv: list[str], path: str, fds: Sequence[int], user_flags: Sequence[str] = ()) -> None:
        """Run mount(8) onto `path`, held as one of `fds`. A failure with options the caller chose is told apart
        from any other: mount(8) says the same ("wrong fs type, bad option, bad superblock") for a filesystem
        option it does not know and for a broken filesystem."""
        before = self.mount_at(path)
        try:
            await self.runner.run(argv, pass_fds=fds)
        except BaseException as exc:
            # Keep nothing half-done: mount(8) may have bound and then failed to apply the options.
            with anyio.CancelScope(shield=True):
                after = self.mount_at(path)
                if after is not None and after != before:
                    await anyio.to_thread.run_sync(self.beneath.umount, path)
                refused = isinstance(exc, CommandFailed) and exc.returncode == 32 and bool(user_flags)
                if refused and await self._mounts_without(argv, path, fds, user_flags):
                    raise InvalidArgument(
                        f"the filesystem refused the mount options {list(user_flags)}: one of them is not an"
                        f" option it knows ({str(getattr(exc, 'stderr', '')).strip()})"
                    ) from exc
            raise

    async def _mounts_without(self, argv: list[str], path: str, fds: Sequence[int], flags: Sequence[str]) -> bool:
        """Whether the mount `argv` succeeds read-only without the caller's `flags` (undone right away)."""
        index = argv.index("-o") if "-o" in argv else -1
        kept = [o for o in argv[index + 1].split(",") if o not in flags] if index >= 0 else []
        trial = argv[:index] + argv[index + 2 :] if index >= 0 else list(argv)
        trial[1:1] = ["-o", ",".join([*kept, "ro"])]
        done = await self.runner.run(trial, check=False, pass_fds=fds)
        if done.returncode != 0:
            return False
        await anyio.to_thread.run_sync(self.beneath.umount, path)
        return True

    async def _unmount_all(self, path: str) -> None:
        for _ in range(MAX_STACKED):
            if self.mount_at(path) is None:
                return
            try:
                await anyio.to_thread.run_sync(self.beneath.umount, path)
            except (FailedPrecondition, BackendFailure):
                if self.mount_at(path) is None:  # unmounted by someone else meanwhile
                    return
                raise
        raise BackendFailure(f"{path} still has mounts after {MAX_STACKED} unmounts; inspect it by hand")


def _has_entries(dir_fd: int) -> bool:
    """Whether the directory held by the O_PATH descriptor `dir_fd` has any entry."""
    with os.scandir(fd_path(dir_fd)) as entries:
        return next(entries, None) is not None


def _is_block_node(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiox" else "a"
