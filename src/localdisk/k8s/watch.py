"""List-then-watch with the guarantees a controller needs and a bare `Watch.stream` does not give.

- Resume: each watch starts from the last resourceVersion seen (an event's or a bookmark's), so a reconnect neither
  replays nor loses events.
- 410 Gone (the version was compacted away, answered as a status or as an ERROR event): relist, and hand the full
  list to `on_relist` so the caller can catch up on whatever it missed.
- Errors back off exponentially with jitter; and every list or watch request waits for the `Pacer`, so a server that
  closes streams at once, or answers 410 again and again, costs at most one request per `min_interval`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from localdisk.k8s.client import status_of

log = logging.getLogger(__name__)

ListFunction = Callable[..., Awaitable[Any]]
OnRelist = Callable[[list[Any]], Awaitable[None]]
OnEvent = Callable[[str, Any], Awaitable[None]]
TRANSIENT = (ApiException, aiohttp.ClientError, TimeoutError, OSError)
"""What a list or a watch fails with when the API server or the network does: retried without a traceback."""


@dataclass
class Pacer:
    """Spaces out requests: at least `min_interval` between two starts, doubling (with jitter) after each failure."""

    min_interval: float = 1.0
    max_interval: float = 60.0
    failures: int = 0
    failing_since: float | None = None
    """When the current run of failures began (monotonic seconds), None while requests succeed."""
    _last_start: float = field(default=-1e9, repr=False)

    def delay(self) -> float:
        if not self.failures:
            return self.min_interval
        backoff = min(self.max_interval, self.min_interval * 2.0**self.failures)
        return backoff * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography

    async def wait(self) -> None:
        remaining = self._last_start + self.delay() - time.monotonic()
        if remaining > 0:
            await anyio.sleep(remaining)
        self._last_start = time.monotonic()

    def failed(self) -> None:
        self.failures = min(self.failures + 1, 30)
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def succeeded(self) -> None:
        self.failures = 0
        self.failing_since = None

    def failing_for(self) -> float:
        """Seconds the current run of failures has lasted; 0 while requests succeed."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since


async def list_and_watch(
    list_function: ListFunction,
    *,
    on_relist: OnRelist,
    on_event: OnEvent,
    pacer: Pacer | None = None,
    timeout_seconds: int = 300,
    what: str = "objects",
    **kwargs: Any,
) -> None:
    """Keep `on_relist`/`on_event` up to date with a collection forever (until cancelled).

    `list_function` is a kubernetes-asyncio list method (`CoreV1Api.list_node`, say) and `kwargs` its arguments.
    `on_relist` gets every object after each (re)list; `on_event` gets ADDED, MODIFIED and DELETED events in between.
    An exception from a callback is treated like an API error: logged, backed off, then a fresh relist.
    """
    pacer = pacer or Pacer()
    resource_version: str | None = None
    while True:
        await pacer.wait()
        try:
            if resource_version is None:
                listed = await list_function(**kwargs)
                if isinstance(listed, dict):  # custom objects come as plain JSON, not as generated models
                    resource_version = listed["metadata"]["resourceVersion"]
                    items = list(listed.get("items") or [])
                else:
                    resource_version = listed.metadata.resource_version
                    items = list(listed.items or [])
                await on_relist(items)
                pacer.succeeded()
                await pacer.wait()
            delivered, resource_version = await _watch_once(
                list_function, resource_version, on_event, timeout_seconds, kwargs
            )
            if delivered:
                pacer.succeeded()
        except TRANSIENT as exc:
            if status_of(exc) == 410:
                log.info("watch of %s: resourceVersion %s expired (410 Gone); relisting", what, resource_version)
            else:
                log.warning("list/watch of %s failed (%s); retrying", what, _describe(exc))
            resource_version = None
            pacer.failed()
        except Exception:  # a bug or a surprising object must not stop the controller; it is retried after a relist
            log.exception("handling %s failed; relisting", what)
            resource_version = None
            pacer.failed()


async def _watch_once(
    list_function: ListFunction,
    resource_version: str,
    on_event: OnEvent,
    timeout_seconds: int,
    kwargs: dict[str, Any],
) -> tuple[int, str]:
    """One watch request; returns how many events it delivered and the resourceVersion to resume from."""
    delivered = 0
    async with Watch() as watch:
        stream = watch.stream(
            list_function,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,  # set, so that Watch returns at the end instead of reconnecting itself
            allow_watch_bookmarks=True,
            _request_timeout=timeout_seconds + 30,
            **kwargs,
        )
        async for event in stream:
            delivered += 1
            kind = event["type"]
            if kind != "BOOKMARK":
                await on_event(kind, event["object"])
            if watch.resource_version:
                resource_version = watch.resource_version
    return delivered, resource_version


def _describe(exc: BaseException) -> str:
    status = status_of(exc)
    if status is not None:
        return f"HTTP {status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
