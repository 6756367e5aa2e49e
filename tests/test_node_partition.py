"""The Node service lifecycle on the partition backend: GPT partitions of a loop-attached disk image."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from localdisk.backends.partition import PartitionBackend
from localdisk.sizes import GiB
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.node_lifecycle import NodeLifecycle
from tests.test_partition_backend import partition_pool


@needs_loop_devices
class TestPartitionNode(NodeLifecycle):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[PartitionBackend]:
        async with loop_disks(1, 1 * GiB) as disks, partition_pool(disks) as backend:
            yield backend
