"""Every request localdisk's Kubernetes code makes is allowed by the RBAC rules the manifests give its account.

The fake API server records each request; here each is turned into the (verb, group, resource, namespace, name)
an authorizer sees and checked against the Roles and ClusterRoles bound to the account in examples/deploy.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
import yaml
from prometheus_client import CollectorRegistry

from localdisk import config
from localdisk.k8s.leader import LeaderElector, LeaseSettings
from localdisk.k8s.nodeloss import NodeLossController, NodeLossSettings
from localdisk.k8s.orphans import OrphanReporter, OrphanSettings, object_claims
from localdisk.k8s.watch import Pacer
from localdisk.manager import CreateRequest, VolumeManager
from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes

pytestmark = pytest.mark.anyio
DEPLOY = Path(__file__).parent.parent.parent / "examples" / "deploy"
NAMESPACE = "localdisk"


def manifests() -> Iterator[dict[str, Any]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def rules_of(account: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace the rule is limited to, or None for cluster-wide; rule) for a ServiceAccount in NAMESPACE."""
    docs = list(manifests())
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    found: list[tuple[str | None, dict[str, Any]]] = []
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            continue
        scope = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        found += [(scope, rule) for rule in role["rules"]]
    return found


def attributes(method: str, path_qs: str) -> tuple[str, str, str, str, str | None]:
    split = urlsplit(path_qs)
    resource, namespace, name = FakeKubernetes._route(split.path)
    watch = parse_qs(split.query).get("watch", ["false"])[0].lower() not in ("false", "0")
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
    if verb is None:
        verb = "watch" if watch else ("get" if name else "list")
    return verb, resource.group, resource.plural, namespace, name


def denied(fake: FakeKubernetes, account: str) -> list[str]:
    rules = rules_of(account)
    refused = []
    for method, path in fake.requests:
        verb, group, plural, namespace, name = attributes(method, path)
        allowed = any(
            (scope is None or scope == namespace)
            and group in rule["apiGroups"]
            and plural in rule["resources"]
            and verb in rule["verbs"]
            and (not rule.get("resourceNames") or name in rule["resourceNames"])
            for scope, rule in rules
        )
        if not allowed:
            refused.append(f"{verb} {group or 'core'}/{plural} {namespace}/{name or ''}")
    return sorted(set(refused))


async def test_controller_needs_nothing_beyond_its_role(fake: FakeKubernetes, api: Any) -> None:
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    pvc = await fake.put("persistentvolumeclaims", objects.claim("apps", "data-db-0", volume="pv-1"))
    await fake.put("persistentvolumes", objects.volume("pv-1", "gone", bound_to=pvc))
    await fake.put("nodes", objects.node("n1"))
    pvc = await fake.put("persistentvolumeclaims", objects.claim("apps", "data-db-1", volume="pv-2"))
    await fake.put("persistentvolumes", objects.volume("pv-2", "n1", bound_to=pvc, reclaim_policy="Retain"))
    await fake.put("persistentvolumeclaims", objects.pending_claim("apps", "data-db-2", "gone"))
    await fake.put("csistoragecapacities", objects.capacity("csisc-gone", "gone"))
    fake.install("volumesnapshotcontents")
    content = objects.snapshot_content("snapcontent-1", "gone")
    await fake.put("volumesnapshotcontents", content)
    await fake.remove("volumesnapshotcontents", "snapcontent-1")  # terminating, held by the snapshotter's finalizer
    fake.requests.clear()
    node_loss = NodeLossController(
        api, NodeLossSettings(grace_period=0), registry=CollectorRegistry(), pacer=Pacer(0.05)
    )
    elector = LeaderElector(api, LeaseSettings(NAMESPACE, "localdisk-controller", "replica-1", 1.0, 0.6, 0.1))

    def pv_lists() -> int:
        return sum(1 for m, p in fake.requests if m == "GET" and p.split("?")[0] == "/api/v1/persistentvolumes")

    def verbs() -> set[str]:
        return {attributes(m, p)[0] for m, p in fake.requests}

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(elector.run, node_loss.run)
            while not fake.count("DELETE", "/persistentvolumes/") or not fake.count(
                "PATCH", "/volumesnapshotcontents/"
            ):
                await anyio.sleep(0.05)
            lists = pv_lists()
            await fake.remove("nodes", "n1")  # a watched deletion too: the controller reads the node, lists the PVs
            while (
                fake.count("GET", "/api/v1/nodes/n1") == 0
                or pv_lists() == lists
                or "update" not in verbs()
                or fake.count("DELETE", "/persistentvolumeclaims/data-db-1") == 0
            ):
                await anyio.sleep(0.05)
            group.cancel_scope.cancel()
    assert verbs() >= {"get", "list", "watch", "create", "update", "patch", "delete"}, "the scenario covered them all"
    assert denied(fake, "localdisk-controller") == []


async def test_orphan_reporter_needs_nothing_beyond_the_node_role(fake: FakeKubernetes, api: Any) -> None:
    """The split shape's node agent finds orphans through its LocalVolume objects: no rights on PVs needed."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    async with VolumeManager.from_config(config.development_default()).session() as manager:
        await manager.create_volume(CreateRequest("pvc-orphan", "fake", required_bytes=1 << 20))
        reporter = OrphanReporter(
            api,
            manager,
            OrphanSettings("n1", report_after=1, delete_after=2),
            registry=CollectorRegistry(),
            clock=lambda: now,
            claims=object_claims(api, "n1"),
        )
        await reporter.scan()
        now += timedelta(seconds=5)
        await reporter.scan()
        assert await manager.list_volumes() == []
    assert fake.count("POST", "/events") == 2
    assert denied(fake, "localdisk-node") == []


def test_the_check_itself_refuses_what_is_not_granted() -> None:
    fake = FakeKubernetes()
    fake.requests = [
        ("DELETE", "/api/v1/nodes/n1"),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/other/leases/x"),
    ]
    assert denied(fake, "localdisk-controller") == [
        "delete core/nodes /n1",
        "update coordination.k8s.io/leases other/x",
    ]
