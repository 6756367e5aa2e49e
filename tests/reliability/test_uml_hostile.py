"""Hostile input to every Controller RPC, served by the `lvm` and `thin` backends on real LVM (UML, `nox -s e2e`).

The same generated calls as on partitions (test_hostile_partition.py): names that read as options or shell, NUL,
huge and Unicode strings, zero, negative, enormous and unaligned sizes, unknown parameters, mixed capabilities, IDs
of other backends, pools and nodes. Every LVM command (and the in-process zeroing) is seen by an `ArgvWatch`: no
request string in any argv, no option localdisk does not use. The VG also holds an LV localdisk did not make, with
data; requests naming it must never touch it. After each example every volume and snapshot it created is deleted,
and the pool must be as it was: the same LVs of ours, none pending, the same capacity, the foreign data intact.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.from_thread
import pytest
from grpclib.testing import ChannelFor
from hypothesis import HealthCheck, example, given, settings

from localdisk import VolumeManager
from localdisk._proto.csi.v1 import ControllerStub
from localdisk.backends.lvm import LinearBackend, ThinBackend
from localdisk.backends.lvmcmd import Lvm
from localdisk.csi.controller import ControllerService
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.csi_helpers import create_request
from tests.lvm.conftest import THIN_POOL
from tests.reliability.hostile import ArgvWatch
from tests.reliability.tally import TALLY
from tests.reliability.test_hostile_partition import FOREIGN, Bench, calls_for, grown
from tests.reliability.uml import linear_pool, thin_pool
from tests.reliability.views import LvmView
from tests.test_partition_backend import write_synced

pytestmark = pytest.mark.uml
FOREIGN_LV = "not-localdisks"


@asynccontextmanager
async def lvm_bench(kind: str) -> AsyncIterator[Bench]:
    watch = ArgvWatch()
    runner = CommandRunner(default_timeout=120, observers=[watch])
    pool_context = linear_pool(runner) if kind == "lvm" else thin_pool(runner, ratio=2.0)
    async with pool_context as backend:
        assert isinstance(backend, LinearBackend | ThinBackend)
        vg = backend.vg
        await Lvm(runner).create_linear(vg, FOREIGN_LV, 8 * MiB, ["someone.else"], wipe=True)
        foreign_node = f"/dev/{vg}/{FOREIGN_LV}"
        write_synced(foreign_node, FOREIGN)
        view = LvmView(vg, THIN_POOL if kind == "thin" else None)
        manager = VolumeManager({(backend.kind, backend.pool): backend}, {backend.kind: backend.pool})
        async with ChannelFor([ControllerService(manager, "node-1")]) as channel:
            controller = ControllerStub(channel)
            answer = await controller.create_volume(create_request("pvc-base", 8 * MiB, kind, backend.pool))
            assert answer.volume is not None
            bench = Bench(
                controller, manager, watch, view, vg, answer.volume.volume_id, FOREIGN_LV, foreign_node,
                backend=kind, pool=backend.pool,
            )  # fmt: skip
            bench.layout = {name: uuid for name, (uuid, _) in view.objects().items()}
            bench.capacity = (await manager.capacity(kind, backend.pool)).total_bytes
            watch.seen.clear()
            yield bench
        # linear_pool/thin_pool remove every LV of the VG afterwards, the foreign one too


@pytest.mark.parametrize("kind", ["lvm", "thin"])
def test_controller_rpcs_on_lvm(kind: str) -> None:
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(lvm_bench(kind)) as bench,
    ):

        @settings(
            max_examples=int(os.environ.get("LOCALDISK_HOSTILE_LVM_EXAMPLES", "25")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            database=None,
        )
        @example(calls=grown(kind, bench.pool))
        @given(calls=calls_for(bench.base_id, FOREIGN_LV, kind, bench.pool, size_unit=4 * MiB))
        def examples(calls: list[tuple[str, object]]) -> None:
            portal.call(bench.run, calls)

        try:
            examples()
        finally:
            TALLY.hostile[f"controller rpcs, {kind} backend (UML)"] += bench.sent
            TALLY.argv_checked += bench.watch.checked
    print(sorted(bench.answers.items()))
    assert bench.answers["create_volume OK"] > 0 and bench.answers["controller_expand_volume OK"] > 0
