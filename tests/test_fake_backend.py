"""The fake backend passes the same contract as the real ones."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.sizes import GiB
from tests.contract import BackendContract


class TestFakeContract(BackendContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[FakeBackend]:
        backend = FakeBackend("default", FakePoolConfig(size_bytes=1 * GiB))
        await backend.open()
        yield backend
        await backend.aclose()
