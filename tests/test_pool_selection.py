"""`VolumeManager.select`: the pools a node serves change while it runs (its labels changed)."""

from __future__ import annotations

import anyio
import pytest

from localdisk.config import parse
from localdisk.errors import FailedPrecondition
from localdisk.manager import CreateRequest, VolumeManager
from localdisk.sizes import GiB, MiB

CONFIG = parse(
    {
        "pools": {
            "fake": {
                "everywhere": {"size_bytes": GiB},
                "fast": {"size_bytes": 2 * GiB, "default": True, "node_labels": {"disk": "fast"}},
            }
        }
    },
    "test config",
)


async def test_a_pool_selected_later_opens_and_one_deselected_keeps_its_volumes_but_takes_no_new_ones() -> None:
    manager = VolumeManager.from_config(CONFIG.for_node("n1", {}))
    async with manager.session():
        assert manager.pools() == [("fake", "everywhere")]

        await manager.select(CONFIG.for_node("n1", {"disk": "fast"}), "labels changed")
        assert manager.pools() == [("fake", "everywhere"), ("fake", "fast")]
        assert manager.defaults == {"fake": "fast"}
        kept = await manager.create_volume(CreateRequest("kept", "fake", "fast", required_bytes=64 * MiB))
        assert (await manager.capacity("fake", "fast")).available_bytes == 2 * GiB - 64 * MiB

        await manager.select(CONFIG.for_node("n1", {}), "its node's labels no longer select it")
        state = manager.pool_states()[("fake", "fast")]
        assert not state.up and state.reason == "its node's labels no longer select it"
        assert (await manager.capacity("fake", "fast")).available_bytes == 0
        with pytest.raises(FailedPrecondition, match="takes no new volumes on this node"):
            await manager.create_volume(CreateRequest("new", "fake", "fast", required_bytes=64 * MiB))
        # the volume it holds: found again by a retried create, grown, snapshotted, deleted
        again = await manager.create_volume(CreateRequest("kept", "fake", "fast", required_bytes=64 * MiB))
        assert again.id == kept.id
        await manager.expand_volume(kept.id, 128 * MiB)
        snapshot = await manager.create_snapshot(kept.id, "kept-snap")
        await manager.delete_snapshot(snapshot.id)
        await manager.delete_volume(kept.id)
        assert await manager.list_volumes() == []
        assert manager.defaults == {"fake": "everywhere"}

        await manager.select(CONFIG.for_node("n1", {"disk": "fast"}), "labels changed")
        assert manager.pool_states()[("fake", "fast")].up
        made = await manager.create_volume(CreateRequest("new", "fake", "fast", required_bytes=64 * MiB))
        assert made.ref.pool == "fast"


async def test_keep_fresh_waits_for_pools_that_may_come_later() -> None:
    manager = VolumeManager.from_config(CONFIG.for_node("n1", {}))
    async with manager.session():
        await manager.keep_fresh()  # nothing to keep fresh, and no pools will come: returns at once
        manager.pools_may_change = True
        with anyio.move_on_after(0.5) as waited:
            await manager.keep_fresh()
        assert waited.cancelled_caught, "with pools that may come later it keeps running"
