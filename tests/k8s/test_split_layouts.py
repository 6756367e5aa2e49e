"""LVM layouts and caches in the split shape, against the real API server: `serve --role controller` (a process, with
the RBAC rules and admission policy of examples/deploy) and a node agent whose pool is the real lvm backend on a VG
of several PVs held in memory (tests/lvm/memory_pvs.py), run in this process with the token a DaemonSet pod on its
node would have.

What it shows: CreateVolume with `mirrors`, `stripes`, `cache` becomes a LocalVolume whose spec holds that layout,
the agent makes exactly it (the lvcreate the backend issues), GetCapacity per layout answers the node's own numbers
as they change, and the errors are those of the single-process shape.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk._proto.csi.v1 import (
    ControllerStub,
    DeleteVolumeRequest,
    GetCapacityRequest,
    Topology,
    TopologyRequirement,
)
from localdisk.k8s import TOPOLOGY_KEY
from localdisk.k8s.agent import AgentSettings, NodeAgent
from localdisk.k8s.client import connect
from localdisk.k8s.crd import GROUP, VERSION
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.csi_helpers import create_request
from tests.k8s import controlplane
from tests.k8s.controlplane import NAMESPACE, ApiError, ControlPlane, localdisk_command, wait_for
from tests.k8s.test_split import deploy
from tests.lvm.memory_pvs import PvLvm, opened

pytestmark = [
    pytest.mark.controlplane,
    controlplane.skip_unless_available(),
    pytest.mark.timeout(300),
    pytest.mark.anyio,
]
NODE = "n-dense"
VOLUMES = f"/apis/{GROUP}/{VERSION}/localvolumes"
HDD = 256 * MiB
T = TypeVar("T")


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    """The API server with localdisk's CRDs, RBAC and admission policy, and the central controller."""
    controlplane.require()
    work = Path(tempfile.mkdtemp(prefix="localdisk-layouts-"))
    plane = ControlPlane(work, controlplane.kube_bin_dir())
    try:
        plane.start()
        api = plane.admin
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        for crd in deploy("crds.yaml"):
            api.apply(crd)
            path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"

            def established(path: str = path) -> bool:
                conditions = api.get(path).get("status", {}).get("conditions", [])
                return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

            wait_for(f"{crd['metadata']['name']} established", lambda: established() or None, 30)
        rbac = ["clusterrole.yaml", "clusterrolebinding.yaml", "role.yaml", "rolebinding.yaml"]
        for doc in [d for name in [*rbac, "admissionpolicy.yaml", "admissionpolicybinding.yaml"] for d in deploy(name)]:
            api.apply(doc)
        socket_path = work / "controller.sock"
        controller = plane._start(
            "localdisk-controller",
            [
                localdisk_command(),
                "serve",
                "--role=controller",
                f"--kubeconfig={plane.controller_kubeconfig}",
                f"--endpoint=unix://{socket_path}",
                "--log-format=text",
            ],
        )
        plane._wait_up(controller, "localdisk serve --role controller", socket_path.exists, 60)
        yield plane
    finally:
        plane.stop()
        if not os.environ.get("LOCALDISK_KEEP_LOGS"):
            shutil.rmtree(work, ignore_errors=True)


