"""What the server takes off the wire before a servicer sees a request, and how much it holds while it does.

grpclib reads a request by its length prefix, whatever the length: it acknowledges data to the client, and so lets
it send more, until it holds the whole announced message. A prefix of 4 GiB made it buffer all a client sent (and
keep it), a 100 MiB message held the event loop while it was parsed, and malformed framing or headers came back as
UNKNOWN. `GuardedServer` is grpclib's `Server` with these limits, in the order a request meets them:

- its headers are checked first: a content-type other than gRPC's, no `te: trailers`, a bad `grpc-timeout` or no
  `:method`/`:path` is INVALID_ARGUMENT; a `grpc-encoding` other than identity is UNIMPLEMENTED (no compression);
- the 5-byte message prefix is read alone: a message over `Limits.max_message_bytes` is RESOURCE_EXHAUSTED at once,
  its body never read; the compressed flag is UNIMPLEMENTED; a stream that ends early is INVALID_ARGUMENT;
- a message over `Limits.small_message_bytes` first reserves its size from one server-wide budget
  (`Limits.budget_bytes`), given back when the request is decoded or its stream or connection goes; when the budget
  is spent the request is RESOURCE_EXHAUSTED;
- a message over `Limits.inline_decode_bytes` is decoded in a worker thread, one at a time, so the event loop
  keeps answering;
- HTTP/2 flow control bounds what a client can send that the server has not asked for: `Limits.stream_window` per
  stream, `Limits.connection_window` per connection.

So one stream holds at most one message (4 MiB) and a window; one connection at most its window and, per open stream
(h2 allows 100), one small message; large messages all together at most the budget. Requests are refused the way
gRPC servers refuse them (grpc-go uses the same codes), each with a message saying why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpclib.const
import h2.exceptions
from grpclib._typing import IServable
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline, encode_grpc_message
from grpclib.protocol import H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Handler, Server, Stream

from localdisk.csi.codec import StrictProtoCodec

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
PREFIX_BYTES = 5  # gRPC's message prefix: a compressed flag and a 4-byte big-endian length


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 4 * MiB  # gRPC's default; CSI requests are a few KiB
    small_message_bytes: int = 64 * KiB  # read without the budget
    inline_decode_bytes: int = 4 * KiB  # decoded on the event loop (at most some 2,000 fields: milliseconds)
    budget_bytes: int = 16 * MiB  # all larger messages being received or decoded at once
    stream_window: int = 64 * KiB  # HTTP/2's default, and its minimum
    connection_window: int = 1 * MiB


class GuardedServer(Server):
    """grpclib's `Server`, serving `servicers` within `limits` (see the module's docstring)."""

    def __init__(self, servicers: Collection[IServable], limits: Limits = Limits()) -> None:
        self.limits = limits
        self.budget_left = limits.budget_bytes
        self._codec_strict = StrictProtoCodec()
        self._decoding = asyncio.Lock()  # large decodes one at a time: a thread each would only share one GIL
        config = Configuration(
            http2_connection_window_size=limits.connection_window, http2_stream_window_size=limits.stream_window
        )
        super().__init__([_Guarded(servicer, self) for servicer in servicers], codec=self._codec_strict, config=config)

    def _protocol_factory(self) -> H2Protocol:  # grpclib's, with our Handler
        self.__gc_step__()
        handler = _CheckedHandler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        return H2Protocol(handler, self._config, self._h2_config)

    async def receive(self, stream: Stream[Any, Any], request_type: type[Any]) -> Any:
        """The one request message of a unary call, read and decoded within the limits."""
        raw: H2Stream = stream._stream
        try:
            prefix = await raw.recv_data(PREFIX_BYTES)
        except AssertionError:  # grpclib's buffer: the stream ended with fewer bytes than asked for
            raise GRPCError(Status.INVALID_ARGUMENT, "the request ended inside its 5-byte message prefix") from None
        if not prefix:
            raise GRPCError(Status.INVALID_ARGUMENT, "the request ended without a message")
        compressed, length = prefix[0], int.from_bytes(prefix[1:], "big")
        if length > self.limits.max_message_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"the request message is {length} bytes, more than the {self.limits.max_message_bytes} accepted",
            )
        if compressed == 1:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        if compressed:
            raise GRPCError(Status.INVALID_ARGUMENT, f"the message prefix has compressed flag {compressed}, not 0")
        reserved = length if length > self.limits.small_message_bytes else 0
        if reserved > self.budget_left:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"the server is already receiving {self.limits.budget_bytes - self.budget_left} bytes of large"
                f" requests; a {length}-byte request does not fit in {self.limits.budget_bytes}; retry later",
            )
        self.budget_left -= reserved
        try:
            try:
                data = await raw.recv_data(length)
            except AssertionError:
                raise GRPCError(
                    Status.INVALID_ARGUMENT, f"the request ended before the {length} bytes its prefix announced"
                ) from None
            if length <= self.limits.inline_decode_bytes:
                return self._codec_strict.decode(data, request_type)
            await self._decoding.acquire()
            decoding = asyncio.get_running_loop().run_in_executor(None, self._codec_strict.decode, data, request_type)
            # A cancelled request (its stream reset, its connection gone) leaves the thread running: the lock and
            # the budget go back when the thread ends, not before, or a client resetting streams could start any
            # number of decodes at once.
            decoding.add_done_callback(functools.partial(self._decoded, reserved))
            reserved = 0  # now the callback's to give back
            return await asyncio.shield(decoding)
        finally:
            self.budget_left += reserved

    def _decoded(self, reserved: int, decoding: asyncio.Future[Any]) -> None:
        self._decoding.release()
        self.budget_left += reserved
        if not decoding.cancelled():
            decoding.exception()  # retrieved here, in case its request was cancelled and nobody else will


class _Guarded:
    """A servicer whose unary handlers get their request from `GuardedServer.receive`."""

    def __init__(self, servicer: IServable, server: GuardedServer) -> None:
        self.servicer = servicer
        self.server = server

    def __mapping__(self) -> Mapping[str, grpclib.const.Handler]:
        return {
            path: handler._replace(func=functools.partial(self._call, handler))
            if handler.cardinality is Cardinality.UNARY_UNARY
            else handler
            for path, handler in self.servicer.__mapping__().items()
        }

    async def _call(self, handler: grpclib.const.Handler, stream: Stream[Any, Any]) -> None:
        request = await self.server.receive(stream, handler.request_type)
        await handler.func(cast(Stream[Any, Any], _Received(stream, request)))


class _Received:
    """The grpclib stream a generated handler expects, its request already received."""

    def __init__(self, stream: Stream[Any, Any], request: Any) -> None:
        self._stream = stream
        self._request = request

    async def recv_message(self) -> Any:
        request, self._request = self._request, None
        return request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def refusal(headers: list[tuple[str, str]]) -> tuple[int, Status, str] | None:
    """The HTTP status, gRPC status and message refusing a request with these headers; None to let it through."""
    named = dict(headers)
    if ":method" not in named or ":path" not in named:
        return 400, Status.INVALID_ARGUMENT, "the request lacks a :method or :path header"
    if named[":method"] != "POST":
        return 405, Status.INVALID_ARGUMENT, f"gRPC requests are POST, not {named[':method'][:32]!r}"
    content_type = named.get("content-type", "")
    base, _, subtype = content_type.partition("+")
    if base != GRPC_CONTENT_TYPE or subtype not in ("", "proto"):
        return 415, Status.INVALID_ARGUMENT, f"content-type {content_type[:64]!r} is not application/grpc(+proto)"
    if named.get("te") != "trailers":
        return 400, Status.INVALID_ARGUMENT, "the request lacks the header te: trailers"
    if named.get("grpc-encoding", "identity") != "identity":
        return 200, Status.UNIMPLEMENTED, f"grpc-encoding {named['grpc-encoding'][:32]!r} is not supported"
    try:
        Deadline.from_headers(headers)
    except ValueError:
        return 200, Status.INVALID_ARGUMENT, f"grpc-timeout {named['grpc-timeout'][:32]!r} is not valid"
    return None


class _CheckedHandler(Handler):
    """grpclib's per-connection handler, answering requests with bad headers with a deliberate status.

    grpclib refuses them itself, but as UNKNOWN (and a request without :method or :path with no answer at all).
    """

    def accept(self, stream: H2Stream, headers: Any, release_stream: Callable[[], Any]) -> None:
        refused = refusal(headers)
        if refused is None:
            super().accept(stream, headers, release_stream)
            return
        self.__gc_step__()
        self._tasks[stream] = self.loop.create_task(_refuse(stream, *refused, release_stream))


async def _refuse(
    stream: H2Stream, http_status: int, status: Status, message: str, release_stream: Callable[[], Any]
) -> None:
    try:
        log.info("refused a request: %s", message)
        headers = [
            (":status", str(http_status)),
            ("content-type", GRPC_CONTENT_TYPE),
            ("grpc-status", str(status.value)),
            ("grpc-message", encode_grpc_message(message)),
        ]
        if status is Status.UNIMPLEMENTED:
            headers.append(("grpc-accept-encoding", "identity"))
        await stream.send_headers(headers, end_stream=True)
        if stream.closable:
            stream.reset_nowait()
    except (h2.exceptions.ProtocolError, ConnectionError):  # the client went away first
        pass
    finally:
        release_stream()
