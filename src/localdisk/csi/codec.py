"""Strict decoding of requests: a request that is not a well-formed message is INVALID_ARGUMENT, nothing worse.

betterproto2 parses leniently. Bytes that are not UTF-8 in a string field make the parse raise, which grpclib
answers with UNKNOWN; and a field sent with another wire type than the one its declaration implies keeps the raw
wire value (an int where a string belongs), which then breaks some servicer code far from the wire and comes out as
INTERNAL. `StrictProtoCodec` turns both into INVALID_ARGUMENT naming the message and the field, before any servicer
sees the request.

betterproto2 also keeps every field it does not know by appending its bytes to one bytes object, which costs time
quadratic in their number: a Probe of 1 MiB of zero bytes took a minute to parse, holding the event loop all along.
`known_fields` drops them first, in one linear pass over the wire format that also refuses what no protobuf parser
accepts (field number 0, groups, a truncated field) and messages of more than `MAX_FIELDS` fields; requests are never
re-encoded, so nothing needs the unknown fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import betterproto2
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from localdisk.csi.status import brief

# A CSI request holds tens of fields; a CreateVolume listing every node of a 5000-node cluster as its topology some
# 40,000. Past this many (at any depth), parsing alone would take seconds of CPU per request.
MAX_FIELDS = 100_000
MAX_DEPTH = 32  # nesting of messages; CSI's deepest request nests five

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5
_FIXED_SIZES = {
    betterproto2.TYPE_FLOAT: 4,
    betterproto2.TYPE_FIXED32: 4,
    betterproto2.TYPE_SFIXED32: 4,
    betterproto2.TYPE_DOUBLE: 8,
    betterproto2.TYPE_FIXED64: 8,
    betterproto2.TYPE_SFIXED64: 8,
}
_CONTINUATION_BYTES = bytes(range(0x80, 0x100))


class MalformedMessage(ValueError):
    """The bytes are not protobuf wire format."""


class TooManyFields(ValueError):
    """The message holds more than `MAX_FIELDS` fields."""


@dataclass(frozen=True)
class _Field:
    nested: type[betterproto2.Message] | None  # the message type a length-delimited value holds, if any
    packed_size: int | None  # for a packed repeated scalar: 0 for varints, else the size of one element


_SCHEMAS: dict[type[betterproto2.Message], dict[int, _Field]] = {}


def _schema(message_type: type[betterproto2.Message]) -> dict[int, _Field]:
    schema = _SCHEMAS.get(message_type)
    if schema is None:
        meta = message_type._betterproto  # type: ignore[arg-type]  # a classproperty betterproto2 types loosely
        schema = {}
        for number, name in meta.field_name_by_number.items():
            field = meta.meta_by_field_name[name]
            nested = None
            if field.proto_type == betterproto2.TYPE_MAP:
                nested = meta.cls_by_field[name]
            elif field.proto_type == betterproto2.TYPE_MESSAGE:
                nested = field.unwrap() if field.unwrap is not None else meta.cls_by_field[name]
            packed = None
            if field.repeated and field.proto_type in betterproto2.PACKED_TYPES:
                packed = _FIXED_SIZES.get(field.proto_type, 0)
            schema[number] = _Field(nested, packed)
        _SCHEMAS[message_type] = schema
    return schema


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise MalformedMessage("a varint is truncated or longer than 10 bytes")


def known_fields(data: bytes, message_type: type[betterproto2.Message]) -> bytes:
    """`data` without the fields `message_type` does not declare, at any depth, in time linear in its length.

    Raises `MalformedMessage` for bytes that are not wire format, `TooManyFields` past `MAX_FIELDS`.
    """
    left = [MAX_FIELDS]
    kept = _known(data, 0, len(data), message_type, 0, left)
    return data if kept is None else kept


def _known(
    data: bytes, start: int, end: int, message_type: type[betterproto2.Message], depth: int, left: list[int]
) -> bytes | None:
    """The known fields of the message in data[start:end], or None when that is all of it."""
    if depth > MAX_DEPTH:
        raise MalformedMessage(f"messages nested more than {MAX_DEPTH} deep")
    schema = _schema(message_type)
    pieces: list[bytes] | None = None  # set once something is dropped or rewritten
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        tag_end = value_start = pos
        if number == 0:
            raise MalformedMessage("field number 0")
        if wire == _WIRE_VARINT:
            _, pos = _varint(data, pos, end)
        elif wire == _WIRE_FIXED64:
            pos += 8
        elif wire == _WIRE_FIXED32:
            pos += 4
        elif wire == _WIRE_LEN:
            length, value_start = _varint(data, pos, end)
            pos = value_start + length
        else:
            raise MalformedMessage(f"field {number} has wire type {wire}, which proto3 does not use")
        if pos > end:
            raise MalformedMessage(f"field {number} is truncated")
        field = schema.get(number)
        count = 1
        if field is not None and wire == _WIRE_LEN and field.packed_size is not None:
            value = data[value_start:pos]
            count += (
                (len(value) // field.packed_size)
                if field.packed_size
                else len(value.translate(None, _CONTINUATION_BYTES))
            )
        left[0] -= count
        if left[0] < 0:
            raise TooManyFields(f"more than {MAX_FIELDS} fields")
        if field is None:
            if pieces is None:
                pieces = [data[start:field_start]]
            continue
        inner = None
        if wire == _WIRE_LEN and field.nested is not None:
            inner = _known(data, value_start, pos, field.nested, depth + 1, left)
        if inner is not None:
            if pieces is None:
                pieces = [data[start:field_start]]
            pieces += [data[field_start:tag_end], betterproto2.encode_varint(len(inner)), inner]
        elif pieces is not None:
            pieces.append(data[field_start:pos])
    return None if pieces is None else b"".join(pieces)


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
            if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
                data = known_fields(data, message_type)
            message = super().decode(data, message_type)
        except TooManyFields as exc:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, f"the request {what} holds {exc}") from None
        except Exception as exc:  # whatever the parser trips on, the bytes were not such a message
            raise GRPCError(Status.INVALID_ARGUMENT, brief(f"the request is not a valid {what}: {exc}")) from None
        if isinstance(message, betterproto2.Message) and (field := ill_typed(message)) is not None:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the request is not a valid {what}: field {field} has the wrong wire type"
            )
        return message
