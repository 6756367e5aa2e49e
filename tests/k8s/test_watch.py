"""list_and_watch: resumes from resourceVersion, relists on 410 Gone, backs off, and never hot-loops."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from kubernetes_asyncio import client

from localdisk.k8s.watch import Pacer, list_and_watch
from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.relists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.changed = anyio.Event()

    async def on_relist(self, items: list[Any]) -> None:
        self.relists.append(sorted(i.metadata.name for i in items))
        self._poke()

    async def on_event(self, kind: str, obj: Any) -> None:
        self.events.append((kind, obj.metadata.name))
        self._poke()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, condition: Any, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self.changed.wait()


async def test_events_after_the_list_arrive_once_across_reconnects(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n0"))
    fake.max_watch_seconds = 0.2  # every watch ends quickly: the client must resume where it stopped
    seen = Recorder()
    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: list_and_watch(
                client.CoreV1Api(api).list_node,
                on_relist=seen.on_relist,
                on_event=seen.on_event,
                pacer=Pacer(min_interval=0.05),
            )
        )
        await seen.until(lambda: seen.relists)
        for name in ("n1", "n2", "n3"):
            await fake.put("nodes", objects.node(name))
            await seen.until(lambda added=("ADDED", name): added in seen.events)
            watches = fake.count("GET", "watch=")  # the one that brought the change included
            with anyio.fail_after(5):  # the next change is made only once that watch has ended and been resumed
                while fake.count("GET", "watch=") == watches:
                    await anyio.sleep(0.02)
        await fake.remove("nodes", "n1")
        await seen.until(lambda: ("DELETED", "n1") in seen.events)
        group.cancel_scope.cancel()
    assert seen.relists == [["n0"]]
    assert seen.events == [("ADDED", "n1"), ("ADDED", "n2"), ("ADDED", "n3"), ("DELETED", "n1")]
    assert fake.count("GET", "watch=") >= 4, "each change came on a watch of its own, resumed where the last stopped"


async def test_expired_resource_version_relists(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n0"))
    seen = Recorder()

    async def on_relist(items: list[Any]) -> None:
        await seen.on_relist(items)
        if len(seen.relists) == 1:  # the cluster moves on and compacts before the first watch starts
            await fake.put("nodes", objects.node("n1"))
            fake.compact()

    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: list_and_watch(
                client.CoreV1Api(api).list_node, on_relist=on_relist, on_event=seen.on_event, pacer=Pacer(0.05)
            )
        )
        await seen.until(lambda: len(seen.relists) == 2)
        group.cancel_scope.cancel()
    assert seen.relists == [["n0"], ["n0", "n1"]], "the change lost to compaction came back through the relist"
    assert seen.events == []


async def test_410_status_on_the_watch_request_relists(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n0"))
    fake.fail("GET", "watch=", 410)
    seen = Recorder()
    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: list_and_watch(
                client.CoreV1Api(api).list_node, on_relist=seen.on_relist, on_event=seen.on_event, pacer=Pacer(0.05)
            )
        )
        await seen.until(lambda: len(seen.relists) == 2)
        await fake.put("nodes", objects.node("n1"))
        await seen.until(lambda: seen.events)
        group.cancel_scope.cancel()
    assert seen.events == [("ADDED", "n1")]


@pytest.mark.parametrize("trouble", ["server errors", "streams closed at once"])
async def test_no_hot_loop(fake: FakeKubernetes, api: Any, trouble: str) -> None:
    if trouble == "server errors":
        fake.fail("GET", "/api/v1/nodes", 500, times=10_000)
    else:
        fake.max_watch_seconds = 0
    seen = Recorder()
    started = time.monotonic()
    with anyio.move_on_after(1.0):
        await list_and_watch(
            client.CoreV1Api(api).list_node,
            on_relist=seen.on_relist,
            on_event=seen.on_event,
            pacer=Pacer(min_interval=0.1, max_interval=0.4),
        )
    elapsed = time.monotonic() - started
    requests = fake.count("GET", "/api/v1/nodes")
    assert requests >= 2, "it kept trying"
    assert requests <= elapsed / 0.1 + 2, f"{requests} requests in {elapsed:.2f}s: faster than the pacer allows"
    if trouble == "server errors":
        assert requests <= 6, f"{requests} requests in 1s despite exponential backoff"


async def test_a_failing_callback_is_retried_after_a_relist(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("nodes", objects.node("n0"))
    calls: list[int] = []
    done = anyio.Event()

    async def on_relist(items: list[Any]) -> None:
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("a bug in the handler")
        done.set()

    async def on_event(kind: str, obj: Any) -> None:
        pass

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: list_and_watch(
                    client.CoreV1Api(api).list_node, on_relist=on_relist, on_event=on_event, pacer=Pacer(0.05)
                )
            )
            await done.wait()
            group.cancel_scope.cancel()
    assert calls == [1, 1]
