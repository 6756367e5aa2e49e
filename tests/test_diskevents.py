"""Disk events (issue 15, part 3): a disk that appears is discovered at once, not at the next `discover_seconds`.

The parser on canned `udevadm monitor --property` output of both kinds; then the real thing on host loop disks:
the kernel's uevents (this machine runs no udev daemon) of a loop image growing into range bring a pool that is
down up, and give a running `localdisk serve` the new disk, with every interval set to an hour.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import config
from localdisk._proto.csi.v1 import (
    ControllerStub,
    DeleteVolumeRequest,
    GetCapacityRequest,
    ListVolumesRequest,
    NodeGetInfoRequest,
    NodeStub,
)
from localdisk.backends.partition import PartitionBackend, PartitionPoolConfig
from localdisk.discovery import Claims
from localdisk.diskevents import DiskEvent, EventParser, follow_disk_events, monitor_argv
from localdisk.errors import ConfigError
from localdisk.manager import VolumeManager
from localdisk.runner import CommandRunner
from localdisk.sizes import MiB
from tests.csi_helpers import create_request
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.sanity import running_server
from tests.test_discovery_loop import growable_disk

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]
HOUR = 3600.0

KERNEL_OUTPUT = """monitor will print the received events for:
KERNEL - the kernel uevent

KERNEL[41571.304174] change   /devices/virtual/block/loop0 (block)
ACTION=change
DEVPATH=/devices/virtual/block/loop0
SUBSYSTEM=block
RESIZE=1
DEVNAME=/dev/loop0
DEVTYPE=disk
SEQNUM=45314

KERNEL[41571.4] add      /devices/virtual/block/loop0/loop0p1 (block)
ACTION=add
DEVPATH=/devices/virtual/block/loop0/loop0p1
SUBSYSTEM=block
DEVNAME=/dev/loop0p1
DEVTYPE=partition

KERNEL[41571.5] add      /devices/virtual/block/dm-3 (block)
ACTION=add
DEVPATH=/devices/virtual/block/dm-3
SUBSYSTEM=block
DEVNAME=/dev/dm-3
DEVTYPE=disk

"""

UDEV_OUTPUT = """monitor will print the received events for:
UDEV - the event which udev sends out after rule processing

UDEV  [812.334] add      /devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc (block)
ACTION=add
DEVPATH=/devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc
SUBSYSTEM=block
DEVNAME=/dev/sdc
DEVTYPE=disk
ID_SERIAL=WDC_WD40EFRX-68N32N0_WD-WCC7K0000001
DEVLINKS=/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K0000001

UDEV  [813.001] bind     /devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc (block)
ACTION=bind
SUBSYSTEM=block
DEVNAME=/dev/sdc
DEVTYPE=disk

UDEV  [900.5] remove   /devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc (block)
ACTION=remove
DEVPATH=/devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc
SUBSYSTEM=block
DEVNAME=/dev/sdc
DEVTYPE=disk

