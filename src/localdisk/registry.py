"""Backends by name: the StorageClass parameter `backend` selects one.

Built-in backends are named here and imported only when a pool of theirs is configured, so a node that uses
partitions never imports the LVM code. Third-party backends register through the `localdisk.backends` entry-point
group, whose objects are `BackendSpec` instances.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

from pydantic import BaseModel, ConfigDict, Field

from localdisk.backend import VolumeBackend
from localdisk.errors import ConfigError, InvalidArgument
from localdisk.runner import CommandRunner


class PoolConfig(BaseModel):
    """Settings every pool has; backends subclass it with their own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: bool = False
    """The pool used when a StorageClass names the backend but no `pool`."""
    fs_type: str | None = None
    """Filesystem used when a volume capability names none (else the node's default)."""
    nodes: tuple[str, ...] = ()
    """The nodes this pool is for, by name pattern (shell globs: `storage-*`); any one may match. Empty: every
    node (that the labels below also select)."""
    node_labels: dict[str, str] = Field(default_factory=dict)
    """Node labels the pool needs, every one: a value is a glob, `a|b` offers alternatives, `*` only asks that
    the label is there. `{"localdisk.io/disks" = "hdd"}` selects the nodes labelled so."""

    def selects(self, node: str, labels: Mapping[str, str]) -> bool:
        """Whether a node of that name and those labels serves this pool."""
        if self.nodes and not any(fnmatch.fnmatchcase(node, pattern) for pattern in self.nodes):
            return False
        for key, wanted in self.node_labels.items():
            value = labels.get(key)
            if value is None or not any(fnmatch.fnmatchcase(value, alt) for alt in wanted.split("|")):
                return False
        return True


@dataclass(frozen=True)
class BackendSpec:
    name: str
    config_model: type[PoolConfig]
    factory: Callable[[str, PoolConfig, CommandRunner], VolumeBackend]
    description: str = ""


BUILTIN: dict[str, str] = {
    "fake": "localdisk.backends.fake:BACKEND",
    "lvm": "localdisk.backends.lvm:LINEAR_BACKEND",
    "thin": "localdisk.backends.lvm:THIN_BACKEND",
    "partition": "localdisk.backends.partition:BACKEND",
}
ENTRY_POINT_GROUP = "localdisk.backends"


def available() -> list[str]:
    names = set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def get(name: str) -> BackendSpec:
    """The backend registered under `name`; an unknown name is an `InvalidArgument` listing the known ones."""
    target = BUILTIN.get(name)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                spec = ep.load()
                if not isinstance(spec, BackendSpec):
                    raise ConfigError(f"entry point {ep.value!r} for backend {name!r} is not a BackendSpec")
                return spec
        raise InvalidArgument(f"unknown backend {name!r}; known backends: {', '.join(available())}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise InvalidArgument(f"backend {name!r} is not available in this build of localdisk") from exc
    spec = getattr(module, attr)
    assert isinstance(spec, BackendSpec)
    return spec
