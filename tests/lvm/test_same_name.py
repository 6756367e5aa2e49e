"""A CreateVolume of a name that exists with another layout or cache answers ALREADY_EXISTS (CSI: same name,
incompatible parameters), as one outside the existing volume's size does; with the same ones it returns the volume.
On the host, with the in-memory LVM stand-in (tests/lvm/memory.py)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from localdisk.backends.lvmcache import CacheSpec, cache_name
from localdisk.errors import AlreadyExists
from localdisk.manager import CreateRequest
from localdisk.sizes import MiB
from tests.contract import manager_for
from tests.lvm.memory import CACHED, MemoryLvm, detached_cache, opened, volume_lv

pytestmark = pytest.mark.anyio
NAME = "pvc-mirrored"
# The pool: mirrors 2 on hdd by default (tests/lvm/memory.py), caches on ssd; the volume asked for an 8 MiB cache.
SAME = {"mirrors": "2", "pvTags": "hdd", "cache": "writethrough", "cacheSize": "8Mi"}


def request(parameters: dict[str, str], size: int = 16 * MiB) -> CreateRequest:
    return CreateRequest(name=NAME, backend="lvm", pool="dense", required_bytes=size, parameters=parameters)


async def test_a_create_of_an_existing_name_must_ask_for_its_layout_and_cache() -> None:
    volume = volume_lv(NAME, 16 * MiB, CacheSpec("writethrough", size=8 * MiB))
    cvol = replace(detached_cache(volume, 8 * MiB), name=f"[{cache_name(volume.name)}_cvol]", attr="Cwi-ao-C--")
    lvm = MemoryLvm(replace(volume, attr=CACHED, pool=cvol.name), cvol)
    manager = manager_for(await opened(lvm))
    [existing] = await manager.list_volumes()
    assert await manager.create_volume(request(SAME)) == existing
    # the same, spelled otherwise: the pool's defaults for the layout (2 copies on hdd), the cache size in bytes
    assert await manager.create_volume(request({"cache": "writethrough", "cacheSize": "8388608"})) == existing
    refused = {
        "copies": {**SAME, "mirrors": "3"},
        "raid10 (2 stripes": {**SAME, "stripes": "2"},
        "on PVs tagged ssd": {**SAME, "pvTags": "ssd"},
        "a writeback cache": {**SAME, "cache": "writeback"},
        "cache of 16 MiB": {**SAME, "cacheSize": "16Mi"},
        "cache of 10% of the volume": {**SAME, "cacheSize": "10%"},
        "asks for no cache": {"mirrors": "2", "cache": "none"},
    }
    for words, parameters in refused.items():
        with pytest.raises(AlreadyExists, match=re.escape(words)) as caught:
            await manager.create_volume(request(parameters))
        assert "already exists" in caught.value.message and NAME in caught.value.message
    assert lvm.calls == [], "a refused create changes nothing"
    with pytest.raises(AlreadyExists, match="outside the requested range"):  # the size, checked as before
        await manager.create_volume(request(SAME, 64 * MiB))
