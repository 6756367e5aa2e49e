"""Paths under one directory, opened and changed without following anything swapped in after they were checked.

The Node service runs as root and mounts where kubelet tells it. Checking a path (inside the kubelet root, no
symlink leading out) and then mounting it by name leaves a window: a directory of the path swapped for a symlink
meanwhile sends the mount elsewhere. Here every step holds what it checked instead: a path is opened with openat2(2)
beneath the root with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, which refuses any symlink
on the way, and the open descriptor is what later steps use: mount(8) is given `/proc/self/fd/N` (passed to it,
with `--no-canonicalize` so it does not turn it back into a name), directories are made with mkdirat under a held
parent, and unmounting and removing happen through the held parent with no symlink followed at the end.

Callers give real paths (symlinks already resolved, as `KubeletPaths.check` returns them): a symlink found here
means something changed since, and the answer is `FailedPrecondition`, never a guess.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from localdisk.errors import BackendFailure, FailedPrecondition, InvalidArgument

SYS_OPENAT2 = 437  # the same number on every architecture (new syscalls share one table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
UMOUNT_NOFOLLOW = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
# Per-mount flags a bind mount can carry (mount(2)), by mount(8) option name.
MOUNT_FLAGS = {
    "ro": 0x1,  # MS_RDONLY
    "nosuid": 0x2,
    "nodev": 0x4,
    "noexec": 0x8,
    "noatime": 0x400,
    "nodiratime": 0x800,
    "relatime": 0x200000,
    "strictatime": 0x1000000,
    "nosymfollow": 0x100,
}

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, resolve: int = RESOLVE) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = int(_libc.syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def fd_path(fd: int) -> str:
    """The name a child process given `fd` (pass_fds) reaches it by."""
    return f"/proc/self/fd/{fd}"


class Beneath:
    """Opens, makes, unmounts and removes paths under `root` without following symlinks."""

    def __init__(self, root: str = "/") -> None:
        if not root.startswith("/"):
            raise InvalidArgument(f"{root!r} must be an absolute path")
        self.root = os.path.realpath(root)

    def _parts(self, path: str) -> list[str]:
        if path == self.root:
            return []
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise InvalidArgument(f"{path!r} is not under {self.root}")
        parts = path[len(prefix) :].split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise InvalidArgument(f"{path!r} is not a normalized path")
        return parts

    @staticmethod
    def _refused(path: str, exc: OSError) -> Exception:
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            return FailedPrecondition(
                f"{path} changed while it was used: a symlink now stands on the way; refusing to follow it"
            )
        if exc.errno == errno.ENOTDIR:
            return FailedPrecondition(f"{path}: a part of the path is not a directory")
        if exc.errno == errno.ENOENT:
            return FailedPrecondition(f"{path} does not exist")
        return BackendFailure(f"cannot open {path}: {exc.strerror}")

    @contextmanager
    def opened(self, path: str, flags: int = os.O_PATH) -> Iterator[int]:
        """An O_PATH (or `flags`) descriptor of `path`, closed on exit."""
        fd = self.open(path, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    def open(self, path: str, flags: int = os.O_PATH) -> int:
        parts = self._parts(path)
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not parts:
                return os.dup(root_fd)
            return openat2(root_fd, "/".join(parts), flags | os.O_NOFOLLOW)
        except OSError as exc:
            raise self._refused(path, exc) from exc
        finally:
            os.close(root_fd)

    def lstat(self, path: str) -> os.stat_result | None:
        """lstat of `path` reached without symlinks; None when nothing is there (or a parent is missing)."""
        parent, name = os.path.split(path)
        try:
            parent_fd = self.open(parent)
        except FailedPrecondition:
            return None
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(parent_fd)

    def makedirs(self, path: str) -> int:
        """Make `path` and its missing parents as directories; returns an O_PATH descriptor of it."""
        parts = self._parts(path)
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        done = self.root
        try:
            for part in parts:
                done = os.path.join(done, part)
                try:
                    os.mkdir(part, 0o750, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise self._refused(done, exc) from exc
                try:
                    child = openat2(fd, part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                except OSError as exc:
                    if exc.errno == errno.ENOTDIR:
                        raise FailedPrecondition(f"{done} exists and is not a directory") from exc
                    raise self._refused(done, exc) from exc
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def make_file(self, path: str) -> int:
        """Make `path` an (empty) regular file if nothing is there; returns an O_PATH descriptor of it."""
        parent, name = os.path.split(path)
        parent_fd = self.makedirs(parent)
        try:
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(name, flags, 0o600, dir_fd=parent_fd))
            except OSError as exc:
                if exc.errno == errno.EISDIR:
                    raise FailedPrecondition(f"{path} exists and is not a regular file") from exc
                raise self._refused(path, exc) from exc
            fd = openat2(parent_fd, name, os.O_PATH | os.O_NOFOLLOW)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FailedPrecondition(f"{path} exists and is not a regular file")
            return fd
        except OSError as exc:
            raise self._refused(path, exc) from exc
        finally:
            os.close(parent_fd)

    def umount(self, path: str) -> bool:
        """Unmount the mount at `path` (the top one), reaching it through its held parent and not following a
        symlink at the end; False when nothing is mounted there."""
        parent, name = os.path.split(path)
        with self.opened(parent) as parent_fd:
            target = os.fsencode(f"{fd_path(parent_fd)}/{name}")
            if _libc.umount2(target, UMOUNT_NOFOLLOW) == 0:
                return True
            code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):
            return False
        if code == errno.EBUSY:
            raise FailedPrecondition(f"{path} is busy: a process still uses the volume there")
        raise BackendFailure(f"cannot unmount {path}: {os.strerror(code)}")

    def remount_bind(self, path: str, flags: int) -> None:
        """Set the per-mount flags (MS_RDONLY, MS_NOSUID, ...) of the bind mount at `path` to exactly `flags`.
        The mount is reached through a descriptor opened beneath the root after it was made, so through it."""
        with self.opened(path) as fd:
            target = os.fsencode(fd_path(fd))
            if _libc.mount(None, target, None, ctypes.c_ulong(MS_REMOUNT | MS_BIND | flags), None) == 0:
                return
            code = ctypes.get_errno()
        raise BackendFailure(f"cannot set the options of the bind mount at {path}: {os.strerror(code)}")

    def remove(self, path: str) -> None:
        """Remove the empty directory or empty regular file at `path`; nothing there is success."""
        parent, name = os.path.split(path)
        try:
            parent_fd = self.open(parent)
        except FailedPrecondition:  # the parent is gone or not a directory: nothing can be at `path`
            return
        try:
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return
            try:
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=parent_fd)
                elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(name, dir_fd=parent_fd)
                else:
                    raise FailedPrecondition(f"{path} is not an empty file or directory; refusing to delete it")
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    raise FailedPrecondition(
                        f"{path} is not empty after unmounting; it holds files that are not on the volume, refusing"
                        " to delete them"
                    ) from exc
                if exc.errno == errno.EBUSY:
                    raise FailedPrecondition(f"{path} is still a mount point; unmount it first") from exc
                raise BackendFailure(f"cannot remove {path}: {exc.strerror}") from exc
        finally:
            os.close(parent_fd)
