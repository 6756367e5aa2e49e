"""Domain errors of localdisk, grouped by what the caller should do about them.

The core and the backends raise only these; the CSI adapter maps them to gRPC status codes in one place
(`localdisk.csi.status`), the CLI maps them to exit codes. `retryable` tells a caller whether the same request may
succeed later without being changed (a busy volume, a failing command) or never will (a bad request, a wrong state).
"""

from __future__ import annotations


class LocalDiskError(Exception):
    """Base of every error localdisk raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# Permanent: the request must change before it can succeed.
class InvalidArgument(LocalDiskError):
    """The request is malformed or asks for something this driver does not do."""


class NotFound(LocalDiskError):
    """The volume, snapshot, backend or pool named does not exist."""


class AlreadyExists(LocalDiskError):
    """An object with that name exists but differs from what was asked for."""


class OutOfRange(LocalDiskError):
    """A size outside what the backend can provide (below its minimum, above its maximum)."""


class Unsupported(LocalDiskError):
    """The backend does not implement this operation (snapshots on a partition pool, say)."""


class FailedPrecondition(LocalDiskError):
    """The object is in a state that forbids the operation (a volume with snapshots, a foreign filesystem)."""


class PoolGone(FailedPrecondition):
    """The storage under a running pool went away (a disk died or was pulled): the pool goes down with this message
    (`localdisk.availability`), and calls that need it are refused until it is back; other pools go on."""


class InsufficientCapacity(LocalDiskError):
    """The pool has no room for the request now; it may have later, once space is freed."""


class ConfigError(LocalDiskError):
    """The node configuration is invalid; the message names the bad key."""


# Temporary: the same request may succeed when retried.
class Busy(LocalDiskError):
    """Another operation on the same object is under way."""

    retryable = True


class BackendFailure(LocalDiskError):
    """An external command or the storage itself failed unexpectedly."""

    retryable = True


class CommandFailed(BackendFailure):
    """An external command exited non-zero; keeps argv, exit code and stderr for diagnosis."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str, message: str | None = None) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:] if stderr.strip() else []
        detail = "; ".join(line.strip() for line in tail)
        text = message or f"{argv[0]} failed (exit {returncode})" + (f": {detail}" if detail else "")
        super().__init__(text)


class CommandTimeout(CommandFailed):
    """An external command did not finish in time and was killed."""