async def until(what: str, check: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    """Poll `check` (without blocking the agent running beside) until it answers; fail with `what` at the deadline."""
    with anyio.move_on_after(timeout):
        while True:
            found = await check()
            if found is not None:
                return found
            await anyio.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _request(name: str, size: int, **parameters: str) -> Any:
    on_node = TopologyRequirement(preferred=[Topology(segments={TOPOLOGY_KEY: NODE})])
    request = create_request(name, size, "lvm", "dense", accessibility_requirements=on_node)
    request.parameters.update(parameters)
    return request


async def test_layouts_and_caches_go_from_the_central_controller_to_the_node_that_makes_them(
    plane: ControlPlane,
) -> None:
    api = plane.admin
    api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})  # no CSINode: no sidecars involved
    kubeconfig = plane.node_agent_kubeconfig(NODE)
    lvm = PvLvm([*((f"/dev/sd{c}", HDD, "hdd") for c in "abcd"), ("/dev/nvme0n1", 128 * MiB, "ssd")])
    backend = await opened(lvm, pv_tags=["hdd"], cache_pv_tags=["ssd"])
    manager = manager_for(backend)
    layouts: list[dict[str, str]] = [
        {},
        {"mirrors": "2"},
        {"stripes": "4"},
        {"stripes": "2", "mirrors": "2"},
        {"pvTags": "ssd"},
        {"cache": "writethrough", "cacheSize": "10%"},
    ]
    try:
        k8s = await connect(str(kubeconfig))
        async with k8s, anyio.create_task_group() as group:
            group.start_soon(NodeAgent(k8s, manager, AgentSettings(NODE, heartbeat=0.5, resync=5.0)).run)
            async with Channel(path=str(plane.work / "controller.sock")) as channel:
                stub = ControllerStub(channel)

                async def capacity(parameters: dict[str, str]) -> tuple[int, int]:
                    answer = await stub.get_capacity(
                        GetCapacityRequest(
                            parameters={"backend": "lvm", "pool": "dense", **parameters},
                            accessible_topology=Topology(segments={TOPOLOGY_KEY: NODE}),
                        )
                    )
                    return answer.available_capacity, answer.maximum_volume_size or 0

                async def node_says(parameters: dict[str, str]) -> tuple[int, int]:
                    found = await backend.capacity_for(parameters)
                    return found.available_bytes, found.maximum_volume_bytes

                async def capacities_match() -> list[tuple[int, int]] | None:
                    """GetCapacity through the controller for each layout, once it equals the node's own answer."""
                    through = [await capacity(p) for p in layouts]
                    return through if through == [await node_says(p) for p in layouts] else None

                before = await until("the controller to answer per layout as the node does", capacities_match)
                # a mirror: two of one HDD pair each (an extent of RAID metadata per copy); raid10: one over all four
                assert before[1:5] == [
                    (2 * (HDD - 4 * MiB), HDD - 4 * MiB),
                    (4 * HDD, 4 * HDD),
                    (2 * (HDD - 4 * MiB), 2 * (HDD - 4 * MiB)),
                    (128 * MiB, 128 * MiB),  # the SSD alone
                ]

                # a mirror, a striped volume and a cached one: each object's spec holds its layout, each lvcreate it
                made = {}
                for name, parameters in (
                    ("pvc-mirrored", {"mirrors": "2"}),
                    ("pvc-striped", {"stripes": "4", "stripeSize": "128Ki"}),
                    ("pvc-cached", {"cache": "writethrough", "cacheSize": "8Mi"}),
                ):
                    volume = (await stub.create_volume(_request(name, 64 * MiB, **parameters))).volume
                    assert volume is not None and volume.capacity_bytes == 64 * MiB
                    made[name] = volume.volume_id
                spec = {name: api.get(f"{VOLUMES}/{volume_id}")["spec"] for name, volume_id in made.items()}
                assert spec["pvc-mirrored"]["layout"] == {"mirrors": 2} and "cache" not in spec["pvc-mirrored"]
                assert spec["pvc-striped"]["layout"] == {"stripes": 4, "stripeSizeBytes": 128 * 1024}
                assert spec["pvc-cached"]["cache"] == {"mode": "writethrough", "sizeBytes": 8 * MiB}
                mirrored, striped, plain, cache = lvm.created
                assert (mirrored.mirrors, len(mirrored.pvs)) == (2, 2)
                assert (striped.stripes, striped.stripe_size, len(striped.pvs)) == (4, 128 * 1024, 4)
                assert (plain.stripes, plain.mirrors) == (1, 1)  # the cached volume: plain, on the HDDs only
                assert sorted(plain.pvs) == [f"/dev/sd{c}" for c in "abcd"]
                assert cache.pvs == ("/dev/nvme0n1",) and cache.size == 8 * MiB
                assert lvm.lvs[plain.lv].cached

                # capacity follows what the node has left, per layout
                after = await until("the capacities to follow the new volumes", capacities_match)
                assert after[1][1] < before[1][1] and after[2][1] < before[2][1]

                # the errors of the single-process shape
                errors = {
                    "pvc-mirrored": ({"mirrors": "3"}, Status.ALREADY_EXISTS, "another layout or cache"),
                    "pvc-five": ({"stripes": "5"}, Status.INVALID_ARGUMENT, "needs 5 PVs"),
                    "pvc-bad": ({"mirrors": "two"}, Status.INVALID_ARGUMENT, "'mirrors' is 'two'"),
                    "pvc-huge": ({"mirrors": "2"}, Status.RESOURCE_EXHAUSTED, "raid1 with 2 copies"),
                }
                for name, (parameters, status, words) in errors.items():
                    size = 512 * MiB if name == "pvc-huge" else 64 * MiB
                    with pytest.raises(GRPCError) as refused:
                        await stub.create_volume(_request(name, size, **parameters))
                    assert refused.value.status is status, refused.value.message
                    assert words in str(refused.value.message)
                assert len(lvm.created) == 4, "nothing made for a refused request"

                for volume_id in [*made.values(), "pvc-huge"]:
                    await stub.delete_volume(DeleteVolumeRequest(volume_id=volume_id))
                assert sorted(lvm.removed) == sorted([mirrored.lv, striped.lv, plain.lv, f"[{cache.lv}_cvol]"]), (
                    "each volume and its cache removed"
                )
                assert lvm.lvs == {}
                await until("the capacities to be back", capacities_match)
            group.cancel_scope.cancel()
    finally:
        for path in (f"/apis/{GROUP}/{VERSION}/localnodes/{NODE}", f"/api/v1/nodes/{NODE}"):
            try:
                api.delete(path)
            except ApiError as exc:
                if exc.status != 404:
                    raise