"""


def events(text: str) -> list[DiskEvent]:
    parser = EventParser()
    return [event for line in text.splitlines(keepends=True) if (event := parser.feed(line)) is not None]


def test_only_whole_disks_added_removed_or_changed_are_events() -> None:
    assert events(KERNEL_OUTPUT) == [DiskEvent("change", "loop0")]  # not its partition, not a device-mapper LV
    assert events(UDEV_OUTPUT) == [DiskEvent("add", "sdc"), DiskEvent("remove", "sdc")]  # not `bind`
    assert events("ACTION=add\nSUBSYSTEM=block\nDEVTYPE=disk\nDEVNAME=/dev/sdd") == []  # unfinished: no blank yet
    assert events("ACTION=add\nSUBSYSTEM=net\nDEVTYPE=disk\nDEVNAME=/dev/sdd\n\n") == []
    assert events("x" * 10_000 + "\nACTION=add\nSUBSYSTEM=block\nDEVTYPE=disk\nDEVPATH=/a/b/vdb\n\n") == [
        DiskEvent("add", "vdb")  # a line that is no property is skipped; the name from DEVPATH without DEVNAME
    ]


def test_the_monitor_follows_udev_where_its_daemon_runs_and_the_kernel_elsewhere(tmp_path: Path) -> None:
    control = tmp_path / "control"
    kernel = monitor_argv("auto", udev_control=control)
    assert kernel is not None and kernel[1:] == ["monitor", "--kernel", "--property", "--subsystem-match=block"]
    control.touch()
    udev = monitor_argv("auto", udev_control=control)
    assert udev is not None and udev[2] == "--udev"
    assert monitor_argv("kernel", udev_control=control) == kernel
    assert monitor_argv("off") is None
    assert monitor_argv("auto", udevadm="no-such-udevadm-here") is None
    assert config.parse({"node": {"disk_events": "off"}}).node.disk_events == "off"
    with pytest.raises(ConfigError, match="disk_events"):
        config.parse({"node": {"disk_events": "inotify"}})


def rules_pool(name: str, disk: str, **settings: object) -> PartitionBackend:
    rules = {"transport": "loop", "names": [Path(disk).name], "min_size": "48Mi"}
    pool_config = PartitionPoolConfig.model_validate({"match": rules, "setup": True, **settings})
    return PartitionBackend(name, pool_config, CommandRunner(default_timeout=60), claims=Claims())


def nudge(device: str) -> None:
    """The kernel sends a change event for the disk (as when its size is set again)."""
    subprocess.run(["losetup", "--set-capacity", device], check=True, timeout=60)


@needs_loop_devices
async def test_a_down_pool_comes_up_on_the_kernels_event_not_at_its_retry_interval() -> None:
    async with growable_disk(8 * MiB) as (late, grow):
        manager = VolumeManager({("partition", "later"): rules_pool("later", late, discover_seconds=HOUR)}, {})
        await manager.open()
        assert not manager.pool_states()[("partition", "later")].up  # 8 MiB: smaller than the rules ask
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(manager.retry_unavailable, HOUR)
            tasks.start_soon(manager.keep_fresh)
            tasks.start_soon(lambda: follow_disk_events(manager, "kernel", settle=0.1, gap=0.2))
            grow(64 * MiB)
            with anyio.fail_after(60):
                # the monitor may not listen yet when the disk grows: the kernel is asked again every 2 s (each is
                # a change event; no interval of the pool's is due within the hour)
                while not manager.pool_states()[("partition", "later")].up:
                    nudge(late)
                    with anyio.move_on_after(2):
                        while not manager.pool_states()[("partition", "later")].up:
                            await anyio.sleep(0.05)
            tasks.cancel_scope.cancel()
        assert (await manager.capacity("partition", "later")).available_bytes > 48 * MiB
        await manager.aclose()


@needs_loop_devices
async def test_a_served_pool_takes_a_new_disk_on_its_event(tmp_path: Path) -> None:
    async with loop_disks(1, 64 * MiB) as (first,), growable_disk(8 * MiB) as (late, grow):
        names = [Path(first).name, Path(late).name]
        config_file = tmp_path / "config.toml"
        config_file.write_text(
            f'[node]\nkubelet_dir = "{tmp_path / "kubelet"}"\npool_retry_seconds = {HOUR}\n\n'
            f"[pools.partition.found]\ndefault = true\nsetup = true\ndiscover_seconds = {HOUR}\n"
            f'[pools.partition.found.match]\ntransport = "loop"\nnames = {names!r}\nmin_size = "48Mi"\n'.replace(
                "'", '"'
            )
        )
        with running_server(tmp_path, config_file) as sock:
            channel = Channel(path=str(sock))
            try:
                controller = ControllerStub(channel)
                request = GetCapacityRequest(parameters={"backend": "partition", "pool": "found"})
                one_disk = (await controller.get_capacity(request)).available_capacity
                assert 0 < one_disk < 64 * MiB
                grow(64 * MiB)
                with anyio.fail_after(60):
                    while (await controller.get_capacity(request)).available_capacity <= one_disk:
                        nudge(late)
                        with anyio.move_on_after(2):
                            while (await controller.get_capacity(request)).available_capacity <= one_disk:
                                await anyio.sleep(0.1)
            finally:
                channel.close()
        assert "disk event (change " + Path(late).name in (tmp_path / "serve.log").read_text()


@needs_loop_devices
async def test_a_disk_that_dies_under_a_running_server_fails_only_its_pool(tmp_path: Path) -> None:
    """Pool `one`'s only disk dies under `localdisk serve` (its size drops to 0, as when a disk is pulled and its
    node stays): the calls that touch it are FAILED_PRECONDITION naming the disk, its capacity is 0, and pool `two`,
    ListVolumes and the Node service go on. The disk comes back with its content: the pool is up again, with its
    volume, without a restart."""
    async with loop_disks(1, 64 * MiB) as (other,), growable_disk(64 * MiB) as (dying, grow):
        config_file = tmp_path / "config.toml"
        config_file.write_text(
            f'[node]\nkubelet_dir = "{tmp_path / "kubelet"}"\npool_retry_seconds = 1\n\n'
            + "".join(
                f'[pools.partition.{pool}]\nsetup = true\n[pools.partition.{pool}.match]\ntransport = "loop"\n'
                f'names = ["{Path(disk).name}"]\n\n'
                for pool, disk in (("one", dying), ("two", other))
            )
        )
        with running_server(tmp_path, config_file) as sock:
            channel = Channel(path=str(sock))
            try:
                controller, node = ControllerStub(channel), NodeStub(channel)

                async def create(pool: str, name: str) -> str:
                    request = create_request(name, 8 * MiB, "partition")
                    request.parameters["pool"] = pool
                    made = (await controller.create_volume(request)).volume
                    assert made is not None
                    return made.volume_id

                async def listed() -> set[str]:
                    entries = (await controller.list_volumes(ListVolumesRequest())).entries
                    return {e.volume.volume_id for e in entries if e.volume is not None}

                async def capacity(pool: str) -> int:
                    request = GetCapacityRequest(parameters={"backend": "partition", "pool": pool})
                    return (await controller.get_capacity(request)).available_capacity

                kept, theirs = await create("one", "pvc-on-one"), await create("two", "pvc-on-two")
                content = Path(dying).read_bytes()
                grow(0)  # the disk dies

                with pytest.raises(GRPCError) as refused:
                    await create("one", "pvc-one-after")
                assert refused.value.status is Status.FAILED_PRECONDITION
                assert f"{dying}) of partition pool 'one'" in (refused.value.message or "")
                assert await capacity("one") == 0
                with pytest.raises(GRPCError) as not_deleted:
                    await controller.delete_volume(DeleteVolumeRequest(volume_id=kept))
                assert not_deleted.value.status is Status.FAILED_PRECONDITION
                assert await listed() == {theirs}  # the dead pool's volume is not offered, and not forgotten
                assert (await create("two", "pvc-two-after")).startswith("partition:two:")
                assert (await node.node_get_info(NodeGetInfoRequest())).node_id

                grow(64 * MiB)  # the disk is back, as it was
                with open(dying, "r+b") as device:
                    device.write(content)
                with anyio.fail_after(60):
                    while kept not in await listed():
                        nudge(dying)
                        with anyio.move_on_after(2):
                            while kept not in await listed():
                                await anyio.sleep(0.1)
                assert await capacity("one") > 0
                await controller.delete_volume(DeleteVolumeRequest(volume_id=kept))
            finally:
                channel.close()
        log = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in log and "partition pool 'one' went down" in log
