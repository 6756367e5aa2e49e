"""Domain errors to gRPC status codes, in one place.

Every servicer method is wrapped by `rpc`: a `LocalDiskError` becomes its status with the error's message; any
other exception is logged with its traceback and becomes INTERNAL with a short message, so neither stderr nor a
traceback ever reaches a client.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import errors

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


def status_of(error: errors.LocalDiskError) -> Status:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return Status.INTERNAL


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def rpc(method: Callable[[Any, Req], Coroutine[Any, Any, Resp]]) -> Callable[[Any, Req], Coroutine[Any, Any, Resp]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req) -> Resp:
        try:
            return await method(self, request)
        except GRPCError:
            raise
        except errors.LocalDiskError as exc:
            code = status_of(exc)
            log.info("%s -> %s: %s", method.__name__, code.name, exc.message)
            raise GRPCError(code, exc.message) from exc
        except Exception as exc:
            log.exception("%s failed unexpectedly", method.__name__)
            raise GRPCError(Status.INTERNAL, f"{method.__name__}: internal error ({type(exc).__name__})") from exc

    return wrapper
