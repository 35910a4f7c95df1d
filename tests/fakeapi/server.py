"""A strict test API server speaking the Kubernetes list/watch protocol.

Written from the API conventions (kubernetes/community
contributors/devel/sig-architecture/api-conventions.md) and the API
concepts page (kubernetes.io/docs/reference/using-api/api-concepts/:
"Efficient detection of changes", "Watch bookmarks", "Retrieving large
results sets in chunks", "Resource versions"), and checked against what
kubernetes_asyncio sends.  What it does like a real kube-apiserver:

* JSON lists (``ServiceList`` ...) whose items carry no kind/apiVersion,
  ``metadata.resourceVersion`` from one global revision counter,
  ``limit``/``continue`` pagination at the first page's revision, and 410
  ``Expired`` for a continue token older than the compaction revision (with
  a fresh token for an inconsistent continuation, as upstream).
* resourceVersion semantics: for list, unset = most recent, "0" = any (the
  watch cache ignores ``limit``), N with ``limit`` = exact (410 when
  compacted), N without = not older than; for watch, unset/"0" = synthetic
  ADDED for the current state then changes, N = changes after N, or one
  ERROR event (410 Expired) when N is compacted.
* chunked watch streams of ``{"type": ..., "object": ...}`` lines (with
  ``trickle=N`` each line is cut into N-byte chunks written apart): ADDED,
  MODIFIED, DELETED, BOOKMARK (only with ``allowWatchBookmarks=true``),
  ERROR; an object leaving a label selector arrives as DELETED, one entering
  it as ADDED, as the watch cache does; ``timeoutSeconds`` ends the stream
  cleanly.
* ``Status`` bodies for errors, 404 ``NotFound`` for unknown paths, 405 for
  wrong methods, 401/403 for authentication and RBAC (when configured).
* field selectors per resource, as the server's version knows them
  (``minor=30``: Services have no ``spec.clusterIP`` / ``spec.type`` field
  selector yet, a 400 ``field label not supported`` as before 1.31).

Strict where a real server is lenient: unknown query parameters, or
parameters that do not belong to the request, are answered 400 *and*
recorded in :attr:`FakeAPIServer.violations`; leaving ``async with`` with
violations fails the test.  A client that invents resourceVersions (newer
than the server ever issued) is a violation too.

Test controls (all synchronous, call them from the test's event loop):
:meth:`apply` / :meth:`delete` write objects, :meth:`compact` expires old
revisions, :meth:`cut_watches` drops every open watch mid-stream,
:meth:`send_bookmarks`, :meth:`inject` queues error / slow / dropped
responses, :attr:`requests` logs every request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from .selectors import SelectorError, fields_match, labels_match, parse_field_selector, parse_label_selector
from .store import RESOURCES, Change, ResourceType, Store

LIST_PARAMS = frozenset(
    {"labelSelector", "fieldSelector", "watch", "allowWatchBookmarks", "resourceVersion",
     "resourceVersionMatch", "timeoutSeconds", "limit", "continue", "pretty", "sendInitialEvents"}
)
GET_PARAMS = frozenset({"pretty", "resourceVersion"})
CREATE_PARAMS = frozenset({"pretty", "dryRun", "fieldManager", "fieldValidation"})


class _Reject(Exception):
    """Answer the request with this Status."""

    def __init__(self, code: int, reason: str, message: str, violation: bool = False, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.violation = code, reason, message, violation
        self.extra = extra or {}
        self.headers = headers or {}


def status_body(code: int, reason: str, message: str, **extra: Any) -> dict:
    """A metav1.Status, as the API server encodes errors."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": extra.pop("metadata", {}), "status": "Failure",
            "message": message, "reason": reason, "details": extra.pop("details", {}), "code": code}
    return body


@dataclass
class Fault:
    """An injected misbehaviour for the next ``count`` matching requests."""

    status: int | None = 500  # 0: drop the connection without answering; None: only the delay
    path: str = ""  # substring of the request path that must match ("" = any)
    op: str = ""  # "list" | "watch" | "get" | "discovery" | "" (any)
    count: int = 1
    retry_after: int | None = None
    delay: float = 0.0  # seconds to wait before answering (a slow server)
    message: str = "injected failure"


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    op: str
    user: str = ""
    status: int = 0


