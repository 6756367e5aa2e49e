"""A thick LVM pool's layouts away from its node: the request a StorageClass makes, and the space that answers it.

In the single-process shape the lvm backend reads `pvs` and plans a layout itself (`lvmlayout`). In the cluster shape
the central controller must answer GetCapacity for a StorageClass with `mirrors: "2"` and choose a node for it, but
the PVs are on the nodes. So each node agent reports its thick pools' `PoolSpace` (each PV's size, free space and
tags, the extent size, the pool's spare and its layout and cache defaults) in its LocalNode, and the controller plans
from that with the very functions the backend uses: `LinearBackend.capacity_for` is `PoolSpace.capacity` of its own
VG report, so what GetCapacity promises in either shape is the same number.

`LayoutRequest` is what a StorageClass's layout and cache parameters ask for, each value checked as the backend
checks it, with the ones it does not set left to the pool's defaults. It travels in a LocalVolume's spec (typed
fields `layout` and `cache`) to the node agent, which turns it back into the same parameters for its
`VolumeManager`.

Pure: no commands, nothing of Kubernetes; JSON in the shapes of the custom resources (`examples/deploy/crds.yaml`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from localdisk.backends.lvmcache import CACHE, CACHE_SIZE, CacheSpec, parse_cache
from localdisk.backends.lvmlayout import (
    MIRRORS,
    PV_TAGS,
    STRIPE_SIZE,
    STRIPES,
    Layout,
    PvSpace,
    available,
    check_fits,
    eligible,
    max_volume,
    parse_layout,
    same_layout,
)
from localdisk.errors import InvalidArgument

MAX_PVS = 128
"""PVs a pool's report carries at most (the usable ones with the most free space first): a report stays bounded."""
MAX_TAGS = 16
"""Tags a StorageClass may name, and a report carries per PV, at most."""
MAX_TAG_LENGTH = 128
"""Characters of a tag a StorageClass may name; a PV's longer tags (which no request can name) are not reported."""
DEFAULT_CACHE_SIZE = "10%"


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class LayoutRequest:
    """The layout and cache parameters of a StorageClass; None: the pool's default for that one."""

    stripes: int | None = None
    stripe_size: int | None = None  # bytes
    mirrors: int | None = None
    pv_tags: tuple[str, ...] | None = None  # () asks for any PV, whatever the pool's default tags
    cache: str | None = None  # writethrough | writeback | writecache | none
    cache_size: int | None = None  # bytes, or
    cache_percent: int | None = None  # a share of the volume

    @property
    def empty(self) -> bool:
        return self == LayoutRequest()

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> LayoutRequest:
        """The request of these StorageClass parameters. `InvalidArgument` for a value the backend would refuse on
        any pool (`mirrors: two`, `stripeSize: 48Ki`), and for parameters that contradict each other whatever the
        pool's defaults (`stripes: "1"` with a `stripeSize`, `cache: none` with a `cacheSize`); what depends on a
        pool (its PVs, its defaults) is `PoolSpace.check`'s and the node's question."""
        given = {k: v for k, v in parameters.items() if k in {STRIPES, STRIPE_SIZE, MIRRORS, PV_TAGS}}
        stripes = parse_layout({STRIPES: given[STRIPES]}).stripes if STRIPES in given else None
        mirrors = parse_layout({MIRRORS: given[MIRRORS]}).mirrors if MIRRORS in given else None
        stripe_size = None
        if STRIPE_SIZE in given:
            stripe_size = parse_layout({STRIPES: "2", STRIPE_SIZE: given[STRIPE_SIZE]}).stripe_size
        pv_tags = parse_layout({PV_TAGS: given[PV_TAGS]}).pv_tags if PV_TAGS in given else None
        if pv_tags and (len(pv_tags) > MAX_TAGS or max(map(len, pv_tags)) > MAX_TAG_LENGTH):
            raise InvalidArgument(
                f"parameter {PV_TAGS!r} names {len(pv_tags)} tag(s); at most {MAX_TAGS} of at most"
                f" {MAX_TAG_LENGTH} characters each"
            )
        if STRIPES in given:
            parse_layout(given)  # stripes given: stripeSize and mirrors are checked against them
        mode = size = percent = None
        if CACHE in parameters:
            parse_cache({CACHE: parameters[CACHE]}, None, DEFAULT_CACHE_SIZE)
            mode = parameters[CACHE].strip().lower()
            parse_cache({k: v for k, v in parameters.items() if k in {CACHE, CACHE_SIZE}}, None, DEFAULT_CACHE_SIZE)
        if CACHE_SIZE in parameters:
            # checked and read as the size of some cache, whatever the mode the pool or the parameters give
            amount = parse_cache({CACHE: "writethrough", CACHE_SIZE: parameters[CACHE_SIZE]}, None, "")
            if amount is not None:
                size, percent = (None, amount.percent) if amount.percent else (amount.size, None)
        return cls(stripes, stripe_size, mirrors, pv_tags, mode, size, percent)

    def parameters(self) -> dict[str, str]:
        """The StorageClass parameters that ask for this (what the node's `VolumeManager` is given)."""
        amount = f"{self.cache_percent}%" if self.cache_percent else self.cache_size
        values = {
            STRIPES: self.stripes,
            STRIPE_SIZE: self.stripe_size,
            MIRRORS: self.mirrors,
            PV_TAGS: ",".join(self.pv_tags) if self.pv_tags is not None else None,
            CACHE: self.cache,
            CACHE_SIZE: amount,
        }
        return {key: str(value) for key, value in values.items() if value is not None}

    # -- a LocalVolume's spec.layout and spec.cache ----------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """The LocalVolume spec fields for this request: `layout` and `cache`, each only when something is set."""
        layout = _without_none(
            {
                "stripes": self.stripes,
                "stripeSizeBytes": self.stripe_size,
                "mirrors": self.mirrors,
                "pvTags": list(self.pv_tags) if self.pv_tags is not None else None,
            }
        )
        cache = _without_none({"mode": self.cache, "sizeBytes": self.cache_size, "sizePercent": self.cache_percent})
        return {key: value for key, value in (("layout", layout), ("cache", cache)) if value}

    @classmethod
    def from_spec(cls, layout: Mapping[str, Any] | None, cache: Mapping[str, Any] | None) -> LayoutRequest:
        """The request a LocalVolume's spec holds (none at all in an object written before layouts travelled)."""
        layout, cache = layout or {}, cache or {}

        def number(where: Mapping[str, Any], key: str) -> int | None:
            value = where.get(key)
            return int(value) if value is not None else None

        tags = layout.get("pvTags")
        return cls(
            stripes=number(layout, "stripes"),
            stripe_size=number(layout, "stripeSizeBytes"),
            mirrors=number(layout, "mirrors"),
            pv_tags=tuple(str(t) for t in tags) if tags is not None else None,
            cache=str(cache["mode"]) if cache.get("mode") else None,
            cache_size=number(cache, "sizeBytes"),
            cache_percent=number(cache, "sizePercent"),
        )


