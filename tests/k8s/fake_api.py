"""A small Kubernetes API server over real HTTP, for the few resources localdisk's Kubernetes code touches.

It keeps the semantics the controller depends on, and refuses what it does not implement instead of pretending:
- one global resourceVersion counter; list answers carry it, every write bumps it;
- watch from a resourceVersion replays the history after it, then streams new changes until `timeoutSeconds`,
  and ends with a BOOKMARK when asked for them; a version older than the last `compact()` gets an ERROR event with
  a 410 Expired status, as the real server sends it;
- 404 NotFound, 409 AlreadyExists on create, 409 Conflict on a stale `metadata.resourceVersion` (PUT, merge PATCH)
  and on failed DeleteOptions preconditions (uid, resourceVersion);
- finalizers: DELETE of an object with finalizers only sets `deletionTimestamp`; the object goes away when an update
  empties its finalizers;
- only JSON merge patches (415 otherwise); label and field selectors and paging are refused with 400.
Tests can inject failures (`fail`), and freeze the server right after a given request (`freeze_after`) to stop a
client in the middle of its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = {
    r.plural: r
    for r in (
        Resource("", "v1", "nodes", "Node", False),
        Resource("", "v1", "persistentvolumes", "PersistentVolume", False),
        Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True),
        Resource("", "v1", "events", "Event", True),
        Resource("storage.k8s.io", "v1", "storageclasses", "StorageClass", False),
        Resource("storage.k8s.io", "v1", "csistoragecapacities", "CSIStorageCapacity", True),
        Resource("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", "VolumeSnapshotContent", False),
        Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
        Resource("localdisk.csi.io", "v1alpha1", "localvolumes", "LocalVolume", False),
    )
}
SUPPORTED_QUERY = {"watch", "resourceVersion", "timeoutSeconds", "allowWatchBookmarks", "pretty", "labelSelector"}


def _terms(selector: str) -> list[tuple[str, str]]:
    """Equality-based label selectors (`k=v,k2=v2`), the only kind localdisk sends; anything else is refused."""
    terms = []
    for term in filter(None, selector.split(",")):
        key, sep, value = term.partition("=")
        if not sep or not key or any(c in term for c in "!() ") or value.startswith("="):
            raise ApiError(400, "BadRequest", f"the fake API server only implements k=v selectors, not {term!r}")
        terms.append((key, value))
    return terms


def _selected(obj: Obj, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(key) == value for key, value in _terms(selector))


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int
    times: int


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter as apimachinery reads it: present and not "false" or "0" (any case) is true."""
    value = request.query.get(name)
    return value is not None and value.strip().lower() not in ("false", "0")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKubernetes:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (plural, namespace, name)
        self.revision = 0
        self.history: list[tuple[int, str, str, Obj]] = []  # (revision, plural, event type, object)
        self.compacted = 0
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.uninstalled: set[str] = {"volumesnapshotcontents"}
        """Resources of CRDs that are not installed: 404 for every request (`install` adds them)."""
        self.max_watch_seconds = 30.0
        self._freeze_after: tuple[str, str] | None = None
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._frozen = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Task[Any]] = set()
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self.thaw()
        # aiohttp does not cancel a handler when its client goes away: end the open watches here
        for task in list(self._watches):
            task.cancel()
        for task in list(self._watches):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test controls ------------------------------------------------------------------------------------------
    def fail(self, method: str, path_contains: str, status: int, times: int = 1) -> None:
        """Answer the next `times` matching requests with `status` instead of serving them."""
        self.faults.append(Fault(method, path_contains, status, times))

    def freeze_after(self, method: str, path_contains: str) -> None:
        """After serving the next matching request, hold every later request until `thaw()`."""
        self._freeze_after = (method, path_contains)
        self._frozen = asyncio.Event()

    async def wait_frozen(self) -> None:
        await self._frozen.wait()

    def thaw(self) -> None:
        self._freeze_after = None
        self._thawed.set()

    def install(self, plural: str) -> None:
        """Install the CRD of `plural` (the snapshot CRDs are not there unless a test installs them)."""
        self.uninstalled.discard(plural)

    def compact(self) -> None:
        """Forget the history: watches from any version before now get 410 Gone."""
        self.compacted = self.revision
        self.history.clear()

    def count(self, method: str, path_contains: str = "") -> int:
        return sum(1 for m, p in self.requests if m == method and path_contains in p)

    # -- direct store access (what other clients of the cluster would do) --------------------------------------
    def get(self, plural: str, name: str, namespace: str = "") -> Obj | None:
        found = self.objects.get((plural, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def items(self, plural: str) -> list[Obj]:
        return [copy.deepcopy(o) for (p, _, _), o in sorted(self.objects.items()) if p == plural]

    async def put(self, plural: str, obj: Obj) -> Obj:
        return await self._create(RESOURCES[plural], obj.get("metadata", {}).get("namespace", ""), obj)

    async def remove(self, plural: str, name: str, namespace: str = "") -> Obj:
        return await self._delete(RESOURCES[plural], namespace, name, {})

    async def update(self, plural: str, name: str, namespace: str, patch: Obj) -> Obj:
        return await self._patch(RESOURCES[plural], namespace, name, patch)

    # -- HTTP ---------------------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        await self._thawed.wait()
        try:
            self._inject_fault(request)
            response = await self._serve(request)
        except ApiError as exc:
            response = web.json_response(exc.status(), status=exc.code)
        frozen_on = self._freeze_after
        if frozen_on and request.method == frozen_on[0] and frozen_on[1] in request.path_qs:
            self._freeze_after = None
            self._thawed.clear()
            self._frozen.set()
        return response

    def _inject_fault(self, request: web.Request) -> None:
        for fault in self.faults:
            if fault.times > 0 and request.method == fault.method and fault.path_contains in request.path_qs:
                fault.times -= 1
                reasons = {409: "Conflict", 410: "Expired", 429: "TooManyRequests", 500: "InternalError"}
                raise ApiError(fault.status, reasons.get(fault.status, "Unknown"), "injected by the test")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        resource, namespace, name = self._route(request.path)
        if resource.plural in self.uninstalled:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({resource.plural})")
        unsupported = set(request.query) - SUPPORTED_QUERY
        if unsupported:
            raise ApiError(400, "BadRequest", f"the fake API server does not implement {sorted(unsupported)}")
        _terms(request.query.get("labelSelector", ""))
        method = request.method
        if method == "GET" and name is None and _flag(request, "watch"):
            return await self._watch(request, resource, namespace)
        if method == "GET" and name is None:
            return web.json_response(self._list(resource, namespace, request.query.get("labelSelector", "")))
        if method == "GET":
            return web.json_response(self._read(resource, namespace, name or ""))
        if method == "POST" and name is None:
            return web.json_response(await self._create(resource, namespace, await request.json()), status=201)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")
        if method == "PUT":
            return web.json_response(await self._replace(resource, namespace, name, await request.json()))
        if method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                raise ApiError(
                    415, "UnsupportedMediaType", f"the fake only does merge patches, not {request.content_type}"
                )
            return web.json_response(await self._patch(resource, namespace, name, await request.json()))
        if method == "DELETE":
            raw = await request.read()
            options = json.loads(raw) if raw.strip() else {}
            return web.json_response(await self._delete(resource, namespace, name, options or {}))
        raise ApiError(405, "MethodNotAllowed", method)

    @staticmethod
    def _route(path: str) -> tuple[Resource, str, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"no API at {path}")
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2 or rest[0] not in RESOURCES:
            raise ApiError(404, "NotFound", f"no resource at {path}")
        resource = RESOURCES[rest[0]]
        if (resource.group, resource.version) != (group, version):
            raise ApiError(404, "NotFound", f"{resource.plural} is not served at {path}")
        if namespace and not resource.namespaced:
            raise ApiError(404, "NotFound", f"{resource.plural} is cluster-scoped")
        name = rest[1] if len(rest) == 2 else None
        if resource.namespaced and name is not None and not namespace:
            raise ApiError(404, "NotFound", f"{resource.plural} is namespaced")
        return resource, namespace, name

    # -- operations ---------------------------------------------------------------------------------------------
    def _list(self, resource: Resource, namespace: str, selector: str = "") -> Obj:
        items = [
            copy.deepcopy(o)
            for (plural, ns, _), o in sorted(self.objects.items())
            if plural == resource.plural and (not namespace or ns == namespace) and _selected(o, selector)
        ]
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.revision)},
            "items": items,
        }

    def _read(self, resource: Resource, namespace: str, name: str) -> Obj:
        found = self.objects.get((resource.plural, namespace, name))
        if found is None:
            raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        return copy.deepcopy(found)

    async def _commit(self, resource: Resource, namespace: str, obj: Obj, event: str) -> Obj:
        self.revision += 1
        key = (resource.plural, namespace, obj["metadata"]["name"])
        obj["metadata"]["resourceVersion"] = str(self.revision)
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.history.append((self.revision, resource.plural, event, copy.deepcopy(obj)))
        async with self._changed:
            self._changed.notify_all()
        return copy.deepcopy(obj)

    async def _create(self, resource: Resource, namespace: str, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name is required")
        if resource.namespaced:
            if meta.get("namespace", namespace) != namespace or not namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
            meta["namespace"] = namespace
        if (resource.plural, namespace, name) in self.objects:
            raise ApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta.pop("deletionTimestamp", None)
        return await self._commit(resource, namespace, obj, "ADDED")

    def _check_version(self, current: Obj, wanted: str | None) -> None:
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply your"
                " changes to the latest version and try again",
            )

    async def _store_update(self, resource: Resource, namespace: str, current: Obj, new: Obj) -> Obj:
        for kept in ("uid", "creationTimestamp", "deletionTimestamp", "name", "namespace"):
            if kept in current["metadata"]:
                new["metadata"][kept] = current["metadata"][kept]
            else:
                new["metadata"].pop(kept, None)
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return await self._commit(resource, namespace, new, "DELETED")
        return await self._commit(resource, namespace, new, "MODIFIED")

    async def _replace(self, resource: Resource, namespace: str, name: str, body: Obj) -> Obj:
        current = self._read(resource, namespace, name)
        if body.get("metadata", {}).get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the request")
        self._check_version(current, body.get("metadata", {}).get("resourceVersion"))
        new = copy.deepcopy(body)
        new.setdefault("metadata", {})
        return await self._store_update(resource, namespace, current, new)

    async def _patch(self, resource: Resource, namespace: str, name: str, patch: Obj) -> Obj:
        current = self._read(resource, namespace, name)
        self._check_version(current, (patch.get("metadata") or {}).get("resourceVersion"))
        new = merge_patch(current, patch)
        new.setdefault("metadata", {})
        return await self._store_update(resource, namespace, current, new)

    async def _delete(self, resource: Resource, namespace: str, name: str, options: Obj) -> Obj:
        current = self._read(resource, namespace, name)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {preconditions['uid']}")
        self._check_version(current, preconditions.get("resourceVersion"))
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return current
            current["metadata"]["deletionTimestamp"] = _now()
            return await self._commit(resource, namespace, current, "MODIFIED")
        return await self._commit(resource, namespace, current, "DELETED")

    async def _watch(self, request: web.Request, resource: Resource, namespace: str) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._watches.add(task)
        try:
            return await self._stream(request, resource, namespace)
        except ConnectionResetError:  # the client went away
            return web.Response(status=499)
        finally:
            self._watches.discard(task)

    async def _stream(self, request: web.Request, resource: Resource, namespace: str) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        timeout = min(float(request.query.get("timeoutSeconds", "1800")), self.max_watch_seconds)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        async def send(kind: str, obj: Obj) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        selector = request.query.get("labelSelector", "")

        def matches(plural: str, obj: Obj) -> bool:
            return (
                plural == resource.plural
                and (not namespace or obj["metadata"].get("namespace") == namespace)
                and _selected(obj, selector)
            )

        if since in ("", "0"):
            position = self.revision
            for obj in self._list(resource, namespace, selector)["items"]:
                await send("ADDED", obj)
        else:
            position = int(since)
            if position < self.compacted:
                expired = ApiError(410, "Expired", f"too old resource version: {position} ({self.compacted})")
                await send("ERROR", expired.status())
                return response
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            pending = [entry for entry in self.history if entry[0] > position]
            for revision, plural, kind, obj in pending:
                position = revision
                if matches(plural, obj):
                    await send(kind, obj)
            if pending:
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            async with self._changed:
                if not any(entry[0] > position for entry in self.history):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
        if _flag(request, "allowWatchBookmarks"):
            await send(
                "BOOKMARK",
                {
                    "kind": resource.kind,
                    "apiVersion": resource.api_version,
                    "metadata": {"resourceVersion": str(position)},
                },
            )
        return response
