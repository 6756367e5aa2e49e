"""Reliability of the `thin` backend on real LVM, inside the UML sandbox (`nox -s e2e`); skipped elsewhere.

SIGKILL crash loop (volumes and snapshots) against `localdisk serve`, the concurrency suite, and a thin pool filled
past its threshold.

Why a cut operation converges (lvm.py): a thin LV or snapshot is created with its identity tags in one lvcreate,
so a kill leaves nothing or the finished object, which the retried call finds by name; a volume restored larger
than its source carries the pending tag until lvextend has grown it, and the retry finishes it. lvextend and
lvremove are single metadata commits. The crash test checks it with `lvs`: exactly the acknowledged volumes and
snapshots, none pending, all in the pool.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk._proto.csi.v1 import ControllerGetVolumeRequest, CreateSnapshotRequest, GetCapacityRequest
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import create_request, csi_for
from tests.lvm.conftest import THIN_POOL, THIN_VG
from tests.lvm.helpers import read, write
from tests.reliability.concurrency import ConcurrencySuite, Pool
from tests.reliability.tally import TALLY
from tests.reliability.uml import pool_for, thin_pool
from tests.reliability.views import LvmView

pytestmark = [pytest.mark.uml, pytest.mark.anyio]
EXTENT = 4 * MiB


class TestThinConcurrency(ConcurrencySuite):
    pytestmark = [pytest.mark.timeout(900)]  # 50 calls, each a few LVM commands under UML

    @pytest.fixture
    async def pool(self) -> AsyncIterator[Pool]:
        async with thin_pool(CommandRunner()) as backend:
            yield await pool_for(backend, 32 * MiB, LvmView(THIN_VG, THIN_POOL))


def expected_available(ratio: float, threshold: float) -> int:
    """What the pool can still give, from `lvs` alone: nothing past the threshold, else the smaller of what the
    ratio allows and what is really free, in whole extents."""
    argv = ["lvm", "lvs", "--reportformat", "json", "--units", "b", "--nosuffix"]
    argv += ["-o", "lv_name,lv_size,pool_lv,data_percent,metadata_percent", "--", THIN_VG]
    lvs = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)["report"][0]["lv"]
    pool = next(lv for lv in lvs if lv["lv_name"] == THIN_POOL)
    size, data, meta = int(pool["lv_size"]), float(pool["data_percent"]), float(pool["metadata_percent"])
    if data >= threshold or meta >= threshold:
        return 0
    virtual = sum(int(lv["lv_size"]) for lv in lvs if lv["pool_lv"] == THIN_POOL)
    room = min(int(size * ratio) - virtual, size - int(size * data / 100))
    return max(room, 0) // EXTENT * EXTENT


@pytest.mark.timeout(600)
async def test_thin_pool_past_its_threshold() -> None:
    """Filled past the threshold: new volumes and snapshots refused, existing ones keep working, capacity exact."""
    ratio, threshold = 10.0, 20.0
    async with (
        thin_pool(CommandRunner(), ratio=ratio, threshold=threshold) as backend,
        csi_for(manager_for(backend)) as csi,
    ):
        where = {"backend": "thin", "pool": backend.pool}

        async def available() -> int:
            return (await csi.controller.get_capacity(GetCapacityRequest(parameters=where))).available_capacity

        assert await available() == expected_available(ratio, threshold) > 0
        answer = await csi.controller.create_volume(create_request("pvc-big", 128 * MiB, **where))
        assert answer.volume is not None
        volume_id = answer.volume.volume_id
        device = f"/dev/{THIN_VG}/{volume_id.split(':')[2]}"
        payload = os.urandom(MiB)
        written = 0
        while expected_available(ratio, threshold) > 0:  # provision blocks until the pool is past 20%
            write(device, payload, written)
            written += MiB
            assert written < 128 * MiB, "the pool never reached its threshold"
        assert await available() == 0
        with pytest.raises(GRPCError) as refused:
            await csi.controller.create_volume(create_request("pvc-one-more", 4 * MiB, **where))
        assert refused.value.status == Status.RESOURCE_EXHAUSTED and "threshold" in (refused.value.message or "")
        with pytest.raises(GRPCError) as refused:
            await csi.controller.create_snapshot(CreateSnapshotRequest(source_volume_id=volume_id, name="snap"))
        assert refused.value.status == Status.RESOURCE_EXHAUSTED
        # The existing volume works: its data reads back, new blocks can still be written, it is healthy.
        assert read(device, MiB, 0) == payload
        write(device, payload[::-1], written)
        assert read(device, MiB, written) == payload[::-1]
        status = await csi.controller.controller_get_volume(ControllerGetVolumeRequest(volume_id=volume_id))
        assert status.status is not None and status.status.volume_condition is not None
        assert not status.status.volume_condition.abnormal
        # Discarding the data gives the space back, and capacity follows exactly.
        subprocess.run(["blkdiscard", "--", device], check=True)
        assert await available() == expected_available(ratio, threshold) > 0
        again = await csi.controller.create_volume(create_request("pvc-after", 4 * MiB, **where))
        assert again.volume is not None
        assert await available() == expected_available(ratio, threshold)
        TALLY.operations["disk full, thin (UML)"] += written // MiB + 5
