"""`localdisk scheduler-extender`: scores nodes by the room their pools have for a pod's claims, spread or pack.

Storage capacity tracking only filters: any node with room will do. Where the scheduler's own answer to that,
VolumeBinding scoring (the StorageCapacityScoring feature gate), cannot be turned on, kube-scheduler can call this
process instead (its `extenders` configuration). For each pod it sums the pod's unbound claims per StorageClass of
this driver, looks up each candidate node's CSIStorageCapacity for that class, and scores the room left after the
claims: `spread` prefers the node with the most left, `pack` the one with the least that still fits. Scores are
relative to the candidates (the best 10, the worst 0, linear in between, averaged over the pod's classes), because
an extender's scores are integers from 0 to 10: an absolute scale would give most nodes the same one.

The filter verb adds what capacity tracking lacks: the scheduler checks each claim against a node's capacity on
its own, so two claims of one class that fit one at a time but not together pass it; here they do not.

Answers come from memory: watches keep CSIStorageCapacity objects, PVCs and StorageClasses (a few fields each) in
`ClusterView`; a request never waits for the API server. The scheduler configuration marks the extender
`ignorable`, so a pod is never held up while it is down or not yet synced (it answers 503 then): the scheduler
goes on with capacity filtering alone.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import anyio
from aiohttp import web
from kubernetes_asyncio import client

from localdisk.k8s import DRIVER_NAME, TOPOLOGY_KEY
from localdisk.k8s.client import connect
from localdisk.k8s.watch import TRANSIENT, Pacer, list_and_watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]
MAX_SCORE = 10
"""The highest score an extender may give (`MaxExtenderPriority`); the scheduler scales it to its own 0..100."""
WATCH_MIN_INTERVAL = 0.2
"""Seconds between two list or watch requests of one kind. Events that happen in between arrive when the next watch
starts (it resumes from the last version seen), so this is how stale the view may get at a reconnect: the default
second of `Pacer` let a pod created right after the extender's first list be scored without its claims."""
FETCH_TIMEOUT = 0.5
"""Seconds to read a claim the watch has not brought yet; the scheduler waits a second for an answer."""
DEFAULT_MAX_BODY_BYTES = 4 << 20
"""A pod and a few thousand node names fit many times over; with `nodeCacheCapable: false` the scheduler sends
whole Node objects instead, and this may need raising."""


class Policy(StrEnum):
    SPREAD = "spread"
    """The node with the most room left after the pod's claims wins: claims spread over the nodes."""
    PACK = "pack"
    """The node with the least room left that still fits wins: nodes fill one after another, big ones stay free."""


class BadRequest(ValueError):
    """A request the extender cannot read: answered 400 with this message."""


# Quantities


_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIXES = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    **{suffix: Decimal(1024) ** power for power, suffix in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)},
}


