"""Hostile bytes on the wire: requests that are not well-formed messages, sent to a real `localdisk serve`.

The other hostile tests build well-typed messages, so they never send what a broken or malicious client can: bytes
that are not UTF-8 in a string field, a field with another wire type than its declaration (an integer where the
volume ID belongs), truncated or random bytes. Sent raw through grpcio to every RPC of a running server, each must
be answered with a deliberate status (INVALID_ARGUMENT, or a normal answer when the bytes happen to decode into a
valid request), never UNKNOWN or INTERNAL. Found by this test: both cases above used to come back as UNKNOWN and
INTERNAL; `localdisk.csi.codec` now refuses them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdisk import VolumeManager, development_default
from localdisk.csi.server import services
from tests.csi_helpers import create_request
from tests.reliability.tally import TALLY

METHODS = sorted(
    path
    for servicer in services(VolumeManager.from_config(development_default()), "n")
    for path in servicer.__mapping__()
)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire: int, payload: bytes | int) -> bytes:
    tag = varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(payload, int)
        return tag + varint(payload)
    assert isinstance(payload, bytes)
    if wire == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload.ljust(8 if wire == 1 else 4, b"\0")[: 8 if wire == 1 else 4]


NOT_UTF8 = st.sampled_from([b"\xff", b"\xfe\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
PAYLOADS = st.one_of(st.binary(max_size=40), NOT_UTF8, NOT_UTF8.map(lambda b: b"pvc-" + b))
FIELDS = st.one_of(
    st.builds(field, st.integers(1, 20), st.just(0), st.integers(0, 2**64 - 1)),
    st.builds(field, st.integers(1, 20), st.sampled_from([1, 2, 5]), PAYLOADS),
    # a nested message field holding wrong types in turn
    st.builds(
        lambda n, inner: field(n, 2, inner),
        st.integers(1, 12),
        st.lists(st.builds(field, st.integers(1, 6), st.just(0), st.integers(0, 300)), max_size=3).map(b"".join),
    ),
)
VALID = bytes(create_request("pvc-wire", 1 << 20))
EXAMPLES = int(os.environ.get("LOCALDISK_WIRE_EXAMPLES", "600"))


def mutate(data: bytes, index: int, kind: str, byte: int) -> bytes:
    index %= max(len(data), 1)
    if kind == "truncate":
        return data[:index]
    if kind == "flip":
        return data[:index] + bytes([data[index] ^ byte if data else byte]) + data[index + 1 :]
    return data[:index] + bytes([byte]) + data[index:]


BODIES = st.one_of(
    st.binary(max_size=120),
    st.lists(FIELDS, min_size=1, max_size=6).map(b"".join),
    st.builds(
        mutate,
        st.just(VALID),
        st.integers(0, 10_000),
        st.sampled_from(["truncate", "flip", "insert"]),
        st.integers(1, 255),
    ),
)


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "kubelet").mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nkubelet_dir = "{tmp_path}/kubelet"\n\n[pools.fake.wire]\ndefault = true\n')
    socket = tmp_path / "csi.sock"
    argv = [sys.executable, "-m", "localdisk.cli", "serve", "--endpoint", f"unix://{socket}", "--node-id", "n"]
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([*argv, "--config", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.02)
        yield f"unix://{socket}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_malformed_requests_get_a_deliberate_status(endpoint: str) -> None:
    answers: Counter[str] = Counter()
    with grpc.insecure_channel(endpoint) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(method=st.sampled_from(METHODS), body=BODIES)
        def send(method: str, body: bytes) -> None:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            code, details = grpc.StatusCode.OK, ""
            try:
                call(body, timeout=30)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            answers[code.name] += 1
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, body, details)
            # UNIMPLEMENTED (ControllerModifyVolume, say) comes from the generated base class, without a message.
            assert details or code in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED), f"{code.name}, no message"

        try:
            send()
        finally:
            TALLY.hostile["raw bytes on the wire, every RPC"] += sum(answers.values())
            TALLY.notes.append(f"raw bytes on the wire: {dict(sorted(answers.items()))}")
    assert answers["INVALID_ARGUMENT"] > 0
