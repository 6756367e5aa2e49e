"""ListVolumes at many volumes: answers assembled from cached entry encodings say exactly what encoding each
answer afresh says, page by page, and follow the volumes as they change."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from localdisk import parse_config
from localdisk._proto.csi.v1 import ListVolumesRequest, ListVolumesResponse
from localdisk.csi import convert
from localdisk.manager import CreateRequest, IdOrder, VolumeManager
from localdisk.model import ContentSource, ObjectRef, SourceKind, Volume
from tests.csi_helpers import Csi, MiB, csi_for

pytestmark = pytest.mark.anyio
COUNT = 300


@pytest.fixture
async def csi() -> AsyncIterator[Csi]:
    config = parse_config({"pools": {"fake": {"a": {"default": True}, "b": {}}}}, "test")
    async with csi_for(VolumeManager.from_config(config)) as client:
        for i in range(COUNT):  # in-process: the listing is what is tested
            pool = "a" if i % 3 else "b"
            await client.manager.create_volume(CreateRequest(f"pvc-{i:04d}", "fake", pool, required_bytes=MiB))
        yield client


async def walk(csi: Csi, page: int) -> list[str]:
    seen: list[str] = []
    token = ""
    while True:
        answer = await csi.controller.list_volumes(ListVolumesRequest(max_entries=page, starting_token=token))
        assert len(answer.entries) <= page
        seen += [e.volume.volume_id for e in answer.entries if e.volume is not None]
        token = answer.next_token
        if not token:
            return seen


async def test_pages_cover_every_volume_once_in_order(csi: Csi) -> None:
    everything = await csi.controller.list_volumes(ListVolumesRequest())
    ids = [e.volume.volume_id for e in everything.entries if e.volume is not None]
    assert len(ids) == COUNT and ids == sorted(ids) and everything.next_token == ""
    for page in (1, 7, 100, COUNT - 1, COUNT, COUNT + 1):
        assert await walk(csi, page) == ids
    with pytest.raises(GRPCError) as info:
        await csi.controller.list_volumes(ListVolumesRequest(starting_token=str(COUNT + 1)))
    assert info.value.status is Status.ABORTED


async def test_answers_follow_changes(csi: Csi) -> None:
    before = await csi.controller.list_volumes(ListVolumesRequest())
    first = before.entries[0].volume
    assert first is not None
    await csi.manager.expand_volume(first.volume_id, 3 * MiB)
    await csi.manager.delete_volume(before.entries[1].volume.volume_id)  # type: ignore[union-attr]
    after = await csi.controller.list_volumes(ListVolumesRequest())
    assert len(after.entries) == COUNT - 1
    assert after.entries[0].volume is not None and after.entries[0].volume.capacity_bytes == 3 * MiB
    assert after.entries[1:] == before.entries[2:]


def test_assembled_answer_is_what_betterproto_writes() -> None:
    volumes = [
        Volume(ObjectRef("fake", "a", f"v{i}"), f"n{i}", (i + 1) * MiB, abnormal="gone" if i % 4 == 0 else None)
        for i in range(50)
    ]
    volumes[3] = Volume(ObjectRef("lvm", "ü", "h"), "x", 1 << 40, ContentSource(SourceKind.SNAPSHOT, "thin:p:s"))
    volumes[5] = Volume(ObjectRef("lvm", "p", "h2"), "y", 0, ContentSource(SourceKind.VOLUME, "lvm:p:h"))
    entries = convert.VolumeEntries("node-ü")
    for start, end, token in ((0, 50, ""), (10, 20, "20"), (0, 0, "0"), (49, 50, "")):
        answer = entries.response(volumes, start, end, token)
        plain = ListVolumesResponse(
            entries=[convert.list_entry(v, "node-ü") for v in volumes[start:end]], next_token=token
        )
        assert bytes(answer) == answer.SerializeToString() == bytes(plain)
        assert ListVolumesResponse.parse(bytes(answer)) == plain
        assert answer.entries == plain.entries


def test_entry_encoding_is_betterprotos() -> None:
    odd = "ünï 🙂 " * 40  # multi-byte, and long enough for two-byte lengths
    for vol in [
        Volume(ObjectRef("fake", "a", "v"), "n", 0),
        Volume(ObjectRef("", "", ""), "", 0),
        Volume(ObjectRef("partition", odd, "h" * 100), odd, (1 << 63) - 1, abnormal=odd),
        Volume(ObjectRef("thin", "p", "x"), "n", 300, ContentSource(SourceKind.SNAPSHOT, odd), abnormal=""),
        Volume(ObjectRef("thin", "p", "y"), "n", 1, ContentSource(SourceKind.VOLUME, "")),
    ]:
        for node in ("node-1", "", odd):
            assert convert.encode_entry(vol, node) == bytes(convert.list_entry(vol, node)), (vol, node)


def test_cache_stays_bounded() -> None:
    entries = convert.VolumeEntries("n")
    for generation in range(20):  # every volume changes every time: old entries must go
        volumes = [Volume(ObjectRef("fake", "a", f"v{i}"), "n", (generation + 1) * MiB) for i in range(100)]
        entries.response(volumes, 0, 100, "")
        assert len(entries._cache) <= 2 * len(volumes) + 64 + len(volumes)


def test_id_order_is_the_order_of_the_ids_through_changes() -> None:
    """`IdOrder` (pools joined by ID prefix, each by handle, a pool's order reused while its handles stay) gives
    exactly the IDs sorted, also for pools whose names sort differently from their prefixes ("a" < "a-b" but
    "fake:a-b:" < "fake:a:") and for names holding a colon, where it sorts every ID."""
    rng = random.Random(7)
    order = IdOrder()
    for pools in ([("fake", "a"), ("fake", "a-b"), ("fake", "a0"), ("lvm", "a")], [("fake", "a:b"), ("fake", "a")]):
        listed: dict[tuple[str, str], list[Volume]] = {key: [] for key in pools}
        for _ in range(60):
            key = rng.choice(pools)
            volumes = listed[key]
            if volumes and rng.random() < 0.3:
                volumes.pop(rng.randrange(len(volumes)))
            elif volumes and rng.random() < 0.3:  # the same handles again, one volume changed
                at = rng.randrange(len(volumes))
                volumes[at] = Volume(volumes[at].ref, "changed", volumes[at].size_bytes + MiB)
            else:
                handle = rng.choice(["", "-", "0", "Z", "z", "ü"]) + str(rng.randrange(1000))
                volumes.insert(rng.randrange(len(volumes) + 1), Volume(ObjectRef(*key, handle), handle, MiB))
            for _ in range(2):  # the second time from the order found the first
                arranged = order.arrange({k: list(v) for k, v in listed.items()})
                everything = [v for vs in listed.values() for v in vs]
                assert arranged == sorted(everything, key=lambda v: v.id)
