"""Domain errors to gRPC status codes, in one place.

Every servicer method is wrapped by `rpc`: a `LocalDiskError` becomes its status with the error's message; any
other exception is logged with its traceback and becomes INTERNAL with a short message, so neither stderr nor a
traceback ever reaches a client. Every message is cut to `MAX_MESSAGE_CHARS` (`brief`): messages quote the request,
and a grpc-message header larger than the client's header limit (16 KiB in grpc-go and grpcio) replaces the real
status with RESOURCE_EXHAUSTED "Stream removed".
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import errors, logs

log = logging.getLogger(__name__)

STATUS: dict[type[errors.LocalDiskError], Status] = {
    errors.InvalidArgument: Status.INVALID_ARGUMENT,
    errors.ConfigError: Status.FAILED_PRECONDITION,
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.OutOfRange: Status.OUT_OF_RANGE,
    errors.Unsupported: Status.INVALID_ARGUMENT,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.InsufficientCapacity: Status.RESOURCE_EXHAUSTED,
    errors.Busy: Status.ABORTED,
    errors.BackendFailure: Status.INTERNAL,
}


# Percent-encoded in the grpc-message header, a character takes at most 12 bytes (4 UTF-8 bytes, each as %XX): 1024
# characters stay under 12 KiB, within the 16 KiB a client accepts for all its headers.
MAX_MESSAGE_CHARS = 1024


def brief(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` if it is at most `limit` characters, else its start and end around a note of what was cut."""
    if len(message) <= limit:
        return message
    note = f" [...{len(message)} characters in all...] "
    head = (limit - len(note)) * 3 // 4
    tail = limit - len(note) - head
    return f"{message[:head]}{note}{message[len(message) - tail :]}"


def status_of(error: errors.LocalDiskError) -> Status:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return Status.INTERNAL


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def csi_method_name(python_name: str) -> str:
    return "".join(part.title() for part in python_name.split("_"))


def _subject(request: object) -> str:
    for field in ("volume_id", "source_volume_id", "snapshot_id", "name"):
        value = getattr(request, field, "")
        if value:
            return str(value)[:200]
    return ""


def rpc(method: Callable[[Any, Req], Coroutine[Any, Any, Resp]]) -> Callable[[Any, Req], Coroutine[Any, Any, Resp]]:
    """Wrap a servicer method: log context, metrics, and the one mapping from domain errors to gRPC status."""
    name = csi_method_name(method.__name__)

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req) -> Resp:
        start = time.monotonic()
        code = Status.OK
        with logs.bound(method=name, volume=_subject(request), request_id=uuid.uuid4().hex[:12]):
            try:
                response = await method(self, request)
            except GRPCError as exc:
                code = exc.status
                log.info("%s -> %s: %s", name, code.name, exc.message and brief(exc.message))
                if exc.message is None or len(exc.message) <= MAX_MESSAGE_CHARS:
                    raise
                raise GRPCError(code, brief(exc.message), exc.details) from exc
            except errors.LocalDiskError as exc:
                code = status_of(exc)
                log.info("%s -> %s: %s", name, code.name, brief(exc.message))
                raise GRPCError(code, brief(exc.message)) from exc
            except Exception as exc:
                code = Status.INTERNAL
                log.exception("%s failed unexpectedly", name)
                raise GRPCError(code, f"{name}: internal error ({type(exc).__name__}); see the driver's log") from exc
            finally:
                elapsed = time.monotonic() - start
                metrics = getattr(self, "metrics", None)
                if metrics is not None:
                    metrics.observe_rpc(name, code.name, elapsed)
            log.debug("%s ok in %.3fs", name, elapsed)
            return response

    return wrapper
