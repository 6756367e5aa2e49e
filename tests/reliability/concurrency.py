"""Concurrent CSI calls against one pool, as several sidecars and retries produce them: a backend-agnostic suite.

`ConcurrencySuite` is bound to a backend by a subclass that provides a `pool` fixture (a `Pool`: a manager whose
one pool is empty, its CSI parameters, and a `DiskView` of what really is on disk). The checks:

- 50 CreateVolume calls with one name at once: each answers OK or ABORTED (the name is busy), every OK carries
  the same volume ID, and retrying the ABORTED ones converges on that ID; one object on disk.
- 50 CreateVolume calls with different names: each answers OK or RESOURCE_EXHAUSTED; as many succeed as the pool
  has room for, the refused ones leave nothing behind (nothing pending, nothing half made), and the capacity reported
  afterwards is exactly what the volumes left.
- DeleteVolume, ControllerExpandVolume, ControllerGetVolume and CreateSnapshot on one volume at once: each answers
  OK, ABORTED, or the final answer its operation may give (NOT_FOUND once the volume is gone, RESOURCE_EXHAUSTED
  when it cannot grow, INVALID_ARGUMENT for snapshots where unsupported); a neighbouring volume's data is untouched.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import VolumeManager
from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerGetVolumeRequest,
    CreateSnapshotRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
)
from localdisk.sizes import MiB
from tests.csi_helpers import Csi, create_request, csi_for
from tests.reliability.tally import TALLY


class View(Protocol):
    def objects(self) -> dict[str, tuple[str, int]]: ...

    def volume_name(self, csi_name: str) -> str: ...

    def snapshot_name(self, csi_name: str) -> str: ...

    def problems(self) -> list[str]: ...


@dataclass
class Pool:
    manager: VolumeManager
    parameters: dict[str, str]  # the StorageClass parameters that select the pool
    view: View
    volume_bytes: int  # a size of which the pool holds at least a few, but fewer than 50
    room: int  # how many volumes of `volume_bytes` the empty pool holds
    snapshots: bool
    read_back: Callable[[str], bytes] | None = None  # read a volume's first bytes by device path
    write: Callable[[str, bytes], None] | None = None
    rounds: int = 5  # of the racing test (each costs a few seconds under UML)


def status(exc: BaseException) -> str:
    assert isinstance(exc, GRPCError), f"not a gRPC status: {exc!r}"
    return exc.status.name


async def answers(calls: Sequence[Awaitable[Any]]) -> list[tuple[str, Any]]:
    """Run the calls at once; each result is ("OK", answer) or (status name, the error)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    return [(status(r), r) if isinstance(r, BaseException) else ("OK", r) for r in results]


