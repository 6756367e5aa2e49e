# ruff: noqa: ASYNC110, ASYNC240 - a benchmark driver: polling for the socket and writing the results cost nothing
"""ListVolumes and GetCapacity at many volumes, on the HOST, through the CSI unix socket of an in-process server.

The partition pool of partbench.py holds at most 256 volumes (two GPTs of 128 entries) and the sandbox's UML kernel
makes every system call a trip through the host, so the listing's own cost at 1000+ volumes is measured here, on
the fake backend: no process and no disk, only what localdisk itself does per volume (listing, sorting, converting
to CSI messages, encoding, the socket). Measured per level (BENCH_LIST_LEVELS, default 0,100,1000,5000):

- ListVolumes of everything in one page, p50/p95 over BENCH_CALLS calls, and the first of them apart (the first
  listing of the volumes just made, what a restarted server pays once);
- a paginated walk (max_entries BENCH_LIST_PAGE, default 100) of every page by next_token: the walk's p50/p95 and
  the p95 of one page;
- GetCapacity, p50/p95;
- a profile of the server side of one full ListVolumes (cProfile, in-process, at the largest level): the top
  functions by cumulative time, written to the JSON output.

The client reads the answers raw (`RawCodec`: it counts entries and takes next_token from the wire bytes) rather
than decoding them with betterproto2, whose pure-Python parsing of 1000 entries costs far more than the server's
side; a real CO decodes in Go. So the times are the server's, the socket's and the transport's.

Nothing here asserts a time: a benchmark is not a test.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from common import log, ms, pct
from grpclib.client import Channel
from grpclib.encoding.proto import ProtoCodec

from localdisk import config as node_config
from localdisk._proto.csi.v1 import ControllerStub, GetCapacityRequest, ListVolumesRequest
from localdisk.csi.controller import ControllerService
from localdisk.csi.server import serve
from localdisk.manager import CreateRequest, VolumeManager

MiB = 1024 * 1024
LEVELS = [int(x) for x in os.environ.get("BENCH_LIST_LEVELS", "0,100,1000,5000").split(",") if x.strip()]
CALLS = int(os.environ.get("BENCH_CALLS", "50"))
PAGE = int(os.environ.get("BENCH_LIST_PAGE", "100"))
POOL = "bench"


class RawCodec(ProtoCodec):
    """Requests encoded as usual; answers handed back as their wire bytes, undecoded."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def entries_and_token(data: bytes) -> tuple[int, str]:
    """A ListVolumesResponse read raw: the number of entries (field 1) and next_token (field 2)."""
    pos, entries, token = 0, 0, ""
    while pos < len(data):
        tag, pos = _varint(data, pos)
        length, pos = _varint(data, pos)  # both fields are length-delimited
        if tag >> 3 == 1:
            entries += 1
        elif tag >> 3 == 2:
            token = data[pos : pos + length].decode()
        pos += length
    return entries, token


async def walk(controller: ControllerStub) -> tuple[int, list[float]]:
    """Every page of a paginated listing, by next_token: (entries seen, latency of each page)."""
    token, seen, pages = "", 0, []
    while True:
        start = time.monotonic()
        reply: Any = await controller.list_volumes(ListVolumesRequest(max_entries=PAGE, starting_token=token))
        pages.append(time.monotonic() - start)
        count, token = entries_and_token(reply)
        seen += count
        if not token:
            return seen, pages


