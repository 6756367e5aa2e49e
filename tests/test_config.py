"""Node configuration: valid files load, and every mistake names the key to fix."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from localdisk import ConfigError, VolumeManager, config, load_config, parse_config


def test_loads_pools_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[node]\nkubelet_dir = "/var/lib/k"\ndefault_fs = "xfs"\n'
        "[pools.fake.a]\nsize_bytes = 1048576\n[pools.fake.b]\ndefault = true\n"
    )
    config = load_config(path)
    assert config.node.kubelet_dir == "/var/lib/k"
    assert config.node.default_fs == "xfs"
    assert [(p.backend, p.name) for p in config.pools] == [("fake", "a"), ("fake", "b")]
    assert config.default_pool("fake") == "b"
    manager = VolumeManager.from_config(config)
    assert manager.backend("fake").pool == "b"
    assert manager.backend("fake", "a").pool == "a"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"pools": {"fake": {"a": {"size_bytes": "big"}}}}, "pools.fake.a.size_bytes"),
        ({"pools": {"fake": {"a": {"colour": "red"}}}}, "pools.fake.a.colour"),
        ({"pools": {"nosuch": {"a": {}}}}, "unknown backend 'nosuch'"),
        ({"pools": {"fake": {"Bad_Name": {}}}}, "pools.fake.Bad_Name"),
        ({"node": {"default_fs": "ntfs"}}, "node.default_fs"),
        ({"nodes": {}}, "unknown top-level key"),
        ({"pools": {"fake": {"a": {"default": True}, "b": {"default": True}}}}, "more than one pool"),
    ],
)
def test_errors_name_the_bad_key(data: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert words in info.value.message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[pools\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_several_pools_without_default_need_a_pool_parameter() -> None:
    manager = VolumeManager.from_config(parse_config({"pools": {"fake": {"a": {}, "b": {}}}}))
    with pytest.raises(Exception, match="none is the default"):
        manager.backend("fake")


GROUPS = """
[pools.fake.hdd]
default = true
node_labels = { "localdisk.io/disks" = "hdd" }

[pools.fake.nvme]
default = true
node_labels = { "localdisk.io/disks" = "nvme|ssd" }

[pools.fake.scratch]
nodes = ["worker-*", "gpu-?"]

[pools.fake.everywhere]
"""


def test_one_config_read_as_two_nodes_gives_each_its_pools() -> None:
    config = parse_config(tomllib.loads(GROUPS))
    hdd = config.for_node("storage-1", {"localdisk.io/disks": "hdd"})
    fast = config.for_node("worker-7", {"localdisk.io/disks": "ssd", "zone": "a"})
    assert [p.name for p in hdd.pools] == ["hdd", "everywhere"]
    assert [p.name for p in fast.pools] == ["nvme", "scratch", "everywhere"]
    assert hdd.default_pool("fake") == "hdd" and fast.default_pool("fake") == "nvme"
    assert [p.name for p in config.for_node("gpu-12", {}).pools] == ["everywhere"]  # `?` is one character
    assert [p.name for p in config.for_node("gpu-1", {"localdisk.io/disks": ""}).pools] == ["scratch", "everywhere"]


def test_two_defaults_on_one_node_are_refused_there() -> None:
    config = parse_config(tomllib.loads(GROUPS))
    assert config.for_node("n", {"localdisk.io/disks": "hdd"}).default_pool("fake") == "hdd"
    overlapping = parse_config(tomllib.loads(GROUPS.replace('"nvme|ssd"', '"*"')))  # nvme: any value
    with pytest.raises(ConfigError, match="node n: more than one pool of backend 'fake' has default"):
        overlapping.for_node("n", {"localdisk.io/disks": "hdd"})


def test_the_kubelet_directory_can_be_set_apart_from_the_file() -> None:
    cfg = config.development_default().with_kubelet_dir("/var/lib/k0s/kubelet/")
    assert cfg.node.kubelet_dir == "/var/lib/k0s/kubelet"
    assert cfg.pools == config.development_default().pools
    with pytest.raises(ConfigError, match="absolute"):
        config.development_default().with_kubelet_dir("var/lib/kubelet")
