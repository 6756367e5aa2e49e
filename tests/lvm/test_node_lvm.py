"""The Node service lifecycle (every filesystem and raw block) on real LVM: linear and thin, inside the sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from localdisk.backends.lvm import LinearBackend, ThinBackend
from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner
from tests.lvm.conftest import THIN_VG, thin_backend
from tests.node_lifecycle import NodeLifecycle

pytestmark = [pytest.mark.uml]
NODE_POOL = "nodepool"


class TestLinearNode(NodeLifecycle):
    @pytest.fixture
    def backend(self, linear: LinearBackend) -> LinearBackend:
        return linear


class TestThinNode(NodeLifecycle):
    @pytest.fixture
    async def backend(self, runner: CommandRunner, lvm: Lvm, clean_thin: None) -> AsyncIterator[ThinBackend]:
        # The sandbox's 256 MiB pool is smaller than the lifecycle's 448 MiB volume (xfs wants > 300 MiB), and a
        # thin pool never promises one volume more than it really has free: a second, larger pool for these tests.
        await runner.run(["lvcreate", "-y", "-Zy", "-L", "480M", "-T", f"{THIN_VG}/{NODE_POOL}"], timeout=600)
        backend = thin_backend(runner, lvm, pool=NODE_POOL, ratio=4.0)
        await backend.open()
        try:
            yield backend
        finally:
            await backend.aclose()
            await runner.run(["lvremove", "-y", f"{THIN_VG}/{NODE_POOL}"], timeout=600, check=False)
