"""CSI Node service: makes a volume's device usable by pods on this node.

Backend-agnostic: the `VolumeManager` says which device a volume is (`Volume.device_path`), `localdisk.mounts`
formats, mounts, binds, grows and measures it. This module validates each request (fields, access mode, paths
inside the kubelet root), picks the filesystem for an empty device (capability, else the pool's `fs_type`, else
`node.default_fs`; a capability without fs_type keeps whatever supported filesystem the device already has), and
refuses a second concurrent call for the same volume with ABORTED, as CSI asks.

An encrypted volume (`Volume.encrypted`, recorded by its backend, never taken from the request) is a LUKS2 container
(`localdisk.crypt`): staging formats it on first use and opens its mapping with the passphrase from the node-stage
secret (key `passphrase`), and from then on the mapping, /dev/mapper/localdisk-<hash>, is the volume's device for
mounting, publishing, stats and expansion; unstaging closes it. The passphrase is never logged nor put in a message.
A repeated stage of a volume that is open already checks its passphrase all the same. The secret may also carry
`previousPassphrase`: a volume whose header that one opens, and `passphrase` does not, has its key re-wrapped to
`passphrase` at stage (`Crypt.rotate`), so an administrator rotates by updating the Secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import anyio

from localdisk import qos
from localdisk._proto.csi.v1 import (
    NodeBase,
    NodeExpandVolumeRequest,
    NodeExpandVolumeResponse,
    NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse,
    NodeGetInfoRequest,
    NodeGetInfoResponse,
    NodeGetVolumeStatsRequest,
    NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest,
    NodePublishVolumeResponse,
    NodeServiceCapability,
    NodeServiceCapabilityRpc,
    NodeServiceCapabilityRpcType,
    NodeStageVolumeRequest,
    NodeStageVolumeResponse,
    NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest,
    NodeUnstageVolumeResponse,
    VolumeCapability,
    VolumeCondition,
    VolumeUsage,
    VolumeUsageUnit,
)
from localdisk.config import NodeConfig
from localdisk.crypt import Crypt, Passphrase, Pbkdf, Rotation
from localdisk.csi import convert, validate
from localdisk.csi.paths import KubeletPaths
from localdisk.csi.status import rpc
from localdisk.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LocalDiskError,
    NotFound,
    OutOfRange,
)
from localdisk.manager import KeyedGuard, VolumeManager
from localdisk.model import Volume
from localdisk.mounts import Mounter, MountInfo, device_number, mount_flags
from localdisk.qos import VolumeQos

Cap = NodeServiceCapabilityRpcType
PASSPHRASE_KEY = "passphrase"  # noqa: S105 - the key in the node-stage secret, not a value
PREVIOUS_KEY = "previousPassphrase"  # the key of the passphrase before a rotation (optional)
log = logging.getLogger(__name__)


def _capability(cap: VolumeCapability | None) -> VolumeCapability:
    validate.require(cap, "volume_capability")
    assert cap is not None
    validate.check_capability(cap, "volume_capability")
    if cap.mount is not None:
        mount_flags(cap.mount.mount_flags, "volume_capability.mount.mount_flags")
    return cap


def _reader_only(cap: VolumeCapability) -> bool:
    return cap.access_mode is not None and cap.access_mode.mode == validate.Mode.SINGLE_NODE_READER_ONLY


class NodeService(NodeBase):
    def __init__(
        self,
        manager: VolumeManager,
        node_id: str,
        config: NodeConfig | None = None,
        mounter: Mounter | None = None,
        pbkdf: Pbkdf | None = None,
        io: VolumeQos | None = None,
    ) -> None:
        config = config or NodeConfig()
        self.io = io or qos.for_node(config.node)
        self.manager = manager
        self.node_id = node_id
        self.paths = KubeletPaths(config.node.kubelet_dir)
        self.default_fs: str = config.node.default_fs
        self.pool_fs = {(p.backend, p.name): p.config.fs_type for p in config.pools if p.config.fs_type}
        self.mounter = (mounter or Mounter()).within(self.paths.root)
        settings = config.node
        self.crypt = Crypt(
            self.mounter,
            pbkdf or Pbkdf(iter_time_ms=settings.luks_iter_time_ms, memory_kib=settings.luks_pbkdf_memory_kib),
        )
        self._guard = KeyedGuard()

    async def _device(self, volume_id: str) -> tuple[Volume, str]:
        volume = await self.manager.get_volume(volume_id)
        return volume, self._usable_device(volume)

    @staticmethod
    def _usable_device(volume: Volume) -> str:
        if volume.abnormal is not None:
            raise FailedPrecondition(f"volume {volume.id} is not usable: {volume.abnormal}")
        if not volume.device_path:
            raise FailedPrecondition(
                f"volume {volume.id} has no device on this node (backend {volume.ref.backend!r} gives none)"
            )
        return volume.device_path

    def _visible(self, volume: Volume) -> str | None:
        """The device a staged or published volume is seen through: its dm-crypt mapping when encrypted (None
        while the mapping is not open), else the backend's device."""
        if not volume.encrypted or not volume.device_path:
            return volume.device_path
        try:
            return self.crypt.mapping_of(volume.id, volume.device_path)
        except FailedPrecondition:
            return None

    def _opened(self, volume: Volume, device: str) -> str:
        """The device to publish, grow or measure: the open mapping of an encrypted volume, else `device`."""
        if not volume.encrypted:
            return device
        mapped = self.crypt.mapping_of(volume.id, device)
        if mapped is None:
            raise FailedPrecondition(f"encrypted volume {volume.id} is not open on this node; stage it first")
        return mapped

    @staticmethod
    def _passphrase(secrets: dict[str, str], volume_id: str) -> Passphrase:
        """The passphrase of an encrypted volume, from the node-stage secret. Messages name keys, never values."""
        if not secrets:
            raise InvalidArgument(
                f"volume {volume_id} is encrypted and NodeStageVolume carries no secrets; set"
                " csi.storage.k8s.io/node-stage-secret-name and -namespace in the StorageClass, naming a Secret with"
                " key 'passphrase'"
            )
        value = secrets.get(PASSPHRASE_KEY)
        if value is None:
            keys = ", ".join(repr(k) for k in sorted(secrets)[:8] if len(k) <= 64)
            raise InvalidArgument(
                f"volume {volume_id} is encrypted and the node-stage secret has no key {PASSPHRASE_KEY!r}"
                f" (it has {keys or 'other keys'})"
            )
        return NodeService._secret_value(value, PASSPHRASE_KEY, volume_id)

    @staticmethod
    def _previous_passphrase(secrets: dict[str, str], volume_id: str) -> Passphrase | None:
        value = secrets.get(PREVIOUS_KEY)
        return None if not value else NodeService._secret_value(value, PREVIOUS_KEY, volume_id)

    @staticmethod
    def _secret_value(value: str, key: str, volume_id: str) -> Passphrase:
        try:
            return Passphrase(value.encode("utf-8", "surrogatepass"))
        except InvalidArgument as exc:
            raise InvalidArgument(f"volume {volume_id}: the node-stage secret's {key!r}: {exc.message}") from None

    async def _device_if_known(self, volume_id: str) -> str | None:
        """The volume's device for clean-up work: unknown (None) must never keep a pod's mount from going."""
        try:
            return self._visible(await self.manager.get_volume(volume_id))
        except LocalDiskError as exc:
            log.info("volume %s: device unknown during clean-up: %s", volume_id, exc.message)
            return None

    def _volume_path(self, volume_id: str, path: str) -> str:
        """The checked `volume_path` of NodeGetVolumeStats or NodeExpandVolume. The volume can only be staged or
        published inside the kubelet root, so a path that is not a safe place there (relative, outside, through a
        symlink leading out) is where the volume is not: NOT_FOUND, as CSI's error tables say, and nothing is read,
        mounted or resized there."""
        try:
            return self.paths.check(path, "volume_path")
        except InvalidArgument as exc:
            raise NotFound(f"volume {volume_id} is not staged or published at that path: {exc.message}") from None

    def _default_fs(self, volume: Volume) -> str:
        """The filesystem an empty device of `volume` gets when the capability names none."""
        return self.pool_fs.get((volume.ref.backend, volume.ref.pool)) or self.default_fs

    # -- stage ------------------------------------------------------------------------------------------------
    @rpc
    async def node_stage_volume(self, message: NodeStageVolumeRequest) -> NodeStageVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        staging = self.paths.check(message.staging_target_path, "staging_target_path")
        cap = _capability(message.volume_capability)
        with self._guard.hold(message.volume_id):
            volume, device = await self._device(message.volume_id)
            if cap.mount is None and self.mounter.mount_at(staging) is not None:
                raise AlreadyExists(f"{staging} has a filesystem mounted; unstage it before staging a block volume")
            device_number(device)
            opened_here = False
            if volume.encrypted:
                passphrase = self._passphrase(message.secrets, volume.id)
                previous = self._previous_passphrase(message.secrets, volume.id)
                opened_here = self.crypt.mapping_of(volume.id, device) is None
                await self.crypt.ensure_format(device, passphrase)
                device, rotated = await self.crypt.unlock(volume.id, device, passphrase, previous)
                if rotated in (Rotation.REWRAPPED, Rotation.FINISHED):
                    log.info(
                        "volume %s: key rotation: its LUKS2 volume key is now wrapped by the node-stage secret's %r"
                        " and no longer by its %r (%s); the data was not touched",
                        volume.id,
                        PASSPHRASE_KEY,
                        PREVIOUS_KEY,
                        "re-wrapped now" if rotated is Rotation.REWRAPPED else "finished a rotation cut off before",
                    )
            if cap.mount is None:  # raw block: published straight from the device (or mapping), nothing to mount
                return NodeStageVolumeResponse()
            try:
                await self.mounter.stage(
                    device,
                    staging,
                    cap.mount.fs_type or None,
                    cap.mount.mount_flags,
                    readonly=_reader_only(cap),
                    default_fs=self._default_fs(volume),
                )
            except BaseException:
                if opened_here:  # leave nothing half done: the mapping opened for this stage goes again
                    with anyio.CancelScope(shield=True):
                        await self.crypt.close(volume.id)
                raise
        return NodeStageVolumeResponse()

    @rpc
    async def node_unstage_volume(self, message: NodeUnstageVolumeRequest) -> NodeUnstageVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        staging = self.paths.check(message.staging_target_path, "staging_target_path")
        with self._guard.hold(message.volume_id):
            await self._refuse_foreign_mount(message.volume_id, staging)
            await self.mounter.unstage(staging)
            await self.crypt.close(message.volume_id)  # an encrypted volume's mapping; none open is success
        return NodeUnstageVolumeResponse()

    # -- publish ----------------------------------------------------------------------------------------------
    @rpc
    async def node_publish_volume(self, message: NodePublishVolumeRequest) -> NodePublishVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        target = self.paths.check(message.target_path, "target_path")
        staging = self.paths.check(message.staging_target_path, "staging_target_path")
        cap = _capability(message.volume_capability)
        if target == staging or target.startswith(staging + "/") or staging.startswith(target + "/"):
            raise InvalidArgument(
                "target_path and staging_target_path must be distinct and neither inside the other: a volume is"
                " published from its staging path onto a target of its own"
            )
        readonly = message.readonly or _reader_only(cap)
        single_writer = cap.access_mode is not None and cap.access_mode.mode == validate.Mode.SINGLE_NODE_SINGLE_WRITER
        pod_uid = message.volume_context.get(qos.POD_UID_KEY) or None
        with self._guard.hold(message.volume_id):
            volume, device = await self._device(message.volume_id)
            device = self._opened(volume, device)
            if cap.mount is None:
                if single_writer:
                    self._refuse_second_writer(volume.id, target, self.mounter.block_binds(device))
                with self._limited(volume.id, target, pod_uid, device):
                    await self.mounter.publish_block(device, target, readonly)
                return NodePublishVolumeResponse()
            staged = self.mounter.mount_at(staging)
            if staged is not None and not self.mounter.mounted_from(staged, device_number(device)):
                raise FailedPrecondition(f"{staging} is not where volume {volume.id} is staged")
            if single_writer and staged is not None:
                self._refuse_second_writer(volume.id, target, self.mounter.publications(staged))
            wanted = cap.mount.fs_type
            if staged is not None and wanted and staged.fs_type != wanted:
                raise FailedPrecondition(f"volume {volume.id} is staged as {staged.fs_type}, not {wanted}")
            with self._limited(volume.id, target, pod_uid, device):
                await self.mounter.publish_filesystem(staging, target, readonly, cap.mount.mount_flags)
        return NodePublishVolumeResponse()

    @contextlib.contextmanager
    def _limited(self, volume_id: str, target: str, pod_uid: str | None, device: str) -> Iterator[None]:
        """Apply the volume's I/O limits to the pod's cgroup for `device` (what the pod's I/O goes to: the mapping
        of an encrypted volume) before the publication, and take them back if it fails (`localdisk.qos`)."""
        number = device_number(device)
        self.io.publish(volume_id, target, pod_uid, (os.major(number), os.minor(number)))
        try:
            yield
        except BaseException:
            self.io.unpublish(volume_id, target)
            raise

    def restore_io_limits(self) -> int:
        """At start: re-apply the I/O limits of the publications recorded before a restart, forget the gone."""
        problem = self.io.cgroups.problem()
        if problem is not None:
            log.warning("I/O limits of volumes cannot be enforced on this node: %s", problem)
        return self.io.restore(lambda target: self.mounter.mount_at(target) is not None)

    async def _refuse_foreign_mount(self, volume_id: str, path: str) -> None:
        """Unstage and unpublish touch only what is the given volume's: the mount at `path` must be its device
        (or a bind of its staged filesystem). A volume that is gone, or whose device is, cannot be compared; its
        mount may go unless it is another volume's, so a deleted volume never keeps a pod's mount in place."""
        mount = self.mounter.mount_at(path)
        if mount is None:
            return
        try:
            volume: Volume | None = await self.manager.get_volume(volume_id)
        except LocalDiskError:  # gone, or its pool is down: a pod's mount must still be able to go
            volume = None
        seen = self._visible(volume) if volume is not None else None
        if volume is not None and seen and self._device_exists(seen):
            if self.mounter.holds(path, seen, mount):
                return
            raise FailedPrecondition(
                f"{path} holds a mount of {mount.source}, not of volume {volume_id}; it is left as it is"
            )
        for other in await self.manager.list_volumes():
            device = self._visible(other)
            if (
                other.id != volume_id
                and device
                and self._device_exists(device)
                and self.mounter.holds(path, device, mount)
            ):
                raise FailedPrecondition(f"{path} holds volume {other.id}, not {volume_id}; it is left as it is")

    @staticmethod
    def _device_exists(device: str) -> bool:
        try:
            device_number(device)
        except (FailedPrecondition, InvalidArgument):
            return False
        return True

    @staticmethod
    def _refuse_second_writer(volume_id: str, target: str, publications: list[MountInfo]) -> None:
        """SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): one publication on the node, not one per target path.
        Publishing again at the same target stays idempotent."""
        others = [m.mount_point for m in publications if m.mount_point != target]
        if others:
            raise FailedPrecondition(
                f"volume {volume_id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at"
                f" {others[0]}; unpublish it there first"
            )

    @rpc
    async def node_unpublish_volume(self, message: NodeUnpublishVolumeRequest) -> NodeUnpublishVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        target = self.paths.check(message.target_path, "target_path")
        with self._guard.hold(message.volume_id):
            await self._refuse_foreign_mount(message.volume_id, target)
            await self.mounter.unpublish(target, await self._device_if_known(message.volume_id))
            self.io.unpublish(message.volume_id, target)
        return NodeUnpublishVolumeResponse()

    # -- stats and expansion ----------------------------------------------------------------------------------
    @rpc
    async def node_get_volume_stats(self, message: NodeGetVolumeStatsRequest) -> NodeGetVolumeStatsResponse:
        validate.require(message.volume_id, "volume_id")
        validate.require(message.volume_path, "volume_path")
        self.paths.check_optional(message.staging_target_path, "staging_target_path")
        volume = await self.manager.get_volume(message.volume_id)  # CSI: NOT_FOUND for a volume that is not there
        path = self._volume_path(volume.id, message.volume_path)
        device, problem = self._visible(volume), volume.abnormal or volume.degraded
        if volume.encrypted and device is None:
            problem = problem or f"encrypted volume {volume.id} is not open on this node (its mapping is gone)"
        stats = await self.mounter.stats(path, device)
        problem = problem or stats.problem
        usage = [VolumeUsage(unit=VolumeUsageUnit.BYTES, total=stats.total_bytes)]
        if not stats.block:
            usage = [
                VolumeUsage(
                    unit=VolumeUsageUnit.BYTES,
                    total=stats.total_bytes,
                    available=stats.available_bytes,
                    used=stats.used_bytes,
                )
            ]
            if stats.total_inodes:  # btrfs allocates inodes dynamically and reports none
                usage.append(
                    VolumeUsage(
                        unit=VolumeUsageUnit.INODES,
                        total=stats.total_inodes,
                        available=stats.free_inodes,
                        used=stats.used_inodes,
                    )
                )
        return NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=VolumeCondition(abnormal=problem is not None, message=problem or "volume is healthy"),
        )

    @rpc
    async def node_expand_volume(self, message: NodeExpandVolumeRequest) -> NodeExpandVolumeResponse:
        validate.require(message.volume_id, "volume_id")
        validate.require(message.volume_path, "volume_path")
        self.paths.check_optional(message.staging_target_path, "staging_target_path")
        required, limit = validate.capacity(message.capacity_range)
        if message.volume_capability is not None:
            validate.check_capability(message.volume_capability, "volume_capability")
        with self._guard.hold(message.volume_id):
            volume = await self.manager.get_volume(message.volume_id)  # NOT_FOUND first, then where it is (not)
            path = self._volume_path(volume.id, message.volume_path)
            device = self._usable_device(volume)
            if not self.mounter.holds(path, self._opened(volume, device)):  # checked before growing anything
                raise NotFound(f"volume {volume.id} is not staged or published at {path}")
            if required and volume.size_bytes < required:
                # Node-side expansion: in a per-node deployment only this node can reach the volume, and the
                # external-resizer has no per-node mode, so the driver does not advertise controller expansion and
                # kubelet's NodeExpandVolume grows the volume itself, then the filesystem (see docs/deploy.md).
                await self.manager.expand_volume(message.volume_id, required, limit)
                volume, device = await self._device(message.volume_id)
            size = await self.mounter.device_size(device)
            if required and size < required:
                raise FailedPrecondition(
                    f"the device of volume {message.volume_id} has {size} bytes, less than the {required} asked,"
                    f" although the volume is {volume.size_bytes} bytes; retry once the kernel sees the new size"
                )
            if limit and size > limit:
                raise OutOfRange(f"the device of volume {message.volume_id} has {size} bytes, over limit {limit}")
            if volume.encrypted:  # the mapping first (online, no passphrase: see localdisk.crypt), then the filesystem
                await self.crypt.resize(volume.id)
                device = self._opened(volume, device)
            capacity = await self.mounter.expand(path, device)
        return NodeExpandVolumeResponse(capacity_bytes=capacity)

    # -- identity ---------------------------------------------------------------------------------------------
    @rpc
    async def node_get_info(self, message: NodeGetInfoRequest) -> NodeGetInfoResponse:
        return NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=0, accessible_topology=convert.topology(self.node_id)
        )

    @rpc
    async def node_get_capabilities(self, message: NodeGetCapabilitiesRequest) -> NodeGetCapabilitiesResponse:
        caps = [
            Cap.STAGE_UNSTAGE_VOLUME,
            Cap.GET_VOLUME_STATS,
            Cap.EXPAND_VOLUME,
            Cap.VOLUME_CONDITION,
            Cap.SINGLE_NODE_MULTI_WRITER,
        ]
        return NodeGetCapabilitiesResponse(
            capabilities=[NodeServiceCapability(rpc=NodeServiceCapabilityRpc(type=c)) for c in caps]
        )
