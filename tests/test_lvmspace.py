"""A thick pool's layouts away from its node (`lvmspace`): the request a StorageClass makes, checked as the backend
checks it, kept through a LocalVolume's spec; the PV space a node reports, from which the controller answers the
numbers the node's own backend answers."""

from __future__ import annotations

import json

import pytest

from localdisk.backends.lvmcache import parse_cache
from localdisk.backends.lvmlayout import Layout, PvSpace, parse_layout
from localdisk.backends.lvmspace import MAX_PVS, LayoutRequest, PoolSpace
from localdisk.errors import InvalidArgument
from localdisk.model import VolumeSpec
from localdisk.sizes import MiB
from tests.lvm.memory_pvs import PvLvm, opened

pytestmark = pytest.mark.anyio
VALID = [
    {},
    {"mirrors": "2"},
    {"stripes": "4", "stripeSize": "128Ki"},
    {"stripes": "2", "mirrors": "2"},
    {"pvTags": "ssd"},
    {"pvTags": ""},  # any PV, whatever the pool's default tags
    {"pvTags": "hdd, ssd"},
    {"stripeSize": "64Ki"},  # on a pool whose default is striped
    {"cache": "WriteThrough", "cacheSize": "10%"},
    {"cache": "writeback", "cacheSize": "8Mi"},
    {"cache": "none"},
    {"cacheSize": "16Mi"},  # over the pool's default cache
]


