"""The concurrency suite (`concurrency.py`) bound to the partition backend on two loop devices."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.reliability.concurrency import ConcurrencySuite, Pool
from tests.reliability.views import PartitionView
from tests.test_partition_backend import partition_pool, read_direct, write_synced

DISK = 64 * MiB  # 62 MiB usable once aligned: 7 volumes of 8 MiB per disk


@needs_loop_devices
class TestPartitionConcurrency(ConcurrencySuite):
    @pytest.fixture
    async def pool(self) -> AsyncIterator[Pool]:
        async with loop_disks(2, DISK) as disks, partition_pool(disks) as backend:
            yield Pool(
                manager=manager_for(backend),
                parameters={"backend": "partition", "pool": backend.pool},
                view=PartitionView(disks),
                volume_bytes=8 * MiB,
                room=14,
                snapshots=False,
                read_back=lambda device: read_direct(device, 0, 4096),
                write=lambda device, data: write_synced(device, data),
            )
