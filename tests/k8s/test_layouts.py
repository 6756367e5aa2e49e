"""LVM layouts and caches in the cluster shape, piece by piece: the central controller checks the StorageClass's
layout, plans capacity and the node from the PVs each node reports, and writes the layout into the LocalVolume's
spec; the node agent reports its PVs and gives the layout to its manager. The real API server path is
tests/k8s/test_split.py's (test_a_mirrored_and_a_striped_claim_...)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor
from kubernetes_asyncio import client

from localdisk._proto.csi.v1 import ControllerStub, GetCapacityRequest, Topology, TopologyRequirement
from localdisk.backends.lvmspace import LayoutRequest
from localdisk.csi.central import CentralControllerService
from localdisk.k8s import TOPOLOGY_KEY
from localdisk.k8s.agent import AgentSettings, NodeAgent
from localdisk.k8s.cluster import ClusterVolumes, NodeReport, VolumeRequest
from localdisk.k8s.crd import FINALIZER, PoolReport, VolumeObject
from localdisk.manager import VolumeManager
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import create_request
from tests.lvm.memory_pvs import PvLvm, opened

pytestmark = pytest.mark.anyio
HDD = 256 * MiB


async def _node_manager(hdds: int, *, ssd: bool = False, size: int = HDD) -> tuple[PvLvm, VolumeManager]:
    pvs = [(f"/dev/sd{chr(97 + i)}", size, "hdd") for i in range(hdds)] + ([("/dev/nvme0n1", HDD, "ssd")] * ssd)
    lvm = PvLvm(pvs)
    backend = await opened(lvm, cache_pv_tags=["ssd"] if ssd else [], pv_tags=["hdd"])
    return lvm, manager_for(backend)


async def _report(name: str, manager: VolumeManager) -> NodeReport:
    async with client.ApiClient() as api:  # never called: the agent only reads its manager here
        pools = await NodeAgent(api, manager, AgentSettings(name)).pools()
    return NodeReport(name, datetime.now(UTC), tuple(pools))


class Recorded(ClusterVolumes):
    """The controller's cluster view with fresh node reports and no API server: a create is recorded and answered
    as made."""

    def __init__(self, *reports: NodeReport) -> None:
        super().__init__(api=None)
        self.nodes = {r.name: r for r in reports}
        self.synced.set()
        self.created: list[VolumeRequest] = []

    async def create_volume(self, request: VolumeRequest) -> VolumeObject:
        self.created.append(request)
        body = self._volume_body("pvc-x", request)
        body["status"] = {"phase": "Ready", "handle": "lvm:dense:x", "sizeBytes": request.required_bytes}
        return VolumeObject.of(body)


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[Recorded, ControllerStub]]:
    """n1: 3 HDDs and an SSD (caches), 256 MiB each; n2: 4 HDDs of 512 MiB, no SSD."""
    _, n1 = await _node_manager(3, ssd=True)
    _, n2 = await _node_manager(4, size=2 * HDD)
    cluster = Recorded(await _report("n1", n1), await _report("n2", n2))
    async with ChannelFor([CentralControllerService(cluster)]) as channel:
        yield cluster, ControllerStub(channel)


def _on(*nodes: str) -> TopologyRequirement:
    return TopologyRequirement(preferred=[Topology(segments={TOPOLOGY_KEY: n}) for n in nodes])


async def _create(stub: ControllerStub, size: int, nodes: tuple[str, ...], **parameters: str) -> None:
    request = create_request("pvc-x", size, "lvm", "dense", accessibility_requirements=_on(*nodes))
    request.parameters.update(parameters)
    await stub.create_volume(request)


async def _capacity(stub: ControllerStub, node: str | None, **parameters: str) -> tuple[int, int]:
    topology = Topology(segments={TOPOLOGY_KEY: node}) if node else None
    answer = await stub.get_capacity(
        GetCapacityRequest(parameters={"backend": "lvm", "pool": "dense", **parameters}, accessible_topology=topology)
    )
    return answer.available_capacity, answer.maximum_volume_size or 0


async def test_get_capacity_answers_per_layout_what_each_node_would(two_nodes: tuple[Recorded, Any]) -> None:
    _, stub = two_nodes
    extent = 4 * MiB
    # plain: every HDD (the pool's pvTags); one volume may span them
    assert await _capacity(stub, "n1") == (3 * HDD, 3 * HDD)
    # a 2-way mirror: each copy on one PV, one extent of RAID metadata per copy; volumes filled one after another
    # (n1's third HDD alone holds no mirror)
    assert await _capacity(stub, "n2", mirrors="2") == (2 * (2 * HDD - extent), 2 * HDD - extent)
    assert await _capacity(stub, "n1", mirrors="2") == (HDD - extent, HDD - extent)
    # 4 stripes: n2 only (n1 has 3 HDDs), and summed over the cluster without a topology
    assert await _capacity(stub, "n2", stripes="4") == (8 * HDD, 8 * HDD)
    assert await _capacity(stub, "n1", stripes="4") == (0, 0)
    assert await _capacity(stub, None, stripes="4") == (8 * HDD, 8 * HDD)
    # the SSD alone: n1 only; a cache: only where there are cache PVs
    assert await _capacity(stub, "n1", pvTags="ssd") == (HDD, HDD)
    assert await _capacity(stub, "n1", cache="writethrough", cacheSize="10%") == (3 * HDD, 3 * HDD)
    assert await _capacity(stub, "n2", cache="writethrough") == (0, 0)
    with pytest.raises(GRPCError) as bad:
        await _capacity(stub, "n1", mirrors="two")
    assert bad.value.status is Status.INVALID_ARGUMENT


async def test_a_layout_goes_to_a_node_that_can_make_it_and_travels_in_the_spec(
    two_nodes: tuple[Recorded, Any],
) -> None:
    cluster, stub = two_nodes
    # the scheduler's node first; n1 cannot stripe over 4 HDDs, n2 can: n2 it is
    await _create(stub, 64 * MiB, ("n1", "n2"), stripes="4", stripeSize="128Ki")
    made = cluster.created[-1]
    assert made.node == "n2"
    assert made.layout == LayoutRequest(stripes=4, stripe_size=128 * 1024)
    spec = cluster._volume_body("pvc-x", made)["spec"]
    assert spec["layout"] == {"stripes": 4, "stripeSizeBytes": 131072} and "cache" not in spec
    # a mirror of 300 MiB fits no HDD of n1 (256 MiB each) but two of n2's
    await _create(stub, 200 * MiB, ("n1", "n2"), mirrors="2")
    assert cluster.created[-1].node == "n1"
    await _create(stub, 300 * MiB, ("n1", "n2"), mirrors="2")
    assert cluster.created[-1].node == "n2"
    # a cache: n1 has the SSD
    await _create(stub, 64 * MiB, ("n1",), cache="writeback", cacheSize="16Mi")
    assert cluster._volume_body("pvc-x", cluster.created[-1])["spec"]["cache"] == {
        "mode": "writeback",
        "sizeBytes": 16 * MiB,
    }
    # a plain volume writes no layout, as before layouts travelled
    await _create(stub, 64 * MiB, ("n1",))
    assert "layout" not in cluster._volume_body("pvc-x", cluster.created[-1])["spec"]


async def test_a_layout_no_node_can_make_or_no_room_for_it(two_nodes: tuple[Recorded, Any]) -> None:
    cluster, stub = two_nodes
    refusals = {
        "needs 4 PVs; lvm pool 'dense' on node n1 has 3 tagged hdd": {"stripes": "4"},
        "lvm pool 'dense' has no fast PVs for caches": {"cache": "writethrough"},
        "parameter 'mirrors' is 'two'": {"mirrors": "two"},
        "raid10 keeps 2 copies": {"stripes": "2", "mirrors": "3"},
    }
    for words, parameters in refusals.items():
        node = ("n2",) if "cache" in parameters else ("n1",)
        with pytest.raises(GRPCError) as refused:
            await _create(stub, 64 * MiB, node, **parameters)
        assert refused.value.status is Status.INVALID_ARGUMENT, parameters
        assert words in str(refused.value.message)
    assert cluster.created == [], "nothing asked of a node"
    # room it lacks now goes to the scheduler's node, whose agent answers RESOURCE_EXHAUSTED (as the single-process
    # shape does): the report may be a heartbeat old
    await _create(stub, 1024 * MiB, ("n1", "n2"), mirrors="2")
    assert cluster.created[-1].node == "n1"


async def test_a_layout_waits_for_a_node_that_has_not_reported(two_nodes: tuple[Recorded, Any]) -> None:
    cluster, stub = two_nodes
    with pytest.raises(GRPCError) as waiting:  # only a report shows the node's agent carries layouts to its disks
        await _create(stub, 64 * MiB, ("n3",), mirrors="2")
    assert waiting.value.status is Status.ABORTED
    await _create(stub, 64 * MiB, ("n3",))  # a plain volume is asked of it as before
    assert cluster.created[-1].node == "n3"
    thin = PoolReport("thin", "dense", True, True, "", HDD, HDD, True, True)  # a pool that reports no PVs
    cluster.nodes["n3"] = NodeReport("n3", datetime.now(UTC), (thin,))
    request = create_request("pvc-x", MiB, "thin", "dense", accessibility_requirements=_on("n3"))
    request.parameters["mirrors"] = "2"
    with pytest.raises(GRPCError) as refused:
        await stub.create_volume(request)
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert "makes no LVM layouts" in str(refused.value.message)


async def test_a_retry_with_another_layout_is_already_exists(two_nodes: tuple[Recorded, Any]) -> None:
    cluster, _ = two_nodes
    asked = VolumeRequest("pvc-x", "n1", "lvm", "dense", MiB, 0, layout=LayoutRequest.from_parameters({"mirrors": "2"}))
    existing = VolumeObject.of(cluster._volume_body("pvc-x", asked) | {"status": {"handle": "lvm:dense:x"}})
    cluster._same_layout(existing, asked)
    spelled = LayoutRequest.from_parameters({"mirrors": "2", "pvTags": "hdd"})  # the pool's default tags, named
    cluster._same_layout(existing, VolumeRequest("pvc-x", "n1", "lvm", "dense", MiB, 0, layout=spelled))
    for other in ({}, {"mirrors": "3"}, {"mirrors": "2", "cache": "writethrough"}):
        request = VolumeRequest("pvc-x", "n1", "lvm", "dense", MiB, 0, layout=LayoutRequest.from_parameters(other))
        with pytest.raises(Exception, match="already exists with another layout or cache") as caught:
            cluster._same_layout(existing, request)
        assert type(caught.value).__name__ == "AlreadyExists"


class CustomObjects:
    """What the agent calls of CustomObjectsApi here: status patches, recorded."""

    def __init__(self) -> None:
        self.status: list[dict[str, Any]] = []

    async def patch_cluster_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        self.status.append(args[4]["status"])

    async def patch_cluster_custom_object(self, *args: Any, **kwargs: Any) -> None:
        pass


def _local_volume(name: str, spec: dict[str, Any], size: int = 64 * MiB) -> VolumeObject:
    base = {"name": name, "node": "n1", "backend": "lvm", "pool": "dense", "requiredBytes": size}
    return VolumeObject.of(
        {"metadata": {"name": name, "generation": 1, "finalizers": [FINALIZER]}, "spec": base | spec}
    )


async def test_the_agent_makes_the_layout_of_the_spec_and_reports_its_pvs() -> None:
    lvm, manager = await _node_manager(3, ssd=True)
    async with client.ApiClient() as api:
        agent = NodeAgent(api, manager, AgentSettings("n1"))
        agent.custom = CustomObjects()
        await agent._reconcile_volume(_local_volume("pvc-m", {"layout": {"mirrors": 2}}))
        answer = agent.custom.status[-1]
        assert answer["phase"] == "Ready" and answer["error"] is None
        [create] = lvm.created
        assert (create.stripes, create.mirrors) == (1, 2)  # raid1
        assert len(create.pvs) == 2 and all(pv.startswith("/dev/sd") for pv in create.pvs)  # two HDDs
        # the same name with another layout (an object written again, say): the node says ALREADY_EXISTS
        await agent._reconcile_volume(_local_volume("pvc-m", {"layout": {"stripes": 2}}))
        assert agent.custom.status[-1]["error"]["reason"] == "AlreadyExists"
        # an object of before layouts travelled: the pool's defaults, a plain volume on the HDDs
        await agent._reconcile_volume(_local_volume("pvc-plain", {}))
        assert (lvm.created[-1].stripes, lvm.created[-1].mirrors) == (1, 1)
        [pool] = await agent.pools()
    space = pool.space()
    assert space is not None and len(space.pvs) == 4 and space.cache_pv_tags == ("ssd",)
    assert space.defaults.pv_tags == ("hdd",)
    # the mirror's two copies (64 MiB and an extent each), the plain volume on the freest HDD, the SSD untouched
    assert sorted(pv.free for pv in space.pvs) == [HDD - 68 * MiB, HDD - 68 * MiB, HDD - 64 * MiB, HDD]
