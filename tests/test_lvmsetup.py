"""Zero-touch LVM set-up without LVM (issue 15): the marks that make each step recognisable, the reports it reads,
its configuration, what it runs (and never runs) against a VG that is not its own, and a pool going down when its
disk dies under the running server. The real set-up, on real LVM, is tests/lvm/test_zerotouch*.py (UML)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from localdisk import config as node_config
from localdisk.availability import Available
from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, ThinPoolConfig
from localdisk.backends.lvmcmd import Lvm
from localdisk.backends.lvmsetup import (
    BUILDING_TAG,
    OURS_TAG,
    RulesPool,
    marked_for,
    parse_group,
    parse_pvs,
    pv_uuid_for,
    with_rules,
)
from localdisk.discovery import Claims, Roots
from localdisk.errors import ConfigError, FailedPrecondition, NotFound
from localdisk.model import VolumeSpec
from localdisk.runner import CommandResult, CommandRunner

pytestmark = pytest.mark.anyio


def test_a_pv_uuid_marks_its_vg_and_only_it() -> None:
    uuid = pv_uuid_for("ld-bulk")
    assert [len(part) for part in uuid.split("-")] == [6, 4, 4, 4, 4, 4, 6]  # LVM's own format
    assert marked_for(uuid, "ld-bulk") and marked_for(uuid.replace("-", ""), "ld-bulk")
    assert not marked_for(uuid, "ld-other")
    assert not marked_for("26LlFN-ne7b-Ucdy-gaGO-bPeP-Ulih-e9F8OJ", "ld-bulk")  # a PV someone else made
    assert pv_uuid_for("ld-bulk") != uuid  # random beyond the mark


def test_reports_are_read() -> None:
    pvs = json.dumps(
        {
            "report": [
                {
                    "pv": [
                        {"pv_name": "/dev/sdb", "vg_name": "ld-bulk", "pv_uuid": "a"},
                        {"pv_name": "/dev/sdc", "vg_name": "", "pv_uuid": "b"},
                        {"pv_name": "[unknown]", "vg_name": "ld-bulk", "pv_uuid": "c"},
                    ]
                }
            ]
        }
    )
    found = parse_pvs(pvs)
    assert [(p.device, p.vg, p.kernel_name) for p in found][:2] == [
        ("/dev/sdb", "ld-bulk", "sdb"),
        ("/dev/sdc", "", "sdc"),
    ]
    vgs = json.dumps(
        {
            "report": [
                {
                    "vg": [
                        {"vg_name": "other", "vg_tags": "", "vg_missing_pv_count": "0", "vg_size": "1"},
                        {
                            "vg_name": "ld-bulk",
                            "vg_tags": f"{OURS_TAG},{BUILDING_TAG}",
                            "vg_missing_pv_count": "1",
                            "vg_size": "1073741824",
                        },
                    ]
                }
            ]
        }
    )
    lvs = json.dumps(
        {
            "report": [
                {
                    "lv": [
                        {"lv_name": "tp", "lv_tags": "", "lv_attr": "twi-a-tz--", "lv_size": "536870912"},
                        {"lv_name": "[tp_tdata]", "lv_tags": "", "lv_attr": "Twi-ao----", "lv_size": "536870912"},
                        {"lv_name": "lvol0", "lv_tags": "", "lv_attr": "-wi-a-----", "lv_size": "4194304"},
                    ]
                }
            ]
        }
    )
    group = parse_group(vgs, lvs, "ld-bulk", "tp")
    assert group is not None
    assert group.tags == {OURS_TAG, BUILDING_TAG} and group.missing == 1 and group.size == 1 << 30
    assert [name for name, _ in group.lvs] == ["tp", "lvol0"]  # hidden LVs are not leftovers to remove
    assert group.thin_size == 1 << 29
    assert parse_group(vgs, lvs, "absent", "tp") is None


def test_config_keys() -> None:
    parsed = node_config.parse(
        {
            "pools": {
                "lvm": {"bulk": {"volume_group": "ld-bulk", "setup": True, "match": {"rotational": True}}},
                "thin": {
                    "fast": {
                        "volume_group": "ld-fast",
                        "thin_pool": "pool",
                        "setup": True,
                        "thin_percent": 80,
                        "metadata_size": "64M",
                        "match": {"transport": "nvme", "min_size": "1T"},
                    }
                },
            }
        }
    )
    thin = parsed.pools[1].config
    assert isinstance(thin, ThinPoolConfig) and thin.metadata_size == 64_000_000 and thin.thin_percent == 80
    with pytest.raises(ConfigError, match=r"pools\.lvm\.x: .*setup = true needs a \[\.\.\.match\] table"):
        node_config.parse({"pools": {"lvm": {"x": {"volume_group": "vg", "setup": True}}}})
    with pytest.raises(ConfigError, match="give at least one rule"):
        node_config.parse({"pools": {"lvm": {"x": {"volume_group": "vg", "match": {}}}}})


def test_only_a_pool_with_rules_is_wrapped() -> None:
    runner = CommandRunner()
    plain = LinearBackend("p", LinearPoolConfig(volume_group="vg"), Lvm(runner), runner)
    assert with_rules(plain, plain.config, runner) is plain  # a pool naming its VG behaves as it always did
    ruled_config = LinearPoolConfig.model_validate({"volume_group": "vg", "match": {"names": ["sdz"]}})
    ruled = LinearBackend("p", ruled_config, Lvm(runner), runner)
    wrapped = with_rules(ruled, ruled_config, runner)
    assert isinstance(wrapped, RulesPool) and wrapped.finds_disks and wrapped.kind == "lvm"


class ScriptedLvm(CommandRunner):
    """Answers the report commands from canned JSON and records every command run."""

    def __init__(self, vgs: list[dict[str, Any]], pvs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.vgs, self.pvs = vgs, pvs
        self.ran: list[list[str]] = []

    async def run(self, argv: Sequence[str], **_: Any) -> CommandResult:
        args = [str(a) for a in argv]
        self.ran.append(args)
        answers = {"vgs": {"vg": self.vgs}, "pvs": {"pv": self.pvs}, "lvs": {"lv": []}}
        text = json.dumps({"report": [answers[args[1]]]}) if args[0] == "lvm" and args[1] in answers else ""
        return CommandResult(args, 0, text.encode(), b"", 0.0)


async def test_a_vg_of_that_name_without_the_tag_is_not_touched(tmp_path: Any) -> None:
    runner = ScriptedLvm(
        vgs=[{"vg_name": "ld-bulk", "vg_tags": "", "vg_missing_pv_count": "0", "vg_size": "1"}],
        pvs=[{"pv_name": "/dev/sdb", "vg_name": "ld-bulk", "pv_uuid": "x"}],
    )
    config = LinearPoolConfig.model_validate({"volume_group": "ld-bulk", "setup": True, "match": {"names": ["sd*"]}})
    pool = RulesPool(
        LinearBackend("bulk", config, Lvm(runner), runner), config, runner, claims=Claims(), roots=Roots(sys=tmp_path)
    )
    backend = Available(pool)
    await backend.open()
    assert not backend.up and backend.state.reason is not None
    assert "exists but was not made by localdisk" in backend.state.reason and OURS_TAG in backend.state.reason
    assert [a[1] for a in runner.ran] == ["vgs", "lvs"]  # reports only: nothing written
    with pytest.raises(FailedPrecondition, match="not made by localdisk"):
        await backend.create_volume(VolumeSpec(name="v", size_bytes=1 << 20))


async def test_no_vg_and_no_disk_is_down_saying_so(tmp_path: Any) -> None:
    runner = ScriptedLvm(vgs=[], pvs=[])
    config = LinearPoolConfig.model_validate({"volume_group": "ld-bulk", "match": {"names": ["sd*"]}})
    pool = RulesPool(
        LinearBackend("bulk", config, Lvm(runner), runner), config, runner, claims=Claims(), roots=Roots(sys=tmp_path)
    )
    backend = Available(pool)
    await backend.open()
    assert backend.state.reason is not None
    assert "does not exist and no disk to make it from (setup = false" in backend.state.reason
    assert (await backend.capacity()).available_bytes == 0
    assert all(a[1] in {"vgs", "pvs"} for a in runner.ran), runner.ran


class Dying(FakeBackend):
    """A fake pool whose disk dies while it is served: its background re-read fails as LVM's would."""

    dead = False

    @property
    def refresh_interval(self) -> float:
        return 1.0

    async def refresh_state(self) -> None:
        if self.dead:
            raise NotFound("volume group 'ld-bulk' not found")

    async def open(self) -> None:
        if self.dead:
            raise FailedPrecondition("volume group 'ld-bulk' not found on this node")
        await super().open()


async def test_a_pool_whose_disk_dies_goes_down_and_comes_back() -> None:
    inner = Dying("dies", FakePoolConfig())
    backend = Available(inner)
    await backend.open()
    volume = await backend.create_volume(VolumeSpec(name="v", size_bytes=1 << 20))
    inner.dead = True
    await backend.refresh_state()
    assert not backend.up and backend.state.reason == "volume group 'ld-bulk' not found"
    assert (await backend.capacity()).available_bytes == 0
    with pytest.raises(FailedPrecondition, match="'dies' is unavailable on this node: volume group 'ld-bulk' not"):
        await backend.create_volume(VolumeSpec(name="w", size_bytes=1 << 20))
    inner.dead = False
    await backend.open()  # what `retry_unavailable` does
    assert backend.up and await backend.find_volume("v") == volume
