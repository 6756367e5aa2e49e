"""How a thick volume is spread over the PVs of its VG, and how much a given layout can still get.

A `Layout` is what a StorageClass (or the pool's defaults) asks for: striped over N PVs, mirrored (raid1 with N
copies), both (raid10: N stripes, 2 copies), on the PVs carrying some tags (only SSDs, only HDDs). The volume group
total says nothing about that: a 2-way mirror needs its size twice, on two different PVs; a 4-stripe volume needs a
quarter of its size on each of 4 PVs. So capacity is planned from the free space of each PV (`pvs`), here, in pure
functions a host test can feed with made-up PVs.

The plan is deliberately the simple one LVM is then told to follow: every leg (a stripe of a striped volume, an image
of a mirror, both for raid10) goes on ONE PV, the legs on different PVs, the PVs with the most free space first, and
lvcreate is given exactly those PVs. A leg that could span two PVs is never planned, so LVM can always do what was
planned, and what GetCapacity promises is what CreateVolume gets. (LVM could sometimes do a little more by spanning;
the plan leaves that on the table rather than promise it.)

Sizes: a striped volume is rounded up to whole extents per stripe (LVM does the same); a RAID image also takes one
extent of RAID metadata (`_rmeta`) on its PV.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from localdisk.backends.lvmcmd import PhysicalVolume, check_tags
from localdisk.errors import InsufficientCapacity, InvalidArgument
from localdisk.sizes import human

MAX_STRIPES = 64
MAX_MIRRORS = 4  # copies; LVM's raid1 allows more, but past 4 nobody means it
DEFAULT_STRIPE_SIZE = 64 * 1024
MIN_STRIPE_SIZE = 4 * 1024
LAYOUT_TAG = "localdisk.csi.io/layout="  # on each laid-out LV: what expansion has to keep

# StorageClass parameters (and the pool-default keys they override)
STRIPES, STRIPE_SIZE, MIRRORS, PV_TAGS = "stripes", "stripeSize", "mirrors", "pvTags"
LAYOUT_PARAMETERS = frozenset({STRIPES, STRIPE_SIZE, MIRRORS, PV_TAGS})

_UNITS = {"": 1, "k": 1024, "ki": 1024, "m": 1024**2, "mi": 1024**2}


@dataclass(frozen=True)
class PvSpace:
    """One PV as the planner sees it: its device, its free bytes, its tags, whether LVM may allocate on it."""

    name: str
    free: int
    tags: frozenset[str] = frozenset()
    usable: bool = True  # allocatable and present (not missing)
    size: int = 0


@dataclass(frozen=True)
class Layout:
    stripes: int = 1
    stripe_size: int = 0  # bytes; 0: LVM's default (64 KiB) when striped
    mirrors: int = 1  # copies of the data: 1 is no mirror
    pv_tags: tuple[str, ...] = ()  # only PVs with one of these tags (empty: any PV)

    @property
    def kind(self) -> str:
        if self.mirrors > 1:
            return "raid10" if self.stripes > 1 else "raid1"
        return "striped" if self.stripes > 1 else "linear"

    @property
    def plain(self) -> bool:
        """A linear volume LVM may put anywhere on the eligible PVs (spanning them)."""
        return self.stripes == 1 and self.mirrors == 1

    @property
    def legs(self) -> int:
        """How many areas on distinct PVs the volume needs."""
        return self.stripes * self.mirrors

    @property
    def raid(self) -> bool:
        return self.mirrors > 1

    def describe(self) -> str:
        parts = {
            "linear": "linear",
            "striped": f"striped over {self.stripes} PVs",
            "raid1": f"raid1 with {self.mirrors} copies",
            "raid10": f"raid10 ({self.stripes} stripes, {self.mirrors} copies)",
        }[self.kind]
        return parts + " volume" + (f" on PVs tagged {' or '.join(self.pv_tags)}" if self.pv_tags else "")

    def tag(self) -> str:
        """The LV tag recording this layout (LVM's tag alphabet: tags joined by '&')."""
        return f"{LAYOUT_TAG}s{self.stripes}.z{self.stripe_size}.m{self.mirrors}.t{'&'.join(self.pv_tags)}"

    @classmethod
    def from_tag(cls, tags: Iterable[str]) -> Layout | None:
        for tag in tags:
            if tag.startswith(LAYOUT_TAG):
                try:
                    stripes, size, mirrors, pv_tags = tag[len(LAYOUT_TAG) :].split(".", 3)
                    chosen = tuple(filter(None, pv_tags[1:].split("&")))
                    return cls(int(stripes[1:]), int(size[1:]), int(mirrors[1:]), chosen)
                except ValueError:
                    return None
        return None

    # -- sizes in extents ---------------------------------------------------------------------------------------------
    def rounded(self, size: int, extent: int) -> int:
        """The size LVM gives a volume asked for `size` bytes: whole extents in every stripe."""
        unit = extent * self.stripes
        return -(-size // unit) * unit

    def leg_extents(self, size: int, extent: int) -> int:
        """Extents each leg takes on its PV for a volume of `size` bytes (RAID metadata included)."""
        return self.rounded(size, extent) // extent // self.stripes + (1 if self.raid else 0)

    def footprint(self, size: int, extent: int) -> int:
        """Bytes of the VG's free space a volume of `size` bytes takes."""
        return self.leg_extents(size, extent) * extent * self.legs


def same_layout(one: Layout, other: Layout) -> bool:
    """Whether two layouts make the same volume: LVM's default stripe size is 64 KiB whether it is named or not, and
    the order of PV tags does not matter."""

    def key(layout: Layout) -> tuple[int, int, int, frozenset[str]]:
        size = (layout.stripe_size or DEFAULT_STRIPE_SIZE) if layout.stripes > 1 else 0
        return layout.stripes, size, layout.mirrors, frozenset(layout.pv_tags)

    return key(one) == key(other)


def _positive_int(parameters: Mapping[str, str], key: str, default: int, limit: int) -> int:
    text = parameters.get(key)
    if text is None:
        return default
    if not text.strip().isdigit() or not 1 <= int(text) <= limit:
        raise InvalidArgument(f"parameter {key!r} is {text!r}; use a whole number from 1 to {limit}")
    return int(text)


def _stripe_size(text: str) -> int:
    number = text.strip().rstrip("Bb")
    digits = number.rstrip("KkMmIi")
    unit = number[len(digits) :].lower()
    if not digits.isdigit() or unit not in _UNITS:
        raise InvalidArgument(f"parameter {STRIPE_SIZE!r} is {text!r}; use a power of two like 64Ki or 1Mi")
    size = int(digits) * _UNITS[unit]
    if size < MIN_STRIPE_SIZE or size & (size - 1):
        raise InvalidArgument(f"parameter {STRIPE_SIZE!r} is {text!r}; it must be a power of two of at least 4Ki")
    return size


def _pv_tags(text: str) -> tuple[str, ...]:
    tags = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        check_tags(tags)
    except InvalidArgument as exc:
        raise InvalidArgument(f"parameter {PV_TAGS!r}: {exc.message}") from None
    return tags


def parse_layout(parameters: Mapping[str, str], defaults: Layout = Layout()) -> Layout:
    """The layout StorageClass `parameters` ask for, on top of the pool's `defaults`; `InvalidArgument` for a value
    that is no layout at all (whether the pool can give it is `plan`'s question)."""
    stripes = _positive_int(parameters, STRIPES, defaults.stripes, MAX_STRIPES)
    mirrors = _positive_int(parameters, MIRRORS, defaults.mirrors, MAX_MIRRORS)
    stripe_size = _stripe_size(parameters[STRIPE_SIZE]) if STRIPE_SIZE in parameters else defaults.stripe_size
    pv_tags = _pv_tags(parameters[PV_TAGS]) if PV_TAGS in parameters else defaults.pv_tags
    if STRIPE_SIZE in parameters and stripes == 1:
        raise InvalidArgument(f"parameter {STRIPE_SIZE!r} needs {STRIPES!r} of 2 or more")
    return check_layout(Layout(stripes, stripe_size if stripes > 1 else 0, mirrors, pv_tags))


def check_layout(layout: Layout) -> Layout:
    """`layout` if LVM has such a layout; `InvalidArgument` if not."""
    if layout.stripes > 1 and layout.mirrors > 2:
        raise InvalidArgument(
            f"raid10 keeps 2 copies; {layout.mirrors} mirrors with {layout.stripes} stripes is not a layout LVM has"
        )
    if layout.stripe_size and (layout.stripe_size < MIN_STRIPE_SIZE or layout.stripe_size & (layout.stripe_size - 1)):
        raise InvalidArgument(f"stripe size {layout.stripe_size} must be a power of two of at least 4Ki")
    return layout


def pv_space(pvs: Iterable[PhysicalVolume]) -> list[PvSpace]:
    """The planner's view of a report's PVs: a missing or non-allocatable PV holds nothing new."""
    return [PvSpace(pv.name, pv.free, pv.tags, pv.allocatable and not pv.missing, pv.size) for pv in pvs]


def eligible(pvs: Iterable[PvSpace], layout: Layout) -> list[PvSpace]:
    """The PVs a volume of `layout` may use, most free space first."""
    chosen = [pv for pv in pvs if pv.usable and (not layout.pv_tags or pv.tags & set(layout.pv_tags))]
    return sorted(chosen, key=lambda pv: (-pv.free, pv.name))


def check_fits(layout: Layout, pvs: Sequence[PvSpace], extent: int, where: str) -> None:
    """`InvalidArgument` if the layout can never be made in this VG (too few eligible PVs, a bad stripe size)."""
    if layout.stripe_size and layout.stripe_size > extent:
        raise InvalidArgument(
            f"stripe size {human(layout.stripe_size)} is larger than the extent size {human(extent)} of {where}"
        )
    count = len(eligible(pvs, layout))
    if count < layout.legs:
        raise InvalidArgument(
            f"a {layout.describe()} needs {layout.legs} PVs; {where} has {count}"
            + (f" tagged {' or '.join(layout.pv_tags)}" if layout.pv_tags else "")
            + " that can hold data"
        )


def max_volume(layout: Layout, pvs: Sequence[PvSpace], extent: int) -> int:
    """The largest volume of `layout` the PVs can hold now (0 if none)."""
    chosen = eligible(pvs, layout)
    if layout.plain:
        return sum(pv.free for pv in chosen) // extent * extent
    if len(chosen) < layout.legs:
        return 0
    per_leg = chosen[layout.legs - 1].free // extent - (1 if layout.raid else 0)
    return max(per_leg, 0) * extent * layout.stripes


def available(layout: Layout, pvs: Sequence[PvSpace], extent: int) -> int:
    """What volumes of `layout` can get in total, filled one after another (each largest first), in bytes of data."""
    free = {pv.name: pv.free for pv in eligible(pvs, layout)}
    if layout.plain:
        return sum(free.values()) // extent * extent
    anywhere = replace(layout, pv_tags=())  # the PVs are already the eligible ones
    total = 0
    for _ in range(256):  # each pass empties at least one PV's share; bounded in any case
        space = [PvSpace(name, room) for name, room in free.items()]
        size = max_volume(anywhere, space, extent)
        if size <= 0:
            break
        total += size
        for pv in eligible(space, anywhere)[: layout.legs]:
            free[pv.name] -= layout.leg_extents(size, extent) * extent
    return total


def plan(layout: Layout, pvs: Sequence[PvSpace], size: int, extent: int, where: str) -> list[str]:
    """The PVs to give lvcreate for a volume of `size` bytes and `layout`: one per leg for a laid-out volume, every
    eligible one for a plain volume restricted by tag ([] for a plain volume anywhere: LVM chooses).
    `InvalidArgument` if the layout cannot be made here at all, `InsufficientCapacity` if there is no room now."""
    check_fits(layout, pvs, extent, where)
    chosen = eligible(pvs, layout)
    biggest = max_volume(layout, pvs, extent)
    if layout.rounded(size, extent) > biggest:
        needs = (
            ""
            if layout.plain
            else (f" (it takes {human(layout.footprint(size, extent))} of free space, on {layout.legs} different PVs)")
        )
        raise InsufficientCapacity(
            f"{where} can give at most {human(biggest)} to one {layout.describe()} now; {human(size)} requested{needs}"
        )
    if layout.plain:
        return [pv.name for pv in chosen] if layout.pv_tags else []
    return [pv.name for pv in chosen[: layout.legs]]