async def measure(controller: ControllerStub, level: int) -> dict[str, Any]:
    capacity_request = GetCapacityRequest(parameters={"backend": "fake", "pool": POOL})
    capacity, full, walks, pages = [], [], [], []
    listed = 0
    for _ in range(CALLS):
        start = time.monotonic()
        await controller.get_capacity(capacity_request)
        capacity.append(time.monotonic() - start)
    for _ in range(CALLS):
        start = time.monotonic()
        reply: Any = await controller.list_volumes(ListVolumesRequest())
        full.append(time.monotonic() - start)
        listed = entries_and_token(reply)[0]
    for _ in range(max(CALLS // 5, 3)):
        start = time.monotonic()
        seen, times = await walk(controller)
        walks.append(time.monotonic() - start)
        pages += times
        assert seen == level, (seen, level)
    return {
        "listed": listed,
        "get_capacity_p50_ms": ms(pct(capacity, 0.5)),
        "get_capacity_p95_ms": ms(pct(capacity, 0.95)),
        "list_volumes_first_ms": ms(full[0]),  # the first after the level was filled: nothing cached for them yet
        "list_volumes_p50_ms": ms(pct(full, 0.5)),
        "list_volumes_p95_ms": ms(pct(full, 0.95)),
        "paginated_walk_p50_ms": ms(pct(walks, 0.5)),
        "paginated_walk_p95_ms": ms(pct(walks, 0.95)),
        "page_p95_ms": ms(pct(pages, 0.95)),
        "per_volume_us": round(pct(full, 0.5) / level * 1e6, 1) if level else None,
    }


async def profile(manager: VolumeManager) -> str:
    """The server side of one full ListVolumes, in-process, under cProfile: the top 25 by cumulative time."""
    service = ControllerService(manager, "bench")
    await service.list_volumes(ListVolumesRequest())  # warm: what a long-running server has cached
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        reply = await service.list_volumes(ListVolumesRequest())
        bytes(reply)  # the encoding grpclib does before writing the reply to the socket
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


async def main(out_path: Path) -> None:
    config = node_config.parse({"pools": {"fake": {POOL: {"size_bytes": 1 << 60, "default": True}}}}, "listbench")
    manager = VolumeManager.from_config(config)
    results: dict[str, Any] = {"settings": {"levels": LEVELS, "calls": CALLS, "page": PAGE}}
    levels: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="listbench-") as tmp:
        socket = Path(tmp) / "csi.sock"
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve, manager, "bench", f"unix://{socket}")
            with anyio.fail_after(60):
                while not socket.exists():
                    await anyio.sleep(0.05)
            existing = 0
            async with Channel(path=str(socket), codec=RawCodec()) as channel:
                controller = ControllerStub(channel)
                for level in LEVELS:
                    for i in range(existing, level):  # in-process: filling is not what is measured
                        await manager.create_volume(CreateRequest(f"l-{i}", "fake", POOL, required_bytes=MiB))
                    existing = max(existing, level)
                    levels[str(level)] = await measure(controller, level)
                    log(f"at {level} volumes: {levels[str(level)]}")
            results["profile_at_" + str(existing)] = await profile(manager)
            tasks.cancel_scope.cancel()
    results["levels"] = levels
    out_path.write_text(json.dumps(results, indent=2))
    print(table(results), flush=True)
    print(f"\nwritten to {out_path}", flush=True)


def table(results: dict[str, Any]) -> str:
    lines = ["", "== ListVolumes / GetCapacity on the fake backend, host, through the socket (ms) =="]
    lines.append(
        f"{'volumes':>8s} {'first':>8s} {'list p50':>9s} {'list p95':>9s} {'us/vol':>7s} {'walk p50':>9s}"
        f" {'walk p95':>9s} {'page p95':>9s} {'cap p50':>8s} {'cap p95':>8s}"
    )
    for level, row in results.get("levels", {}).items():
        per = "" if row["per_volume_us"] is None else f"{row['per_volume_us']:.1f}"
        lines.append(
            f"{level:>8s} {row.get('list_volumes_first_ms', float('nan')):8.2f}"
            f" {row['list_volumes_p50_ms']:9.2f} {row['list_volumes_p95_ms']:9.2f} {per:>7s}"
            f" {row['paginated_walk_p50_ms']:9.2f} {row['paginated_walk_p95_ms']:9.2f} {row['page_p95_ms']:9.2f}"
            f" {row['get_capacity_p50_ms']:8.2f} {row['get_capacity_p95_ms']:8.2f}"
        )
    for key, text in results.items():
        if key.startswith("profile_at_"):
            lines.append(f"== server-side ListVolumes, {key} (5 calls + encoding) ==")
            lines += text.strip().splitlines()[:45]
    return "\n".join(lines)


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1] if len(sys.argv) > 1 else "bench-list.json").resolve())
