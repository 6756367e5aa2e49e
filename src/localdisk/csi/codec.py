"""Strict decoding of requests: a request that is not a well-formed message is INVALID_ARGUMENT, nothing worse.

betterproto2 parses leniently. Bytes that are not UTF-8 in a string field make the parse raise, which grpclib
answers with UNKNOWN; and a field sent with another wire type than the one its declaration implies keeps the raw
wire value (an int where a string belongs), which then breaks some servicer code far from the wire and comes out as
INTERNAL. `StrictProtoCodec` turns both into INVALID_ARGUMENT naming the message and the field, before any servicer
sees the request.
"""

from __future__ import annotations

from typing import Any

import betterproto2
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

_SCALARS: dict[str, type | tuple[type, ...]] = {
    betterproto2.TYPE_STRING: str,
    betterproto2.TYPE_BYTES: bytes,
    betterproto2.TYPE_BOOL: bool,
    betterproto2.TYPE_FLOAT: float,
    betterproto2.TYPE_DOUBLE: float,
    betterproto2.TYPE_MESSAGE: betterproto2.Message,
}


def ill_typed(message: betterproto2.Message, where: str = "") -> str | None:
    """The first field of `message` (recursively) whose value does not have its declared type, or None."""
    meta = message._betterproto  # type: ignore[arg-type]  # betterproto2 types this classproperty loosely
    for name, field in meta.meta_by_field_name.items():
        value = getattr(message, name)
        path = f"{where}{name}"
        if field.proto_type == betterproto2.TYPE_MAP:
            assert field.map_meta is not None
            key_meta, value_meta = field.map_meta
            if not isinstance(value, dict):
                return path
            for key, item in value.items():
                if _wrong(key_meta, key) or _wrong(value_meta, item):
                    return f"{path}[{key!r}]"
        elif field.repeated:
            if not isinstance(value, list):
                return path
            for index, item in enumerate(value):
                if (problem := _check(field, item, f"{path}[{index}]")) is not None:
                    return problem
        elif value is None:
            if not field.optional and field.proto_type != betterproto2.TYPE_MESSAGE:  # a group or unknown wire type
                return path
        elif (problem := _check(field, value, path)) is not None:
            return problem
    return None


def _check(field: betterproto2.FieldMetadata, value: Any, path: str) -> str | None:
    if _wrong(field, value):
        return path
    if isinstance(value, betterproto2.Message) and field.unwrap is None:
        return ill_typed(value, path + ".")
    return None


def _wrong(field: betterproto2.FieldMetadata, value: Any) -> bool:
    if field.unwrap is not None:  # a well-known wrapper (Int64Value, Timestamp, ...) held as its Python value
        return value is not None and not isinstance(value, type(field.unwrap()().to_wrapped()))
    expected = _SCALARS.get(field.proto_type)
    if expected is not None:
        return not isinstance(value, expected)
    return not isinstance(value, int) or isinstance(value, bool)  # integers and enums


class StrictProtoCodec(ProtoCodec):
    """grpclib's protobuf codec, refusing requests that do not decode into well-typed messages."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        what = getattr(message_type, "__name__", "message")
        try:
            message = super().decode(data, message_type)
        except Exception as exc:  # whatever the parser trips on, the bytes were not such a message
            raise GRPCError(Status.INVALID_ARGUMENT, f"the request is not a valid {what}: {exc}") from None
        if isinstance(message, betterproto2.Message) and (field := ill_typed(message)) is not None:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the request is not a valid {what}: field {field} has the wrong wire type"
            )
        return message