def parse_quantity(text: object) -> int:
    """A Kubernetes resource quantity ("256Mi", "1G", "1.5Gi", "2e9", "1073741824") in whole bytes, rounded up
    as the API server's `Value()` does; `ValueError` for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError(f"not a quantity: {str(text)[:64]!r}")
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"not a quantity: {text!r}")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number) * (Decimal(10) ** int(exponent[1:]) if exponent else _SUFFIXES[suffix or ""])
    except InvalidOperation:
        raise ValueError(f"not a quantity: {text!r}") from None
    return int(value.to_integral_value(rounding=ROUND_CEILING))


# Label selectors


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a `metav1.LabelSelector` (matchLabels, matchExpressions) selects `labels`. A missing selector
    selects nothing here: a CSIStorageCapacity without nodeTopology is not about any node."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


# The cluster, as far as scoring needs it


@dataclass(frozen=True)
class StorageCapacity:
    storage_class: str
    node_topology: Mapping[str, Any] | None
    capacity: int | None
    """Bytes free; None when the object has no capacity (the driver did not say)."""

    @classmethod
    def from_object(cls, obj: Obj) -> StorageCapacity:
        raw = obj.get("capacity")
        return cls(obj.get("storageClassName") or "", obj.get("nodeTopology"), parse_quantity(raw) if raw else None)

    def index_key(self) -> tuple[str, str] | None:
        """One label the selector requires (key, value), to find it without scanning every object."""
        labels = (self.node_topology or {}).get("matchLabels") or {}
        return next(iter(sorted(labels.items())), None)


@dataclass(frozen=True)
class Claim:
    storage_class: str | None
    requested: int
    bound: bool

    @classmethod
    def from_spec(cls, spec: Obj) -> Claim:
        requests = (spec.get("resources") or {}).get("requests") or {}
        storage = requests.get("storage")
        return cls(
            spec.get("storageClassName"), parse_quantity(storage) if storage else 0, bool(spec.get("volumeName"))
        )


@dataclass(frozen=True)
class StorageClass:
    provisioner: str
    wait_for_first_consumer: bool
    default: bool

    @classmethod
    def from_object(cls, obj: Obj) -> StorageClass:
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return cls(
            obj.get("provisioner") or "",
            obj.get("volumeBindingMode") == "WaitForFirstConsumer",
            annotations.get("storageclass.kubernetes.io/is-default-class") == "true",
        )


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


@dataclass
class Collection:
    """One watched kind: the records by namespace/name, and whether the first list has arrived."""

    records: dict[str, Any] = field(default_factory=dict)
    synced: bool = False


class ClusterView:
    """What the watches saw: CSIStorageCapacity objects (indexed by class and one node label), PVCs and
    StorageClasses. Objects that cannot be read (a malformed quantity) are left out and logged."""

    def __init__(self) -> None:
        self.capacities = Collection()
        self.claims = Collection()
        self.classes = Collection()
        self._index: dict[tuple[str, str, str], list[StorageCapacity]] | None = None
        self._unindexed: dict[str, list[StorageCapacity]] = {}

    @property
    def synced(self) -> bool:
        return self.capacities.synced and self.claims.synced and self.classes.synced

    # Feeding it (the watch callbacks, or tests)

    def replace(self, kind: str, objects: Iterable[Obj]) -> None:
        collection = self._collection(kind)
        collection.records = {}
        for obj in objects:
            self._put(kind, collection, obj)
        collection.synced = True
        self._index = None

    def apply(self, kind: str, event: str, obj: Obj) -> None:
        collection = self._collection(kind)
        if event == "DELETED":
            collection.records.pop(_key(obj), None)
        else:
            self._put(kind, collection, obj)
        if kind == "capacities":
            self._index = None

    def _collection(self, kind: str) -> Collection:
        collection: Collection = getattr(self, kind)
        return collection

    def _put(self, kind: str, collection: Collection, obj: Obj) -> None:
        try:
            if kind == "capacities":
                record: Any = StorageCapacity.from_object(obj)
            elif kind == "claims":
                record = Claim.from_spec(obj.get("spec") or {})
            else:
                record = StorageClass.from_object(obj)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring %s %s: %s", kind, _key(obj), exc)
            collection.records.pop(_key(obj), None)
            return
        collection.records[_key(obj)] = record

    # Reading it

    def storage_class(self, name: str) -> StorageClass | None:
        found: StorageClass | None = self.classes.records.get(f"/{name}")
        return found

    def default_class(self) -> str | None:
        defaults = sorted(key[1:] for key, sc in self.classes.records.items() if sc.default)
        return defaults[-1] if defaults else None

    def claim(self, namespace: str, name: str) -> Claim | None:
        found: Claim | None = self.claims.records.get(f"{namespace}/{name}")
        return found

    def free_bytes(self, storage_class: str, labels: Mapping[str, str]) -> int | None:
        """The most room any CSIStorageCapacity of `storage_class` whose topology selects a node with `labels`
        reports; None when none does."""
        index = self._build_index()
        candidates = list(self._unindexed.get(storage_class, ()))
        for key, value in labels.items():
            candidates += index.get((storage_class, key, value), ())
        found = [c.capacity for c in candidates if c.capacity is not None and selector_matches(c.node_topology, labels)]
        return max(found) if found else None

    def _build_index(self) -> dict[tuple[str, str, str], list[StorageCapacity]]:
        if self._index is None:
            index: dict[tuple[str, str, str], list[StorageCapacity]] = {}
            unindexed: dict[str, list[StorageCapacity]] = {}
            for capacity in self.capacities.records.values():
                label = capacity.index_key()
                if label is None:
                    unindexed.setdefault(capacity.storage_class, []).append(capacity)
                else:
                    index.setdefault((capacity.storage_class, *label), []).append(capacity)
            self._index, self._unindexed = index, unindexed
        return self._index


# Scoring


@dataclass(frozen=True)
class Candidate:
    name: str
    labels: Mapping[str, str]


def candidates_of(args: Any) -> tuple[list[Candidate], bool]:
    """The candidate nodes of an `ExtenderArgs` body, and whether they came as names (`nodeCacheCapable: true`).

    Whole Node objects bring their labels; bare names get the one label localdisk's capacity objects select on,
    `topology.localdisk.io/node=<name>` (the value is the node name the node plugin reports)."""
    if not isinstance(args, dict):
        raise BadRequest("the body must be a JSON object (ExtenderArgs)")
    names = args.get("NodeNames")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequest("NodeNames must be a list of strings")
        return [Candidate(n, {TOPOLOGY_KEY: n}) for n in names], True
    nodes = args.get("Nodes")
    items = nodes.get("items") if isinstance(nodes, dict) else None
    if not isinstance(items, list):
        raise BadRequest("ExtenderArgs needs NodeNames or Nodes.items")
    found = []
    for node in items:
        meta = node.get("metadata") if isinstance(node, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        labels = meta.get("labels") or {} if isinstance(meta, dict) else {}
        if not isinstance(name, str) or not isinstance(labels, dict):
            raise BadRequest("every node in Nodes.items needs metadata.name (and labels, if any, as an object)")
        found.append(Candidate(name, labels))
    return found, False


@dataclass(frozen=True)
class ClaimUse:
    """A claim a pod's volume names; `template` is an ephemeral volume's claim template, for while its claim does not
    exist yet."""

    namespace: str
    name: str
    template: Claim | None = None


def claims_of(pod: Any) -> list[ClaimUse]:
    """The claims of a pod's `persistentVolumeClaim` volumes, and of its `ephemeral` ones (`<pod>-<volume>`)."""
    if not isinstance(pod, dict):
        raise BadRequest("Pod must be an object")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict) or not isinstance(spec.get("volumes") or [], list):
        raise BadRequest("Pod.metadata and Pod.spec must be objects, Pod.spec.volumes a list")
    namespace, pod_name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    uses = []
    for volume in spec.get("volumes") or []:
        if not isinstance(volume, dict):
            raise BadRequest("every volume must be an object")
        if isinstance(volume.get("persistentVolumeClaim"), dict):
            uses.append(ClaimUse(namespace, str(volume["persistentVolumeClaim"].get("claimName") or "")))
        elif isinstance(volume.get("ephemeral"), dict):
            template = (volume["ephemeral"].get("volumeClaimTemplate") or {}).get("spec")
            try:
                claim = Claim.from_spec(template) if isinstance(template, dict) else None
            except (ValueError, TypeError, AttributeError) as exc:
                raise BadRequest(f"volume {volume.get('name')!r}: {exc}") from None
            uses.append(ClaimUse(namespace, f"{pod_name}-{volume.get('name')}", claim))
    return uses


