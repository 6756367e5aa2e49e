"""The request decoder: linear in the size of a request, whatever fields it holds.

betterproto2 appends each unknown field to one bytes object, quadratic in their number (a 1 MiB Probe of zero bytes
took a minute). These tests check the decoder's result, not its speed: that unknown fields never reach betterproto2
(`_unknown_fields` stays empty at every depth), and that what is not wire format, or holds too many fields, is
refused before any parsing. The reliability suite measures the running server (tests/reliability/test_wire.py).
"""

from __future__ import annotations

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import given
from hypothesis import strategies as st

from localdisk._proto.csi.v1 import CapacityRange, CreateVolumeRequest, ProbeRequest
from localdisk.csi.codec import MAX_FIELDS, StrictProtoCodec, known_fields
from tests.csi_helpers import create_request
from tests.reliability.test_wire import field, varint

CODEC = StrictProtoCodec()
UNKNOWN = field(99, 0, 7) + field(98, 2, b"\xff" * 10) + field(97, 5, b"abcd") + field(96, 1, b"12345678")


def test_unknown_fields_are_dropped_at_every_depth() -> None:
    capacity = field(1, 0, 1 << 20) + UNKNOWN + field(2, 0, 2 << 20)
    entry = field(1, 2, b"backend") + UNKNOWN + field(2, 2, b"fake")
    # a long varint for a length (two bytes for 4) is valid wire format and must survive the rewrite
    padded = varint(2 << 3 | 2) + b"\x84\x00" + field(1, 0, 7) + field(9, 0, 1)
    data = UNKNOWN + field(1, 2, b"pvc-1") + UNKNOWN + field(2, 2, capacity) + field(4, 2, entry) + padded + UNKNOWN

    message = CODEC.decode(data, CreateVolumeRequest)

    assert message == CreateVolumeRequest(
        name="pvc-1", capacity_range=CapacityRange(required_bytes=7), parameters={"backend": "fake"}
    )
    assert message._unknown_fields == b""
    assert message.capacity_range is not None and message.capacity_range._unknown_fields == b""


def test_a_request_without_unknown_fields_is_passed_on_as_it_is() -> None:
    data = bytes(create_request("pvc-1", 1 << 20))
    assert known_fields(data, CreateVolumeRequest) is data


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (bytes(4 << 20), "field number 0"),  # 4 MiB of zero bytes: refused at the first byte
        (field(1, 2, b"abc")[:-1], "field 1 is truncated"),
        (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "varint"),
        (varint(5 << 3 | 3), "wire type 3"),
    ],
)
def test_what_is_not_wire_format_is_invalid_argument(data: bytes, complaint: str) -> None:
    with pytest.raises(GRPCError) as refused:
        CODEC.decode(data, CreateVolumeRequest)
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert complaint in (refused.value.message or "")


def test_more_fields_than_a_request_ever_holds_is_resource_exhausted() -> None:
    assert CODEC.decode(field(1, 0, 0) * MAX_FIELDS, ProbeRequest)._unknown_fields == b""
    with pytest.raises(GRPCError) as refused:
        CODEC.decode(field(1, 0, 0) * (MAX_FIELDS + 1), ProbeRequest)
    assert refused.value.status == Status.RESOURCE_EXHAUSTED
    # nested fields count too: empty parameters entries, each one field with nothing in it
    with pytest.raises(GRPCError) as nested:
        CODEC.decode(field(4, 2, b"") * (MAX_FIELDS + 1), CreateVolumeRequest)
    assert nested.value.status == Status.RESOURCE_EXHAUSTED


@given(st.binary(max_size=200))
def test_dropping_unknown_fields_changes_nothing_else(data: bytes) -> None:
    try:
        expected = CreateVolumeRequest.parse(data)
        kept = known_fields(data, CreateVolumeRequest)
    except Exception:  # not wire format, for betterproto2 or for us: nothing to compare
        return
    assert CreateVolumeRequest.parse(kept) == expected
