"""`localdisk serve` on real LVM: the CSI server as a subprocess in the UML sandbox, driven through its socket.

One server serves an `lvm` and a `thin` pool; the controller RPCs a provisioner, resizer and snapshotter send are
made over the unix socket with grpclib's generated stubs, exactly as the sidecars would.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerStub,
    CreateSnapshotRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
)
from tests.csi_helpers import MiB, create_request
from tests.lvm.conftest import LINEAR_VG, THIN_POOL, THIN_VG

pytestmark = [pytest.mark.uml, pytest.mark.anyio]

CONFIG = f"""
[pools.lvm.fast]
volume_group = "{LINEAR_VG}"

[pools.thin.tp]
volume_group = "{THIN_VG}"
thin_pool = "{THIN_POOL}"
overprovision_ratio = 1.0  # the ratio, not the real free space, bounds capacity: creates show in it
"""


@pytest.fixture
async def controller(tmp_path: Path, clean_linear: None, clean_thin: None) -> AsyncIterator[ControllerStub]:
    config = tmp_path / "node.toml"
    config.write_text(CONFIG)
    socket = tmp_path / "csi.sock"
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "localdisk.cli", "serve", "--endpoint", f"unix://{socket}", "--config", str(config)]
    with open(log, "wb") as out:
        process = await anyio.open_process([*argv, "--node-id", "uml-node"], stdout=out, stderr=out)
    try:
        with anyio.fail_after(120):  # Python and grpclib start slowly under UML
            while not socket.exists():
                if process.returncode is not None:
                    pytest.fail(f"localdisk serve exited {process.returncode}:\n{log.read_text()}")
                await anyio.sleep(0.2)
        channel = Channel(path=str(socket))
        try:
            yield ControllerStub(channel)
        finally:
            channel.close()
    finally:
        process.terminate()
        with anyio.move_on_after(30):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()
    assert process.returncode in (0, -15), log.read_text()
    assert "Traceback" not in log.read_text()


async def capacity(controller: ControllerStub, backend: str) -> int:
    response = await controller.get_capacity(GetCapacityRequest(parameters={"backend": backend}))
    assert (response.maximum_volume_size or 0) > 0
    return response.available_capacity


async def test_controller_rpcs_over_the_socket(controller: ControllerStub) -> None:
    """One server start (slow under UML) for every RPC: create, expand, capacity, snapshots, delete, errors."""
    too_big = create_request("pvc-huge", 64 * 1024 * MiB, backend="lvm")
    with pytest.raises(GRPCError) as refused:
        await controller.create_volume(too_big)
    assert refused.value.status == Status.RESOURCE_EXHAUSTED
    assert LINEAR_VG in (refused.value.message or "")
    for backend, pool in (("lvm", "fast"), ("thin", "tp")):
        before = await capacity(controller, backend)
        request = create_request(f"pvc-{backend}", 16 * MiB, backend=backend)
        created = (await controller.create_volume(request)).volume
        assert created is not None
        assert created.volume_id.startswith(f"{backend}:{pool}:ldv-")
        assert created.capacity_bytes == 16 * MiB
        assert (await controller.create_volume(request)).volume == created
        assert await capacity(controller, backend) == before - 16 * MiB

        grown = await controller.controller_expand_volume(
            ControllerExpandVolumeRequest(
                volume_id=created.volume_id, capacity_range=CapacityRange(required_bytes=32 * MiB)
            )
        )
        assert grown.capacity_bytes == 32 * MiB and grown.node_expansion_required

        snapshot_request = CreateSnapshotRequest(source_volume_id=created.volume_id, name=f"snap-{backend}")
        if backend == "lvm":
            with pytest.raises(GRPCError) as refused:
                await controller.create_snapshot(snapshot_request)
            assert refused.value.status == Status.INVALID_ARGUMENT
            assert "does not support snapshots" in (refused.value.message or "")
        else:
            snapshot = (await controller.create_snapshot(snapshot_request)).snapshot
            assert snapshot is not None
            assert snapshot.ready_to_use and snapshot.size_bytes == 32 * MiB
            assert snapshot.source_volume_id == created.volume_id
            source = VolumeContentSource(snapshot=VolumeContentSourceSnapshotSource(snapshot_id=snapshot.snapshot_id))
            restore = create_request("pvc-restored", 32 * MiB, backend="thin", volume_content_source=source)
            restored = (await controller.create_volume(restore)).volume
            assert restored is not None
            assert restored.content_source is not None and restored.capacity_bytes == 32 * MiB
            await controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
            await controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
            await controller.delete_volume(DeleteVolumeRequest(volume_id=restored.volume_id))

        await controller.delete_volume(DeleteVolumeRequest(volume_id=created.volume_id))
        await controller.delete_volume(DeleteVolumeRequest(volume_id=created.volume_id))
        assert await capacity(controller, backend) == before
