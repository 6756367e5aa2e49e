"""What the reliability suites need on real LVM inside the UML sandbox: pools, configs, the crash loop's run.

The sandbox of `nox -s e2e` gives the VGs of tests/lvm (`ldtest-lin`, and `ldtest-thin` with thin pool `pool`);
every fixture here puts them back as they were, also when a test fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, ThinBackend, ThinPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.lvm.conftest import LINEAR_VG, THIN_POOL, THIN_VG, reset_vg
from tests.lvm.helpers import read, write
from tests.reliability.concurrency import Pool
from tests.reliability.crashloop import CrashLoop, Report, Server, Settings, Supervisor, run_together
from tests.reliability.views import LvmView

FILLER = "not-localdisk-filler"  # an LV localdisk did not make: it must never be listed, changed or removed


@asynccontextmanager
async def linear_pool(runner: CommandRunner, free: int | None = None) -> AsyncIterator[LinearBackend]:
    """The `lvm` backend on the sandbox's VG; with `free`, a foreign LV takes all the VG's space but that."""
    lvm = Lvm(runner)
    await reset_vg(lvm, LINEAR_VG)
    try:
        if free is not None:
            report = await lvm.report(LINEAR_VG)
            await lvm.create_linear(LINEAR_VG, FILLER, report.vg.free - free, [], wipe=False)
        backend = LinearBackend("fast", LinearPoolConfig(volume_group=LINEAR_VG), lvm, runner)
        await backend.open()
        yield backend
        if free is not None:
            assert (await lvm.report(LINEAR_VG)).lv(FILLER) is not None, "the foreign LV was removed"
    finally:
        await reset_vg(lvm, LINEAR_VG)


@asynccontextmanager
async def thin_pool(
    runner: CommandRunner, *, ratio: float = 1.0, threshold: float = 90.0
) -> AsyncIterator[ThinBackend]:
    lvm = Lvm(runner)
    await reset_vg(lvm, THIN_VG, keep=frozenset({THIN_POOL}))
    try:
        config = ThinPoolConfig(
            volume_group=THIN_VG, thin_pool=THIN_POOL, overprovision_ratio=ratio, threshold_percent=threshold
        )
        backend = ThinBackend("tp", config, lvm, runner)
        await backend.open()
        yield backend
    finally:
        await reset_vg(lvm, THIN_VG, keep=frozenset({THIN_POOL}))


async def pool_for(backend: LinearBackend | ThinBackend, volume_bytes: int, view: LvmView) -> Pool:
    capacity = await backend.capacity()
    return Pool(
        manager=manager_for(backend),
        parameters={"backend": backend.kind, "pool": backend.pool},
        view=view,
        volume_bytes=volume_bytes,
        room=capacity.available_bytes // volume_bytes,
        snapshots=backend.features.snapshots,
        read_back=lambda device: read(device, 4096),
        write=lambda device, data: write(device, data),
        rounds=2,
    )


CONFIGS = {
    "lvm": f'[pools.lvm.fast]\nvolume_group = "{LINEAR_VG}"\n',
    "thin": f'[pools.thin.tp]\nvolume_group = "{THIN_VG}"\nthin_pool = "{THIN_POOL}"\n',
}


async def crash_loops(tmp_path: Path, kills: int, seed: int, seconds: float) -> list[Report]:
    """The crash loop of `crashloop.py` for `lvm` and `thin` at once, against one `localdisk serve` serving both
    pools (each kill interrupts the call in flight of each loop); servers are forked from a zygote."""
    lvm = Lvm(CommandRunner())
    await reset_vg(lvm, LINEAR_VG)
    await reset_vg(lvm, THIN_VG, keep=frozenset({THIN_POOL}))
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nkubelet_dir = "{tmp_path}/kubelet"\n\n' + CONFIGS["lvm"] + "\n" + CONFIGS["thin"])
    supervisor = Supervisor(Server(config, tmp_path, fork=True), seed, startup_kill_probability=0.1)
    loops = []
    for backend, view in (("lvm", LvmView(LINEAR_VG)), ("thin", LvmView(THIN_VG, THIN_POOL))):
        settings = Settings(
            kills=kills,
            max_seconds=seconds,
            seed=seed,
            kill_probability=0.9,  # a restart is the slow part under UML: make most of them count
            first_guess_seconds=3.0,
            sizes=(4 * MiB, 8 * MiB, 12 * MiB + 12345),
            growth=(4 * MiB, 8 * MiB - 4096),
            max_live=8,
            snapshots=backend == "thin",
            parameters={"backend": backend},
        )
        loops.append(CrashLoop(backend, supervisor, view, settings))
    try:
        return await run_together(loops)
    finally:
        await reset_vg(lvm, LINEAR_VG)
        await reset_vg(lvm, THIN_VG, keep=frozenset({THIN_POOL}))