def _replace(api: controlplane.Api, crd: dict[str, Any]) -> None:
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
    version = api.get(path)["metadata"]["resourceVersion"]
    api.request("PUT", path, {**crd, "metadata": {**crd["metadata"], "resourceVersion": version}})


async def test_a_crd_that_would_drop_the_layout_makes_the_create_fail_before_any_object(plane: ControlPlane) -> None:
    """A cluster whose LocalVolume CRD is older than layouts prunes spec.layout: its node would make a plain volume.
    The controller asks with a dry run first and answers FAILED_PRECONDITION, writing nothing."""
    api = plane.admin
    [current] = [d for d in deploy("crds.yaml") if d["metadata"]["name"] == "localvolumes.localdisk.csi.io"]
    old = copy.deepcopy(current)
    spec = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for key in ("layout", "cache"):
        del spec["properties"][key]
    spec["x-kubernetes-validations"] = [r for r in spec["x-kubernetes-validations"] if "layout" not in r["rule"]]
    spec["x-kubernetes-validations"] = [r for r in spec["x-kubernetes-validations"] if "cache" not in r["rule"]]
    api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    kubeconfig = plane.node_agent_kubeconfig(NODE)
    lvm = PvLvm([(f"/dev/sd{c}", HDD, "hdd") for c in "ab"])
    manager = manager_for(await opened(lvm))
    try:
        _replace(api, old)
        probe = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LocalVolume",
            "metadata": {"name": "probe"},
            "spec": {"name": "probe", "node": NODE, "backend": "lvm", "layout": {"mirrors": 2}},
        }
        wait_for(  # the API server takes the new schema a moment after the write
            "the old CRD to prune spec.layout",
            lambda: "layout" not in api.request("POST", f"{VOLUMES}?dryRun=All", probe)["spec"] or None,
            30,
        )
        k8s = await connect(str(kubeconfig))
        async with k8s, anyio.create_task_group() as group:
            group.start_soon(NodeAgent(k8s, manager, AgentSettings(NODE, heartbeat=0.5, resync=5.0)).run)
            async with Channel(path=str(plane.work / "controller.sock")) as channel:
                stub = ControllerStub(channel)

                async def reported() -> bool | None:
                    answer = await stub.get_capacity(
                        GetCapacityRequest(
                            parameters={"backend": "lvm", "mirrors": "2"},
                            accessible_topology=Topology(segments={TOPOLOGY_KEY: NODE}),
                        )
                    )
                    return answer.available_capacity > 0 or None

                await until("the node's report", reported)
                with pytest.raises(GRPCError) as refused:
                    await stub.create_volume(_request("pvc-old-crd", 64 * MiB, mirrors="2"))
                assert refused.value.status is Status.FAILED_PRECONDITION
                assert "drops spec.layout" in str(refused.value.message)
                with pytest.raises(ApiError) as absent:
                    api.get(f"{VOLUMES}/pvc-old-crd")
                assert absent.value.status == 404
                assert lvm.created == []
            group.cancel_scope.cancel()
    finally:
        _replace(api, current)
        for path in (f"/apis/{GROUP}/{VERSION}/localnodes/{NODE}", f"/api/v1/nodes/{NODE}"):
            try:
                api.delete(path)
            except ApiError as exc:
                if exc.status != 404:
                    raise
