"""Encrypted volumes (LUKS2 per volume, `localdisk.crypt`) through the CSI servicers on real LVM, in the sandbox.

What is shown: data written through the mapping round-trips and the LV itself holds none of it in clear; the
passphrase comes only from the node-stage secret and never shows in a log line or an error; a wrong or missing
secret, a foreign LUKS header or a plaintext filesystem are refused before anything is formatted; a restarted
server finds its staged volumes; online expansion grows the LV, the mapping and the filesystem; raw block volumes;
snapshots and clones of an encrypted thin volume open with the source's passphrase; a key rotation re-wraps the key
and leaves the data alone; delete is a crypto-erase (the header area is zero, the data area noise, the next volume
on the same extents shows nothing of the old one) and costs less than the zeroing pass of a plain thick volume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from grpclib._typing import IServable
from grpclib.const import Status
from grpclib.testing import ChannelFor

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerStub,
    CreateSnapshotRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    IdentityStub,
    NodeExpandVolumeRequest,
    NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest,
    NodeStageVolumeRequest,
    NodeStub,
    NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
    VolumeCapability,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
)
from localdisk.backends.lvm import ENCRYPTED_TAG, LinearBackend, ThinBackend
from localdisk.backends.lvmcmd import Lvm
from localdisk.config import NodeConfig, NodeSettings
from localdisk.crypt import HEADER_BYTES, MAPPING_PREFIX, Crypt, Passphrase, Pbkdf, mapping_name
from localdisk.csi.controller import ControllerService
from localdisk.csi.identity import IdentityService
from localdisk.csi.node import NodeService
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.mounts import Mounter
from localdisk.runner import CommandRunner
from tests.contract import manager_for
from tests.csi_helpers import Csi, MiB, block_cap, create_request, mount_cap
from tests.lvm.conftest import LINEAR_VG, THIN_VG
from tests.lvm.helpers import require_dm_crypt, write
from tests.node_lifecycle import byte_usage, expect, kubelet_paths, release_mounts

pytestmark = [pytest.mark.uml, pytest.mark.anyio, pytest.mark.timeout(600)]

FAST = Pbkdf(kind="argon2id", force_iterations=4, memory_kib=32 * 1024)  # cheap stretching: tests only
SECRET = "correct horse battery staple 7f3a9c"
OTHER = "not the passphrase 0b1d2e"
PATTERN = b"LOCALDISK-PLAINTEXT-PATTERN-0123456789abcdef"  # 44 bytes, searched for in the ciphertext
LUKS_MAGIC = b"LUKS\xba\xbe"


@pytest.fixture(scope="module", autouse=True)
def dm_crypt() -> None:
    require_dm_crypt()


@pytest.fixture
def runner() -> CommandRunner:
    return CommandRunner(default_timeout=300)


async def close_mappings(runner: CommandRunner) -> None:
    for entry in Path("/dev/mapper").iterdir():
        if entry.name.startswith(MAPPING_PREFIX):
            await runner.run(["cryptsetup", "close", "--", entry.name], check=False)


@pytest.fixture
async def kubelet_root(tmp_path: Path, runner: CommandRunner) -> AsyncIterator[Path]:
    root = tmp_path / "kubelet"
    root.mkdir()
    try:
        yield root
    finally:
        await release_mounts(root, runner)
        await close_mappings(runner)


@asynccontextmanager
async def csi_for(manager: VolumeManager, root: Path) -> AsyncIterator[Csi]:
    """The three servicers over an in-memory channel; a new one is a restarted server (mounts and mappings stay)."""
    config = NodeConfig(node=NodeSettings(kubelet_dir=str(root)))
    servicers: list[IServable] = [
        IdentityService(),
        ControllerService(manager, "node-1", config),
        NodeService(manager, "node-1", config, pbkdf=FAST),
    ]
    for servicer in servicers:
        servicer.metrics = None  # type: ignore[attr-defined]
    async with ChannelFor(servicers) as channel:
        yield Csi(IdentityStub(channel), ControllerStub(channel), NodeStub(channel), manager)


async def create(csi: Csi, backend: str, pool: str, name: str, size: int, **extra: object) -> str:
    request = create_request(name, size, backend, pool, **extra)
    request.parameters["encrypted"] = "true"
    response = await csi.controller.create_volume(request)
    assert response.volume is not None
    return response.volume.volume_id


def stage_request(
    volume_id: str, staging: str, cap: VolumeCapability, secret: str | None = SECRET
) -> NodeStageVolumeRequest:
    secrets = {} if secret is None else {"passphrase": secret}
    return NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=cap, secrets=secrets
    )


async def stage_publish(csi: Csi, volume_id: str, staging: str, target: str, cap: VolumeCapability) -> None:
    await csi.node.node_stage_volume(stage_request(volume_id, staging, cap))
    await csi.node.node_publish_volume(
        NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
        )
    )


async def stage_publish_with(
    csi: Csi, volume_id: str, staging: str, target: str, cap: VolumeCapability, secret: str
) -> None:
    await csi.node.node_stage_volume(stage_request(volume_id, staging, cap, secret))
    await csi.node.node_publish_volume(
        NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
        )
    )


async def unpublish_unstage(csi: Csi, volume_id: str, staging: str, target: str) -> None:
    await csi.node.node_unpublish_volume(NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    await csi.node.node_unstage_volume(NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))


def read_raw(path: str, offset: int = 0, length: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        length = size - offset if length is None else length
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# -- filesystem, linear: the whole life, and what is on the disk -------------------------------------------------
async def test_linear_filesystem_life_ciphertext_restart_expand_and_crypto_erase(
    linear: LinearBackend, kubelet_root: Path, runner: CommandRunner, lvm: Lvm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="localdisk")
    manager = manager_for(linear)
    cap = mount_cap("ext4")
    payload = PATTERN * (2 * MiB // len(PATTERN))
    paths = kubelet_paths(kubelet_root, "pvc-enc", block=False)
    async with csi_for(manager, kubelet_root) as csi:
        volume_id = await create(csi, "lvm", linear.pool, "pvc-enc", 64 * MiB)
        volume = await manager.get_volume(volume_id)
        assert volume.encrypted and volume.device_path is not None
        lv_device = volume.device_path
        assert ENCRYPTED_TAG in (await lvm.report(LINEAR_VG)).lvs[volume.ref.handle].tags

        await stage_publish(csi, volume_id, paths.staging, paths.target, cap)
        mapped = f"/dev/mapper/{mapping_name(volume_id)}"
        assert Mounter(runner).mount_at(paths.staging) is not None
        assert (await Mounter(runner).probe(lv_device)).description == "a crypto_LUKS crypto signature"
        assert (await Mounter(runner).probe(mapped)).fs_type == "ext4"
        write_file(os.path.join(paths.target, "data.bin"), payload)
        stats = await csi.node.node_get_volume_stats(
            NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=paths.target)
        )
        assert stats.volume_condition is not None and not stats.volume_condition.abnormal
        assert 32 * MiB < byte_usage(stats) <= 64 * MiB - HEADER_BYTES  # the filesystem sees through the mapping

        # Online expansion: NodeExpandVolume grows the LV, the mapping, then the filesystem, while mounted.
        grown = await csi.node.node_expand_volume(
            NodeExpandVolumeRequest(
                volume_id=volume_id,
                volume_path=paths.target,
                staging_target_path=paths.staging,
                capacity_range=CapacityRange(required_bytes=96 * MiB),
                volume_capability=cap,
            )
        )
        assert grown.capacity_bytes == 96 * MiB - HEADER_BYTES
        with open(os.path.join(paths.target, "data.bin"), "rb") as f:
            assert f.read() == payload

    # A restarted server (new servicers, same kernel): staging and publishing again are no-ops, the data is there.
    async with csi_for(manager, kubelet_root) as csi:
        await stage_publish(csi, volume_id, paths.staging, paths.target, cap)
        with open(os.path.join(paths.target, "data.bin"), "rb") as f:
            assert f.read() == payload
        await unpublish_unstage(csi, volume_id, paths.staging, paths.target)
        assert not os.path.lexists(mapped), "unstage closes the mapping"

        drop_caches()
        raw = read_raw(lv_device)
        assert PATTERN not in raw, "the LV holds the plaintext"
        assert raw.startswith(LUKS_MAGIC)

        # Stage again after unstage: the header is found and opened, not reformatted.
        await stage_publish(csi, volume_id, paths.staging, paths.target, cap)
        with open(os.path.join(paths.target, "data.bin"), "rb") as f:
            assert f.read() == payload
        await unpublish_unstage(csi, volume_id, paths.staging, paths.target)

        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))

    # The same extents, seen raw (an LV made without zeroing or wiping): the header area is zero, no key material
    # or header is left, and the data area holds no plaintext.
    await runner.run(["lvcreate", "-y", "-Zn", "-Wn", "-L", "96M", "-n", "probe", LINEAR_VG])
    try:
        raw = read_raw(f"/dev/{LINEAR_VG}/probe")
        assert raw[:HEADER_BYTES] == bytes(HEADER_BYTES)
        assert LUKS_MAGIC not in raw and b"SKUL\xba\xbe" not in raw
        assert PATTERN not in raw
        assert raw[HEADER_BYTES : HEADER_BYTES + MiB] != bytes(MiB), "the data area is ciphertext, not zeroed"
    finally:
        await runner.run(["lvremove", "-y", f"{LINEAR_VG}/probe"])

    # The next volumes on those extents: a plain one is zeroed, an encrypted one shows noise through its mapping.
    async with csi_for(manager, kubelet_root) as csi:
        plain = await manager.create_volume(
            CreateRequest(name="pvc-next", backend="lvm", pool=linear.pool, required_bytes=96 * MiB)
        )
        assert plain.device_path is not None and not plain.encrypted
        assert read_raw(plain.device_path) == bytes(96 * MiB)
        await manager.delete_volume(plain.id)

    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "ran [" in text, "command logging was on"
    assert SECRET not in text, "the passphrase reached a log line"


async def test_refusals_name_no_secret_and_format_nothing(
    linear: LinearBackend, kubelet_root: Path, runner: CommandRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="localdisk")
    manager = manager_for(linear)
    cap = mount_cap("ext4")
    mounter = Mounter(runner)
    async with csi_for(manager, kubelet_root) as csi:
        volume_id = await create(csi, "lvm", linear.pool, "pvc-refusals", 64 * MiB)
        device = (await manager.get_volume(volume_id)).device_path
        assert device is not None
        paths = kubelet_paths(kubelet_root, "pvc-refusals", block=False)
        messages = []
        # No secret at all, no passphrase key, an empty passphrase: INVALID_ARGUMENT, nothing formatted.
        messages.append(
            await expect(
                Status.INVALID_ARGUMENT, csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap, None))
            )
        )
        wrong_key = NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=paths.staging, volume_capability=cap, secrets={"key": SECRET}
        )
        messages.append(await expect(Status.INVALID_ARGUMENT, csi.node.node_stage_volume(wrong_key)))
        messages.append(
            await expect(
                Status.INVALID_ARGUMENT, csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap, ""))
            )
        )
        assert (await mounter.probe(device)).empty

        # Formatted with the right passphrase, then a wrong one: FAILED_PRECONDITION, nothing opened or mounted.
        await csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap))
        await csi.node.node_unstage_volume(
            NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=paths.staging)
        )
        header = read_raw(device, 0, HEADER_BYTES)
        messages.append(
            await expect(
                Status.FAILED_PRECONDITION,
                csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap, OTHER)),
            )
        )
        assert not os.path.lexists(f"/dev/mapper/{mapping_name(volume_id)}")
        assert mounter.mount_at(paths.staging) is None
        assert read_raw(device, 0, HEADER_BYTES) == header

        # A LUKS header that is not ours: refused, left as it is.
        await runner.run(
            ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST.argv(), "--key-file=-", device],
            input=SECRET.encode(),
        )
        foreign = read_raw(device, 0, HEADER_BYTES)
        messages.append(
            await expect(
                Status.FAILED_PRECONDITION, csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap))
            )
        )
        assert read_raw(device, 0, HEADER_BYTES) == foreign

        # A plaintext filesystem on a volume recorded as encrypted: refused, never formatted over.
        await runner.run(["wipefs", "-a", "-q", device])
        await runner.run(["mkfs.ext4", "-q", "-F", device])
        messages.append(
            await expect(
                Status.FAILED_PRECONDITION, csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap))
            )
        )
        assert (await mounter.probe(device)).fs_type == "ext4"
        await runner.run(["wipefs", "-a", "-q", device])
        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))
    for message in messages:
        assert SECRET not in message and OTHER not in message
    text = caplog.text
    assert SECRET not in text and OTHER not in text


# -- raw block, thin: snapshots and clones keep the source's passphrase; key rotation -------------------------------
async def test_thin_raw_block_snapshot_clone_rotation_and_crypto_erase_of_copies(
    thin: ThinBackend, kubelet_root: Path, runner: CommandRunner, lvm: Lvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = manager_for(thin)
    cap = block_cap()
    payload = PATTERN * (MiB // len(PATTERN))
    async with csi_for(manager, kubelet_root) as csi:
        source_id = await create(csi, "thin", thin.pool, "pvc-src", 64 * MiB, volume_capabilities=[cap])
        paths = kubelet_paths(kubelet_root, "pvc-src", block=True)
        await stage_publish(csi, source_id, paths.staging, paths.target, cap)
        write(paths.target, payload, MiB)
        assert read_raw(paths.target, MiB, len(payload)) == payload
        device = (await manager.get_volume(source_id)).device_path
        assert device is not None
        assert PATTERN not in read_raw(device)
        await unpublish_unstage(csi, source_id, paths.staging, paths.target)

        snapshot = await csi.controller.create_snapshot(
            CreateSnapshotRequest(source_volume_id=source_id, name="snap-1")
        )
        assert snapshot.snapshot is not None
        restored_id = await create(
            csi,
            "thin",
            thin.pool,
            "pvc-restored",
            64 * MiB,
            volume_capabilities=[cap],
            volume_content_source=VolumeContentSource(
                snapshot=VolumeContentSourceSnapshotSource(snapshot_id=snapshot.snapshot.snapshot_id)
            ),
        )
        assert (await manager.get_volume(restored_id)).encrypted
        # Rotate the source's passphrase through its Secret (raw block, unstaged): the key is re-wrapped at stage,
        # the data untouched; the snapshot and the restored copy keep the passphrase they were taken with.
        crypt = Crypt(Mounter(runner), FAST)
        rotating = stage_request(source_id, paths.staging, cap, OTHER)
        rotating.secrets["previousPassphrase"] = SECRET
        await csi.node.node_stage_volume(rotating)
        await csi.node.node_publish_volume(
            NodePublishVolumeRequest(
                volume_id=source_id, staging_target_path=paths.staging, target_path=paths.target, volume_capability=cap
            )
        )
        assert read_raw(paths.target, MiB, len(payload)) == payload
        await unpublish_unstage(csi, source_id, paths.staging, paths.target)
        await expect(
            Status.FAILED_PRECONDITION, csi.node.node_stage_volume(stage_request(source_id, paths.staging, cap))
        )
        assert await crypt.unlocking_slot(device, Passphrase(SECRET.encode())) is None

        copy = kubelet_paths(kubelet_root, "pvc-restored", block=True)
        await stage_publish(csi, restored_id, copy.staging, copy.target, cap)
        assert read_raw(copy.target, MiB, len(payload)) == payload
        await unpublish_unstage(csi, restored_id, copy.staging, copy.target)

        # Deleting the snapshot, then the restored copy, is a crypto-erase of each: just before its lvremove the LV's
        # header area holds no LUKS header (it was activated, erased and discarded), and the pool did not allocate
        # 16 MiB to erase it. The source keeps its header byte for byte, and opens and reads.
        seen: dict[str, tuple[bytes, float]] = {}
        remove = thin.lvm.remove

        async def looking_remove(vg: str, lv: str) -> None:
            pool = (await lvm.report(vg)).lvs[thin.thin_pool]
            seen[lv] = (read_raw(f"/dev/{vg}/{lv}", 0, HEADER_BYTES), pool.data_percent or 0.0)
            await remove(vg, lv)

        monkeypatch.setattr(thin.lvm, "remove", looking_remove)
        source_header = read_raw(device, 0, HEADER_BYTES)
        restored_lv = restored_id.rsplit(":", 1)[1]
        snapshot_lv = snapshot.snapshot.snapshot_id.rsplit(":", 1)[1]
        snapshot_id = snapshot.snapshot.snapshot_id
        deletes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            (snapshot_lv, lambda: csi.controller.delete_snapshot(DeleteSnapshotRequest(snapshot_id=snapshot_id))),
            (restored_lv, lambda: csi.controller.delete_volume(DeleteVolumeRequest(volume_id=restored_id))),
        ]
        for lv_name, delete in deletes:
            before = (await lvm.report(THIN_VG)).lvs[thin.thin_pool].data_percent or 0.0
            await delete()
            header, during = seen[lv_name]
            assert LUKS_MAGIC not in header and b"SKUL\xba\xbe" not in header, f"{lv_name} kept its header"
            assert header == bytes(HEADER_BYTES)
            assert during - before < 100 * 8 * MiB / (256 * MiB), "erasing the copy's header allocated pool blocks"
            assert read_raw(device, 0, HEADER_BYTES) == source_header, "the source's header changed"
            await stage_publish_with(csi, source_id, paths.staging, paths.target, cap, OTHER)
            assert read_raw(paths.target, MiB, len(payload)) == payload
            await unpublish_unstage(csi, source_id, paths.staging, paths.target)
        assert lv_name not in (await lvm.report(THIN_VG)).lvs

        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=source_id))
        assert seen[source_id.rsplit(":", 1)[1]][0] == bytes(HEADER_BYTES)


async def test_repeat_stage_checks_the_passphrase_and_a_secret_update_rotates_the_key(
    linear: LinearBackend, kubelet_root: Path, runner: CommandRunner, caplog: pytest.LogCaptureFixture
) -> None:
    """A stage of a volume that is open already refuses a wrong passphrase (and leaves the volume as it is); an
    administrator rotates by updating the Secret (`passphrase` new, `previousPassphrase` old), while the volume is
    staged or not, and the data reads back the same."""
    caplog.set_level(logging.DEBUG, logger="localdisk")
    manager = manager_for(linear)
    cap = mount_cap("ext4")
    paths = kubelet_paths(kubelet_root, "pvc-rotate", block=False)
    payload = os.urandom(3 * MiB)
    data = os.path.join(paths.target, "data.bin")
    crypt = Crypt(Mounter(runner), FAST)
    third = "a third passphrase 55e1"
    messages = []
    async with csi_for(manager, kubelet_root) as csi:
        volume_id = await create(csi, "lvm", linear.pool, "pvc-rotate", 64 * MiB)
        device = (await manager.get_volume(volume_id)).device_path
        assert device is not None
        mapped = f"/dev/mapper/{mapping_name(volume_id)}"
        await stage_publish(csi, volume_id, paths.staging, paths.target, cap)
        write_file(data, payload)
        digest = hashlib.sha256(payload).hexdigest()

        # Staged already: a wrong passphrase (alone, or with a wrong previous one) is refused; nothing changes.
        for secrets in ({"passphrase": OTHER}, {"passphrase": OTHER, "previousPassphrase": third}):
            again = NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=paths.staging, volume_capability=cap, secrets=secrets
            )
            messages.append(await expect(Status.FAILED_PRECONDITION, csi.node.node_stage_volume(again)))
        assert os.path.exists(mapped) and Mounter(runner).mount_at(paths.staging) is not None
        assert hashlib.sha256(Path(data).read_bytes()).hexdigest() == digest
        await csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap))  # the right one: idempotent

        # Rotation while staged: the Secret says passphrase OTHER, previousPassphrase SECRET.
        rotate = stage_request(volume_id, paths.staging, cap, OTHER)
        rotate.secrets["previousPassphrase"] = SECRET
        await csi.node.node_stage_volume(rotate)
        assert "key rotation" in caplog.text
        assert await crypt.unlocking_slot(device, Passphrase(OTHER.encode())) is not None
        assert await crypt.unlocking_slot(device, Passphrase(SECRET.encode())) is None
        await csi.node.node_stage_volume(rotate)  # again: nothing left to do
        await unpublish_unstage(csi, volume_id, paths.staging, paths.target)
        messages.append(
            await expect(
                Status.FAILED_PRECONDITION, csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap))
            )
        )

        # Rotation while unstaged, at the next stage: passphrase third, previousPassphrase OTHER.
        back = stage_request(volume_id, paths.staging, cap, third)
        back.secrets["previousPassphrase"] = OTHER
        await csi.node.node_stage_volume(back)
        await csi.node.node_publish_volume(
            NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=paths.staging, target_path=paths.target, volume_capability=cap
            )
        )
        drop_caches()
        assert hashlib.sha256(Path(data).read_bytes()).hexdigest() == digest, "the data changed"
        assert await crypt.unlocking_slot(device, Passphrase(OTHER.encode())) is None
        await unpublish_unstage(csi, volume_id, paths.staging, paths.target)
        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))
    for message in messages:
        assert SECRET not in message and OTHER not in message and third not in message
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text and OTHER not in text and third not in text


async def test_delete_refused_while_the_mapping_is_open(linear: LinearBackend, kubelet_root: Path) -> None:
    manager = manager_for(linear)
    cap = block_cap()
    async with csi_for(manager, kubelet_root) as csi:
        volume_id = await create(csi, "lvm", linear.pool, "pvc-open", 32 * MiB, volume_capabilities=[cap])
        paths = kubelet_paths(kubelet_root, "pvc-open", block=True)
        await csi.node.node_stage_volume(stage_request(volume_id, paths.staging, cap))
        await expect(Status.ABORTED, csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id)))
        device = (await manager.get_volume(volume_id)).device_path
        assert device is not None and read_raw(device, 0, 6) == LUKS_MAGIC
        await csi.node.node_unstage_volume(
            NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=paths.staging)
        )
        await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=volume_id))


async def test_delete_time_crypto_erase_against_zeroing(linear: LinearBackend, kubelet_root: Path) -> None:
    """A thick volume's life (create, delete): plain ones are zeroed in full, encrypted ones crypto-erased."""
    manager = manager_for(linear)
    size = 384 * MiB
    timings: dict[str, float] = {}
    async with csi_for(manager, kubelet_root) as csi:
        for encrypted in (False, True):
            request = create_request(f"pvc-time-{encrypted}", size, "lvm", linear.pool)
            if encrypted:
                request.parameters["encrypted"] = "true"
            started = time.monotonic()
            created = await csi.controller.create_volume(request)
            assert created.volume is not None
            made = time.monotonic()
            if encrypted:  # as a node would: a header to erase
                paths = kubelet_paths(kubelet_root, "pvc-time", block=True)
                await csi.node.node_stage_volume(stage_request(created.volume.volume_id, paths.staging, block_cap()))
                await csi.node.node_unstage_volume(
                    NodeUnstageVolumeRequest(volume_id=created.volume.volume_id, staging_target_path=paths.staging)
                )
            deleting = time.monotonic()
            await csi.controller.delete_volume(DeleteVolumeRequest(volume_id=created.volume.volume_id))
            done = time.monotonic()
            kind = "encrypted" if encrypted else "zeroed"
            timings[f"{kind} create"] = made - started
            timings[f"{kind} delete"] = done - deleting
            timings[f"{kind} create+delete"] = (made - started) + (done - deleting)
    print(f"\nlinear {size // MiB} MiB:", ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