async def until_answered(call: Callable[[], Awaitable[Any]], seconds: float = 300.0) -> Any:
    """Retry ABORTED with jittered exponential backoff, as the sidecars do: without the jitter, callers that were
    refused together come back together and are refused together again."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while time.monotonic() < deadline:
        try:
            return await call()
        except GRPCError as exc:
            if exc.status != Status.ABORTED:
                raise
        attempt += 1
        await asyncio.sleep(random.uniform(0, min(2.0, 0.01 * 2**attempt)))
    raise AssertionError(f"still ABORTED after {seconds}s")


async def staggered(delay: float, call: Awaitable[Any]) -> Any:
    await asyncio.sleep(delay)
    return await call


@asynccontextmanager
async def served(pool: Pool) -> AsyncIterator[Csi]:
    async with csi_for(pool.manager) as csi:
        yield csi


@pytest.mark.anyio
class ConcurrencySuite:
    async def test_fifty_creates_of_one_name_make_one_volume(self, pool: Pool) -> None:
        async with served(pool) as csi:
            request = create_request("pvc-same-name", pool.volume_bytes, **self._where(pool))
            first = await answers([csi.controller.create_volume(request) for _ in range(50)])
            codes = Counter(code for code, _ in first)
            assert set(codes) <= {"OK", "ABORTED"}, codes
            assert codes["ABORTED"] > 0, f"the calls did not overlap: {codes}"
            TALLY.notes.append(f"50 creates of one name at once: {dict(codes)}")
            ids = {answer.volume.volume_id for code, answer in first if code == "OK"}
            assert len(ids) == 1, f"{codes}: {ids}"
            # Five of the refused callers retry, as the provisioner does, and converge on the same volume.
            again = await asyncio.gather(
                *[until_answered(lambda: csi.controller.create_volume(request)) for _ in range(5)]
            )
            assert {a.volume.volume_id for a in again} == ids
            on_disk = pool.view.objects()
            assert list(on_disk) == [pool.view.volume_name("pvc-same-name")], on_disk
            assert not pool.view.problems()
            TALLY.operations["concurrency"] += 55
            await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=ids.pop()))
            assert pool.view.objects() == {}

    async def test_fifty_creates_on_one_pool_fill_it_cleanly(self, pool: Pool) -> None:
        async with served(pool) as csi:
            empty = await csi.controller.get_capacity(GetCapacityRequest(parameters=pool.parameters))
            names = [f"pvc-fill-{i:02d}" for i in range(50)]
            where = self._where(pool)
            results = await answers(
                [csi.controller.create_volume(create_request(n, pool.volume_bytes, **where)) for n in names]
            )
            codes = Counter(code for code, _ in results)
            TALLY.notes.append(f"50 creates of different names at once: {dict(codes)}")
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (codes, [str(a) for c, a in results if c != "OK"][:3])
            made = {n: a.volume for n, (code, a) in zip(names, results, strict=True) if code == "OK"}
            assert len(made) == pool.room, f"{len(made)} created, the pool holds {pool.room}: {codes}"
            assert len({v.volume_id for v in made.values()}) == len(made)
            expected = {
                pool.view.volume_name(n): (v.volume_id.split(":", 2)[2], v.capacity_bytes) for n, v in made.items()
            }
            assert pool.view.objects() == expected, "the disk holds other than what was acknowledged"
            assert not pool.view.problems(), pool.view.problems()
            full = await csi.controller.get_capacity(GetCapacityRequest(parameters=pool.parameters))
            assert (full.maximum_volume_size or 0) < pool.volume_bytes, full
            used = sum(v.capacity_bytes for v in made.values())
            assert full.available_capacity == empty.available_capacity - used, (empty, full, used)
            TALLY.operations["concurrency"] += 50
            deletes = [csi.controller.delete_volume(DeleteVolumeRequest(volume_id=v.volume_id)) for v in made.values()]
            assert {code for code, _ in await answers(deletes)} == {"OK"}
            assert pool.view.objects() == {}
            after = await csi.controller.get_capacity(GetCapacityRequest(parameters=pool.parameters))
            assert after.available_capacity == empty.available_capacity, (after, empty)
            TALLY.operations["concurrency"] += len(deletes)

    async def test_racing_changes_to_one_volume(self, pool: Pool) -> None:
        async with served(pool) as csi:
            where = self._where(pool)
            created = await csi.controller.create_volume(create_request("pvc-neighbour", pool.volume_bytes, **where))
            neighbour = created.volume
            assert neighbour is not None
            payload = os.urandom(4096)
            device = (await pool.manager.get_volume(neighbour.volume_id)).device_path
            if pool.write is not None and device:
                pool.write(device, payload)
            allowed = {
                "expand": {"OK", "ABORTED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"},
                "delete": {"OK", "ABORTED"},
                "get": {"OK", "NOT_FOUND"},
                "snapshot": {"OK", "ABORTED", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
                if pool.snapshots
                else {"INVALID_ARGUMENT", "NOT_FOUND"},
            }
            seen: Counter[str] = Counter()
            rng = random.Random(round(time.time()))
            for round_ in range(pool.rounds):
                volume = (
                    await csi.controller.create_volume(create_request(f"pvc-race-{round_}", pool.volume_bytes, **where))
                ).volume
                assert volume is not None
                calls = self._racing_calls(csi, volume.volume_id, pool.volume_bytes, round_)
                rng.shuffle(calls)  # who wins the race differs per round; staggered starts land mid-operation
                results = await answers([staggered(rng.uniform(0, 0.3), call) for _, call in calls])
                for (kind, _), (code, answer) in zip(calls, results, strict=True):
                    assert code in allowed[kind], f"{kind}: {code} {answer}"
                    seen[f"{kind} {code}"] += 1
                    if kind == "expand" and code == "OK":
                        assert answer.capacity_bytes > pool.volume_bytes
                    if kind == "snapshot" and code == "OK":
                        snapshot = DeleteSnapshotRequest(snapshot_id=answer.snapshot.snapshot_id)
                        await until_answered(partial(csi.controller.delete_snapshot, snapshot))
                await until_answered(
                    partial(csi.controller.delete_volume, DeleteVolumeRequest(volume_id=volume.volume_id))
                )
                on_disk = pool.view.objects()
                assert list(on_disk) == [pool.view.volume_name("pvc-neighbour")], on_disk
                assert not pool.view.problems(), pool.view.problems()
                TALLY.operations["concurrency"] += len(calls)
            if pool.read_back is not None and device:
                assert pool.read_back(device) == payload, "a race on one volume changed its neighbour's data"
            await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=neighbour.volume_id))
            TALLY.notes.append(f"racing changes to one volume, {pool.rounds} rounds: {dict(sorted(seen.items()))}")

    @staticmethod
    def _racing_calls(csi: Csi, volume_id: str, size: int, round_: int) -> list[tuple[str, Awaitable[Any]]]:
        c = csi.controller
        calls: list[tuple[str, Awaitable[Any]]] = []
        for k in range(1, 11):
            grow = CapacityRange(required_bytes=size + k * MiB)
            calls.append(
                (
                    "expand",
                    c.controller_expand_volume(ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=grow)),
                )
            )
        calls += [("delete", c.delete_volume(DeleteVolumeRequest(volume_id=volume_id))) for _ in range(5)]
        calls += [("get", c.controller_get_volume(ControllerGetVolumeRequest(volume_id=volume_id))) for _ in range(5)]
        for i in range(5):
            snap = CreateSnapshotRequest(source_volume_id=volume_id, name=f"snap-race-{round_}-{i}")
            calls.append(("snapshot", c.create_snapshot(snap)))
        return calls

    @staticmethod
    def _where(pool: Pool) -> dict[str, Any]:
        return {"backend": pool.parameters["backend"], "pool": pool.parameters.get("pool")}
