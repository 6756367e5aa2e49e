"""The fake API server keeps the HTTP semantics the controller relies on (checked through kubernetes-asyncio)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio


async def test_not_found_and_already_exists(fake: FakeKubernetes, api: Any) -> None:
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as missing:
        await core.read_node("nope")
    assert missing.value.status == 404
    await core.create_node(objects.node("n1"))
    with pytest.raises(ApiException) as again:
        await core.create_node(objects.node("n1"))
    assert again.value.status == 409
    assert (await core.read_node("n1")).metadata.uid


async def test_stale_resource_version_and_failed_preconditions_conflict(fake: FakeKubernetes, api: Any) -> None:
    core = client.CoreV1Api(api)
    pv = await core.create_persistent_volume(objects.volume("pv1", "n1"))
    old = pv.metadata.resource_version
    await core.patch_persistent_volume(
        "pv1", {"metadata": {"labels": {"a": "b"}}}, _content_type="application/merge-patch+json"
    )
    with pytest.raises(ApiException) as stale:
        await core.patch_persistent_volume(
            "pv1",
            {"metadata": {"labels": {"a": "c"}, "resourceVersion": old}},
            _content_type="application/merge-patch+json",
        )
    assert stale.value.status == 409
    with pytest.raises(ApiException) as wrong_uid:
        await core.delete_persistent_volume("pv1", body={"preconditions": {"uid": "not-the-uid"}})
    assert wrong_uid.value.status == 409
    with pytest.raises(ApiException) as strategic:
        await core.patch_persistent_volume("pv1", {"metadata": {"labels": {"a": "d"}}})
    assert strategic.value.status == 415, "strategic merge patches are refused, not faked"
    assert fake.get("persistentvolumes", "pv1") is not None


async def test_finalizers_hold_deletion_until_emptied(fake: FakeKubernetes, api: Any) -> None:
    core = client.CoreV1Api(api)
    await core.create_persistent_volume(objects.volume("pv1", "n1"))
    await core.delete_persistent_volume("pv1")
    held = fake.get("persistentvolumes", "pv1")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    await core.patch_persistent_volume(
        "pv1", {"metadata": {"finalizers": None}}, _content_type="application/merge-patch+json"
    )
    assert fake.get("persistentvolumes", "pv1") is None


async def test_watch_resumes_from_a_version_and_expires_after_compaction(fake: FakeKubernetes, api: Any) -> None:
    core = client.CoreV1Api(api)
    await fake.put("nodes", objects.node("n0"))
    listed = await core.list_node()
    await fake.put("nodes", objects.node("n1"))
    await fake.put("nodes", objects.node("n2"))
    seen: list[tuple[str, str]] = []
    async with Watch() as watch:
        async for event in watch.stream(
            core.list_node, resource_version=listed.metadata.resource_version, timeout_seconds=1
        ):
            seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
    assert seen == [("ADDED", "n1"), ("ADDED", "n2")]
    fake.compact()

    async def watch_from_the_old_version() -> None:
        async with Watch() as watch:
            async for _ in watch.stream(
                core.list_node, resource_version=listed.metadata.resource_version, timeout_seconds=1
            ):
                pass

    with pytest.raises(ApiException) as gone:
        await watch_from_the_old_version()
    assert gone.value.status == 410


async def test_unimplemented_query_parameters_are_refused(fake: FakeKubernetes, api: Any) -> None:
    with pytest.raises(ApiException) as refused:
        await client.CoreV1Api(api).list_node(field_selector="metadata.name=a")
    assert refused.value.status == 400
    with pytest.raises(ApiException) as refused:  # set-based selectors are not implemented either
        await client.CoreV1Api(api).list_node(label_selector="a in (b)")
    assert refused.value.status == 400


async def test_equality_label_selectors_filter_lists(fake: FakeKubernetes, api: Any) -> None:
    core = client.CoreV1Api(api)
    await core.create_node({"metadata": {"name": "a", "labels": {"zone": "x"}}})
    await core.create_node({"metadata": {"name": "b", "labels": {"zone": "y"}}})
    listed = await core.list_node(label_selector="zone=x")
    assert [n.metadata.name for n in listed.items] == ["a"]
