"""A pool that cannot open degrades; the server does not die (issue 15, part 1).

A real `localdisk serve` with three pools: a partition pool on a present loop disk, an lvm pool whose volume group
does not exist, and a partition pool whose disk is not there yet (a /dev symlink made later). The server must come
up, answer capacity 0 and a clear FAILED_PRECONDITION for the missing pools, serve the present one (Node service
included), show the state in its metrics and in `localdisk capacity`, and bring the late pool up without a restart
once its disk appears.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel
from grpclib.const import Status

from localdisk._proto.csi.v1 import ControllerStub, GetCapacityRequest
from localdisk.availability import Available
from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.errors import FailedPrecondition
from localdisk.manager import VolumeManager
from localdisk.sizes import GiB, MiB
from tests.csi_helpers import create_request
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.node_lifecycle import expect
from tests.sanity import running_server
from tests.test_wire import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]


@pytest.fixture
def late_link() -> Iterator[Path]:
    link = Path(f"/dev/localdisk-test-late-{uuid.uuid4().hex[:8]}")
    try:
        yield link
    finally:
        link.unlink(missing_ok=True)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


@needs_loop_devices
async def test_missing_pools_degrade_and_a_late_disk_comes_up_without_restart(late_link: Path) -> None:
    async with loop_disks(2, GiB) as (present, late):
        workdir = Path(tempfile.mkdtemp(prefix="localdisk-degrade-"))
        config = workdir / "config.toml"
        config.write_text(
            f'[node]\nkubelet_dir = "{workdir / "kubelet"}"\npool_retry_seconds = 0.5\n\n'
            f'[pools.partition.here]\ndisks = ["{present}"]\ndefault = true\n\n'
            f'[pools.partition.late]\ndisks = ["{late_link}"]\n\n'
            '[pools.lvm.missing]\nvolume_group = "ldtest-nosuchvg"\n'
        )
        port = free_port()
        with running_server(workdir, config, ["--metrics-address", f"127.0.0.1:{port}"]) as sock:
            channel = Channel(path=str(sock))
            try:
                controller = ControllerStub(channel)

                async def capacity(backend: str, pool: str) -> int:
                    params = {"backend": backend, "pool": pool}
                    return (await controller.get_capacity(GetCapacityRequest(parameters=params))).available_capacity

                assert await capacity("partition", "here") > 0
                assert await capacity("partition", "late") == 0
                assert await capacity("lvm", "missing") == 0
                message = await expect(
                    Status.FAILED_PRECONDITION,
                    controller.create_volume(create_request("pvc-lvm", 64 * MiB, "lvm", "missing")),
                )
                assert "lvm pool 'missing' is unavailable" in message and "ldtest-nosuchvg" in message
                await expect(
                    Status.FAILED_PRECONDITION,
                    controller.create_volume(create_request("pvc-late", 64 * MiB, "partition", "late")),
                )
                made = await controller.create_volume(create_request("pvc-here", 64 * MiB, "partition", "here"))
                assert made.volume is not None

                text = _metrics(port)
                assert 'localdisk_pool_up{backend="partition",pool="here"} 1.0' in text
                assert 'localdisk_pool_up{backend="lvm",pool="missing"} 0.0' in text
                assert 'localdisk_pool_unavailable{backend="lvm",pool="missing",reason=' in text

                os.symlink(late, late_link)  # the disk arrives
                with anyio.fail_after(60):
                    while await capacity("partition", "late") == 0:
                        await anyio.sleep(0.2)
                late_volume = await controller.create_volume(create_request("pvc-late", 64 * MiB, "partition", "late"))
                assert late_volume.volume is not None
                assert 'localdisk_pool_up{backend="partition",pool="late"} 1.0' in _metrics(port)
            finally:
                channel.close()

        shown = subprocess.run(
            [sys.executable, "-m", "localdisk.cli", "capacity", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        states = {(p["backend"], p["pool"]): (p["up"], p["reason"]) for p in json.loads(shown.stdout)}
        assert states[("partition", "here")] == (True, None)
        assert states[("lvm", "missing")][0] is False and "ldtest-nosuchvg" in states[("lvm", "missing")][1]


async def test_one_config_serves_each_node_its_own_pools(tmp_path: Path) -> None:
    """The same file, served as two nodes: each offers only the pools that select it (by name or label)."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\nkubelet_dir = "{tmp_path / "kubelet"}"\n\n'
        '[pools.fake.hdd]\nnode_labels = { "localdisk.io/disks" = "hdd" }\n\n'
        '[pools.fake.scratch]\nnodes = ["worker-*"]\n'
    )
    offered: dict[str, dict[str, int]] = {}
    for node, labels in (("storage-1", "localdisk.io/disks=hdd"), ("worker-2", "localdisk.io/disks=nvme")):
        workdir = tmp_path / node
        workdir.mkdir()
        with running_server(workdir, config, ["--node-id", node, "--node-labels", labels]) as sock:
            channel = Channel(path=str(sock))
            try:
                controller = ControllerStub(channel)
                offered[node] = {
                    pool: (
                        await controller.get_capacity(GetCapacityRequest(parameters={"backend": "fake", "pool": pool}))
                    ).available_capacity
                    for pool in ("hdd", "scratch")
                }
            finally:
                channel.close()
    assert offered["storage-1"]["hdd"] > 0 and offered["storage-1"]["scratch"] == 0
    assert offered["worker-2"]["hdd"] == 0 and offered["worker-2"]["scratch"] > 0


class _LateCached(FakeBackend):
    """A fake pool with a cached view that cannot open until `ready`; counts its background re-reads."""

    ready = False
    refreshes = 0
    refresh_interval = 0.05

    async def open(self) -> None:
        if not self.ready:
            raise FailedPrecondition("disk not there yet")
        await super().open()

    async def refresh_state(self) -> None:
        self.refreshes += 1


async def test_a_pool_that_comes_up_late_is_kept_fresh_in_the_background() -> None:
    late = _LateCached("late", FakePoolConfig())
    manager = VolumeManager({("fake", "late"): late}, {})
    await manager.open()
    assert not manager.pool_states()[("fake", "late")].up
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(manager.keep_fresh)
        await anyio.wait_all_tasks_blocked()  # keep_fresh has picked its jobs, while the pool was down
        late.ready = True
        await manager.backends[("fake", "late")].open()
        with anyio.fail_after(30):
            while late.refreshes == 0:
                await anyio.sleep(0.02)
        tasks.cancel_scope.cancel()
    assert manager.pool_states()[("fake", "late")].up


class _Disked(FakeBackend):
    """A fake pool on one disk, whose state file may be unreadable (the pool then cannot open)."""

    async def disks(self) -> tuple[str, ...]:
        return ("/dev/disk/by-id/fake-1",)


async def test_a_pool_lists_its_disks_only_while_it_is_up(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("not json")
    pool = Available(_Disked("p", FakePoolConfig(state_file=state)))
    await pool.open()
    assert not pool.state.up
    assert await pool.disks() == ()
    state.unlink()
    await pool.open()
    assert pool.state.up
    assert await pool.disks() == ("/dev/disk/by-id/fake-1",)
    assert await Available(FakeBackend("q", FakePoolConfig())).disks() == ()  # a backend that cannot say
