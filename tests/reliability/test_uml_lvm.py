"""Reliability of the `lvm` backend on real LVM, inside the UML sandbox (`nox -s e2e`); skipped elsewhere.

SIGKILL crash loop against `localdisk serve`, the concurrency suite, and a full volume group.

Why a cut create, expand or delete converges (lvm.py): the LV is created with its identity tags and the pending tag
in one lvcreate, so a kill leaves no LV or a tagged pending one, never an untagged LV nobody can see; a pending LV
is not found by name, and the retried create zeroes it and drops the pending tag (each step repeatable). lvextend
and lvremove are single metadata commits. An LV whose metadata was committed but which was not activated is
activated by the restart's `open`. The crash test checks it with `lvs` at the end: exactly one tagged LV per
acknowledged volume, none pending, nothing else of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk._proto.csi.v1 import DeleteVolumeRequest, GetCapacityRequest
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import create_request, csi_for
from tests.lvm.conftest import LINEAR_VG
from tests.lvm.helpers import read, write
from tests.reliability.concurrency import ConcurrencySuite, Pool
from tests.reliability.tally import TALLY
from tests.reliability.uml import linear_pool, pool_for
from tests.reliability.views import LvmView

pytestmark = [pytest.mark.uml, pytest.mark.anyio]


class TestLvmConcurrency(ConcurrencySuite):
    pytestmark = [pytest.mark.timeout(900)]  # 50 calls, each a few LVM commands under UML

    @pytest.fixture
    async def pool(self) -> AsyncIterator[Pool]:
        async with linear_pool(CommandRunner(), free=96 * MiB) as backend:
            yield await pool_for(backend, 8 * MiB, LvmView(LINEAR_VG))


def vg_free() -> int:
    out = subprocess.run(
        ["lvm", "vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_free", "--", LINEAR_VG],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out)["report"][0]["vg"][0]["vg_free"])


@pytest.mark.timeout(600)
async def test_full_volume_group() -> None:
    """A VG with no space left: RESOURCE_EXHAUSTED, existing volumes untouched, capacity equal to `vgs`'s free."""
    async with linear_pool(CommandRunner(), free=64 * MiB) as backend, csi_for(manager_for(backend)) as csi:
        where = {"backend": "lvm", "pool": backend.pool}

        async def available() -> int:
            return (await csi.controller.get_capacity(GetCapacityRequest(parameters=where))).available_capacity

        assert await available() == vg_free() == 64 * MiB
        made: dict[str, tuple[int, bytes]] = {}
        refusal: GRPCError | None = None
        index = 0
        while refusal is None:
            index += 1
            try:
                answer = await csi.controller.create_volume(create_request(f"pvc-vg-{index}", 12 * MiB, **where))
            except GRPCError as exc:
                refusal = exc
                continue
            assert answer.volume is not None
            payload = os.urandom(4096)
            write(f"/dev/{LINEAR_VG}/{answer.volume.volume_id.split(':')[2]}", payload)
            made[answer.volume.volume_id] = (answer.volume.capacity_bytes, payload)
        assert refusal.status == Status.RESOURCE_EXHAUSTED, refusal
        assert await available() == vg_free() == 64 * MiB - sum(size for size, _ in made.values())
        rest = await available()
        answer = await csi.controller.create_volume(create_request("pvc-vg-rest", rest, **where))
        assert answer.volume is not None and answer.volume.capacity_bytes == rest
        assert await available() == vg_free() == 0
        with pytest.raises(GRPCError) as info:
            await csi.controller.create_volume(create_request("pvc-vg-more", 1, **where))
        assert info.value.status == Status.RESOURCE_EXHAUSTED and "free" in (info.value.message or "")
        for volume_id, (_, payload) in made.items():
            assert read(f"/dev/{LINEAR_VG}/{volume_id.split(':')[2]}", 4096) == payload
        freed_id, (freed, _) = next(iter(made.items()))
        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=freed_id))
        assert await available() == vg_free() == freed
        TALLY.operations["disk full, lvm (UML)"] += len(made) + 3
