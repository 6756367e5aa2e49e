"""I/O limits per volume (`localdisk.qos`, `localdisk.cgroups`) on a fake kubelet cgroup tree of plain files.

What the kernel makes of the io.max lines is shown in tests/lvm/test_qos_lvm.py, under User-Mode Linux; here the
parsing, the record, which cgroup gets which line, and the CSI surface (codes, messages, capabilities).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from grpclib.const import Status
from typer.testing import CliRunner

from localdisk import qos
from localdisk._proto.csi.v1 import (
    ControllerGetCapabilitiesRequest,
    ControllerModifyVolumeRequest,
    ControllerServiceCapabilityRpcType,
    DeleteVolumeRequest,
)
from localdisk.cgroups import CgroupTree
from localdisk.cli import app
from localdisk.config import NodeConfig, NodeSettings, development_default
from localdisk.errors import FailedPrecondition, InvalidArgument
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.metrics import Metrics
from localdisk.qos import IoLimits, VolumeQos
from tests.cgroup_tree import CGROUPFS, SYSTEMD, io_max_line, make_pod
from tests.csi_helpers import Csi, create_request, csi_for
from tests.node_lifecycle import expect

UID_A = "0f3c2a1e-7b7d-4c1e-9d55-2d8f0a1b2c3d"
UID_B = "a1b2c3d4-0000-4000-8000-000000000002"
DEV = (253, 7)


def test_parameters_read_units_and_max() -> None:
    changes = qos.parse_parameters(
        {"readIOPS": "100", "writeBytesPerSecond": "10Mi", "readBytesPerSecond": "5M", "writeIOPS": "max"}
    )
    assert changes == {
        "read_iops": 100,
        "write_bytes_per_second": 10 * 1024 * 1024,
        "read_bytes_per_second": 5_000_000,
        "write_iops": None,
    }
    limits = qos.limits_of({"backend": "lvm", "writeIOPS": "50"})
    assert limits == IoLimits(write_iops=50)
    assert limits.io_max() == {"rbps": None, "wbps": None, "riops": None, "wiops": 50}
    assert IoLimits.from_json(limits.to_json()) == limits


@pytest.mark.parametrize(
    ("parameters", "key"),
    [
        ({"readIOPS": "fast"}, "readIOPS"),
        ({"writeIOPS": "0"}, "writeIOPS"),
        ({"writeIOPS": "-5"}, "writeIOPS"),
        ({"readBytesPerSecond": "lots"}, "readBytesPerSecond"),
        ({"writeBytesPerSecond": "1.5Qi"}, "writeBytesPerSecond"),
        ({"readIOPS": str(2**64)}, "readIOPS"),
    ],
)
def test_bad_values_name_their_key(parameters: dict[str, str], key: str) -> None:
    with pytest.raises(InvalidArgument, match=repr(key)):
        qos.parse_parameters(parameters)


def test_mutable_parameters_take_only_limits() -> None:
    with pytest.raises(InvalidArgument, match="'pool'"):
        qos.parse_parameters({"pool": "ssd"}, only_limits=True)


@pytest.mark.parametrize("layout", [SYSTEMD, CGROUPFS])
@pytest.mark.parametrize("qos_class", ["guaranteed", "burstable", "besteffort"])
def test_pod_cgroup_found_in_both_layouts(tmp_path: Path, layout: str, qos_class: str) -> None:
    made = make_pod(tmp_path, layout, qos_class, UID_A, plain=True)
    tree = CgroupTree(tmp_path)
    assert tree.problem() is None
    assert tree.pod_cgroup(UID_A) == made
    assert tree.pod_cgroup(UID_B) is None
    with pytest.raises(InvalidArgument, match="not a UID"):
        tree.pod_cgroup("../../etc")


def test_cgroup_v1_is_a_clear_precondition(tmp_path: Path) -> None:
    tree = CgroupTree(tmp_path)  # no cgroup.controllers: what a cgroup v1 host has at /sys/fs/cgroup
    assert "cgroup v1" in (tree.problem() or "")
    with pytest.raises(FailedPrecondition, match="cgroup v1"):
        VolumeQos(tmp_path / "state", tree).set_limits("lvm:a:v", IoLimits(read_iops=10))
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert "io controller" in (tree.problem() or "")


@pytest.fixture
def io(tmp_path: Path) -> VolumeQos:
    return VolumeQos(tmp_path / "state", CgroupTree(tmp_path / "cgroup"))


def test_publish_modify_unpublish_two_pods(io: VolumeQos, tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    pod_a = make_pod(root, SYSTEMD, "burstable", UID_A, plain=True)
    pod_b = make_pod(root, CGROUPFS, "besteffort", UID_B, plain=True)
    io.set_limits("lvm:p:one", IoLimits(write_bytes_per_second=2 * 1024 * 1024))
    io.publish("lvm:p:one", "/t/a", UID_A, DEV)
    io.publish("lvm:p:one", "/t/b", UID_B, DEV)
    for pod in (pod_a, pod_b):
        assert io_max_line(pod, DEV) == {"rbps": "max", "wbps": "2097152", "riops": "max", "wiops": "max"}
    assert io.set_limits("lvm:p:one", IoLimits(read_iops=300)) == []  # live, in both pods
    for pod in (pod_a, pod_b):
        assert io_max_line(pod, DEV) == {"rbps": "max", "wbps": "max", "riops": "300", "wiops": "max"}
    io.unpublish("lvm:p:one", "/t/a")
    assert io_max_line(pod_a, DEV) == {}
    assert io_max_line(pod_b, DEV)["riops"] == "300"
    assert [p.target for p in io.record("lvm:p:one").publications] == ["/t/b"]
    io.unpublish("lvm:p:one", "/t/b")
    io.forget("lvm:p:one")
    assert list(io.state_dir.iterdir()) == []


def test_two_volumes_of_one_pod_are_limited_apart(io: VolumeQos, tmp_path: Path) -> None:
    pod = make_pod(tmp_path / "cgroup", CGROUPFS, "guaranteed", UID_A, plain=True)
    io.set_limits("lvm:p:one", IoLimits(write_iops=10))
    io.set_limits("lvm:p:two", IoLimits(write_iops=20))
    io.publish("lvm:p:one", "/t/one", UID_A, (253, 1))
    io.publish("lvm:p:two", "/t/two", UID_A, (253, 2))
    assert io_max_line(pod, (253, 1))["wiops"] == "10"
    assert io_max_line(pod, (253, 2))["wiops"] == "20"
    io.set_limits("lvm:p:two", IoLimits())
    assert io_max_line(pod, (253, 1))["wiops"] == "10"
    assert io_max_line(pod, (253, 2)) == {}


def test_publish_refuses_what_it_cannot_enforce(io: VolumeQos, tmp_path: Path) -> None:
    make_pod(tmp_path / "cgroup", SYSTEMD, "burstable", UID_A, plain=True)
    io.set_limits("lvm:p:one", IoLimits(read_iops=5))
    with pytest.raises(FailedPrecondition, match="podInfoOnMount"):
        io.publish("lvm:p:one", "/t/a", None, DEV)
    with pytest.raises(FailedPrecondition, match=f"no cgroup for pod {UID_B}"):
        io.publish("lvm:p:one", "/t/b", UID_B, DEV)
    assert io.record("lvm:p:one").publications == ()  # nothing recorded for a refused publication
    assert io.publish("lvm:p:none", "/t/c", None, DEV) == IoLimits()  # no limits: no pod needed


def test_restore_reapplies_and_forgets_the_gone(io: VolumeQos, tmp_path: Path) -> None:
    pod = make_pod(tmp_path / "cgroup", SYSTEMD, "besteffort", UID_A, plain=True)
    io.set_limits("lvm:p:one", IoLimits(read_bytes_per_second=4096))
    io.publish("lvm:p:one", "/t/kept", UID_A, (8, 16))
    io.publish("lvm:p:one", "/t/gone", UID_A, (8, 32))
    (pod / "io.max").write_text("")  # what a new pod cgroup (or a lost write) looks like
    again = VolumeQos(io.state_dir, io.cgroups)  # a restarted node plugin
    assert again.restore(lambda target: target == "/t/kept") == 1
    assert io_max_line(pod, (8, 16))["rbps"] == "4096"
    assert [p.target for p in again.record("lvm:p:one").publications] == ["/t/kept"]


# -- the CSI surface, `--role all` ------------------------------------------------------------------------------


@pytest.fixture
async def csi(tmp_path: Path) -> AsyncIterator[Csi]:
    make_pod(tmp_path / "cgroup", SYSTEMD, "burstable", UID_A, plain=True)
    settings = NodeSettings(kubelet_dir=str(tmp_path / "kubelet"), cgroup_root=str(tmp_path / "cgroup"))
    config = NodeConfig(node=settings)
    manager = VolumeManager.from_config(development_default())
    async with csi_for(manager, config=config) as channel:
        yield channel


def _io(tmp_path: Path) -> VolumeQos:
    return VolumeQos(tmp_path / "kubelet/plugins/localdisk.csi.io/state", CgroupTree(tmp_path / "cgroup"))


@pytest.mark.anyio
async def test_create_and_modify_record_limits(csi: Csi, tmp_path: Path) -> None:
    caps = await csi.controller.controller_get_capabilities(ControllerGetCapabilitiesRequest())
    assert ControllerServiceCapabilityRpcType.MODIFY_VOLUME in [c.rpc.type for c in caps.capabilities if c.rpc]
    request = create_request("pvc-limited")
    request.parameters |= {"readIOPS": "100", "writeBytesPerSecond": "1Mi"}
    request.mutable_parameters = {"readIOPS": "200"}
    volume = (await csi.controller.create_volume(request)).volume
    assert volume is not None
    assert _io(tmp_path).limits(volume.volume_id) == IoLimits(read_iops=200, write_bytes_per_second=1024 * 1024)
    await csi.controller.controller_modify_volume(
        ControllerModifyVolumeRequest(volume_id=volume.volume_id, mutable_parameters={"writeBytesPerSecond": "max"})
    )
    assert _io(tmp_path).limits(volume.volume_id) == IoLimits(read_iops=200)
    await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume.volume_id))
    assert _io(tmp_path).record(volume.volume_id).limits.empty


@pytest.mark.anyio
async def test_bad_requests_are_invalid_argument_naming_the_key(csi: Csi) -> None:
    request = create_request("pvc-bad")
    request.parameters |= {"writeIOPS": "many"}
    assert "'writeIOPS'" in await expect(Status.INVALID_ARGUMENT, csi.controller.create_volume(request))
    request = create_request("pvc-bad")
    request.mutable_parameters = {"backend": "lvm"}
    assert "'backend'" in await expect(Status.INVALID_ARGUMENT, csi.controller.create_volume(request))
    modify = ControllerModifyVolumeRequest(volume_id="fake:default:nope", mutable_parameters={"iops": "5"})
    assert "'iops'" in await expect(Status.INVALID_ARGUMENT, csi.controller.controller_modify_volume(modify))
    modify = ControllerModifyVolumeRequest(volume_id="", mutable_parameters={"readIOPS": "5"})
    await expect(Status.INVALID_ARGUMENT, csi.controller.controller_modify_volume(modify))
    modify = ControllerModifyVolumeRequest(volume_id="fake:default:nope", mutable_parameters={})
    await expect(Status.NOT_FOUND, csi.controller.controller_modify_volume(modify))
    modify = ControllerModifyVolumeRequest(volume_id="fake:default:nope", mutable_parameters={"readIOPS": "5"})
    await expect(Status.NOT_FOUND, csi.controller.controller_modify_volume(modify))


@pytest.mark.anyio
async def test_limits_on_a_cgroup_v1_node_are_refused_before_creating(tmp_path: Path) -> None:
    settings = NodeSettings(kubelet_dir=str(tmp_path / "kubelet"), cgroup_root=str(tmp_path / "v1"))
    manager = VolumeManager.from_config(development_default())
    async with csi_for(manager, config=NodeConfig(node=settings)) as channel:
        request = create_request("pvc-v1")
        request.parameters |= {"readIOPS": "10"}
        message = await expect(Status.FAILED_PRECONDITION, channel.controller.create_volume(request))
        assert "cgroup v1" in message
        assert await manager.list_volumes() == []
        plain = await channel.controller.create_volume(create_request("pvc-v1-plain"))
        assert plain.volume is not None


def test_state_dir_default_follows_the_kubelet_dir() -> None:
    assert NodeSettings(kubelet_dir="/k").node_state_dir == "/k/plugins/localdisk.csi.io/state"
    assert NodeSettings(state_dir="/s").node_state_dir == "/s"
    assert os.path.isabs(NodeSettings().node_state_dir)


def test_volume_show_lists_limits_and_what_each_pod_holds(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nstate_dir = "{tmp_path / "state"}"\ncgroup_root = "{tmp_path / "cgroup"}"\n'
        "[pools.fake.default]\ndefault = true\n"
    )
    manager = VolumeManager.from_config(development_default())

    async def made() -> str:
        async with manager.session():
            return (await manager.create_volume(CreateRequest(name="pvc-show", backend="fake"))).id

    volume_id = anyio.run(made)
    pod = make_pod(tmp_path / "cgroup", SYSTEMD, "burstable", UID_A, plain=True)
    io = VolumeQos(tmp_path / "state", CgroupTree(tmp_path / "cgroup"))
    io.set_limits(volume_id, IoLimits(write_iops=40))
    io.publish(volume_id, "/t/a", UID_A, DEV)
    assert io_max_line(pod, DEV)["wiops"] == "40"
    result = CliRunner().invoke(app, ["volume", "show", volume_id, "-c", str(config)], obj=manager)
    assert result.exit_code == 0, result.output
    assert "writeIOPS=40" in result.stdout
    assert f"io.max in pod {UID_A}" in result.stdout and "wiops=40" in result.stdout
    result = CliRunner().invoke(app, ["volume", "show", volume_id, "-c", str(config), "--json"], obj=manager)
    shown = json.loads(result.stdout)
    assert shown["io_limits"] == {"writeIOPS": 40}
    assert shown["io_applied"] == [{"pod": UID_A, "device": "253:7", "io_max": {"wiops": 40}}]


def test_metrics_show_limits_what_io_max_holds_and_throttled_time(io: VolumeQos, tmp_path: Path) -> None:
    pod = make_pod(tmp_path / "cgroup", CGROUPFS, "burstable", UID_A, plain=True)
    io.set_limits("lvm:p:one", IoLimits(read_iops=7, write_bytes_per_second=1024))
    io.publish("lvm:p:one", "/t/a", UID_A, DEV)
    (pod / "io.stat").write_text(
        "253:7 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0 cost.wait=1500000 cost.indelay=500000\n"
    )
    metrics = Metrics()
    metrics.watch_io_limits(io)
    sample = metrics.registry.get_sample_value
    assert sample("localdisk_volume_io_limit", {"volume": "lvm:p:one", "kind": "riops"}) == 7
    assert sample("localdisk_volume_io_limit", {"volume": "lvm:p:one", "kind": "wbps"}) == 1024
    assert sample("localdisk_volume_io_limit", {"volume": "lvm:p:one", "kind": "rbps"}) is None
    assert sample("localdisk_volume_io_limit_enforced", {"volume": "lvm:p:one", "pod": UID_A, "kind": "riops"}) == 7
    assert sample("localdisk_volume_io_throttled_seconds_total", {"volume": "lvm:p:one", "pod": UID_A}) == 2.0


def test_an_unreadable_record_is_none_and_left_alone(io: VolumeQos, tmp_path: Path) -> None:
    make_pod(tmp_path / "cgroup", SYSTEMD, "burstable", UID_A, plain=True)
    io.set_limits("lvm:p:one", IoLimits(read_iops=9))
    path = next(io.state_dir.glob("*.json"))
    for broken in (
        "{",
        '{"volume": "lvm:p:one", "limits": {"speed": 1}}',
        '{"volume": "lvm:p:one", "publications": [{}]}',
    ):
        path.write_text(broken)
        assert io.record("lvm:p:one") == qos.VolumeRecord("lvm:p:one")
        assert io.records() == []
    assert path.exists()
