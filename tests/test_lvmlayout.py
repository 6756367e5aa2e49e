"""The layout planner on made-up PVs: what striped, mirrored or tag-restricted volumes can get, on which PVs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localdisk import CreateRequest
from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.backends.lvmcache import CacheSpec, parse_cache
from localdisk.backends.lvmcmd import layout_args
from localdisk.backends.lvmlayout import (
    Layout,
    PvSpace,
    available,
    check_fits,
    max_volume,
    parse_layout,
    plan,
    same_layout,
)
from localdisk.errors import InsufficientCapacity, InvalidArgument
from localdisk.sandbox import VolumeGroupRequest
from tests.contract import manager_for

MiB = 1024 * 1024
EXTENT = 4 * MiB


def pvs(*free_mib: int, tags: tuple[str, ...] = ()) -> list[PvSpace]:
    return [PvSpace(f"/dev/ubd{chr(98 + i)}", free * MiB, frozenset(tags)) for i, free in enumerate(free_mib)]


def test_parameters_make_a_layout_on_top_of_the_pool_defaults() -> None:
    assert parse_layout({}) == Layout()
    assert parse_layout({"stripes": "4", "stripeSize": "128Ki"}) == Layout(stripes=4, stripe_size=128 * 1024)
    assert parse_layout({"mirrors": "2"}).kind == "raid1"
    assert parse_layout({"mirrors": "2", "stripes": "2"}).kind == "raid10"
    assert parse_layout({"pvTags": "ssd, nvme"}).pv_tags == ("ssd", "nvme")
    assert parse_layout({"stripes": "1"}, Layout(stripes=3)) == Layout(stripes=1)
    assert parse_layout({}, Layout(mirrors=2)).raid


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"stripes": "0"}, "from 1 to 64"),
        ({"stripes": "two"}, "whole number"),
        ({"mirrors": "9"}, "from 1 to 4"),
        ({"stripeSize": "48Ki", "stripes": "2"}, "power of two"),
        ({"stripeSize": "64Ki"}, "needs 'stripes'"),
        ({"stripeSize": "1Q", "stripes": "2"}, "power of two like"),
        ({"mirrors": "3", "stripes": "2"}, "raid10 keeps 2 copies"),
        ({"pvTags": "ssd drive"}, "pvTags"),
    ],
)
def test_bad_values_are_invalid_arguments_that_say_why(parameters: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        parse_layout(parameters)


def test_a_layout_survives_its_lv_tag() -> None:
    layout = Layout(stripes=2, stripe_size=65536, mirrors=2, pv_tags=("ssd", "fast"))
    assert Layout.from_tag([layout.tag(), "other"]) == layout
    assert Layout.from_tag(["other"]) is None


def test_a_mirror_needs_its_size_twice_on_two_different_pvs() -> None:
    layout = Layout(mirrors=2)
    # one big PV is not enough: the copies must be on different PVs
    assert max_volume(layout, pvs(1000, 100), EXTENT) == 100 * MiB - EXTENT  # one extent of RAID metadata each
    assert max_volume(layout, pvs(1000), EXTENT) == 0
    assert layout.footprint(100 * MiB, EXTENT) == 2 * (100 * MiB + EXTENT)


def test_stripes_need_room_on_as_many_pvs_and_round_up_to_whole_extents_per_stripe() -> None:
    layout = Layout(stripes=4)
    assert max_volume(layout, pvs(400, 400, 400, 100, 900), EXTENT) == 4 * 400 * MiB
    assert max_volume(layout, pvs(400, 400, 400), EXTENT) == 0
    assert layout.rounded(10 * MiB, EXTENT) == 16 * MiB
    assert layout.footprint(10 * MiB, EXTENT) == 16 * MiB


def test_available_counts_what_volumes_filled_one_after_another_get() -> None:
    # 2-way mirror over 300, 200, 100 MiB: 196 (on 300+200), then 96 (on 104+100... wait: 104 and 100 left)
    layout = Layout(mirrors=2)
    got = available(layout, pvs(300, 200, 100), EXTENT)
    first = max_volume(layout, pvs(300, 200, 100), EXTENT)
    assert first == 196 * MiB
    assert got == first + 96 * MiB
    assert available(Layout(), pvs(300, 200, 100), EXTENT) == 600 * MiB
    tagged = [*pvs(300, 200, tags=("hdd",)), *pvs(900)]
    assert available(Layout(mirrors=2, pv_tags=("hdd",)), tagged, EXTENT) == 196 * MiB


def test_tags_restrict_the_pvs() -> None:
    space = [*pvs(500, 500, tags=("hdd",)), PvSpace("/dev/ubdz", 100 * MiB, frozenset({"ssd"}))]
    ssd = Layout(pv_tags=("ssd",))
    assert max_volume(ssd, space, EXTENT) == 100 * MiB
    assert plan(ssd, space, 40 * MiB, EXTENT, "vg") == ["/dev/ubdz"]
    with pytest.raises(InsufficientCapacity, match="at most 100 MiB to one linear volume on PVs tagged ssd"):
        plan(ssd, space, 200 * MiB, EXTENT, "vg")
    with pytest.raises(InvalidArgument, match="needs 2 PVs; vg has 1 tagged ssd"):
        check_fits(Layout(mirrors=2, pv_tags=("ssd",)), space, EXTENT, "vg")


def test_a_plan_names_one_pv_per_leg_most_free_first_and_skips_missing_ones() -> None:
    space = [*pvs(100, 300, 200), PvSpace("[unknown]", 900 * MiB, usable=False)]
    assert plan(Layout(mirrors=2), space, 50 * MiB, EXTENT, "vg") == ["/dev/ubdc", "/dev/ubdd"]
    assert plan(Layout(stripes=3), space, 60 * MiB, EXTENT, "vg") == ["/dev/ubdc", "/dev/ubdd", "/dev/ubdb"]
    assert plan(Layout(), space, 50 * MiB, EXTENT, "vg") == []  # plain: LVM chooses


def test_a_stripe_size_past_the_extent_size_cannot_be_made() -> None:
    with pytest.raises(InvalidArgument, match="larger than the extent size"):
        check_fits(Layout(stripes=2, stripe_size=8 * MiB), pvs(100, 100), EXTENT, "vg")


def test_lvcreate_options_per_layout() -> None:
    assert layout_args(1, 0, 1) == []
    assert layout_args(4, 131072, 1) == ["--type", "striped", "-i", "4", "-I", "128k"]
    assert layout_args(1, 0, 3) == ["--type", "raid1", "-m", "2"]
    assert layout_args(2, 0, 2) == ["--type", "raid10", "-i", "2", "-m", "1"]
    with pytest.raises(InvalidArgument):
        layout_args(2, 0, 3)


@given(
    free=st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=8),
    stripes=st.integers(min_value=1, max_value=4),
    mirrors=st.integers(min_value=1, max_value=2),
)
def test_the_largest_volume_always_fits_its_plan_and_one_extent_more_never_does(
    free: list[int], stripes: int, mirrors: int
) -> None:
    layout = Layout(stripes=stripes, mirrors=mirrors)
    space = pvs(*free)
    biggest = max_volume(layout, space, EXTENT)
    if biggest == 0:
        return
    chosen = plan(layout, space, biggest, EXTENT, "vg")
    by_name = {pv.name: pv.free for pv in space}
    if not layout.plain:
        assert len(set(chosen)) == layout.legs
        assert all(by_name[name] >= layout.leg_extents(biggest, EXTENT) * EXTENT for name in chosen)
    assert available(layout, space, EXTENT) >= biggest
    with pytest.raises(InsufficientCapacity):
        plan(layout, space, biggest + EXTENT * stripes, EXTENT, "vg")


def test_cache_parameters() -> None:
    assert parse_cache({}, None, "10%") is None
    assert parse_cache({"cache": "writeback", "cacheSize": "256Mi"}, None, "10%") == CacheSpec("writeback", 256 * MiB)
    assert parse_cache({"cache": "none"}, "writethrough", "10%") is None
    assert parse_cache({}, "writecache", "25%") == CacheSpec("writecache", percent=25)
    spec = CacheSpec("writethrough", percent=10)
    assert spec.bytes_for(400 * MiB, EXTENT) == 40 * MiB
    assert spec.bytes_for(10 * MiB, EXTENT) == 8 * MiB  # at least MIN_CACHE
    assert CacheSpec.from_tags([spec.tag()]) == spec
    assert CacheSpec.from_tags([CacheSpec("writeback", 4096).tag()]) == CacheSpec("writeback", 4096)
    for bad in (
        {"cache": "fast"},
        {"cache": "writeback", "cacheSize": "0"},
        {"cache": "writeback", "cacheSize": "101%"},
    ):
        with pytest.raises(InvalidArgument):
            parse_cache(bad, None, "10%")


def test_the_sandbox_makes_vgs_of_several_tagged_pvs() -> None:
    assert VolumeGroupRequest.parse("vg:512M") == VolumeGroupRequest("vg", 512 * MiB)
    many = VolumeGroupRequest.parse("vg:128Mx3@hdd,64M@ssd+fast")
    assert many.size_bytes == 448 * MiB
    assert many.pvs == ((128 * MiB, ("hdd",)),) * 3 + ((64 * MiB, ("ssd", "fast")),)
    assert VolumeGroupRequest.parse("vg:64Mx2").pvs == ((64 * MiB, ()),) * 2
    for bad in ("vg:64Mx0", "vg:64Mx99", "vg:64M@bad tag", "vg"):
        with pytest.raises(InvalidArgument):
            VolumeGroupRequest.parse(bad)


@pytest.mark.anyio
async def test_backend_parameters_go_only_to_a_backend_that_takes_them() -> None:
    manager = manager_for(FakeBackend("p", FakePoolConfig()))
    with pytest.raises(InvalidArgument, match="are for LVM pools"):
        await manager.create_volume(CreateRequest("v", "fake", "p", MiB, parameters={"stripes": "2"}))
    with pytest.raises(InvalidArgument, match="are for LVM pools"):
        await manager.capacity("fake", "p", {"mirrors": "2"})
    assert (await manager.capacity("fake", "p", {})).available_bytes > 0


def test_layouts_that_make_the_same_volume_are_the_same() -> None:
    """What a retried create is compared by (ALREADY_EXISTS otherwise): LVM's default stripe size named or not, PV
    tags in any order."""
    assert same_layout(Layout(stripes=2), Layout(stripes=2, stripe_size=64 * 1024))
    assert same_layout(Layout(mirrors=2, pv_tags=("hdd", "ssd")), Layout(mirrors=2, pv_tags=("ssd", "hdd")))
    assert not same_layout(Layout(stripes=2), Layout(stripes=2, stripe_size=128 * 1024))
    assert not same_layout(Layout(stripes=2), Layout(stripes=3))
    assert not same_layout(Layout(mirrors=2), Layout(mirrors=2, pv_tags=("hdd",)))
    assert not same_layout(Layout(), Layout(mirrors=2))