def requested_per_class(claims: Iterable[Claim], view: ClusterView, driver: str = DRIVER_NAME) -> dict[str, int]:
    """The bytes the unbound claims ask for, summed per StorageClass of `driver` that binds on first use (a claim
    without a class has the default one). Bound claims, and claims of other drivers, count nothing."""
    sums: dict[str, int] = {}
    for claim in claims:
        if claim.bound:
            continue
        class_name = claim.storage_class if claim.storage_class is not None else view.default_class()
        storage_class = view.storage_class(class_name) if class_name else None
        ours = storage_class is not None and storage_class.provisioner == driver
        if class_name and ours and storage_class is not None and storage_class.wait_for_first_consumer:
            sums[class_name] = sums.get(class_name, 0) + claim.requested
    return sums


def room_left(
    view: ClusterView, requested: Mapping[str, int], nodes: Iterable[Candidate]
) -> dict[str, dict[str, int | None]]:
    """Per class, per node: bytes left after the pod's claims of that class (negative: they do not fit; None: the
    node publishes no capacity for the class)."""
    left: dict[str, dict[str, int | None]] = {}
    for class_name, wanted in requested.items():
        per_node: dict[str, int | None] = {}
        for node in nodes:
            free = view.free_bytes(class_name, node.labels)
            per_node[node.name] = None if free is None else free - wanted
        left[class_name] = per_node
    return left


