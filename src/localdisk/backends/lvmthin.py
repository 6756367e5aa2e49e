"""A thin pool's arithmetic (pure): what it holds and may still give, by its overprovision ratio, its real free space
and its use threshold. Split out of `localdisk.backends.lvm`, whose `ThinBackend` refuses creates by it."""

from __future__ import annotations

from dataclasses import dataclass

from localdisk.backends.lvmcmd import VgReport
from localdisk.errors import FailedPrecondition
from localdisk.sizes import human


@dataclass(frozen=True)
class ThinUse:
    """What a thin pool holds and may still give, by the overprovision ratio and by its real free space."""

    data_bytes: int  # the pool's real data size
    used_bytes: int  # provisioned data blocks
    virtual_bytes: int  # sum of the sizes of every thin LV in the pool (ours, foreign, snapshots)
    data_percent: float
    metadata_percent: float
    ratio: float
    threshold_percent: float

    @property
    def past_threshold(self) -> bool:
        return self.data_percent >= self.threshold_percent or self.metadata_percent >= self.threshold_percent

    @property
    def ratio_room(self) -> int:
        return max(int(self.data_bytes * self.ratio) - self.virtual_bytes, 0)

    @property
    def real_room(self) -> int:
        return max(self.data_bytes - self.used_bytes, 0)

    def available(self, extent: int) -> int:
        if self.past_threshold:
            return 0
        return min(self.ratio_room, self.real_room) // extent * extent

    def refusal(self, size: int, extent: int, where: str) -> str | None:
        """Why a new thin LV of `size` virtual bytes must be refused, or None if it fits."""
        if self.past_threshold:
            return (
                f"thin pool {where} is {self.data_percent:.1f}% full of data and {self.metadata_percent:.1f}% of"
                f" metadata, past the {self.threshold_percent:g}% threshold; free space in it or extend it"
            )
        if size > self.available(extent):
            return (
                f"thin pool {where} can give {human(self.available(extent))} more ({human(self.ratio_room)} by the"
                f" overprovision ratio {self.ratio:g}, {human(self.real_room)} really free); {human(size)} requested"
            )
        return None


def thin_use(report: VgReport, pool: str, ratio: float, threshold: float) -> ThinUse:
    found = report.lv(pool)
    if found is None:
        raise FailedPrecondition(f"thin pool {report.vg.name}/{pool} not found")
    data_percent = found.data_percent or 0.0
    return ThinUse(
        data_bytes=found.size,
        used_bytes=int(found.size * data_percent / 100),
        virtual_bytes=sum(lv.size for lv in report.in_pool(pool)),
        data_percent=data_percent,
        metadata_percent=found.metadata_percent or 0.0,
        ratio=ratio,
        threshold_percent=threshold,
    )
