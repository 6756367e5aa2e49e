"""What the benchmarks share: percentiles, timing a batch of calls at a concurrency, and medians over repeats.

Both drivers (lvmbench.py in the UML sandbox, partbench.py on the host) run as scripts from this directory, so they
import this module as `common`; keeping these helpers in one place keeps their numbers computed the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def timed_all(
    count: int, concurrency: int, call: Callable[[int], Awaitable[object]]
) -> tuple[float, list[float]]:
    """Run call(0..count-1) with at most `concurrency` in flight; (wall time, latency of each)."""
    latencies: list[float] = []
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            start = time.monotonic()
            await call(i)
            latencies.append(time.monotonic() - start)

    start = time.monotonic()
    async with anyio.create_task_group() as tasks:
        for i in range(count):
            tasks.start_soon(one, i)
    return time.monotonic() - start, latencies


def summary(wall: float, latencies: list[float]) -> dict[str, float]:
    return {
        "seconds": round(wall, 3),
        "volumes_per_second": round(len(latencies) / wall, 3),
        "p50_ms": ms(pct(latencies, 0.5)),
        "p95_ms": ms(pct(latencies, 0.95)),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