@pytest.mark.parametrize("parameters", VALID)
def test_a_request_survives_the_spec_and_asks_the_node_for_the_same_volume(parameters: dict[str, str]) -> None:
    request = LayoutRequest.from_parameters(parameters)
    spec = json.loads(json.dumps(request.spec()))  # as the API server stores and returns it
    back = LayoutRequest.from_spec(spec.get("layout"), spec.get("cache"))
    assert back == request
    assert request.empty == (parameters == {})
    # what the node's backend makes of the parameters it is given, over pool defaults that let all of them be valid
    defaults = Layout(stripes=2)
    given = back.parameters()
    assert parse_layout(given, defaults) == parse_layout(parameters, defaults)
    assert parse_cache(given, "writethrough", "10%") == parse_cache(parameters, "writethrough", "10%")


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"mirrors": "two"}, "parameter 'mirrors' is 'two'"),
        ({"stripes": "65"}, "from 1 to 64"),
        ({"stripeSize": "48Ki"}, "power of two"),
        ({"stripes": "1", "stripeSize": "64Ki"}, "needs 'stripes' of 2 or more"),
        ({"stripes": "2", "mirrors": "3"}, "raid10 keeps 2 copies"),
        ({"pvTags": "no spaces"}, "pvTags"),
        ({"pvTags": ",".join(f"t{i}" for i in range(17))}, "at most 16"),
        ({"cache": "fast"}, "parameter 'cache' is 'fast'"),
        ({"cache": "none", "cacheSize": "10%"}, "needs 'cache' set to a cache mode"),
        ({"cacheSize": "101%"}, "1% to 100%"),
    ],
)
def test_a_value_no_pool_takes_is_invalid_argument(parameters: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        LayoutRequest.from_parameters(parameters)


def _space(*pvs: tuple[str, int, int, str], **more: object) -> PoolSpace:
    found = tuple(PvSpace(name, free * MiB, frozenset({tag}), True, size * MiB) for name, size, free, tag in pvs)
    return PoolSpace.from_json(
        PoolSpace(extent=4 * MiB, vg_free=sum(p.free for p in found), pvs=found).to_json() | more, "dense"
    )


def test_the_pool_decides_what_it_can_never_make() -> None:
    space = _space(("/dev/a", 256, 256, "hdd"), ("/dev/b", 256, 128, "hdd"), ("/dev/c", 64, 64, "ssd"))
    space.check(LayoutRequest.from_parameters({"mirrors": "3"}), "pool dense")
    with pytest.raises(InvalidArgument, match="needs 4 PVs; pool dense has 3"):
        space.check(LayoutRequest.from_parameters({"stripes": "4"}), "pool dense")
    with pytest.raises(InvalidArgument, match="needs 2 PVs; pool dense has 1 tagged ssd"):
        space.check(LayoutRequest.from_parameters({"mirrors": "2", "pvTags": "ssd"}), "pool dense")
    with pytest.raises(InvalidArgument, match="no fast PVs for caches"):
        space.check(LayoutRequest.from_parameters({"cache": "writethrough"}), "pool dense")
    cached = _space(("/dev/a", 256, 256, "hdd"), ("/dev/c", 64, 64, "ssd"), cachePvTags=["ssd"])
    cached.check(LayoutRequest.from_parameters({"cache": "writethrough", "pvTags": "hdd"}), "pool dense")
    # a mirror of 2 leaves the rest of b's 128 MiB: 127 MiB less one extent of RAID metadata
    assert space.capacity(LayoutRequest.from_parameters({"mirrors": "2"})).largest == 124 * MiB


def test_two_requests_are_the_same_when_the_pool_makes_the_same_volume_of_them() -> None:
    space = _space(("/dev/a", 256, 256, "hdd"), ("/dev/b", 256, 256, "hdd"))
    mirrored = PoolSpace(space.extent, space.vg_free, space.pvs, defaults=Layout(mirrors=2), pool="dense")
    ask = LayoutRequest.from_parameters
    assert mirrored.same(ask({}), ask({"mirrors": "2"}))  # the pool's default, named or not
    assert mirrored.same(ask({"pvTags": "a,b"}), ask({"pvTags": "b,a"}))
    assert mirrored.same(
        ask({"stripes": "2", "mirrors": "1"}), ask({"stripes": "2", "stripeSize": "64Ki", "mirrors": "1"})
    )
    assert not mirrored.same(ask({}), ask({"mirrors": "1"}))
    assert not mirrored.same(ask({"cache": "none"}), ask({"cache": "writeback"}))


def test_a_report_is_bounded_and_keeps_the_freest_pvs() -> None:
    pvs = tuple(PvSpace(f"/dev/d{i}", i * MiB, frozenset({"hdd", "x" * 200}), True, 512 * MiB) for i in range(300))
    report = PoolSpace(4 * MiB, sum(p.free for p in pvs), pvs).to_json()
    assert len(report["pvs"]) == MAX_PVS
    assert min(p["freeBytes"] for p in report["pvs"]) == (300 - MAX_PVS) * MiB
    assert all(p["tags"] == ["hdd"] for p in report["pvs"])  # a tag no StorageClass can name is not reported
    assert len(json.dumps(report)) < 32 * 1024


CASES = [
    {},
    {"mirrors": "2"},
    {"mirrors": "3"},
    {"stripes": "2"},
    {"stripes": "3", "stripeSize": "128Ki"},
    {"stripes": "2", "mirrors": "2"},
    {"stripes": "4"},  # more legs than PVs: nothing
    {"pvTags": "ssd"},
    {"pvTags": "hdd", "mirrors": "2"},
    {"cache": "writethrough", "cacheSize": "10%"},
    {"cache": "writecache", "cacheSize": "8Mi", "mirrors": "2"},
    {"cache": "writeback", "cacheSize": "48Mi"},  # the SSD holds two such caches: two of the largest volumes
    {"cache": "writeback", "cacheSize": "512Mi"},  # more than the SSD holds: nothing
]


@pytest.mark.parametrize("used", [0, 1])
async def test_the_controller_answers_what_the_node_answers_for_every_layout(used: int) -> None:
    """`PoolSpace.capacity` of the JSON a node reports, against the node's own `capacity_for` (the lvm backend on a
    VG in memory: two HDDs of different sizes and free space, one SSD, one extent-aligned spare)."""
    lvm = PvLvm(
        [
            ("/dev/sda", 512 * MiB, "hdd"),
            ("/dev/sdb", 384 * MiB, "hdd"),
            ("/dev/sdc", 256 * MiB, "hdd"),
            ("/dev/nvme0n1", 128 * MiB, "ssd"),
        ]
    )
    backend = await opened(lvm, cache_pv_tags=["ssd"], spare_bytes=8 * MiB)
    if used:
        await backend.create_volume(VolumeSpec("pvc-used", 100 * MiB, parameters={"mirrors": "2"}))
        assert [pv.free for pv in lvm.physical.values()] == [408 * MiB, 280 * MiB, 256 * MiB, 128 * MiB]
    reported = PoolSpace.from_json(json.loads(json.dumps(await backend.layout_space())), "dense")
    answers = set()
    for parameters in CASES:
        node = await backend.capacity_for(parameters)
        controller = reported.capacity(LayoutRequest.from_parameters(parameters))
        assert (controller.total, controller.available, controller.largest) == (
            node.total_bytes,
            node.available_bytes,
            node.maximum_volume_bytes,
        ), parameters
        answers.add((node.available_bytes, node.maximum_volume_bytes))
    assert len(answers) > 8, "the layouts give different answers: the comparison means something"
