"""Node configuration: which pools this node serves, read from a TOML file and validated at start-up.

    [node]
    kubelet_dir = "/var/lib/kubelet"
    default_fs = "ext4"
    pending_grace_seconds = 300

    [pools.lvm.ssd]            # backend "lvm", pool "ssd"
    volume_group = "vg-ssd"
    default = true

Every error names the bad key (`pools.lvm.ssd.volume_group: Field required`), so a broken ConfigMap is fixed from
the first log line instead of from a traceback.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localdisk import registry
from localdisk.errors import ConfigError, InvalidArgument
from localdisk.model import NAME_PATTERN
from localdisk.registry import PoolConfig

FsType = Literal["ext4", "xfs", "btrfs"]
PENDING_GRACE = 300.0  # seconds; see NodeSettings.pending_grace_seconds


DiskEvents = Literal["auto", "udev", "kernel", "off"]


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kubelet_dir: str = "/var/lib/kubelet"
    default_fs: FsType = "ext4"
    pool_retry_seconds: float = Field(default=30.0, gt=0)
    """How often a pool that could not open (a VG or disk missing, say) is tried again while the server runs."""
    pending_grace_seconds: float = Field(default=PENDING_GRACE, gt=0)
    """How long a volume may stay pending (a create cancelled or killed half-way left it, holding its space) before
    the server removes it in the background. A create in progress in this process is never removed, whatever its
    age; a retry of the create within this time finishes the volume instead."""
    luks_iter_time_ms: int | None = Field(default=None, ge=1, le=60_000)
    luks_pbkdf_memory_kib: int | None = Field(default=None, ge=32, le=4 * 1024 * 1024)
    """How hard the passphrase of an encrypted volume is stretched (argon2id) for the keyslots this node writes: at
    format and at a key rotation. Default: cryptsetup's (about 2 s, up to 1 GiB and half the RAM)."""
    cgroup_root: str = "/sys/fs/cgroup"
    """The cgroup v2 hierarchy holding the kubelet's pod cgroups, where I/O limits are written (`localdisk.cgroups`)."""
    disk_events: DiskEvents = "auto"
    """Discover again as soon as a disk is added, removed or changed (`localdisk.diskevents`): "udev" follows the
    udev daemon's events, "kernel" the kernel's uevents, "auto" udev's where its daemon runs and the kernel's
    elsewhere; "off" keeps to `discover_seconds` and `pool_retry_seconds` alone."""
    state_dir: str | None = None
    """Where the node keeps its record of volumes' I/O limits and publications (`localdisk.qos`); default
    `<kubelet_dir>/plugins/localdisk.csi.io/state`, a host path that survives restarts of the node plugin."""

    @property
    def node_state_dir(self) -> str:
        return self.state_dir or f"{self.kubelet_dir.rstrip('/')}/plugins/localdisk.csi.io/state"


@dataclass(frozen=True)
class PoolEntry:
    backend: str
    name: str
    config: PoolConfig


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSettings = field(default_factory=NodeSettings)
    pools: tuple[PoolEntry, ...] = ()

    def for_node(self, node: str, labels: Mapping[str, str]) -> NodeConfig:
        """The config as the node `node` with `labels` serves it: only the pools that select it (`nodes`,
        `node_labels`). Two default pools of one backend on one node are an error here."""
        chosen = tuple(p for p in self.pools if p.config.selects(node, labels))
        _one_default_per_backend(chosen, f"node {node}")
        return NodeConfig(self.node, chosen)

    def with_kubelet_dir(self, kubelet_dir: str) -> NodeConfig:
        """The config with another kubelet directory (`serve --kubelet-dir`, `$KUBELET_DIR`)."""
        if not kubelet_dir.startswith("/"):
            raise ConfigError(f"the kubelet directory {kubelet_dir!r} must be an absolute path")
        return NodeConfig(self.node.model_copy(update={"kubelet_dir": kubelet_dir.rstrip("/") or "/"}), self.pools)

    def default_pools(self) -> dict[str, str]:
        """Backend -> the pool used when only the backend is given, for each backend that has one."""
        return {b: p for b in {e.backend for e in self.pools} if (p := self.default_pool(b))}

    def default_pool(self, backend: str) -> str | None:
        """The pool used when only `backend` is given: the one marked default, or the only one."""
        mine = [p for p in self.pools if p.backend == backend]
        marked = [p for p in mine if p.config.default]
        if marked:
            return marked[0].name
        return mine[0].name if len(mine) == 1 else None


def _where(prefix: str, error: Any) -> str:
    loc = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    return f"{loc}: {error['msg']}"


def parse(data: dict[str, Any], source: str = "config") -> NodeConfig:
    unknown = set(data) - {"node", "pools"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected [node] and [pools.*]")
    try:
        node = NodeSettings.model_validate(data.get("node", {}))
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_where("node", e) for e in exc.errors())) from exc
    pools: list[PoolEntry] = []
    backends = data.get("pools", {})
    if not isinstance(backends, dict):
        raise ConfigError(f"{source}: pools must be a table of [pools.<backend>.<pool>] tables")
    for backend, entries in backends.items():
        try:
            spec = registry.get(backend)
        except InvalidArgument as exc:
            raise ConfigError(f"{source}: pools.{backend}: {exc.message}") from exc
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: pools.{backend} must be a table of pools")
        for name, raw in entries.items():
            where = f"pools.{backend}.{name}"
            if not NAME_PATTERN.match(name):
                raise ConfigError(f"{source}: {where}: pool names are 1-32 of [a-z0-9-], starting and ending alnum")
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: {where} must be a table")
            try:
                pool_config = spec.config_model.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(f"{source}: " + "; ".join(_where(where, e) for e in exc.errors())) from exc
            pools.append(PoolEntry(backend, name, pool_config))
    config = NodeConfig(node, tuple(pools))
    # Pools for different nodes may each be their backend's default there; `for_node` checks those per node.
    _one_default_per_backend(tuple(p for p in pools if not (p.config.nodes or p.config.node_labels)), source)
    return config


def _one_default_per_backend(pools: tuple[PoolEntry, ...], where: str) -> None:
    for backend in sorted({p.backend for p in pools}):
        marked = [p.name for p in pools if p.backend == backend and p.config.default]
        if len(marked) > 1:
            raise ConfigError(f"{where}: more than one pool of backend {backend!r} has default = true: {marked}")


def load(path: str | Path) -> NodeConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(data, str(path))


def development_default() -> NodeConfig:
    """One in-memory `fake` pool: what `localdisk serve` runs without a config file."""
    return parse({"pools": {"fake": {"default": {"default": True}}}}, "built-in development config")
