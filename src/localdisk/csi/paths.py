"""Checks of the paths the CO hands the Node service, before anything is mounted or created there.

The node plugin runs as root and mounts wherever it is told; a path is its most dangerous input. A staging or
target path must be absolute, already normalized (no `.`, `..`, `//` or trailing `/`), inside the kubelet root
from the node configuration, and must stay inside it once symlinks are resolved. The Node service then works on
the resolved path only, so a symlink swapped in later is not followed on the way to mount(8).
"""

from __future__ import annotations

import os
import posixpath

from localdisk.csi.validate import require
from localdisk.errors import InvalidArgument

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255  # NAME_MAX: the kernel refuses longer components with ENAMETOOLONG


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


class KubeletPaths:
    """Validates paths against one kubelet root directory (`node.kubelet_dir`)."""

    def __init__(self, root: str) -> None:
        if not root.startswith("/"):
            raise InvalidArgument(f"node.kubelet_dir {root!r} must be an absolute path")
        self.root = posixpath.normpath(root)

    def check(self, path: str, field: str) -> str:
        """The path with symlinks resolved, after checking it is a safe place inside the kubelet root."""
        require(path, field)
        if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or "\0" in path:
            raise InvalidArgument(f"{field} is not a usable path (too long or contains a NUL byte)")
        if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in path.split("/")):
            raise InvalidArgument(f"{field} has a component longer than {MAX_NAME_BYTES} bytes, which no file can have")
        if not path.startswith("/"):
            raise InvalidArgument(f"{field} {path!r} must be an absolute path")
        if posixpath.normpath(path) != path or path.startswith("//"):
            raise InvalidArgument(
                f"{field} {path!r} is not normalized; give it without '.', '..', '//' or a trailing '/'"
            )
        if not _inside(path, self.root):
            raise InvalidArgument(f"{field} {path!r} is outside the kubelet directory {self.root}")
        root_real = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if not _inside(real, root_real):
            raise InvalidArgument(
                f"{field} {path!r} leads through a symlink to {real}, outside the kubelet directory {self.root}"
            )
        return real

    def check_optional(self, path: str, field: str) -> str | None:
        return self.check(path, field) if path else None
