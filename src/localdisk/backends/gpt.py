"""GPT tables as plain values: parsing `sfdisk --json` and `wipefs --json`, and the free-space arithmetic.

Kept apart from the partition backend so the parsing and the extent maths are pure functions, tested on recorded
output without root or disks, while the backend only runs commands and takes locks. Sizes here are in sectors of the
table's logical sector size; the kernel's sysfs figures are always in 512-byte units, which `Table.kernel_units`
converts to.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from localdisk.errors import BackendFailure

_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # first sector
    size: int  # sectors
    uuid: str  # PARTUUID, lower case (as udev spells it under /dev/disk/by-partuuid)
    name: str  # the GPT partition name (at most 36 UTF-16 code units)
    type: str = ""  # the partition type GUID, upper case as sfdisk prints it
    attrs: str = ""  # the attribute bits as sfdisk spells them ("RequiredPartition GUID:63"), "" for none

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size


@dataclass(frozen=True)
class Extent:
    """A run of free sectors, [start, end)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Table:
    device: str
    sector_size: int
    first_lba: int
    last_lba: int  # last usable sector, inclusive (as GPT headers and sfdisk spell it)
    partitions: tuple[Partition, ...]
    label_id: str = ""  # the disk GUID, upper case as sfdisk prints it
    table_length: int | None = None  # entries in the partition array when not sfdisk's default (128)

    def by_uuid(self, uuid: str) -> Partition | None:
        uuid = uuid.lower()
        return next((p for p in self.partitions if p.uuid == uuid), None)

    def by_name(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    def with_partition(self, part: Partition) -> Table:
        """This table after `part` was written to it: added, or replacing the entry of the same number."""
        kept = [p for p in self.partitions if p.number != part.number]
        return replace(self, partitions=tuple(sorted([*kept, part], key=lambda p: p.number)))

    def without_partition(self, number: int) -> Table:
        return replace(self, partitions=tuple(p for p in self.partitions if p.number != number))

    def free_number(self) -> int:
        """The lowest unused entry number, which the next partition takes (as parted and sfdisk would pick it)."""
        used = {p.number for p in self.partitions}
        return next(n for n in range(1, len(used) + 2) if n not in used)

    def kernel_units(self, sectors: int) -> int:
        return sectors * self.sector_size // 512

    def kernel_place(self, part: Partition) -> tuple[int, int]:
        """Where the kernel should have `part`: (start, size) in its 512-byte units, as sysfs shows them."""
        return self.kernel_units(part.start), self.kernel_units(part.size)

    def free_extents(self, alignment_bytes: int) -> list[Extent]:
        """Gaps between partitions inside the usable area, with both ends rounded inwards to `alignment_bytes`."""
        align = self.alignment_sectors(alignment_bytes)
        extents: list[Extent] = []
        cursor = self.first_lba
        for part in sorted(self.partitions, key=lambda p: p.start):
            extents.extend(_aligned(cursor, part.start, align))
            cursor = max(cursor, part.end)
        extents.extend(_aligned(cursor, self.last_lba + 1, align))
        return extents

    def room_after(self, part: Partition, alignment_bytes: int) -> int:
        """The first sector `part` may not grow into: the next partition, or the aligned end of the usable area."""
        following = [p.start for p in self.partitions if p.start >= part.end and p.number != part.number]
        return min(following, default=self.usable_end(alignment_bytes))

    def usable_end(self, alignment_bytes: int) -> int:
        """The end of the usable area, rounded down to the alignment: no aligned partition may reach past it."""
        align = self.alignment_sectors(alignment_bytes)
        return (self.last_lba + 1) // align * align

    def alignment_sectors(self, alignment_bytes: int) -> int:
        if alignment_bytes % self.sector_size:
            raise BackendFailure(
                f"{self.device}: sector size {self.sector_size} does not divide the alignment {alignment_bytes}"
            )
        return alignment_bytes // self.sector_size


def _aligned(start: int, end: int, align: int) -> Iterable[Extent]:
    first = -(-start // align) * align
    last = end // align * align
    if last > first:
        yield Extent(first, last)


def best_fit(extents: Iterable[Extent], sectors: int) -> Extent | None:
    """The smallest extent that holds `sectors` (the lowest one among equals), so large gaps stay whole."""
    fitting = [e for e in extents if e.size >= sectors]
    return min(fitting, key=lambda e: (e.size, e.start)) if fitting else None


def parse_sfdisk(text: str, device: str) -> Table:
    """Parse `sfdisk --json <disk>`; anything but a GPT label is a `BackendFailure` naming what was found."""
    try:
        raw: Any = json.loads(text)["partitiontable"]
        label = raw["label"]
        if label != "gpt":
            raise BackendFailure(f"{device} carries a {label!r} partition table, not GPT")
        parts = tuple(_partition(p) for p in raw.get("partitions", []))
        return Table(
            device=device,
            sector_size=int(raw.get("sectorsize", 512)),
            first_lba=int(raw["firstlba"]),
            last_lba=int(raw["lastlba"]),
            partitions=tuple(sorted(parts, key=lambda p: p.number)),
            label_id=str(raw.get("id", "")).upper(),
            table_length=int(raw["table-length"]) if "table-length" in raw else None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendFailure(f"cannot read the partition table of {device}: unexpected sfdisk output ({exc})") from exc


def _partition(raw: dict[str, Any]) -> Partition:
    # sfdisk names each entry by its device node (/dev/sda3, /dev/loop0p3, /dev/nvme0n1p3): the number is its tail.
    match = _TRAILING_NUMBER.search(str(raw["node"]))
    if match is None:
        raise ValueError(f"partition node {raw['node']!r} has no number")
    return Partition(
        number=int(match.group(1)),
        start=int(raw["start"]),
        size=int(raw["size"]),
        uuid=str(raw["uuid"]).lower(),
        name=str(raw.get("name", "")),
        type=str(raw.get("type", "")).upper(),
        attrs=str(raw.get("attrs", "")),
    )


_VERBATIM = re.compile(r'^[^"\\\x00-\x1f\x7f]*$')  # what an sfdisk script can quote without escapes


def table_script(table: Table, node: Callable[[int], str]) -> str | None:
    """The whole of `table` as an sfdisk script, to write it back in one run: the label's header (disk GUID, usable
    area, sector size, entry count) and every partition with its number (`node`: the node name sfdisk takes it
    from), place, type, PARTUUID, name and attributes. None when a name or attribute string cannot be written back
    verbatim (a quote, a backslash, a control character: only partitions localdisk did not make can have one).
    """
    if any(not _VERBATIM.match(p.name) or not _VERBATIM.match(p.attrs) for p in table.partitions):
        return None
    lines = [
        "label: gpt",
        f"label-id: {table.label_id}",
        "unit: sectors",
        f"first-lba: {table.first_lba}",
        f"last-lba: {table.last_lba}",
        f"sector-size: {table.sector_size}",
    ]
    if table.table_length is not None:
        lines.append(f"table-length: {table.table_length}")
    lines.append("")
    for p in table.partitions:
        line = f"{node(p.number)} : start={p.start}, size={p.size}" + (f", type={p.type}" if p.type else "")
        lines.append(line + f', uuid={p.uuid}, name="{p.name}"' + (f', attrs="{p.attrs}"' if p.attrs else ""))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Signature:
    type: str
    offset: int


def parse_wipefs(text: str) -> list[Signature]:
    """Parse `wipefs --json <device>` (listing only, nothing erased); no output at all means no signature."""
    if not text.strip():
        return []
    try:
        raw = json.loads(text)["signatures"]
        return [Signature(str(s["type"]), int(str(s["offset"]), 0)) for s in raw]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendFailure(f"unexpected wipefs output: {exc}") from exc


@dataclass(frozen=True)
class Header:
    """The fields of a GPT header (primary or backup) that tell whose label it is and where its entries lie."""

    disk_guid: str  # upper case, as sfdisk prints it
    entries_lba: int
    entries: int
    entry_size: int


def parse_header(sector: bytes) -> Header | None:
    """A GPT header read raw from its sector, or None when the sector holds none ("EFI PART" missing)."""
    if len(sector) < 92 or sector[:8] != b"EFI PART":
        return None
    entries_lba, entries, entry_size = struct.unpack_from("<QII", sector, 72)
    return Header(str(uuid.UUID(bytes_le=bytes(sector[56:72]))).upper(), entries_lba, entries, entry_size)


def has_protective_mbr(sector: bytes) -> bool:
    """Whether LBA 0 holds a protective MBR: the boot signature and a first entry of type 0xEE."""
    return len(sector) >= 512 and sector[510:512] == b"\x55\xaa" and sector[450] == 0xEE
