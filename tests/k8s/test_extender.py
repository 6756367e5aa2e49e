"""The scheduler extender without a cluster: quantities, selectors, the view the watches feed, scoring, and the HTTP
verbs as kube-scheduler calls them (ExtenderArgs in, HostPriorityList or ExtenderFilterResult out), including what
it refuses. The watches themselves run against the real API server in test_scheduling.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from localdisk.k8s import DRIVER_NAME, TOPOLOGY_KEY
from localdisk.k8s.extender import (
    Claim,
    ClusterView,
    ExtenderSettings,
    Policy,
    make_app,
    parse_quantity,
    room_left,
    scores,
    selector_matches,
    unfit,
)
from localdisk.sizes import GiB, MiB

Obj = dict[str, Any]


def capacity(name: str, class_name: str, node: str, size: str | None) -> Obj:
    obj: Obj = {
        "metadata": {"name": name, "namespace": "localdisk"},
        "storageClassName": class_name,
        "nodeTopology": {"matchLabels": {TOPOLOGY_KEY: node}},
    }
    if size is not None:
        obj["capacity"] = size
    return obj


def claim(name: str, class_name: str | None, size: str, volume: str = "", namespace: str = "apps") -> Obj:
    spec: Obj = {"resources": {"requests": {"storage": size}}}
    if class_name is not None:
        spec["storageClassName"] = class_name
    if volume:
        spec["volumeName"] = volume
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def storage_class(
    name: str, provisioner: str = DRIVER_NAME, mode: str = "WaitForFirstConsumer", default: bool = False
) -> Obj:
    annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
    return {
        "metadata": {"name": name, "annotations": annotations},
        "provisioner": provisioner,
        "volumeBindingMode": mode,
    }


def pod(*claims: str, ephemeral: Obj | None = None, name: str = "app") -> Obj:
    volumes: list[Obj] = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}} for i, c in enumerate(claims)]
    if ephemeral is not None:
        volumes.append({"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": ephemeral}}})
    return {"metadata": {"name": name, "namespace": "apps"}, "spec": {"containers": [], "volumes": volumes}}


def view_of(capacities: list[Obj], claims: list[Obj], classes: list[Obj]) -> ClusterView:
    view = ClusterView()
    view.replace("capacities", capacities)
    view.replace("claims", claims)
    view.replace("classes", classes)
    return view


NODES = {"n1": "1Gi", "n2": "2Gi", "n4": "4Gi"}


def three_nodes(**extra: Obj) -> ClusterView:
    return view_of(
        [capacity(f"c-{n}", "fast", n, size) for n, size in NODES.items()]
        + [capacity(f"s-{n}", "slow", n, size) for n, size in {"n1": "4Gi", "n2": "4Gi", "n4": "1Gi"}.items()],
        [claim("data", "fast", "256Mi"), claim("logs", "slow", "256Mi"), claim("big", "fast", "768Mi")],
        [storage_class("fast"), storage_class("slow")],
    )


# Pieces


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("256Mi", 256 * MiB),
        ("1Gi", GiB),
        ("1G", 10**9),
        ("1.5Gi", 3 * GiB // 2),
        ("2e3", 2000),
        ("1073741824", GiB),
        ("500m", 1),  # rounded up to a whole byte, as Quantity.Value() does
        ("0", 0),
        (1024, 1024),
    ],
)
def test_quantities(text: object, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1 Gi", "1GB", "-", "1.2.3", "x" * 100, None, True, 1.5, "1e"])
def test_bad_quantities_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(text)


def test_selectors() -> None:
    labels = {TOPOLOGY_KEY: "n1", "zone": "a"}
    assert selector_matches({"matchLabels": {TOPOLOGY_KEY: "n1"}}, labels)
    assert not selector_matches({"matchLabels": {TOPOLOGY_KEY: "n2"}}, labels)
    assert selector_matches({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "rack", "operator": "Exists"}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "rack", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["1"]}]}, labels)
    assert selector_matches({}, labels)  # an empty selector selects everything
    assert not selector_matches(None, labels)


def test_the_view_follows_events_and_keeps_the_most_room_per_node() -> None:
    view = three_nodes()
    n1 = {TOPOLOGY_KEY: "n1"}
    assert view.free_bytes("fast", n1) == GiB
    view.apply("capacities", "MODIFIED", capacity("c-n1", "fast", "n1", "768Mi"))
    assert view.free_bytes("fast", n1) == 768 * MiB
    view.apply("capacities", "ADDED", capacity("other", "fast", "n1", "900Mi"))  # a second pool's object
    assert view.free_bytes("fast", n1) == 900 * MiB
    view.apply("capacities", "DELETED", capacity("other", "fast", "n1", None))
    view.apply("capacities", "DELETED", capacity("c-n1", "fast", "n1", None))
    assert view.free_bytes("fast", n1) is None
    view.apply("capacities", "ADDED", capacity("bad", "fast", "n2", "lots"))  # unreadable: left out
    assert view.free_bytes("fast", {TOPOLOGY_KEY: "n2"}) == 2 * GiB
    view.apply("capacities", "ADDED", capacity("zone", "fast", "", "8Gi") | {"nodeTopology": {}})
    assert view.free_bytes("fast", {TOPOLOGY_KEY: "n2"}) == 8 * GiB  # a selector without labels: found by scan


def test_unsynced_until_every_kind_was_listed() -> None:
    view = ClusterView()
    view.replace("capacities", [])
    view.replace("claims", [])
    assert not view.synced
    view.replace("classes", [])
    assert view.synced


# Scoring


def left_for(view: ClusterView, requested: dict[str, int]) -> dict[str, dict[str, int | None]]:
    from localdisk.k8s.extender import Candidate

    return room_left(view, requested, [Candidate(n, {TOPOLOGY_KEY: n}) for n in NODES])


def test_spread_prefers_the_most_room_and_pack_the_least_that_fits() -> None:
    left = left_for(three_nodes(), {"fast": 256 * MiB})
    assert scores(left, NODES, Policy.SPREAD) == {"n1": 0, "n2": 3, "n4": 10}
    assert scores(left, NODES, Policy.PACK) == {"n1": 10, "n2": 7, "n4": 0}


def test_a_node_where_the_claims_do_not_fit_scores_zero_and_is_filtered() -> None:
    left = left_for(three_nodes(), {"fast": 1536 * MiB})
    assert scores(left, NODES, Policy.PACK) == {"n1": 0, "n2": 10, "n4": 0}
    assert scores(left, NODES, Policy.SPREAD) == {"n1": 0, "n2": 0, "n4": 10}
    assert set(unfit(left)) == {"n1"}


def test_classes_are_averaged() -> None:
    left = left_for(three_nodes(), {"fast": 256 * MiB, "slow": 256 * MiB})
    assert scores(left, NODES, Policy.SPREAD) == {"n1": 5, "n2": 7, "n4": 5}


def test_equal_room_is_equal_score_and_no_claims_no_preference() -> None:
    view = view_of([capacity(f"c-{n}", "fast", n, "1Gi") for n in NODES], [], [storage_class("fast")])
    assert scores(left_for(view, {"fast": MiB}), NODES, Policy.SPREAD) == dict.fromkeys(NODES, 10)
    assert scores(left_for(view, {}), NODES, Policy.PACK) == dict.fromkeys(NODES, 0)


# HTTP, as the scheduler calls it


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(view: ClusterView, policy: Policy = Policy.SPREAD, **kwargs: Any) -> str:
        settings = ExtenderSettings(policy=policy, max_body_bytes=kwargs.pop("max_body_bytes", 1 << 20))
        runner = web.AppRunner(make_app(view, settings, kwargs.pop("fetch_claim", None)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    async with ClientSession() as session:
        data = raw if raw is not None else json.dumps(body).encode()
        async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text


pytestmark = pytest.mark.anyio


async def test_prioritize_answers_a_host_priority_list(serve: Any) -> None:
    url = await serve(three_nodes(), Policy.PACK)
    status, answer = await post(f"{url}/prioritize", {"Pod": pod("data"), "NodeNames": ["n1", "n2", "n4"]})
    assert status == 200
    assert answer == [{"Host": "n1", "Score": 10}, {"Host": "n2", "Score": 7}, {"Host": "n4", "Score": 0}]


async def test_prioritize_with_whole_nodes_uses_their_labels(serve: Any) -> None:
    url = await serve(three_nodes())
    nodes = {"items": [{"metadata": {"name": f"host-{n}", "labels": {TOPOLOGY_KEY: n}}} for n in NODES]}
    status, answer = await post(f"{url}/prioritize", {"Pod": pod("data", "logs"), "Nodes": nodes})
    assert status == 200
    assert {a["Host"]: a["Score"] for a in answer} == {"host-n1": 5, "host-n2": 7, "host-n4": 5}


async def test_claims_that_do_not_count(serve: Any) -> None:
    """Bound claims, other drivers' and Immediate classes' claims, unknown claims: no preference."""
    view = three_nodes()
    view.replace(
        "claims",
        [claim("bound", "fast", "1Gi", volume="pv-1"), claim("nfs", "nfs", "1Gi"), claim("now", "now", "1Gi")],
    )
    view.replace(
        "classes",
        [
            storage_class("fast"),
            storage_class("nfs", provisioner="nfs.example.com"),
            storage_class("now", mode="Immediate"),
        ],
    )
    url = await serve(view)
    body = {"Pod": pod("bound", "nfs", "now", "unknown"), "NodeNames": list(NODES)}
    status, answer = await post(f"{url}/prioritize", body)
    assert status == 200
    assert {a["Score"] for a in answer} == {0}


async def test_the_default_class_ephemeral_templates_and_claims_read_on_a_miss(serve: Any) -> None:
    view = three_nodes()
    view.replace("classes", [storage_class("fast", default=True), storage_class("slow")])
    view.replace("claims", [claim("classless", None, "256Mi")])
    fetched: list[str] = []

    async def fetch_claim(namespace: str, name: str) -> Claim | None:
        fetched.append(f"{namespace}/{name}")
        return Claim("fast", 256 * MiB, bound=False) if name == "late" else None

    url = await serve(view, Policy.SPREAD, fetch_claim=fetch_claim)
    for volumes in (
        pod("classless"),
        pod(ephemeral={"storageClassName": "fast", "resources": {"requests": {"storage": "256Mi"}}}),
        pod("late"),
    ):
        status, answer = await post(f"{url}/prioritize", {"Pod": volumes, "NodeNames": list(NODES)})
        assert status == 200
        assert {a["Host"]: a["Score"] for a in answer} == {"n1": 0, "n2": 3, "n4": 10}
    assert fetched == ["apps/app-scratch", "apps/late"]


async def test_filter_refuses_nodes_where_claims_of_a_class_do_not_fit_together(serve: Any) -> None:
    view = three_nodes()
    view.replace("claims", [claim("a", "fast", "768Mi"), claim("b", "fast", "768Mi")])
    url = await serve(view)
    status, answer = await post(f"{url}/filter", {"Pod": pod("a", "b"), "NodeNames": list(NODES)})
    assert status == 200
    assert answer["NodeNames"] == ["n2", "n4"]
    assert set(answer["FailedNodes"]) == {"n1"}
    assert answer["Error"] == ""
    nodes = {"items": [{"metadata": {"name": n, "labels": {TOPOLOGY_KEY: n}}} for n in NODES]}
    status, answer = await post(f"{url}/filter", {"Pod": pod("a", "b"), "Nodes": nodes})
    assert [n["metadata"]["name"] for n in answer["Nodes"]["items"]] == ["n2", "n4"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"Pod": pod()}).encode(), "NodeNames or Nodes"),
        (json.dumps({"Pod": pod(), "NodeNames": "n1"}).encode(), "list of strings"),
        (json.dumps({"Pod": pod(), "Nodes": {"items": [{"metadata": {}}]}}).encode(), "metadata.name"),
        (json.dumps({"Pod": [], "NodeNames": []}).encode(), "Pod must be an object"),
        (json.dumps({"Pod": {"spec": {"volumes": {"a": 1}}}, "NodeNames": []}).encode(), "volumes a list"),
        (json.dumps({"Pod": {"spec": {"volumes": [1]}}, "NodeNames": []}).encode(), "volume must be an object"),
        (
            json.dumps(
                {"Pod": pod(ephemeral={"resources": {"requests": {"storage": "lots"}}}), "NodeNames": []}
            ).encode(),
            "not a quantity",
        ),
    ],
)
async def test_bad_requests_are_400_without_a_traceback(serve: Any, body: bytes, message: str) -> None:
    url = await serve(three_nodes())
    for verb in ("prioritize", "filter"):
        status, answer = await post(f"{url}/{verb}", None, raw=body)
        assert status == 400
        assert message in answer
        assert "Traceback" not in answer


async def test_oversized_bodies_are_refused(serve: Any) -> None:
    url = await serve(three_nodes(), max_body_bytes=64 * 1024)
    names = [f"node-{i:06d}" for i in range(10_000)]
    status, _ = await post(f"{url}/prioritize", {"Pod": pod("data"), "NodeNames": names})
    assert status == 413


async def test_not_ready_until_synced(serve: Any) -> None:
    url = await serve(ClusterView())
    status, _ = await post(f"{url}/prioritize", {"Pod": pod(), "NodeNames": []})
    assert status == 503
    async with ClientSession() as session:
        async with session.get(f"{url}/readyz") as response:
            assert response.status == 503
        async with session.get(f"{url}/healthz") as response:
            assert response.status == 200


async def test_a_bug_is_a_500_without_a_traceback(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from localdisk.k8s import extender

    def broken(*args: Any) -> dict[str, int]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(extender, "scores", broken)
    url = await serve(three_nodes())
    status, answer = await post(f"{url}/prioritize", {"Pod": pod("data"), "NodeNames": list(NODES)})
    assert status == 500
    assert "secret" not in answer and "Traceback" not in answer


async def test_answers_in_milliseconds_for_a_thousand_nodes(serve: Any) -> None:
    import time

    nodes = [f"node-{i}" for i in range(1000)]
    view = view_of(
        [capacity(f"c-{n}", "fast", n, f"{i + 1}Gi") for i, n in enumerate(nodes)],
        [claim("data", "fast", "1Gi")],
        [storage_class("fast")],
    )
    url = await serve(view)
    body = {"Pod": pod("data"), "NodeNames": nodes}
    await post(f"{url}/prioritize", body)  # warm up
    started = time.perf_counter()
    status, answer = await post(f"{url}/prioritize", body)
    elapsed = time.perf_counter() - started
    assert status == 200
    assert answer[-1] == {"Host": "node-999", "Score": 10}
    assert elapsed < 0.25, f"{elapsed * 1000:.0f} ms for 1000 nodes"


# The manifests of examples/scheduler


def scheduler_examples(name: str) -> list[Obj]:
    import yaml

    path = Path(__file__).parent.parent.parent / "examples" / "scheduler" / name
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", ["1.34", "latest"])
def test_the_extender_manifests_are_valid_and_agree_with_the_cli_and_the_configuration(version: str) -> None:
    import kubernetes_validate
    import typer.main

    from localdisk.cli import app

    objects = {o["kind"]: o for o in scheduler_examples("extender.yaml")}
    for obj in objects.values():
        kubernetes_validate.validate(
            obj, kubernetes_validate.latest_version() if version == "latest" else version, True
        )
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "scheduler-extender"
    commands: dict[str, Any] = getattr(typer.main.get_command(app), "commands")  # noqa: B009 - typer's own click
    commands["scheduler-extender"].make_context("scheduler-extender", list(container["args"][1:]))
    port = next(a for a in container["args"] if a.startswith("--port=")).split("=")[1]
    service = objects["Service"]["spec"]
    (config,) = scheduler_examples("extender-config.yaml")
    (extender,) = config["extenders"]
    assert extender["urlPrefix"] == f"http://{service['clusterIP']}:{service['ports'][0]['port']}"
    assert str(service["ports"][0]["port"]) == port
    assert extender["ignorable"] is True and extender["nodeCacheCapable"] is True
    rules = objects["ClusterRole"]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    watched = {
        ("storage.k8s.io", "csistoragecapacities"),
        ("", "persistentvolumeclaims"),
        ("storage.k8s.io", "storageclasses"),
    }
    assert granted == {(g, r, v) for g, r in watched for v in ("list", "watch")} | {
        ("", "persistentvolumeclaims", "get")
    }
