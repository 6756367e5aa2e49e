"""Fixtures: a fake API server on a loopback port, and kubernetes-asyncio clients pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from tests.k8s.fake_api import FakeKubernetes


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubernetes]:
    server = FakeKubernetes()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api_factory(fake: FakeKubernetes) -> AsyncIterator[Callable[[], Any]]:
    """Makes ApiClients for the fake server (one per simulated process), all closed at the end."""
    async with AsyncExitStack() as stack:

        def make() -> Any:
            configuration = client.Configuration(host=fake.url)
            api = client.ApiClient(configuration)
            stack.push_async_callback(api.close)
            return api

        yield make


@pytest.fixture
async def api(api_factory: Callable[[], Any]) -> Any:
    return api_factory()  # made inside the event loop: aiohttp's session wants a running one


@pytest.fixture
def kubeconfig(fake: FakeKubernetes, tmp_path: Path) -> str:
    """A kubeconfig file for the fake server, as a process outside the cluster would use."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake.url}"}}}}]
users: [{{name: test, user: {{token: not-checked}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: test}}}}]
current-context: fake
"""
    )
    return str(path)
