"""A raw HTTP/2 client for wire tests: sends what no gRPC library will (bad prefixes, lengths, headers), over h2.

Blocking, on a unix socket with a timeout on every read, so a server that never answers fails the test instead of
hanging it. It honours flow control: the server decides how much of a large body it lets in.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import h2.config
import h2.connection
import h2.events

GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def framed(message: bytes, *, flag: int = 0, length: int | None = None) -> bytes:
    """`message` behind gRPC's 5-byte prefix; `length` overrides the length it announces."""
    return struct.pack(">BI", flag, len(message) if length is None else length) + message


@dataclass
class Answer:
    headers: dict[str, str] = field(default_factory=dict)  # response headers and trailers together
    data: bytes = b""
    ended: bool = False  # END_STREAM or RST_STREAM seen

    @property
    def grpc_status(self) -> int | None:
        value = self.headers.get("grpc-status")
        return None if value is None else int(value)


class RawH2:
    def __init__(self, path: Path, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.closed = False
        self.answers: dict[int, Answer] = {}
        try:
            self.sock.connect(str(path))
            self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            self.conn.initiate_connection()
            self._flush()
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def start(self, method: str, headers: list[tuple[str, str]] | None = None, *, end: bool = False) -> int:
        """Open a stream calling `method` (a path like /csi.v1.Identity/Probe); returns its id."""
        stream_id: int = self.conn.get_next_available_stream_id()
        pseudo = [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"), (":path", method)]
        self.conn.send_headers(stream_id, pseudo + (GRPC_HEADERS if headers is None else headers), end_stream=end)
        self.answers[stream_id] = Answer()
        self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False, stop_when_answered: bool = True) -> int:
        """Send `data` as the server's windows allow; returns how much was sent before the server answered."""
        sent = 0
        while sent < len(data):
            if stop_when_answered and self.answers[stream_id].ended:
                return sent
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.pump()
                continue
            chunk = data[sent : sent + window]
            sent += len(chunk)
            self.conn.send_data(stream_id, chunk, end_stream=end and sent == len(data))
            self._flush()
        if end and not data:
            self.conn.end_stream(stream_id)
            self._flush()
        return sent

    def answer(self, stream_id: int) -> Answer:
        """Wait, at most the socket's timeout, for the stream's end; its answer."""
        deadline = time.monotonic() + self.timeout
        while not self.answers[stream_id].ended:
            assert time.monotonic() < deadline, f"no answer on stream {stream_id} within {self.timeout} s"
            self.pump()
        return self.answers[stream_id]

    def pump(self) -> None:
        """Read once from the socket and process what came."""
        data = self.sock.recv(1 << 16)
        if not data:
            self.closed = True
            for each in self.answers.values():
                each.ended = True
            return
        for event in self.conn.receive_data(data):
            answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived) and answer:
                answer.headers.update((str(k), str(v)) for k, v in event.headers)
            elif isinstance(event, h2.events.DataReceived) and answer:
                answer.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset) and answer:
                answer.ended = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                for other in self.answers.values():
                    other.ended = True
        self._flush()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)
