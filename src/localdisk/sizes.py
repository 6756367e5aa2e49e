"""Size arithmetic shared by every backend: CSI capacity ranges resolved to one aligned size."""

from __future__ import annotations

from localdisk.errors import InvalidArgument, OutOfRange

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def resolve_size(required: int, limit: int, *, alignment: int, default: int, minimum: int) -> int:
    """Pick the size to provision for a CSI capacity range.

    `required`/`limit` follow CSI: 0 means unset. The result is aligned up to `alignment`, at least `minimum`,
    and never above `limit`; when no aligned size fits the range the request is OUT_OF_RANGE.
    """
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
    wanted = required or (min(default, limit) if limit else default)
    size = align_up(max(wanted, minimum), alignment)
    if limit and size > limit:
        raise OutOfRange(
            f"no size in [{required}, {limit}] bytes is a multiple of {alignment} bytes"
            f" of at least {minimum} bytes; widen limit_bytes"
        )
    return size


def fits_range(size: int, required: int, limit: int) -> bool:
    """Whether an existing volume of `size` bytes satisfies a CSI capacity range."""
    return size >= required and (limit == 0 or size <= limit)


def human(size: int) -> str:
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}".replace(".0 ", " ")
    return f"{size} B"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": KiB,
    "mi": MiB,
    "gi": GiB,
    "ti": TiB,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
}


def parse_size(text: str) -> int:
    """`1073741824`, `512Mi`, `1Gi`, `1GiB` (binary) or `1G` (decimal, as Kubernetes quantities); never negative."""
    value = text.strip()
    number = value.rstrip("bBiIkKmMgGtT")
    unit = value[len(number) :].lower()
    if not number or unit not in _UNITS:
        raise InvalidArgument(f"size {text!r} is not understood; use bytes or a unit like 512Mi, 10Gi, 1G")
    try:
        amount = float(number)
    except ValueError:
        raise InvalidArgument(f"size {text!r} is not a number") from None
    if amount < 0:
        raise InvalidArgument(f"size {text!r} must not be negative")
    return int(amount * _UNITS[unit])
