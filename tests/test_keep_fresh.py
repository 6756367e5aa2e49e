"""`VolumeManager.keep_fresh`: backends that cache their state are re-read in the background at their interval."""

from __future__ import annotations

import anyio
import pytest

from localdisk.backend import CachedState
from localdisk.backends.fake import FakeBackend, FakePoolConfig
from localdisk.manager import VolumeManager
from localdisk.sizes import GiB

pytestmark = pytest.mark.anyio


class CachingFake(FakeBackend):
    """The fake backend with a cache to keep fresh; its refreshes fail when told to."""

    def __init__(self, pool: str, interval: float, *, failing: bool = False) -> None:
        super().__init__(pool, FakePoolConfig(size_bytes=1 * GiB))
        self.interval = interval
        self.failing = failing
        self.refreshed: list[float] = []

    @property
    def refresh_interval(self) -> float:
        return self.interval

    async def refresh_state(self) -> None:
        self.refreshed.append(anyio.current_time())
        if self.failing:
            raise RuntimeError("the disks did not answer")


async def test_each_backend_is_refreshed_at_its_own_interval_and_a_failure_stops_nothing() -> None:
    fast, slow, broken = CachingFake("fast", 0.1), CachingFake("slow", 0.5), CachingFake("broken", 0.1, failing=True)
    plain = FakeBackend("plain", FakePoolConfig(size_bytes=GiB))
    assert isinstance(fast, CachedState) and not isinstance(plain, CachedState)
    manager = VolumeManager({("fake", b.pool): b for b in (fast, slow, broken, plain)}, {"fake": "plain"})
    with anyio.move_on_after(1.05):
        await manager.keep_fresh()
    # at most one per interval (11 and 3 in 1.05 s), and on a loaded machine still several
    assert 4 <= len(fast.refreshed) <= 11, fast.refreshed
    assert 1 <= len(slow.refreshed) <= 3, slow.refreshed
    assert 4 <= len(broken.refreshed) <= 11, "a failing refresh is retried at its interval, not given up"
    gaps = [b - a for a, b in zip(fast.refreshed, fast.refreshed[1:], strict=False)]
    assert min(gaps) >= 0.09, gaps


async def test_nothing_to_keep_fresh_returns_at_once() -> None:
    plain = FakeBackend("plain", FakePoolConfig(size_bytes=GiB))
    idle = CachingFake("idle", 0.0)
    with anyio.fail_after(1):
        await VolumeManager({("fake", "plain"): plain, ("fake", "idle"): idle}, {}).keep_fresh()
    assert idle.refreshed == []
