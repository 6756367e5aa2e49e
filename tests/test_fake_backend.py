"""The fake backend passes the same contract as the real ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.errors import FailedPrecondition
from localdisk.model import ContentSource, SourceKind, VolumeSpec
from localdisk.sizes import GiB, MiB
from tests.contract import BackendContract


class TestFakeContract(BackendContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[FakeBackend]:
        backend = FakeBackend("default", FakePoolConfig(size_bytes=1 * GiB))
        await backend.open()
        yield backend
        await backend.aclose()


class TestFakeWithStateFileContract(BackendContract):
    """The contract again with a state file, reopened before every use: what it keeps is what a disk would."""

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[FakeBackend]:
        backend = FakeBackend("default", FakePoolConfig(size_bytes=1 * GiB, state_file=tmp_path / "pool.json"))
        await backend.open()
        yield backend
        await backend.aclose()


async def test_a_state_file_keeps_volumes_and_snapshots_across_a_restart(tmp_path: Path) -> None:
    config = FakePoolConfig(size_bytes=1 * GiB, state_file=tmp_path / "pool.json")
    first = FakeBackend("default", config)
    await first.open()
    origin = await first.create_volume(VolumeSpec("origin", 64 * MiB))
    grown = await first.expand_volume(origin.ref.handle, 128 * MiB)
    snapshot = await first.create_snapshot(origin.ref.handle, "snap")
    clone = await first.create_volume(
        VolumeSpec(
            "clone", 128 * MiB, ContentSource(SourceKind.SNAPSHOT, snapshot.id), snapshot.ref.handle, encrypted=True
        )
    )
    gone = await first.create_volume(VolumeSpec("gone", 64 * MiB))
    await first.delete_volume(gone.ref.handle)

    second = FakeBackend("default", config)
    await second.open()
    assert await second.get_volume(origin.ref.handle) == grown
    assert await second.get_snapshot(snapshot.ref.handle) == snapshot
    assert await second.find_volume("clone") == clone
    assert await second.find_volume("gone") is None
    assert (await second.capacity()).available_bytes == (await first.capacity()).available_bytes


async def test_an_unreadable_state_file_fails_the_pool_clearly(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text("{not json")
    with pytest.raises(FailedPrecondition, match="cannot read its state file"):
        await FakeBackend("default", FakePoolConfig(state_file=path)).open()