def scores(left: Mapping[str, Mapping[str, int | None]], names: Iterable[str], policy: Policy) -> dict[str, int]:
    """0..10 per node: for each class, the fitting nodes are placed linearly between the worst (0) and the best
    (10) room left, by `policy`, a node where the claims do not fit gets 0; the node's score is the mean over the
    classes, rounded. A pod with no claims of the driver scores 0 everywhere (no preference)."""
    names = list(names)
    totals = dict.fromkeys(names, 0.0)
    for per_node in left.values():
        fitting = {name: room for name, room in per_node.items() if room is not None and room >= 0}
        if not fitting:
            continue
        low, high = min(fitting.values()), max(fitting.values())
        for name, room in fitting.items():
            if name not in totals:
                continue
            if high == low:
                share = 1.0
            elif policy is Policy.SPREAD:
                share = (room - low) / (high - low)
            else:
                share = (high - room) / (high - low)
            totals[name] += MAX_SCORE * share
    classes = max(len(left), 1)
    return {name: round(total / classes) for name, total in totals.items()}


def unfit(left: Mapping[str, Mapping[str, int | None]]) -> dict[str, str]:
    """Nodes whose capacity for some class is published but smaller than the pod's claims of that class together."""
    failed: dict[str, str] = {}
    for class_name, per_node in left.items():
        for name, room in per_node.items():
            if room is not None and room < 0 and name not in failed:
                failed[name] = f"the pod's claims of StorageClass {class_name} need {-room} bytes more than it has"
    return failed


# HTTP


@dataclass(frozen=True)
class ExtenderSettings:
    policy: Policy = Policy.SPREAD
    host: str | None = None
    """None listens on every interface (what a pod behind a Service wants)."""
    port: int = 8099
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    kubeconfig: str | None = None
    driver: str = DRIVER_NAME


FetchClaim = Callable[[str, str], Awaitable[Claim | None]]


