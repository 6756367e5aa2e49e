"""Disks by rules (issue 15, part 3) on a fake sysfs tree: what `scan` reads, what rules match, why disks are refused,
and the config errors that name the bad key. The real-disk side is tests/test_discovery_loop.py."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from localdisk import config
from localdisk.backends.gpt import Table
from localdisk.backends.partition import label_id, labelled_for
from localdisk.discovery import Claims, DiskRules, Roots, SysDisk, scan, survey
from localdisk.errors import ConfigError
from localdisk.runner import CommandResult, CommandRunner
from localdisk.sizes import GiB, TiB

pytestmark = pytest.mark.anyio


def _disk(
    root: Path,
    name: str,
    device_path: str,
    *,
    size: int,
    dev: str,
    rotational: bool = False,
    files: dict[str, str | bytes] | None = None,
    holders: Sequence[str] = (),
    partitions: Sequence[tuple[str, str]] = (),
) -> None:
    """A disk as sysfs shows it: /sys/devices/<device_path>/block/<name>, linked from /sys/block/<name>."""
    real = root / "sys" / "devices" / device_path / "block" / name
    (real / "queue").mkdir(parents=True)
    (real / "holders").mkdir()
    (real / "size").write_text(f"{size // 512}\n")
    (real / "dev").write_text(f"{dev}\n")
    (real / "ro").write_text("0\n")
    (real / "queue" / "rotational").write_text("1\n" if rotational else "0\n")
    for relative, content in (files or {}).items():
        (real / relative).parent.mkdir(parents=True, exist_ok=True)
        (real / relative).write_bytes(content.encode() if isinstance(content, str) else content)
    for holder in holders:
        (real / "holders" / holder).mkdir()
    for part, part_dev in partitions:
        (real / part / "holders").mkdir(parents=True)
        (real / part / "partition").write_text("1\n")
        (real / part / "dev").write_text(f"{part_dev}\n")
    (root / "sys" / "block").mkdir(parents=True, exist_ok=True)
    (root / "sys" / "block" / name).symlink_to(real)


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    """A machine with one disk of each kind discovery must tell apart."""
    pci = "pci0000:00/0000:00:1f.2"
    _disk(tmp_path, "nvme0n1", "pci0000:00/0000:00:04.0/nvme/nvme0", size=2 * TiB, dev="259:0",
          files={"device/model": "Samsung SSD 990 PRO 2TB\n", "device/serial": "S7KHNJ0W123\n"})  # fmt: skip
    _disk(tmp_path, "sda", f"{pci}/ata1/host0/target0:0:0/0:0:0:0", size=4 * TiB, dev="8:0", rotational=True,
          files={"device/model": "ST4000NM000A\n", "device/vpd_pg80": b"\x00\x80\x00\x08ZC1A2B3C"})  # fmt: skip
    _disk(tmp_path, "sdb", f"{pci}/host1/port-1:0/end_device-1:0/target1:0:0/1:0:0:0", size=4 * TiB, dev="8:16",
          rotational=True, files={"device/model": "ST4000NM0025\n"})  # fmt: skip
    _disk(tmp_path, "sdc", f"{pci}/ata3/host2/target2:0:0/2:0:0:0", size=4 * TiB, dev="8:32", rotational=True,
          holders=["dm-0"])  # fmt: skip
    _disk(tmp_path, "sdd", f"{pci}/ata4/host3/target3:0:0/3:0:0:0", size=4 * TiB, dev="8:48", rotational=True,
          partitions=[("sdd1", "8:49")])  # fmt: skip
    _disk(tmp_path, "vda", "pci0000:00/0000:00:02.0/virtio1", size=20 * GiB, dev="253:0", files={"serial": "root\n"})
    _disk(tmp_path, "loop3", "virtual", size=GiB, dev="7:3", rotational=True)
    _disk(tmp_path, "loop4", "virtual", size=0, dev="7:4")  # nothing attached
    _disk(tmp_path, "dm-0", "virtual", size=4 * TiB, dev="252:0")
    _disk(tmp_path, "zram0", "virtual", size=GiB, dev="251:0")
    by_id = tmp_path / "dev" / "disk" / "by-id"
    by_id.mkdir(parents=True)
    (by_id / "nvme-Samsung_SSD_990_PRO_2TB_S7KHNJ0W123").symlink_to("../../nvme0n1")
    (by_id / "ata-ST4000NM000A_ZC1A2B3C").symlink_to("../../sda")
    (by_id / "wwn-0x5000c500a1b2c3d4").symlink_to("../../sda")
    udev = tmp_path / "run" / "udev" / "data"
    udev.mkdir(parents=True)
    (udev / "b8:16").write_text("E:ID_BUS=scsi\nE:ID_SERIAL_SHORT=ZC9SAS01\n")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("22 1 8:49 / /data rw - ext4 /dev/sdd1 rw\n")
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    return Roots(sys=tmp_path / "sys", dev=tmp_path / "dev", udev_data=udev, proc=proc)


def _by_name(roots: Roots) -> dict[str, SysDisk]:
    return {d.name: d for d in scan(roots)}


def test_scan_reads_what_rules_look_at(roots: Roots) -> None:
    disks = _by_name(roots)
    assert sorted(disks) == ["loop3", "nvme0n1", "sda", "sdb", "sdc", "sdd", "vda"]  # no dm, zram, empty loop
    nvme, sata, sas, virtio = disks["nvme0n1"], disks["sda"], disks["sdb"], disks["vda"]
    assert (nvme.transport, nvme.rotational, nvme.size_bytes) == ("nvme", False, 2 * TiB)
    assert (nvme.model, nvme.serial) == ("Samsung SSD 990 PRO 2TB", "S7KHNJ0W123")
    assert nvme.path == "/dev/disk/by-id/nvme-Samsung_SSD_990_PRO_2TB_S7KHNJ0W123"
    assert (sata.transport, sata.rotational, sata.serial) == ("sata", True, "ZC1A2B3C")  # from VPD page 0x80
    assert sata.by_id == ("ata-ST4000NM000A_ZC1A2B3C", "wwn-0x5000c500a1b2c3d4")
    assert (sas.transport, sas.serial, sas.path) == ("sas", "ZC9SAS01", "/dev/sdb")  # serial from udev's data
    assert (virtio.transport, virtio.serial) == ("virtio", "root")
    assert disks["loop3"].transport == "loop"
    assert disks["sdc"].holders == ("dm-0",)
    assert (disks["sdd"].partitions, disks["sdd"].partition_devs) == (("sdd1",), ("8:49",))


@pytest.mark.parametrize(
    ("rules", "matching"),
    [
        ({"transport": "nvme"}, ["nvme0n1"]),
        ({"rotational": True}, ["sda", "sdb", "sdc", "sdd"]),  # loop3 is rotational too, but loops need "loop"
        ({"rotational": True, "transport": ["sas"]}, ["sdb"]),
        ({"min_size": "1T", "max_size": "2Ti"}, ["nvme0n1"]),
        ({"min_size": "3T"}, ["sda", "sdb", "sdc", "sdd"]),
        ({"by_id": "ata-ST4000*"}, ["sda"]),
        ({"model": "ST4000NM*"}, ["sda", "sdb"]),
        ({"serial": "S7KH*"}, ["nvme0n1"]),
        ({"names": ["vd*", "loop*"]}, ["vda"]),
        ({"transport": "loop", "max_size": "1Gi"}, ["loop3"]),
    ],
)
def test_rules_select_subsets(roots: Roots, rules: dict[str, Any], matching: list[str]) -> None:
    parsed = DiskRules.model_validate(rules)
    assert [d.name for d in scan(roots) if parsed.mismatch(d) is None] == matching


def test_a_mismatch_says_why(roots: Roots) -> None:
    disks = _by_name(roots)
    assert DiskRules(min_size=3 * TiB).mismatch(disks["nvme0n1"]) == "2 TiB is smaller than min_size 3 TiB"
    assert DiskRules(rotational=False).mismatch(disks["sda"]) == "rotational"
    assert DiskRules(transport=("nvme",)).mismatch(disks["sda"]) == "transport sata not in ['nvme']"


class _Wipefs(CommandRunner):
    """`wipefs --json` answered from a table of signatures per device; any other command fails the test."""

    def __init__(self, signatures: dict[str, list[str]]) -> None:
        super().__init__()
        self.signatures = signatures
        self.probed: list[str] = []

    async def run(self, argv: Sequence[str], **_: Any) -> CommandResult:
        assert list(argv[:3]) == ["wipefs", "--json", "--"], argv  # discovery only ever lists signatures
        device = Path(argv[3]).name
        self.probed.append(device)
        found = [{"device": device, "offset": "0x0", "type": t} for t in self.signatures.get(device, [])]
        text = f'{{"signatures": {str(found).replace(chr(39), chr(34))}}}' if found else ""
        return CommandResult(list(argv), 0, text.encode(), b"", 0.0)


async def test_only_blank_disks_match_and_the_rest_say_why(roots: Roots) -> None:
    runner = _Wipefs({"sdb": ["gpt", "PMBR"], "sdd": ["gpt", "PMBR"], "sda": ["LVM2_member"]})
    claims = Claims()
    claims.name("partition pool 'other'", [str(roots.dev / "disk" / "by-id" / "wwn-0x5000c500a1b2c3d4")])
    result = await survey(DiskRules(rotational=True), "partition pool 'hdd'", runner, claims=claims, roots=roots)
    found = {f.disk.name: (f.state, f.reason) for f in result.findings}
    assert found == {
        "sda": ("refused", "taken by partition pool 'other'"),  # named by path elsewhere (resolved from by-id)
        "sdb": ("partitioned", ""),  # the backend decides whose GPT it is
        "sdc": ("refused", "held by dm-0 (md, LVM or device-mapper)"),
        "sdd": ("refused", "a partition of it is mounted"),
    }
    assert runner.probed == ["sdb"]  # disks refused on sysfs's word are not even probed
    assert "nvme0n1" in result.unmatched and "sda" not in result.unmatched


async def test_signatures_refuse_a_disk(roots: Roots) -> None:
    runner = _Wipefs({"sda": ["linux_raid_member"], "sdb": ["ext4"], "nvme0n1": ["PMBR", "dos"]})
    for name, signatures in runner.signatures.items():
        result = await survey(DiskRules(names=(name,)), "pool", runner, claims=Claims(), roots=roots)
        assert [(f.state, f.reason) for f in result.findings] == [
            ("refused", f"carries {', '.join(s for s in signatures if s != 'PMBR')} signature(s)")
        ]
    blank = await survey(DiskRules(names=("vda",)), "pool", runner, claims=Claims(), roots=roots)
    assert [f.state for f in blank.findings] == ["blank"]


async def test_swap_and_claims_by_another_pool_refuse(roots: Roots) -> None:
    (roots.proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n/dev/vda\tpartition\t1\t0\t-2\n")
    claims = Claims()
    assert claims.take("pool a", "nvme0n1") and not claims.take("pool b", "nvme0n1")
    runner = _Wipefs({})
    result = await survey(DiskRules(names=("vda", "nvme0n1")), "pool b", runner, claims=claims, roots=roots)
    assert {f.disk.name: f.reason for f in result.findings} == {"nvme0n1": "taken by pool a", "vda": "in use as swap"}
    claims.release("pool a")
    assert claims.take("pool b", "nvme0n1")


def test_the_label_marks_the_pool() -> None:
    table = Table("/dev/x", 512, 2048, 4096, (), label_id=label_id("hdd"))
    assert labelled_for(table) == labelled_for(Table("/dev/y", 512, 2048, 4096, (), label_id=label_id("hdd")))
    assert labelled_for(table) != labelled_for(Table("/dev/x", 512, 2048, 4096, (), label_id=label_id("nvme")))
    assert labelled_for(Table("/dev/x", 512, 2048, 4096, (), label_id="5E5A3C7B-1D4F-4E39-9C1A-0B0E1F2A3B4C")) is None


@pytest.mark.parametrize(
    ("pool", "error"),
    [
        ({"match": {"rotational": True, "colour": "red"}}, "pools.partition.hdd.match.colour: Extra inputs"),
        ({"match": {"transport": "firewire"}}, "pools.partition.hdd.match.transport.0: Input should be 'nvme'"),
        ({"match": {"min_size": "lots"}}, "pools.partition.hdd.match.min_size: Value error, size 'lots'"),
        ({"match": {"min_size": "2T", "max_size": "1T"}}, "pools.partition.hdd.match: Value error, min_size"),
        ({"match": {}}, "pools.partition.hdd.match: Value error, give at least one rule"),
        ({}, "pools.partition.hdd: Value error, give the pool's disks"),
        ({"disks": ["/dev/sda"], "setup": True}, "pools.partition.hdd: Value error, setup = true needs a [...match]"),
    ],
)
def test_config_errors_name_the_bad_key(pool: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"pools": {"partition": {"hdd": pool}}})
    assert error in info.value.message


def test_one_config_gives_two_node_groups_their_own_rules() -> None:
    parsed = config.parse(
        {
            "pools": {
                "partition": {
                    "hdd": {
                        "node_labels": {"localdisk.io/disks": "hdd"},
                        "match": {"rotational": True, "min_size": "1T"},
                        "setup": True,
                    },
                    "fast": {"node_labels": {"localdisk.io/disks": "nvme"}, "match": {"transport": "nvme"}},
                }
            }
        }
    )
    hdd_node = parsed.for_node("storage-1", {"localdisk.io/disks": "hdd"})
    nvme_node = parsed.for_node("compute-1", {"localdisk.io/disks": "nvme"})
    assert [p.name for p in hdd_node.pools] == ["hdd"] and [p.name for p in nvme_node.pools] == ["fast"]
    rules = hdd_node.pools[0].config.match  # type: ignore[attr-defined]
    assert rules == DiskRules(rotational=True, min_size=10**12)


def test_the_example_configmap_gives_each_node_group_its_pools() -> None:
    """examples/deploy/configmap.yaml, read as an HDD node and as an NVMe node (docs/deploy.md's walk-through)."""
    manifest = yaml.safe_load(Path(__file__).parent.parent.joinpath("examples/deploy/configmap.yaml").read_text())
    parsed = config.parse(tomllib.loads(manifest["data"]["config.toml"]), "configmap.yaml")
    hdd = parsed.for_node("storage-1", {"localdisk.io/disks": "hdd"})
    nvme = parsed.for_node("compute-1", {"localdisk.io/disks": "nvme"})
    assert [(p.backend, p.name) for p in hdd.pools] == [("partition", "hdd")]
    assert sorted((p.backend, p.name) for p in nvme.pools) == [
        ("lvm", "default"),
        ("partition", "nvme"),
        ("thin", "default"),
    ]
    assert hdd.default_pool("partition") == "hdd" and nvme.default_pool("partition") == "nvme"
    assert parsed.for_node("unlabelled", {}).pools == ()


async def test_disks_already_in_the_pool_are_not_probed_again(roots: Roots) -> None:
    runner = _Wipefs({"sdb": ["gpt", "PMBR"]})
    result = await survey(
        DiskRules(names=("sdb", "vda")), "pool", runner, claims=Claims(), roots=roots, in_pool={"sdb"}
    )
    assert {f.disk.name: f.state for f in result.findings} == {"sdb": "in the pool", "vda": "blank"}
    assert runner.probed == ["vda"]