@dataclass(frozen=True)
class LayoutCapacity:
    total: int
    available: int
    largest: int
    eligible_pvs: int
    cache_room: int | None = None  # the largest cache the cache PVs can hold, when a cache is asked for
    caches_that_fit: int | None = None  # how many caches of a fixed size they hold


@dataclass(frozen=True)
class PoolSpace:
    """What a thick pool's layouts depend on: its PVs, its extent size, the VG's free space less the pool's spare,
    and its defaults for what a StorageClass leaves out."""

    extent: int
    vg_free: int
    pvs: tuple[PvSpace, ...]
    spare: int = 0
    defaults: Layout = field(default_factory=Layout)
    cache_mode: str | None = None
    cache_size: str = DEFAULT_CACHE_SIZE
    cache_pv_tags: tuple[str, ...] = ()
    pool: str = ""

    @property
    def free(self) -> int:
        """The VG's free space that volumes may take (the pool's spare kept), in whole extents."""
        return max(self.vg_free - self.spare, 0) // self.extent * self.extent

    def resolve(self, request: LayoutRequest | Mapping[str, str]) -> tuple[Layout, CacheSpec | None]:
        """The layout and cache a request makes in this pool (its defaults for what it leaves out);
        `InvalidArgument` as the backend gives it for values that are no layout, or a cache without cache PVs."""
        parameters = request.parameters() if isinstance(request, LayoutRequest) else request
        layout = parse_layout(parameters, self.defaults)
        cache = parse_cache(parameters, self.cache_mode, self.cache_size)
        if cache is not None and not self.cache_pv_tags:
            raise InvalidArgument(
                f"lvm pool {self.pool!r} has no fast PVs for caches; set pools.lvm.{self.pool}.cache_pv_tags"
            )
        return layout, cache

    def check(self, request: LayoutRequest, where: str) -> None:
        """`InvalidArgument` if volumes of this request can never be made here (too few eligible PVs, a stripe size
        over the extent size, no PV for its cache), as the backend's create would say."""
        layout, cache = self.resolve(request)
        check_fits(layout, self.pvs, self.extent, where)
        if cache is not None:
            check_fits(Layout(pv_tags=self.cache_pv_tags), self.pvs, self.extent, f"the cache PVs of {where}")

    def capacity(self, request: LayoutRequest | Mapping[str, str]) -> LayoutCapacity:
        """What volumes of the request can get, from each PV's free space: in total, filling the PVs one largest
        volume after another, and in one volume. 0 if the pool cannot make that layout at all. With a cache, also
        bounded by the room on the cache PVs: a share of 10% of 6 GiB free makes at most 60 GiB; a fixed size of
        2 GiB makes at most 3 caches, so at most 3 of the largest volumes."""
        layout, cache = self.resolve(request)
        chosen = eligible(self.pvs, layout)
        budget = self.free * layout.stripes // layout.legs  # the pool's spare is kept whatever the layout
        total = sum(pv.size for pv in chosen) * layout.stripes // layout.legs
        try:
            check_fits(layout, self.pvs, self.extent, "the pool")
        except InvalidArgument:
            return LayoutCapacity(total, 0, 0, len(chosen))
        room = min(available(layout, self.pvs, self.extent), budget // self.extent * self.extent)
        largest = min(max_volume(layout, self.pvs, self.extent), room)
        cache_room = caches = None
        if cache is not None:
            cache_room = max_volume(Layout(pv_tags=self.cache_pv_tags), self.pvs, self.extent)
            if cache.percent:
                fits = cache_room * 100 // cache.percent // self.extent * self.extent
                room, largest = min(room, fits), min(largest, fits)
            else:
                caches = cache_room // cache.bytes_for(self.extent, self.extent)
                room, largest = min(room, caches * largest), largest if caches else 0
        return LayoutCapacity(total, room, largest, len(chosen), cache_room, caches)

    def same(self, one: LayoutRequest, other: LayoutRequest) -> bool:
        """Whether two requests make the same volume here (the backend's `check_same`: the pool's defaults for what
        either leaves out, LVM's default stripe size, PV tags in any order)."""
        try:
            (layout, cache), (other_layout, other_cache) = self.resolve(one), self.resolve(other)
        except InvalidArgument:
            return one == other
        return same_layout(layout, other_layout) and cache == other_cache

    # -- a LocalNode's pools[].layoutSpace ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        usable = sorted(self.pvs, key=lambda pv: (not pv.usable, -pv.free, pv.name))[:MAX_PVS]
        defaults = LayoutRequest(
            self.defaults.stripes,
            self.defaults.stripe_size or None,
            self.defaults.mirrors,
            self.defaults.pv_tags,
            self.cache_mode,
        ).spec()
        return {
            "extentBytes": self.extent,
            "vgFreeBytes": self.vg_free,
            "spareBytes": self.spare,
            "defaults": {**defaults, "cacheSize": self.cache_size},
            "cachePvTags": list(self.cache_pv_tags),
            "pvs": [
                {
                    "name": pv.name,
                    "sizeBytes": pv.size,
                    "freeBytes": pv.free,
                    "tags": sorted(t for t in pv.tags if len(t) <= MAX_TAG_LENGTH)[:MAX_TAGS],
                    "usable": pv.usable,
                }
                for pv in usable
            ],
        }

    @classmethod
    def from_json(cls, item: Mapping[str, Any], pool: str = "") -> PoolSpace:
        defaults = item.get("defaults") or {}
        request = LayoutRequest.from_spec(defaults.get("layout"), defaults.get("cache"))
        layout = Layout(
            request.stripes or 1, request.stripe_size or 0, request.mirrors or 1, tuple(request.pv_tags or ())
        )
        pvs: Sequence[Mapping[str, Any]] = item.get("pvs") or ()
        return cls(
            extent=max(int(item.get("extentBytes") or 0), 1),
            vg_free=int(item.get("vgFreeBytes") or 0),
            spare=int(item.get("spareBytes") or 0),
            pvs=tuple(
                PvSpace(
                    str(pv.get("name", "")),
                    int(pv.get("freeBytes") or 0),
                    frozenset(str(t) for t in pv.get("tags") or ()),
                    bool(pv.get("usable", True)),
                    int(pv.get("sizeBytes") or 0),
                )
                for pv in pvs
            ),
            defaults=layout,
            cache_mode=request.cache if request.cache not in (None, "none") else None,
            cache_size=str(defaults.get("cacheSize") or DEFAULT_CACHE_SIZE),
            cache_pv_tags=tuple(str(t) for t in item.get("cachePvTags") or ()),
            pool=pool,
        )
