"""The pure half of the LVM backends, on output recorded from real LVM 2.03 (tests/lvm/data, see record.py).

These run everywhere: parsing `lvm fullreport` JSON, classifying LVM's error messages into domain errors, the
identity kept in LV tags, the thin pool arithmetic, and the checks that keep hostile strings out of argv.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from localdisk import registry
from localdisk.backends import lvm as backend
from localdisk.backends import lvmview
from localdisk.backends.lvmcmd import (
    FULLREPORT_ARGS,
    TAG,
    LogicalVolume,
    Lvm,
    VgReport,
    VolumeGroup,
    check_lv_name,
    check_name,
    check_tags,
    classify,
    is_already_exists,
    is_in_use,
    is_insufficient_space,
    is_not_found,
    parse_fullreport,
    parse_time,
)
from localdisk.backends.lvmthin import thin_use
from localdisk.errors import (
    AlreadyExists,
    BackendFailure,
    Busy,
    CommandFailed,
    FailedPrecondition,
    InsufficientCapacity,
    InvalidArgument,
    NotFound,
    PoolGone,
)
from localdisk.sizes import GiB, MiB
from tests.contract import ODD_NAMES
from tests.lvm.conftest import DATA


def sample(name: str) -> str:
    return (DATA / name).read_text()


# -- fullreport -------------------------------------------------------------------------------------------------------
def test_mixed_report() -> None:
    report = parse_fullreport(sample("fullreport-mixed.json"), "ldrec")
    assert report.vg == VolumeGroup("ldrec", report.vg.uuid, 532676608, 352321536, 4 * MiB)
    assert sorted(report.lvs) == ["clone1", "foreign", "lin1", "nozero", "pool", "snap1", "thin1"]
    lin = report.lvs["lin1"]
    assert (lin.size, lin.pool, lin.active, lin.is_thin, lin.hidden) == (8 * MiB, "", True, False, False)
    assert lin.tags == {"localdisk.csi.io/owned", "localdisk.csi.io/kind=volume", "localdisk.csi.io/name.0=MFRGG"}
    assert lin.created_at is not None and lin.created_at.tzinfo is UTC
    assert lin.path == "/dev/ldrec/lin1"
    pool = report.lvs["pool"]
    assert pool.is_thin_pool and pool.zeroing and pool.active
    assert (pool.data_percent, pool.metadata_percent) == (18.75, 11.62)
    assert not report.lvs["nozero"].zeroing
    thin = report.lvs["thin1"]
    assert thin.is_thin and thin.pool == "pool" and thin.size == GiB and thin.data_percent == 2.34
    snap = report.lvs["snap1"]
    assert snap.origin == "thin1" and snap.skip_activation and not snap.active
    clone = report.lvs["clone1"]
    assert clone.origin == "snap1" and clone.active and not clone.skip_activation
    assert [lv.name for lv in report.in_pool("pool")] == ["clone1", "snap1", "thin1"]


def test_inactive_report() -> None:
    report = parse_fullreport(sample("fullreport-inactive.json"), "ldrec")
    assert not any(lv.active for lv in report.lvs.values())
    assert report.lvs["pool"].data_percent is None  # LVM cannot tell the use of an inactive pool
    assert report.lvs["pool"].zeroing


def test_empty_vg_report() -> None:
    report = parse_fullreport(sample("fullreport-empty.json"), "ldrec2")
    assert report.lvs == {}
    assert report.vg.free == report.vg.size == 264241152


def test_report_without_the_vg() -> None:
    with pytest.raises(NotFound, match="ldrec2"):
        parse_fullreport(sample("fullreport-mixed.json"), "ldrec2")


@pytest.mark.parametrize("text", ["", "not json", '{"report": 3}', "[]"])
def test_report_garbage(text: str) -> None:
    with pytest.raises(BackendFailure, match="not a JSON report"):
        parse_fullreport(text, "vg")


def test_report_bad_number() -> None:
    text = '{"report": [{"vg": [{"vg_name": "v", "vg_size": "12x", "vg_free": "0", "vg_extent_size": "1"}]}]}'
    with pytest.raises(BackendFailure, match="vg_size"):
        parse_fullreport(text, "v")


def test_time() -> None:
    assert parse_time("2026-11-27 08:43:13 +0100") == datetime(2026, 11, 27, 7, 43, 13, tzinfo=UTC)
    assert parse_time("") is None
    assert parse_time("yesterday") is None


def test_fullreport_reads_one_vg_in_one_command() -> None:
    assert FULLREPORT_ARGS[0] == "fullreport"
    assert {"json", "b", "--nosuffix"} <= set(FULLREPORT_ARGS)
    assert "lv_tags" in ",".join(FULLREPORT_ARGS)


# -- classifiers -------------------------------------------------------------------------------------------------------
NOT_FOUND = ["remove-not-found", "extend-not-found", "change-not-found", "pool-not-found"]
NOT_FOUND += ["snapshot-origin-not-found"]


@pytest.mark.parametrize(
    ("name", "error"),
    [(n, NotFound) for n in NOT_FOUND]
    + [
        ("create-no-space", InsufficientCapacity),
        ("extend-no-space", InsufficientCapacity),
        ("lv-exists", AlreadyExists),
        ("remove-in-use", Busy),
        ("bad-name", CommandFailed),
        ("vg-not-found", PoolGone),  # a pool's commands name its own VG: the pool goes down, others go on
    ],
)
def test_classify_recorded_stderr(name: str, error: type[Exception]) -> None:
    stderr = sample(f"stderr-{name}.txt")
    result = classify(["lvm", "lvcreate", "-n", "x"], 5, stderr)
    assert type(result) is error
    assert result.message.strip()
    checks = [is_not_found, is_insufficient_space, is_already_exists, is_in_use]
    assert sum(check(stderr) for check in checks) == (error is not CommandFailed)


def test_classified_message_names_the_command_and_drops_noise() -> None:
    stderr = '  WARNING: Sum of all thin volume sizes exceeds the pool.\n  Volume group "vg" not found\n'
    error = classify(["lvm", "fullreport", "--", "vg"], 5, stderr)
    assert isinstance(error, PoolGone)
    assert error.message.startswith('lvm fullreport: Volume group "vg" not found: the volume group is gone')


def test_unknown_failure_keeps_argv_and_stderr() -> None:
    error = classify(["lvm", "lvcreate"], 3, "something new\n")
    assert isinstance(error, CommandFailed)
    assert (error.argv, error.returncode, error.stderr) == (["lvm", "lvcreate"], 3, "something new\n")


# -- argv hygiene ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["-a", "--force", "a b", "a/b", "", ".", "..", "x" * 128, "ü", "$(id)", "a\n"])
def test_hostile_lvm_names_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(name)


@pytest.mark.parametrize("name", ["lv_tmeta", "x_rimage_0", "snapshot", "pvmove"])
def test_reserved_lv_names_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="reserves"):
        check_lv_name(name)


@pytest.mark.parametrize("tag", ["a b", "", "x" * 1025, "ü", "a,b", "-\n"])
def test_bad_tags_refused(tag: str) -> None:
    with pytest.raises(InvalidArgument):
        check_tags([tag])


# -- identity in tags --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_roundtrip(name: str) -> None:
    tags = backend.identity_tags(backend.VOLUME, name, ("snapshot", backend.lv_name_for("snapshot", "s")))
    assert all(TAG.fullmatch(t) for t in tags)
    assert backend.decode_name(tags) == name
    assert backend.source_of(tags) == ("snapshot", backend.lv_name_for("snapshot", "s"))
    lv_name = backend.lv_name_for(backend.VOLUME, name)
    assert check_lv_name(lv_name) == lv_name and backend.HANDLE.fullmatch(lv_name)


@given(st.text(min_size=1, max_size=256).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) <= 1024))
def test_any_name_roundtrips(name: str) -> None:
    tags = backend.name_tags(name)
    check_tags(tags)
    assert backend.decode_name(reversed(tags)) == name


def test_long_names_are_chunked_and_limited() -> None:
    name = "名" * 341  # 1023 bytes
    tags = backend.name_tags(name)
    assert len(tags) == 4 and all(len(t) <= 1024 for t in tags)
    assert backend.decode_name(tags) == name
    with pytest.raises(InvalidArgument, match="1024"):
        backend.name_tags("x" * 1025)


def test_broken_name_tags_read_as_none() -> None:
    assert backend.decode_name([]) is None
    assert backend.decode_name(["localdisk.csi.io/name.1=MFRGG"]) is None  # chunk 0 missing
    assert backend.decode_name(["localdisk.csi.io/name.0=1"]) is None  # not base32


def test_volume_and_snapshot_names_differ() -> None:
    assert backend.lv_name_for("volume", "a") != backend.lv_name_for("snapshot", "a")
    assert backend.lv_name_for("volume", "a").startswith("ldv-")


def test_source_tag_must_name_one_of_ours() -> None:
    assert backend.source_of(["localdisk.csi.io/source=volume:../../etc"]) is None
    assert backend.source_of(["localdisk.csi.io/source=disk:ldv-" + "0" * 32]) is None


# -- thin pool arithmetic ----------------------------------------------------------------------------------------------
def _lv(name: str, size: int, pool: str = "", attr: str = "Vwi-a-tz--", data: float | None = None) -> LogicalVolume:
    return LogicalVolume(name, "", size, frozenset(), attr, pool, "", data, None, None, "")


def _pool_report(data_percent: float, metadata_percent: float, thin_sizes: list[int]) -> VgReport:
    pool = LogicalVolume("pool", "", GiB, frozenset(), "twi-aotz--", "", "", data_percent, metadata_percent, None, "")
    lvs = {"pool": pool} | {f"t{i}": _lv(f"t{i}", size, "pool") for i, size in enumerate(thin_sizes)}
    return VgReport(VolumeGroup("vg", "", 2 * GiB, GiB, 4 * MiB), lvs)


def test_thin_room_is_the_smaller_of_ratio_and_real_space() -> None:
    use = thin_use(_pool_report(25.0, 5.0, [GiB, GiB]), "pool", ratio=3.0, threshold=80.0)
    assert (use.virtual_bytes, use.used_bytes) == (2 * GiB, GiB // 4)
    assert use.ratio_room == GiB and use.real_room == 3 * GiB // 4
    assert use.available(4 * MiB) == 3 * GiB // 4
    assert use.refusal(3 * GiB // 4, 4 * MiB, "vg/pool") is None
    assert "overprovision ratio 3" in (use.refusal(GiB, 4 * MiB, "vg/pool") or "")
    tight = thin_use(_pool_report(0.0, 5.0, [GiB, GiB]), "pool", ratio=2.5, threshold=80.0)
    assert tight.available(4 * MiB) == GiB // 2  # now the ratio binds


@pytest.mark.parametrize(("data", "meta"), [(80.0, 1.0), (1.0, 80.0), (99.9, 99.9)])
def test_thin_threshold_refuses_on_data_or_metadata(data: float, meta: float) -> None:
    use = thin_use(_pool_report(data, meta, []), "pool", ratio=10.0, threshold=80.0)
    assert use.past_threshold and use.available(4 * MiB) == 0
    assert "past the 80% threshold" in (use.refusal(4 * MiB, 4 * MiB, "vg/pool") or "")


def test_thin_use_needs_the_pool() -> None:
    with pytest.raises(FailedPrecondition, match="vg/other"):
        thin_use(_pool_report(0.0, 0.0, []), "other", 1.0, 90.0)


# -- configuration ----------------------------------------------------------------------------------------------------
def test_registry_and_configs() -> None:
    assert registry.get("lvm") is backend.LINEAR_BACKEND
    assert registry.get("thin") is backend.THIN_BACKEND
    config = backend.ThinPoolConfig(volume_group="vg", thin_pool="pool")
    assert (config.overprovision_ratio, config.threshold_percent) == (10.0, 90.0)
    for bad in ({"volume_group": "-vg"}, {"volume_group": "vg", "spare_bytes": -1}, {"volume_group": "a b"}):
        with pytest.raises(ValidationError):
            backend.LinearPoolConfig.model_validate(bad)
    for bad_thin in ({"overprovision_ratio": 0.5}, {"threshold_percent": 0}, {"threshold_percent": 101}):
        with pytest.raises(ValidationError):
            backend.ThinPoolConfig.model_validate({"volume_group": "vg", "thin_pool": "p"} | bad_thin)


# -- the cached view --------------------------------------------------------------------------------------------------
class _SlowReports:
    """Answers `report` with a recorded report, only once the test lets it (as LVM answers after a slow scan)."""

    def __init__(self, report: VgReport) -> None:
        self.report_value = report
        self.asked = anyio.Event()
        self.answer = anyio.Event()

    async def report(self, vg: str) -> VgReport:
        self.asked.set()
        await self.answer.wait()
        return self.report_value


@pytest.mark.anyio
async def test_a_change_made_while_the_view_is_read_is_not_lost() -> None:
    """A report LVM ran before our lvchange must not bring back the tag the lvchange dropped."""
    recorded = parse_fullreport(sample("fullreport-mixed.json"), "ldrec")
    name = next(iter(recorded.lvs))
    stale = lvmview.with_tags(recorded, name, add=[backend.PENDING_TAG])
    source = _SlowReports(stale)
    view = lvmview.VgView(cast(Lvm, source), "ldrec", 30.0)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(view.refresh)
        await source.asked.wait()
        view.apply(lambda r: lvmview.with_tags(r, name, delete=[backend.PENDING_TAG]))
        source.answer.set()
    report = await view.get()
    assert backend.PENDING_TAG not in report.lvs[name].tags
    assert view.unconfirmed, "the change is applied but not yet seen in a report of LVM's"
    source.report_value = recorded
    source.answer = anyio.Event()
    source.answer.set()
    assert await view.refresh() == recorded and not view.unconfirmed


def test_only_present_pvs_named_by_path_go_into_a_devices_file() -> None:
    from localdisk.backends.lvmcmd import devices_dir, usable_pvs

    report = parse_fullreport(sample("fullreport-mixed.json"), "ldrec")
    assert report.pvs == ("/dev/ubda",) and usable_pvs(report.pvs)
    assert usable_pvs(("/dev/sdc", "/dev/mapper/mpath-a"))
    for unusable in ((), ("[unknown]", "/dev/sdb"), ("/dev/disk/by-id/a b",), ("sdb",)):
        assert not usable_pvs(unusable), unusable
    assert devices_dir({}) == Path("/etc/lvm/devices")
    assert devices_dir({"LVM_SYSTEM_DIR": "/x"}) == Path("/x/devices")


def test_the_devices_named_in_a_devices_file(tmp_path: Path) -> None:
    from localdisk.backends.lvmcmd import devices_in_file

    path = tmp_path / "localdisk.devices"
    assert devices_in_file(path) is None
    path.write_text(  # as vgimportdevices of LVM 2.03.16 wrote it in the sandbox
        "# Created by LVM command vgimportdevices pid 728 at Fri Nov 27 11:49:14 2026\n"
        "VERSION=1.1.1\n"
        "IDTYPE=devname IDNAME=/dev/ubda DEVNAME=/dev/ubda PVID=PnZ1QdxO9EdantnT3Ae1JgM7IKhRtc6o\n"
        "IDTYPE=sys_wwid IDNAME=naa.5000 DEVNAME=/dev/sdb PVID=Q1 PART=1\n"
    )
    assert devices_in_file(path) == frozenset({"/dev/ubda", "/dev/sdb"})


def test_every_command_names_its_vg_after_the_double_dash() -> None:
    from localdisk.backends.lvmcmd import target_vg

    assert target_vg(["lvremove", "-y", "--", "vg1/lv"]) == "vg1"
    assert target_vg([*FULLREPORT_ARGS, "--", "vg2"]) == "vg2"
    assert target_vg(["version"]) is None
    assert target_vg(["lvs", "--"]) is None


def test_a_thin_pool_whose_metadata_is_nearly_full_is_out_of_space() -> None:
    """Seen from LVM 2.03.16 when a thin pool's metadata reached 75% (the benchmark's 1000-volume fill)."""
    stderr = (
        "  WARNING: Remaining free space in metadata of thin pool ldbench-thin/pool is too low (75.00% >= 75.00%)."
        " Resize is recommended.\n"
        "  Cannot create new thin volume, free space in thin pool ldbench-thin/pool reached threshold.\n"
    )
    assert is_insufficient_space(stderr)
    assert isinstance(classify(["lvm", "lvcreate"], 5, stderr), InsufficientCapacity)
