"""The backend contract (tests/contract.py) for every layout of the lvm backend: striped, raid1, raid10 and PV-tag
restricted pools, on real LVM in the UML sandbox (`nox -s layout`; needs `--vg ldtest-raid:128Mx3@hdd,64M@ssd`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from localdisk.backends.lvm import LinearBackend
from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner
from tests.contract import BackendContract
from tests.lvm.test_layout import _needs_raid_vg, clean_raid, open_pool

pytestmark = [pytest.mark.uml, pytest.mark.anyio, pytest.mark.usefixtures("_needs_raid_vg")]
__all__ = ["_needs_raid_vg", "clean_raid"]  # fixtures, used by name

# the contract, for every layout ------------------------------------------------------------------------------------
LAYOUTS: dict[str, dict[str, object]] = {
    "striped": {"stripes": 3, "stripe_size_bytes": 128 * 1024},
    "raid1": {"mirrors": 2},
    "raid10": {"stripes": 2, "mirrors": 2},
    "ssd-only": {"pv_tags": ["ssd"]},
}


class TestLayoutContract(BackendContract):
    @pytest.fixture(params=sorted(LAYOUTS))
    async def backend(
        self, request: pytest.FixtureRequest, runner: CommandRunner, lvm: Lvm, clean_raid: None
    ) -> AsyncIterator[LinearBackend]:
        backend = await open_pool(runner, lvm, **LAYOUTS[request.param])
        yield backend
        await backend.aclose()
