"""A full partition pool: refused cleanly, existing volumes untouched, capacity exact to the byte.

Capacity is recomputed here from `sfdisk --json` with its own arithmetic (the usable area rounded inwards to MiB,
minus the partitions), so a bug shared by the backend's extent code and its capacity report cannot hide.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
    GetCapacityResponse,
)
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import Csi, create_request, csi_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.reliability.tally import TALLY
from tests.reliability.views import PartitionView
from tests.test_partition_backend import partition_pool, read_direct, write_synced

SECTOR = 512
ALIGN = MiB // SECTOR


def free_extents(table: dict[str, Any]) -> list[int]:
    """Free gaps in bytes between the MiB-aligned partitions, inside the usable area rounded inwards to MiB."""
    start = -(-int(table["firstlba"]) // ALIGN) * ALIGN
    end = (int(table["lastlba"]) + 1) // ALIGN * ALIGN
    gaps, cursor = [], start
    for part in sorted(table.get("partitions", []), key=lambda p: int(p["start"])):
        assert int(part["start"]) % ALIGN == 0 and int(part["size"]) % ALIGN == 0, part
        if int(part["start"]) > cursor:
            gaps.append((int(part["start"]) - cursor) * SECTOR)
        cursor = max(cursor, int(part["start"]) + int(part["size"]))
    if end > cursor:
        gaps.append((end - cursor) * SECTOR)
    return gaps


def expected_capacity(view: PartitionView) -> tuple[int, int]:
    gaps = [gap for table in view.tables().values() for gap in free_extents(table)]
    return sum(gaps), max(gaps, default=0)


async def capacity(csi: Csi) -> GetCapacityResponse:
    return await csi.controller.get_capacity(GetCapacityRequest(parameters={"backend": "partition", "pool": "test"}))


async def refused(call: Any) -> GRPCError:
    with pytest.raises(GRPCError) as info:
        await call
    return info.value


@needs_loop_devices
@pytest.mark.anyio
async def test_full_partition_pool(tmp_path: Path) -> None:
    async with loop_disks(2, 40 * MiB) as disks, partition_pool(disks) as backend, csi_for(manager_for(backend)) as csi:
        view = PartitionView(disks)
        total, _ = expected_capacity(view)
        assert (await capacity(csi)).available_capacity == total
        volumes: dict[str, tuple[str, int, bytes]] = {}  # name -> id, size, payload

        async def create(name: str, size: int) -> None:
            answer = await csi.controller.create_volume(create_request(name, size, "partition", "test"))
            assert answer.volume is not None
            payload = os.urandom(4096)
            device = (await csi.manager.get_volume(answer.volume.volume_id)).device_path
            assert device is not None
            write_synced(device, payload)
            volumes[name] = (answer.volume.volume_id, answer.volume.capacity_bytes, payload)

        # Fill with mixed sizes until refused, then take exactly the largest gap left, until nothing is left.
        sizes = [9 * MiB, 3 * MiB, 5 * MiB + 1, 1 * MiB]
        index, refusal = 0, None
        while refusal is None:
            size = sizes[index % len(sizes)]
            index += 1
            try:
                await create(f"pvc-full-{index}", size)
            except GRPCError as exc:
                refusal = exc
        assert refusal.status == Status.RESOURCE_EXHAUSTED, refusal
        while (largest := (await capacity(csi)).maximum_volume_size or 0) > 0:
            assert largest == expected_capacity(view)[1]
            await create(f"pvc-gap-{len(volumes)}", largest)
        report = await capacity(csi)
        assert (report.available_capacity, report.maximum_volume_size) == (0, 0) == expected_capacity(view)
        assert sum(size for _, size, _ in volumes.values()) == total, "the volumes do not add up to the pool"

        # Full: a new volume, even the smallest, is RESOURCE_EXHAUSTED and leaves nothing behind.
        before = view.objects()
        error = await refused(csi.controller.create_volume(create_request("pvc-one-more", 1, "partition", "test")))
        assert error.status == Status.RESOURCE_EXHAUSTED and "delete volumes" in (error.message or ""), error
        volume_id, size, _ = next(iter(volumes.values()))
        grow = ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=CapacityRange(required_bytes=size + MiB)
        )
        error = await refused(csi.controller.controller_expand_volume(grow))
        assert error.status in (Status.RESOURCE_EXHAUSTED, Status.OUT_OF_RANGE), error
        assert view.objects() == before and not view.problems(), view.problems()

        # Existing volumes still hold their data and take writes.
        for volume_id, _, payload in volumes.values():
            device = (await csi.manager.get_volume(volume_id)).device_path
            assert device is not None
            assert read_direct(device, 0, 4096) == payload
            write_synced(device, payload[::-1], 4096)
            assert read_direct(device, 4096, 4096) == payload[::-1]

        # Freeing one volume gives back exactly its size, which a new volume can take whole.
        name, (volume_id, size, _) = sorted(volumes.items())[1]
        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))
        del volumes[name]
        report = await capacity(csi)
        assert report.available_capacity == size == expected_capacity(view)[0], (report, size)
        assert report.maximum_volume_size == size
        await create("pvc-refill", size)
        assert (await capacity(csi)).available_capacity == 0
        TALLY.operations["disk full, partition"] += len(volumes) + 4