@dataclass(eq=False)
class _Watcher:
    resource: ResourceType
    namespace: str
    labels: tuple
    fields: tuple
    bookmarks: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _encode_continue(rv: int, start: str) -> str:
    # Same shape as apiserver's storage continue token: opaque to clients.
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("version")
        return int(data["rv"]), str(data["start"])
    except Exception as e:
        raise _Reject(400, "BadRequest", f"continue key is not valid: {e}", violation=True) from None


def _bool_param(q: dict, name: str) -> bool:
    # Go's strconv.ParseBool, which the API server's parameter codec uses.
    v = q.get(name)
    if v is None:
        return False
    if v in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if v in ("", "0", "f", "F", "false", "FALSE", "False"):
        return False
    raise _Reject(400, "BadRequest", f"{name}: Invalid value: {v!r}: not a boolean", violation=True)


class FakeAPIServer:
    """A kube-apiserver stand-in on 127.0.0.1 (HTTP, or HTTPS with ``ssl_context``)."""

    def __init__(
        self,
        *,
        endpoint_slices: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        tokens: dict[str, str] | None = None,  # bearer token -> user name; None = no authentication
        rbac: dict[str, list[dict]] | None = None,  # user -> ClusterRole rules; None = allow everything
        bookmark_interval: float = 60.0,
        strict: bool = True,
        host: str = "127.0.0.1",
        expired_watch: str = "event",  # "event": 200 + ERROR event (watch cache); "http": a 410 response (etcd)
        minor: int = 32,  # the Kubernetes 1.x it behaves as (what field selectors it knows)
        trickle: int = 0,  # >0: write watch events this many bytes per chunk (a slow, fragmented stream)
    ) -> None:
        self.store = Store()
        self.endpoint_slices = endpoint_slices
        self.ssl_context = ssl_context
        self.tokens = tokens
        self.rbac = rbac
        self.bookmark_interval = bookmark_interval
        self.strict = strict
        self.host = host
        self.expired_watch = expired_watch
        self.minor = minor
        self.trickle = trickle
        self.port = 0
        self.requests: list[RequestRecord] = []
        self.violations: list[str] = []
        self.faults: list[Fault] = []
        self.created: list[dict] = []  # objects POSTed (events)
        # Called with each RequestRecord before it is answered: lets a test act
        # at an exact point of the protocol (e.g. compact between two pages).
        self.on_request: Any = None
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.store.listeners.append(self._fan_out)

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> FakeAPIServer:
        app = web.Application(client_max_size=4 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._closing = True
        for w in list(self._watchers):
            w.queue.put_nowait(("close", None))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAPIServer:
        return await self.start()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.stop()
        if exc_type is None and self.strict and self.violations:
            raise AssertionError("the client sent requests a real API server would reject:\n  " + "\n  ".join(self.violations))

    # ------------------------------------------------------------ test controls

    def resource(self, name: str, group: str | None = None) -> ResourceType:
        """Look a resource up by plural or kind ("services", "Service", "endpointslices")."""
        for r in RESOURCES:
            if name in (r.plural, r.kind) and (group is None or r.group == group):
                if group is None and r.plural == "events" and r.group:
                    continue  # "events" means core/v1 unless a group is given
                return r
        raise KeyError(name)

    def apply(self, obj: dict) -> dict:
        """Create or replace one object (no validation: bad objects are allowed on purpose)."""
        kind = obj.get("kind", "")
        group = (obj.get("apiVersion", "v1").rpartition("/")[0]) or ""
        resource = self.resource(kind, group)
        change = self.store.write(resource, obj, self.store.key_of(resource, {**obj, "metadata": {"namespace": "default", **obj.get("metadata", {})}}))
        assert change is not None
        return change.obj

    def apply_all(self, objs: Iterable[dict]) -> None:
        for obj in objs:
            self.apply(obj)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        resource = self.resource(kind)
        key = (namespace if resource.namespaced else "", name)
        return self.store.write(resource, None, key) is not None

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        resource = self.resource(kind)
        return self.store.get(resource, (namespace if resource.namespaced else "", name))

    def compact(self) -> None:
        """Expire every revision before now: watches resuming and continue tokens get 410."""
        self.store.compact()

    def cut_watches(self, partial: bool = True) -> int:
        """Drop every open watch connection, mid-event when ``partial``; returns how many."""
        n = 0
        for w in list(self._watchers):
            w.queue.put_nowait(("cut", partial))
            n += 1
        return n

    def send_bookmarks(self) -> None:
        for w in list(self._watchers):
            w.queue.put_nowait(("bookmark", None))

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def watching(self, plural: str) -> int:
        """How many watches of ``plural`` ("services") are open and receiving changes now."""
        return sum(1 for w in self._watchers if w.resource.plural == plural)

    def inject(self, **kw: Any) -> Fault:
        fault = Fault(**kw)
        self.faults.append(fault)
        return fault

    def requests_for(self, op: str = "", path: str = "") -> list[RequestRecord]:
        return [r for r in self.requests if (not op or r.op == op) and path in r.path]

    async def wait_for(self, pred, timeout: float = 20.0, what: str = "condition") -> None:
        """Poll ``pred()`` until true (event-driven tests still need a bounded wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------ plumbing

    def _fan_out(self, change: Change) -> None:
        for w in list(self._watchers):
            if w.resource == change.resource:
                w.queue.put_nowait(("change", change))

    def _violation(self, request: web.Request, message: str) -> None:
        self.violations.append(f"{request.method} {request.path_qs}: {message}")

    def _reply(self, code: int, body: dict, headers: dict | None = None) -> web.Response:
        return web.Response(status=code, text=json.dumps(body), content_type="application/json", headers=headers)

    def _authenticate(self, request: web.Request) -> str:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        if peercert:
            for rdn in peercert.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        return v
        if self.tokens is None:
            return "system:anonymous"
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:].strip() in self.tokens:
            return self.tokens[auth[7:].strip()]
        raise _Reject(401, "Unauthorized", "Unauthorized")

    def _authorize(self, user: str, verb: str, resource: ResourceType, namespace: str, name: str) -> None:
        if self.rbac is None:
            return
        for rule in self.rbac.get(user, []):
            if not ({"*", resource.group} & set(rule.get("apiGroups", []))):
                continue
            if not ({"*", resource.plural} & set(rule.get("resources", []))):
                continue
            if not ({"*", verb} & set(rule.get("verbs", []))):
                continue
            names = rule.get("resourceNames")
            if names and name not in names:
                continue
            return
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        raise _Reject(
            403, "Forbidden",
            f'{resource.plural} is forbidden: User "{user}" cannot {verb} resource "{resource.plural}" '
            f'in API group "{resource.group}" {scope}',
            extra={"details": {"group": resource.group, "kind": resource.plural}},
        )

    def _route(self, path: str) -> tuple[str, Any]:
        """Map a path to ("discovery", body) or ("resource", (rtype, namespace, name))."""
        parts = [p for p in path.split("/") if p]
        if parts == ["version"]:
            return "discovery", {"major": "1", "minor": "31", "gitVersion": "v1.31.0-kubelab-fakeapi", "platform": "linux/amd64"}
        if parts == ["api"]:
            return "discovery", {"kind": "APIVersions", "versions": ["v1"],
                                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]}
        if parts == ["apis"]:
            groups = sorted({r.group for r in RESOURCES if r.group and self._served(r)})
            return "discovery", {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]}
        if parts[:1] == ["api"]:
            group, rest = "", parts[1:]
        elif parts[:1] == ["apis"] and len(parts) >= 2:
            group, rest = parts[1], parts[2:]
        else:
            raise _Reject(404, "NotFound", "the server could not find the requested resource")
        if not any(r.group == group and self._served(r) for r in RESOURCES):
            raise _Reject(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            if group == "":
                raise _Reject(404, "NotFound", "the server could not find the requested resource")
            return "discovery", {"kind": "APIGroup", "apiVersion": "v1", "name": group,
                                 "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
                                 "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"}}
        version, rest = rest[0], rest[1:]
        served = [r for r in RESOURCES if r.group == group and r.version == version and self._served(r)]
        if not served:
            raise _Reject(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return "discovery", {"kind": "APIResourceList", "apiVersion": "v1",
                                 "groupVersion": served[0].api_version, "resources": [
                                     {"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
                                      "kind": r.kind, "verbs": list(r.verbs)} for r in served]}
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 2:
            raise _Reject(404, "NotFound", "the server could not find the requested resource")
        for r in served:
            if r.plural == rest[0] and (r.namespaced or not namespace):
                return "resource", (r, namespace, rest[1] if len(rest) == 2 else "")
        raise _Reject(404, "NotFound", "the server could not find the requested resource")

    def _served(self, r: ResourceType) -> bool:
        return self.endpoint_slices or r.group != "discovery.k8s.io"

    def _take_fault(self, op: str, path: str) -> Fault | None:
        for f in self.faults:
            if f.count > 0 and (not f.op or f.op == op) and f.path in path:
                f.count -= 1
                if f.count == 0:
                    self.faults.remove(f)
                return f
        return None

    # ------------------------------------------------------------ requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query_pairs = parse_qsl(request.query_string, keep_blank_values=True)
        query = dict(query_pairs)
        record = RequestRecord(request.method, request.path, query, "")
        self.requests.append(record)
        try:
            if len(query) != len(query_pairs):
                raise _Reject(400, "BadRequest", "a query parameter was given twice", violation=True)
            kind, target = self._route(request.path)
            if kind == "discovery":
                record.op = "discovery"
            else:
                rtype, namespace, name = target
                record.op = ("watch" if _bool_param(query, "watch") else "list") if request.method == "GET" and not name else (
                    "get" if request.method == "GET" else "create" if request.method == "POST" else request.method.lower())
            accept = request.headers.get("Accept", "*/*")
            if not any(a in accept for a in ("application/json", "*/*", "application/*")):
                raise _Reject(406, "NotAcceptable", f"only the following media types are accepted: application/json (got {accept!r})", violation=True)
            if self.on_request is not None:
                self.on_request(record)
            fault = self._take_fault(record.op, request.path)
            if fault is not None:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status == 0:
                    record.status = 0
                    request.transport.abort()  # type: ignore[union-attr]
                    return web.Response()  # never sent: the connection is gone
                if fault.status:
                    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
                    reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}.get(fault.status, "Unknown")
                    raise _Reject(fault.status, reason, fault.message, headers=headers)
            user = self._authenticate(request)
            record.user = user
            if kind == "discovery":
                if request.method != "GET":
                    raise _Reject(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource", violation=True)
                self._check_params(query, frozenset({"pretty", "timeout"}), request)
                record.status = 200
                return self._reply(200, target)
            rtype, namespace, name = target
            if request.method == "GET" and not name:
                self._check_params(query, LIST_PARAMS, request)
                self._authorize(user, record.op, rtype, namespace, name)
                if record.op == "watch":
                    record.status = 200
                    return await self._watch(request, rtype, namespace, query)
                record.status = 200
                return self._list(rtype, namespace, query)
            if request.method == "GET":
                self._check_params(query, GET_PARAMS, request)
                self._authorize(user, "get", rtype, namespace, name)
                obj = self.store.get(rtype, (namespace, name))
                if obj is None:
                    raise _Reject(404, "NotFound", f'{rtype.plural} "{name}" not found',
                                  extra={"details": {"name": name, "kind": rtype.plural}})
                record.status = 200
                return self._reply(200, obj)
            if request.method == "POST" and not name and namespace and "create" in rtype.verbs:
                self._check_params(query, CREATE_PARAMS, request)
                self._authorize(user, "create", rtype, namespace, name)
                return await self._create(request, rtype, namespace, record)
            raise _Reject(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", violation=True)
        except _Reject as r:
            if r.violation:
                self._violation(request, r.message)
            record.status = r.code
            return self._reply(r.code, status_body(r.code, r.reason, r.message, **r.extra), r.headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug in this test server must fail the test, not pass silently
            self.violations.append(f"test server error on {request.method} {request.path_qs}: {e!r}")
            raise

    def _check_params(self, query: dict, allowed: frozenset[str], request: web.Request) -> None:
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise _Reject(400, "BadRequest", f"unknown query parameter(s) {', '.join(unknown)}", violation=True)

    async def _create(self, request: web.Request, rtype: ResourceType, namespace: str, record: RequestRecord) -> web.Response:
        try:
            body = await request.json()
        except Exception:
            raise _Reject(400, "BadRequest", "the request body is not JSON", violation=True) from None
        if body.get("kind") != rtype.kind or body.get("apiVersion") != rtype.api_version:
            raise _Reject(400, "BadRequest", f"the body is {body.get('apiVersion')}/{body.get('kind')}, the path wants {rtype.api_version}/{rtype.kind}", violation=True)
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", namespace) != namespace:
            raise _Reject(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request", violation=True)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
        if not meta.get("name"):
            raise _Reject(422, "Invalid", f"{rtype.kind} is invalid: metadata.name: Required value", violation=True)
        meta["namespace"] = namespace
        if self.store.get(rtype, (namespace, meta["name"])) is not None:
            raise _Reject(409, "AlreadyExists", f'{rtype.plural} "{meta["name"]}" already exists')
        change = self.store.write(rtype, body, (namespace, meta["name"]))
        assert change is not None
        self.created.append(change.obj)
        record.status = 201
        return self._reply(201, change.obj)

    def _selectors(self, rtype: ResourceType, query: dict) -> tuple[tuple, tuple]:
        supported = rtype.field_labels
        newer = frozenset()
        if self.minor < 31 and rtype.plural == "services":
            # spec.clusterIP and spec.type became field selectors in 1.31 (kubernetes PR #123905).
            newer = frozenset({"spec.clusterIP", "spec.type"})
            supported = supported - newer
        try:
            labels = parse_label_selector(query.get("labelSelector", ""))
            fields = parse_field_selector(query.get("fieldSelector", ""), supported)
        except SelectorError as e:
            # A field a newer server knows is this server's limit, not the client's mistake.
            known_later = any(str(e).endswith(f": {f}") for f in newer)
            raise _Reject(400, "BadRequest", str(e), violation=not known_later) from None
        return labels, fields

    def _parse_rv(self, value: str) -> int:
        try:
            rv = int(value)
            if rv < 0:
                raise ValueError
        except ValueError:
            raise _Reject(400, "BadRequest", f"resourceVersion: Invalid value: {value!r}: must be a non-negative integer",
                          violation=True) from None
        if rv > self.store.rv:
            # The client invented a revision: a real server would wait for it, then time out.
            raise _Reject(504, "Timeout", f"Too large resource version: {rv}, current: {self.store.rv}", violation=True,
                          extra={"details": {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}})
        return rv

    def _matches(self, obj: dict, namespace: str, labels: tuple, fields: tuple) -> bool:
        meta = obj.get("metadata") or {}
        if namespace and meta.get("namespace") != namespace:
            return False
        return labels_match(labels, meta.get("labels") or {}) and fields_match(fields, obj)

    @staticmethod
    def _list_item(obj: dict) -> dict:
        # Items of a typed list carry no kind/apiVersion on the wire.
        return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}

    def _list(self, rtype: ResourceType, namespace: str, query: dict) -> web.Response:
        for p in ("allowWatchBookmarks", "sendInitialEvents"):
            if p in query:
                raise _Reject(400, "BadRequest", f"{p} is only valid for watch requests", violation=True)
        labels, fields = self._selectors(rtype, query)
        rv_param = query.get("resourceVersion")
        match = query.get("resourceVersionMatch", "")
        cont = query.get("continue", "")
        limit_s = query.get("limit")
        try:
            limit = int(limit_s) if limit_s not in (None, "") else 0
            if limit < 0:
                raise ValueError
        except ValueError:
            raise _Reject(400, "BadRequest", f"limit: Invalid value: {limit_s!r}", violation=True) from None
        if match:
            if match not in ("NotOlderThan", "Exact"):
                raise _Reject(400, "BadRequest", f'resourceVersionMatch: Unsupported value: "{match}": supported values: "Exact", "NotOlderThan"', violation=True)
            if not rv_param:
                raise _Reject(400, "BadRequest", "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided", violation=True)
            if cont:
                raise _Reject(400, "BadRequest", "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is provided", violation=True)
            if match == "Exact" and rv_param == "0":
                raise _Reject(400, "BadRequest", 'resourceVersionMatch: Forbidden: resourceVersionMatch "exact" is forbidden for resourceVersion "0"', violation=True)
        if cont and rv_param not in (None, "", "0"):
            raise _Reject(400, "BadRequest", "specifying resource version is not allowed when using continue", violation=True)

        start = ""
        if cont:
            at, start = _decode_continue(cont)
            if at < self.store.compacted:
                fresh = _encode_continue(self.store.rv, start)
                raise _Reject(
                    410, "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new "
                    "list without the continue parameter, or use the continue token in this response to retrieve the "
                    "remainder of the results. Continuing with the provided token results in an inconsistent list - "
                    "objects that were created, modified, or deleted between the time the first chunk was returned and "
                    "now may show up in the list.",
                    extra={"metadata": {"continue": fresh}},
                )
        elif rv_param in (None, ""):
            at = self.store.rv  # most recent (a consistent read)
        elif rv_param == "0":
            at, limit = self.store.rv, 0  # any; the watch cache ignores limit
        else:
            rv = self._parse_rv(rv_param)
            exact = match == "Exact" or (limit and not match)
            if exact:
                if rv < self.store.compacted:
                    raise _Reject(410, "Expired", f"too old resource version: {rv} ({self.store.compacted})")
                at = rv
            else:
                at = self.store.rv  # not older than rv: the newest data will do

        after = tuple(start.split("/", 1)) if start else None
        items: list[dict] = []
        next_key, remaining = "", 0
        rest = self.store.snapshot(rtype, at, after)  # type: ignore[arg-type]
        for _, obj in rest:
            if not self._matches(obj, namespace, labels, fields):
                continue
            if limit and len(items) == limit:
                # One more match exists: this page ends here, with a continue token.
                last = items[-1]["metadata"]
                next_key = f"{last.get('namespace', '')}/{last['name']}"
                remaining = 1 + sum(1 for _, o in rest if self._matches(o, namespace, labels, fields))
                break
            items.append(obj)
        meta: dict[str, Any] = {"resourceVersion": str(at)}
        if next_key:
            meta["continue"] = _encode_continue(at, next_key)
            if not labels and not fields:
                meta["remainingItemCount"] = remaining  # upstream omits it when a selector filtered the list
        body = {"kind": rtype.list_kind, "apiVersion": rtype.api_version, "metadata": meta,
                "items": [self._list_item(o) for o in items]}
        return self._reply(200, body)

    async def _watch(self, request: web.Request, rtype: ResourceType, namespace: str, query: dict) -> web.StreamResponse:
        if query.get("continue"):
            raise _Reject(400, "BadRequest", "continue is not supported for watch requests", violation=True)
        if query.get("limit"):
            raise _Reject(400, "BadRequest", "limit is not supported for watch requests", violation=True)
        if query.get("resourceVersionMatch") and not _bool_param(query, "sendInitialEvents"):
            raise _Reject(400, "BadRequest", "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided", violation=True)
        if "sendInitialEvents" in query:
            raise _Reject(400, "BadRequest", "sendInitialEvents (streaming lists) is not implemented by this test server", violation=True)
        bookmarks = _bool_param(query, "allowWatchBookmarks")
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else 1800.0 * (1 + random.random())
        except ValueError:
            raise _Reject(400, "BadRequest", f"timeoutSeconds: Invalid value: {query['timeoutSeconds']!r}", violation=True) from None
        labels, fields = self._selectors(rtype, query)
        rv_param = query.get("resourceVersion", "")

        # Decide the start and register the watcher with no await in between,
        # so no change can fall between the replay and the live stream.
        initial: list[dict] = []
        replay: list[Change] = []
        error: dict | None = None
        if rv_param in ("", "0"):
            initial = [o for _, o in self.store.snapshot(rtype) if self._matches(o, namespace, labels, fields)]
        else:
            rv = self._parse_rv(rv_param)
            if rv < self.store.compacted:
                msg = f"too old resource version: {rv} ({self.store.compacted})"
                if self.expired_watch == "http":
                    raise _Reject(410, "Expired", msg)
                error = status_body(410, "Expired", msg)
            else:
                replay = self.store.changes_since(rtype, rv)
        watcher = _Watcher(rtype, namespace, labels, fields, bookmarks)
        if error is None:
            self._watchers.add(watcher)

        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            if error is not None:
                # As the watch cache does: the watch is accepted, then one ERROR event.
                await resp.write(self._event_line("ERROR", error))
                await resp.write_eof()
                return resp
            for obj in initial:
                await self._send(resp, self._event_line("ADDED", obj))
            for change in replay:
                line = self._change_line(watcher, change)
                if line:
                    await self._send(resp, line)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wait = min(deadline, next_bookmark) - now if bookmarks else deadline - now
                try:
                    what, arg = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.001))
                except asyncio.TimeoutError:
                    if bookmarks and loop.time() >= next_bookmark:
                        await self._send(resp, self._bookmark_line(rtype))
                        next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if what == "close":
                    break
                if what == "cut":
                    if arg:
                        await resp.write(b'{"type":"MODIFIED","object":{"kind":"' + rtype.kind.encode())
                    request.transport.abort()  # type: ignore[union-attr]
                    return resp
                if what == "bookmark":
                    if bookmarks:
                        await self._send(resp, self._bookmark_line(rtype))
                    continue
                line = self._change_line(watcher, arg)
                if line:
                    await self._send(resp, line)
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await resp.write_eof()
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self._watchers.discard(watcher)

    async def _send(self, resp: web.StreamResponse, line: bytes) -> None:
        """Write one watch event: whole, or ``trickle`` bytes per HTTP chunk with a pause between."""
        if not self.trickle:
            await resp.write(line)
            return
        for i in range(0, len(line), self.trickle):
            await resp.write(line[i:i + self.trickle])
            await asyncio.sleep(0.001)

    @staticmethod
    def _event_line(type_: str, obj: dict) -> bytes:
        return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"

    def _bookmark_line(self, rtype: ResourceType) -> bytes:
        obj = {"kind": rtype.kind, "apiVersion": rtype.api_version,
               "metadata": {"resourceVersion": str(self.store.rv), "creationTimestamp": None}}
        return self._event_line("BOOKMARK", obj)

    def _change_line(self, w: _Watcher, change: Change) -> bytes | None:
        """The event a watcher with selectors sees for one change (None: it sees nothing)."""
        new_ok = change.type != "DELETED" and self._matches(change.obj, w.namespace, w.labels, w.fields)
        old_ok = change.old is not None and self._matches(change.old, w.namespace, w.labels, w.fields)
        if change.type == "DELETED":
            return self._event_line("DELETED", change.obj) if old_ok else None
        if new_ok and old_ok:
            return self._event_line("MODIFIED", change.obj)
        if new_ok:
            return self._event_line("ADDED", change.obj)
        if old_ok:
            # Left the selector: the watch cache sends the previous state, at this revision.
            gone = json.loads(json.dumps(change.old))
            gone["metadata"]["resourceVersion"] = str(change.rv)
            return self._event_line("DELETED", gone)
        return None
