"""Numbers the reliability suite reports at the end of a run: kills survived, operations, hostile inputs, losses.

Every reliability test adds what it did to `TALLY`; `conftest.py` prints the totals in pytest's terminal summary,
so `nox -s tests` output shows them without `-s`. Volumes lost or leaked are counted, not only asserted, so the
summary says 0 in so many words.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    kills: Counter[str] = field(default_factory=Counter)  # per backend: SIGKILLs while an RPC was in flight
    startup_kills: Counter[str] = field(default_factory=Counter)  # per backend: SIGKILLs during the server's start
    operations: Counter[str] = field(default_factory=Counter)  # per suite: acknowledged operations
    hostile: Counter[str] = field(default_factory=Counter)  # per suite: hostile requests sent
    refusals: Counter[str] = field(default_factory=Counter)  # per gRPC status: how hostile requests were refused
    argv_checked: int = 0  # external commands whose argv was checked against hostile strings
    lost: int = 0  # acknowledged volumes or snapshots that were gone at the end
    leaked: int = 0  # volumes or snapshots found at the end that the client did not know of
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per suite
    notes: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.kills or self.startup_kills or self.operations or self.hostile or self.notes or self.refusals)

    def lines(self) -> list[str]:
        out = []
        for backend in sorted(set(self.kills) | set(self.startup_kills)):
            out.append(
                f"kills survived [{backend}]: {self.kills[backend]} during RPCs"
                f" + {self.startup_kills[backend]} during start-up"
            )
        for suite, count in sorted(self.operations.items()):
            wall = f" in {self.seconds[suite]:.0f}s" if suite in self.seconds else ""
            out.append(f"operations [{suite}]: {count}{wall}")
        for suite, count in sorted(self.hostile.items()):
            out.append(f"hostile inputs tried [{suite}]: {count}")
        if self.refusals:
            by_status = ", ".join(f"{name} {count}" for name, count in sorted(self.refusals.items()))
            out.append(
                f"hostile requests refused: {by_status};"
                f" UNKNOWN {self.refusals['UNKNOWN']}, INTERNAL {self.refusals['INTERNAL']}"
            )
        if self.argv_checked:
            out.append(f"external commands checked for hostile argv: {self.argv_checked}")
        out.append(f"volumes lost: {self.lost}, volumes leaked: {self.leaked}")
        out.extend(self.notes)
        return out


TALLY = Tally()