def make_app(view: ClusterView, settings: ExtenderSettings, fetch_claim: FetchClaim | None = None) -> web.Application:
    """/prioritize and /filter (kube-scheduler's extender verbs), /healthz (alive) and /readyz (watches synced).

    A claim the watch has not brought yet (created a moment before its pod) is read with `fetch_claim`."""

    async def parse(args: Any) -> tuple[list[Candidate], bool, dict[str, int]]:
        try:
            nodes, by_name = candidates_of(args)
            uses = claims_of(args.get("Pod"))
        except BadRequest as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        claims = []
        for use in uses:
            claim = view.claim(use.namespace, use.name)
            if claim is None and fetch_claim is not None:
                claim = await fetch_claim(use.namespace, use.name)
            claim = claim or use.template
            if claim is not None:
                claims.append(claim)
        return nodes, by_name, requested_per_class(claims, view, settings.driver)

    async def read_args(request: web.Request) -> Any:
        if not view.synced:
            raise web.HTTPServiceUnavailable(text="not synced with the API server yet\n")
        try:
            body = await request.read()  # aiohttp refuses more than client_max_size with 413
            return json.loads(body)
        except web.HTTPException:
            raise
        except (ValueError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=f"the body is not JSON: {str(exc)[:200]}\n") from None

    async def prioritize(request: web.Request) -> web.Response:
        started = time.perf_counter()
        args = await read_args(request)
        nodes, _, requested = await parse(args)
        names = [n.name for n in nodes]
        result = scores(room_left(view, requested, nodes), names, settings.policy)
        log.debug(
            "prioritize %s: %s in %.1f ms",
            _pod_name(args),
            result,
            (time.perf_counter() - started) * 1000,
            extra={"requested": requested},
        )
        return web.json_response([{"Host": name, "Score": result[name]} for name in names])

    async def filter_nodes(request: web.Request) -> web.Response:
        args = await read_args(request)
        nodes, by_name, requested = await parse(args)
        failed = unfit(room_left(view, requested, nodes))
        if failed:
            log.debug("filter %s: %s", _pod_name(args), failed)
        answer: Obj = {"FailedNodes": failed, "Error": ""}
        if by_name:
            answer["NodeNames"] = [n.name for n in nodes if n.name not in failed]
        else:
            items = args["Nodes"]["items"]
            answer["Nodes"] = {**args["Nodes"], "items": [i for i in items if i["metadata"]["name"] not in failed]}
        return web.json_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if not view.synced:
            raise web.HTTPServiceUnavailable(text="not synced with the API server yet\n")
        return web.Response(text="ok\n")

    @web.middleware
    async def no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            raise web.HTTPInternalServerError(text="internal error; see the extender's log\n") from None

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[no_tracebacks])
    app.router.add_post("/prioritize", prioritize)
    app.router.add_post("/filter", filter_nodes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _pod_name(args: Any) -> str:
    meta = (args.get("Pod") or {}).get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


# The process


async def main(settings: ExtenderSettings) -> None:
    """Watch and serve until SIGTERM or SIGINT."""
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    group.cancel_scope.cancel()
                    return

        group.start_soon(stop_on_signal)
        await run_extender(settings)
        group.cancel_scope.cancel()


async def run_extender(settings: ExtenderSettings) -> None:
    view = ClusterView()
    api = await connect(settings.kubeconfig)
    async with api:
        storage, core = client.StorageV1Api(api), client.CoreV1Api(api)
        watched = {
            "capacities": storage.list_csi_storage_capacity_for_all_namespaces,
            "claims": core.list_persistent_volume_claim_for_all_namespaces,
            "classes": storage.list_storage_class,
        }

        async def fetch_claim(namespace: str, name: str) -> Claim | None:
            try:
                claim = await core.read_namespaced_persistent_volume_claim(
                    name, namespace, _request_timeout=FETCH_TIMEOUT
                )
                return Claim.from_spec(api.sanitize_for_serialization(claim).get("spec") or {})
            except (*TRANSIENT, ValueError) as exc:
                log.info("claim %s/%s: not in the watch cache, and reading it failed: %s", namespace, name, exc)
                return None

        runner = web.AppRunner(make_app(view, settings, fetch_claim), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, settings.port).start()
            log.info("scheduler extender (%s) on port %d", settings.policy.value, settings.port)
            async with anyio.create_task_group() as group:
                for kind, list_function in watched.items():
                    group.start_soon(_watch, api, view, kind, list_function)
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()


async def _watch(api: Any, view: ClusterView, kind: str, list_function: Any) -> None:
    async def on_relist(items: list[Any]) -> None:
        view.replace(kind, [api.sanitize_for_serialization(item) for item in items])
        log.info("%s listed: %d", kind, len(items))

    async def on_event(event: str, obj: Any) -> None:
        view.apply(kind, event, api.sanitize_for_serialization(obj))

    pacer = Pacer(min_interval=WATCH_MIN_INTERVAL)
    await list_and_watch(list_function, on_relist=on_relist, on_event=on_event, pacer=pacer, what=kind)
