"""The Kubernetes API source: list, then watch, Services, EndpointSlices, Pods and this Node.

What kube-proxy's informers do (client-go's Reflector), for kubelab's
:class:`~kubelab.proxy.provider.Provider` handlers:

* **List then watch** each resource.  Lists are paginated (``limit`` =
  ``page_size``, following ``continue``); when a continue token has expired
  (410) the list starts over as one unpaginated list, as client-go's pager
  does (``FullListIfExpired``).  A watch resumes from the last
  resourceVersion seen -- of an event or a BOOKMARK (``allowWatchBookmarks=true``)
  -- and asks the server to end it after a random 5-10 minutes
  (``timeoutSeconds``, client-go's ``minWatchTimeout``), then re-watches.
* **410 Gone (Expired)** on a watch means the server no longer has the
  history to resume from: relist, and compute what the relist implies --
  objects we had that the new list lacks are *deleted*, changed ones
  *updated*, new ones *added*.  Handlers see ordinary events.
* **Errors and disconnects** (connection refused or reset, a stream cut
  mid-event, 5xx, 429 with ``Retry-After``, timeouts): back off
  exponentially with jitter (client-go's reflector: 0.8 s doubling to 30 s,
  jitter 1.0, reset after 2 min without trouble) and try again from the
  last resourceVersion.  Meanwhile nothing is delivered, so the dataplane
  stays exactly as it was programmed.  A half-received event is dropped
  and re-read after the reconnect, so nothing is lost or delivered twice.
* **Initial sync barrier**: ``on_services_synced`` /
  ``on_endpoint_slices_synced`` (and pods / nodes) fire once, after the
  first complete list has been delivered -- the controller programs nothing
  before both (kube-proxy's ``WaitForCacheSync``).
* **Selectors**: for the proxy, kube-proxy's (cmd/kube-proxy/app/server.go,
  since Kubernetes 1.32): Services with the label selector
  ``!service.kubernetes.io/service-proxy-name`` (another proxy's Services)
  and the field selector ``spec.clusterIP!=None`` (headless Services: DNS
  serves them, no proxy does); EndpointSlices with
  ``!service.kubernetes.io/headless`` (the label the EndpointSlice
  controller puts on a headless Service's slices -- Services themselves never
  carry it).  API servers before 1.31 do not know the ``spec.clusterIP``
  field selector (400 "field label not supported"): then Services are
  listed without it, and the change tracker skips headless ones as
  kube-proxy's ``ShouldSkipService`` does.  Its own Node with the field
  selector ``metadata.name=<node>``.  DNS wants every Service and
  EndpointSlice, headless ones above all, and Pods.
* **EndpointSlices, or Endpoints**: discovery.k8s.io/v1 EndpointSlices are
  used whenever the server serves them (discovery: ``GET
  /apis/discovery.k8s.io/v1``); only where that API is absent (404) does the
  source fall back to core/v1 Endpoints, which
  :func:`kubelab.proxy.objects.parse_object` turns into EndpointSlices.
* **Bad objects** from the server are handled as the files source handles
  bad manifests: :func:`~kubelab.proxy.objects.parse_object` raises
  :class:`~kubelab.proxy.objects.ObjectError` naming the object and field,
  the error is logged (and kept in :attr:`KubeSource.errors`), the last good
  version of that object stays in force, and every other object flows.

Client library: **kubernetes_asyncio**.  It and the official client's
``kubernetes.aio`` (37.x) are the same generated code and the same watch
helper (DESIGN.md: both do bookmarks and resourceVersion; both surface 410),
so the choice is about weight: kubernetes_asyncio is already our dependency
on aiohttp alone, while ``kubernetes`` 37 pulls in pydantic >= 2.14,
urllib3 >= 2.8, requests, websocket-client and aiohttp-retry on top of the
synchronous client.  We use the library for what is hard to get right --
kubeconfig contexts, client certificates, tokens and token files, exec
credential plugins, in-cluster service-account config with token rotation,
TLS, the generated list/watch calls and their parameter names -- and not
its ``Watch`` helper nor its model classes: ``Watch`` retries a 410 once by
itself and re-watches from an RV that is gone, reads events with
``readline()`` (aiohttp refuses a line over its buffer size: an
EndpointSlice with a thousand endpoints), and deserialising into model
classes costs 3.5-25x a plain ``json.loads`` of the same 10,000-Service list
(medians of four runs on a loaded machine), and still 1.5-2.8x json plus our
own validating parser (``bench/kube_api_decode.py``, BENCHMARKS.md); our
objects module parses plain dicts anyway.

How the commands use it (``kubelab proxy`` and ``kubelab dns`` with
``--kubeconfig FILE`` or ``--in-cluster``)::

    from kubelab.proxy.sources import kube
    config = kube.KubeSourceConfig.for_proxy(kubeconfig=args.kubeconfig, in_cluster=args.in_cluster,
                                             node_name=node_name)            # or .for_dns(...)
    source = kube.KubeSource(config, [controller], logger)
    await source.connect()     # optional: fails fast with KubeConfigError on a bad kubeconfig
    await source.run()         # runs until cancelled; transient API trouble never ends it

``KubeSource(kubeconfig=..., in_cluster=..., handlers=..., logger=...)`` (no
config object) builds a proxy-purpose config, for callers that have only
those two flags.  ``add_arguments(parser)`` / ``config_from_args(args,
purpose=...)`` add and read ``--kubeconfig``, ``--context``, ``--master`` and
``--in-cluster`` for commands that do not define them themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from kubelab.model import LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, KubeObject, Origin
from kubelab.proxy.provider import Provider

# kube-proxy's informer selectors (cmd/kube-proxy/app/server.go).  Services
# that ask for another proxy are not its business, nor headless Services
# (server-side since kubernetes PR #126769, 1.32, on the spec.clusterIP field
# selector of PR #123905, 1.31); a headless Service's EndpointSlices are
# labelled service.kubernetes.io/headless by the EndpointSlice controller.
# (Before 1.32 kube-proxy sent both labels to both kinds.  Now the slices of
# another proxy's Service do arrive, and come to nothing without their Service.)
PROXY_SERVICE_LABEL_SELECTOR = f"!{LABEL_SERVICE_PROXY_NAME}"
PROXY_SERVICE_FIELD_SELECTOR = "spec.clusterIP!=None"
PROXY_ENDPOINTS_LABEL_SELECTOR = f"!{LABEL_HEADLESS}"

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# A watch event bigger than this is refused (etcd's own limit is 1.5 MiB per object).
MAX_EVENT_BYTES = 64 * 2**20

# A kubeconfig's tokenFile is read again this often (client-go's cached file
# token source re-reads it every minute), and at once after a 401: the kubelet
# rotates projected service-account tokens in place.
TOKEN_FILE_REREAD = 60.0


class KubeConfigError(Exception):
    """The API server cannot be reached as configured (a bad kubeconfig, missing in-cluster files, ...)."""


class APIStatusError(Exception):
    """A non-2xx answer, or an ERROR watch event, carrying the server's metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None, what: str = "") -> None:
        self.code, self.reason, self.message, self.retry_after = code, reason, message, retry_after
        super().__init__(f"{what}: {code} {reason}: {message}" if what else f"{code} {reason}: {message}")

    @property
    def expired(self) -> bool:
        # 410 Gone: reason Expired (current servers) or Gone (old ones).
        return self.code == 410


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeSourceConfig:
    """How to reach the API server and what to watch."""

    kubeconfig: str | None = None  # a kubeconfig file (its current context unless ``context``)
    context: str | None = None
    in_cluster: bool = False  # the pod's service account (token + CA) and KUBERNETES_SERVICE_HOST/PORT
    master: str | None = None  # kube-proxy's --master: overrides the server address
    purpose: str = "proxy"  # "proxy": kube-proxy's selectors; "dns": everything, and Pods
    node_name: str = ""  # watch this Node (field selector metadata.name=...); "" = no Node
    services: bool = True
    endpoint_slices: bool = True
    pods: bool = False
    page_size: int = 500  # client-go's pager default
    min_watch_timeout: float = 300.0  # watches last a random [t, 2t] (client-go: 5 min)
    request_timeout: float = 60.0  # connect, and each read of a list
    backoff_initial: float = 0.8  # client-go reflector: 800ms, x2, capped at 30s, jitter 1.0, reset after 2min
    backoff_max: float = 30.0
    backoff_factor: float = 2.0
    backoff_jitter: float = 1.0
    backoff_reset: float = 120.0
    service_account_dir: str = SERVICE_ACCOUNT_DIR  # where --in-cluster finds token and ca.crt
    user_agent: str = ""

    @classmethod
    def for_proxy(cls, **kw: Any) -> KubeSourceConfig:
        """kube-proxy's view: filtered Services and EndpointSlices, and this Node when ``node_name`` is given."""
        return cls(purpose="proxy", **kw)

    @classmethod
    def for_dns(cls, **kw: Any) -> KubeSourceConfig:
        """The DNS view: every Service and EndpointSlice (headless ones too), and Pods."""
        kw.setdefault("pods", True)
        return cls(purpose="dns", **kw)

    @property
    def service_selectors(self) -> tuple[str, str]:
        """(label, field) selectors for Services: kube-proxy's for the proxy, none for DNS."""
        if self.purpose == "proxy":
            return PROXY_SERVICE_LABEL_SELECTOR, PROXY_SERVICE_FIELD_SELECTOR
        return "", ""

    @property
    def endpoints_label_selector(self) -> str:
        """The label selector for EndpointSlices (and core/v1 Endpoints): no headless ones for the proxy."""
        return PROXY_ENDPOINTS_LABEL_SELECTOR if self.purpose == "proxy" else ""

    def validate(self) -> None:
        """Raise KubeConfigError for settings that cannot work, naming the flag."""
        if self.purpose not in ("proxy", "dns"):
            raise KubeConfigError(f"purpose must be 'proxy' or 'dns', not {self.purpose!r}")
        if self.in_cluster and self.kubeconfig:
            raise KubeConfigError("give either --kubeconfig FILE or --in-cluster, not both")
        if not (self.in_cluster or self.kubeconfig or self.master):
            raise KubeConfigError("no API server: give --kubeconfig FILE, --in-cluster (inside a pod) or --master URL")
        if self.kubeconfig and not os.path.isfile(self.kubeconfig):
            raise KubeConfigError(f"--kubeconfig {self.kubeconfig}: no such file; give the path of a kubeconfig "
                                  "(kubectl config view --raw > FILE writes one)")
        if self.page_size < 0:
            raise KubeConfigError(f"page size must be >= 0 (0 = no pagination), not {self.page_size}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --kubeconfig, --context, --master and --in-cluster (for commands that do not have them)."""
    g = parser.add_argument_group("API server (instead of manifest files)")
    g.add_argument("--kubeconfig", metavar="FILE", help="watch the API server of this kubeconfig (its current context)")
    g.add_argument("--context", metavar="NAME", help="the kubeconfig context to use instead of the current one")
    g.add_argument("--master", metavar="URL", help="the API server's address, overriding the kubeconfig's")
    g.add_argument("--in-cluster", action="store_true",
                   help="inside a pod: use the service account token and CA and KUBERNETES_SERVICE_HOST/PORT")


def config_from_args(args: argparse.Namespace, *, purpose: str = "proxy", node_name: str = "") -> KubeSourceConfig | None:
    """The source config the flags ask for, or None when no API server flag was given."""
    kubeconfig = getattr(args, "kubeconfig", None)
    in_cluster = bool(getattr(args, "in_cluster", False))
    master = getattr(args, "master", None)
    if not (kubeconfig or in_cluster or master):
        return None
    make = KubeSourceConfig.for_dns if purpose == "dns" else KubeSourceConfig.for_proxy
    return make(kubeconfig=kubeconfig, in_cluster=in_cluster, master=master,
                context=getattr(args, "context", None), node_name=node_name)


# --------------------------------------------------------------------------
# dependencies and back-off
# --------------------------------------------------------------------------


def _default_parse(d: dict, origin: Origin) -> KubeObject:
    from kubelab.proxy.objects import parse_object

    return parse_object(d, origin)


def _object_error_types() -> tuple[type[BaseException], ...]:
    from kubelab.proxy.objects import ObjectError

    return (ObjectError,)


@dataclass
class KubeSourceDeps:
    """What the source is built from besides its config; tests replace parts."""

    parse: Callable[[dict, Origin], KubeObject] = _default_parse
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Any] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    environ: Mapping[str, str] | None = None  # for --in-cluster; None = os.environ


class Backoff:
    """client-go's exponential back-off manager: jittered, capped, reset after a quiet spell."""

    def __init__(self, initial: float, cap: float, factor: float, jitter: float, reset_after: float,
                 clock: Callable[[], float], rng: random.Random) -> None:
        self.initial, self.cap, self.factor, self.jitter, self.reset_after = initial, cap, factor, jitter, reset_after
        self.clock, self.rng = clock, rng
        self._current = 0.0
        self._last = -float("inf")

    def next(self) -> float:
        """The next delay: initial, then x factor up to cap, each plus up to jitter x itself."""
        now = self.clock()
        if self._current == 0.0 or now - self._last > self.reset_after:
            self._current = self.initial
        else:
            self._current = min(self._current * self.factor, self.cap)
        self._last = now
        return self._current + self.rng.random() * self.jitter * self._current


# --------------------------------------------------------------------------
# what is watched
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchedResource:
    """One resource a reflector lists and watches, and the handler methods its objects go to."""

    name: str  # plural, as in the URL: "services"
    kind: str  # the kind of its objects on the wire: "Service"
    api_version: str
    api_class: str  # kubernetes_asyncio.client class: "CoreV1Api"
    list_method: str  # its list-all-namespaces method
    handler: str  # "service" -> on_service_add / on_service_update / on_service_delete
    synced: str  # "on_services_synced"
    label_selector: str = ""
    field_selector: str = ""
    # The field selector is an optimisation an older server may not know (400
    # "field label not supported"): then list and watch without it.
    field_selector_optional: bool = False
    path: str = ""  # for messages: "/api/v1/services"


def _resources(config: KubeSourceConfig, slices_served: bool | None) -> list[WatchedResource]:
    out = []
    svc_labels, svc_fields = config.service_selectors
    sel = config.endpoints_label_selector
    if config.services:
        out.append(WatchedResource("services", "Service", "v1", "CoreV1Api", "list_service_for_all_namespaces",
                                   "service", "on_services_synced", svc_labels, svc_fields,
                                   field_selector_optional=True, path="/api/v1/services"))
    if config.endpoint_slices and slices_served is not None:
        if slices_served:
            out.append(WatchedResource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", "DiscoveryV1Api",
                                       "list_endpoint_slice_for_all_namespaces", "endpoint_slice",
                                       "on_endpoint_slices_synced", sel, path="/apis/discovery.k8s.io/v1/endpointslices"))
        else:
            out.append(WatchedResource("endpoints", "Endpoints", "v1", "CoreV1Api", "list_endpoints_for_all_namespaces",
                                       "endpoint_slice", "on_endpoint_slices_synced", sel, path="/api/v1/endpoints"))
    if config.pods:
        out.append(WatchedResource("pods", "Pod", "v1", "CoreV1Api", "list_pod_for_all_namespaces", "pod",
                                   "on_pods_synced", path="/api/v1/pods"))
    if config.node_name:
        out.append(WatchedResource("nodes", "Node", "v1", "CoreV1Api", "list_node", "node", "on_nodes_synced",
                                   field_selector=f"metadata.name={config.node_name}", path="/api/v1/nodes"))
    return out


# --------------------------------------------------------------------------
# the source
# --------------------------------------------------------------------------


class KubeSource:
    """Feeds handlers from an API server, like kube-proxy's informers.  ``run()`` does the work."""

    def __init__(
        self,
        config: KubeSourceConfig | None = None,
        handlers: Sequence[Provider] = (),
        logger: logging.Logger | None = None,
        *,
        kubeconfig: str | None = None,
        in_cluster: bool = False,
        node_name: str = "",
        deps: KubeSourceDeps | None = None,
    ) -> None:
        if isinstance(handlers, Provider):
            handlers = [handlers]
        if isinstance(config, str):
            # KubeSource("path/to/kubeconfig", ...): the DNS responder's early call.
            kubeconfig, config = config, None
            if any(type(h).__module__.startswith("kubelab.dns") for h in handlers):
                config = KubeSourceConfig.for_dns(kubeconfig=kubeconfig)
        if config is None:
            config = KubeSourceConfig.for_proxy(kubeconfig=kubeconfig, in_cluster=in_cluster, node_name=node_name)
        self.config = config
        self.handlers = list(handlers)
        self.log = logger or logging.getLogger("kubelab.kube")
        self.deps = deps or KubeSourceDeps()
        self.api: Any = None  # kubernetes_asyncio ApiClient, made by connect()
        self.server = ""
        self._loader: Any = None  # the kubeconfig loader (exec plugins, tokenFile)
        self._incluster: Any = None  # the in-cluster loader (re-reads the service-account token)
        self._token_read = 0.0  # when the kubeconfig's tokenFile was last read
        self._configuration: Any = None
        self.reflectors: dict[str, Reflector] = {}
        self.endpoint_slices_served: bool | None = None  # learned by discovery

    # ------------------------------------------------------------ state for callers

    @property
    def synced(self) -> bool:
        """True once every watched resource has delivered its first complete list."""
        return bool(self.reflectors) and all(r.synced for r in self.reflectors.values()) and (
            not self.config.endpoint_slices or self.endpoint_slices_served is not None)

    @property
    def errors(self) -> dict[str, str]:
        """Objects whose current version on the server is invalid: "Kind ns/name" -> error."""
        out: dict[str, str] = {}
        for r in self.reflectors.values():
            out.update(r.errors)
        return out

    # ------------------------------------------------------------ connecting

    async def connect(self) -> None:
        """Load credentials and build the client; raise KubeConfigError with how to fix it."""
        if self.api is not None:
            return
        self.config.validate()
        try:
            from kubernetes_asyncio import client as kclient
            from kubernetes_asyncio import config as kconfig
            from kubernetes_asyncio.config.config_exception import ConfigException
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise KubeConfigError(f"kubernetes_asyncio is not installed ({e}); pip install kubernetes_asyncio") from None
        configuration = type.__call__(kclient.Configuration)  # a fresh one, not a copy of the global default
        try:
            if self.config.in_cluster:
                sa = self.config.service_account_dir
                env = self.deps.environ if self.deps.environ is not None else os.environ
                self._incluster = kconfig.incluster_config.InClusterConfigLoader(
                    token_filename=os.path.join(sa, "token"), cert_filename=os.path.join(sa, "ca.crt"),
                    try_refresh_token=True, environ=env,
                )
                self._incluster.load_and_set(configuration)
                configuration.refresh_api_key_hook = _stripping(configuration.refresh_api_key_hook)
            elif self.config.kubeconfig:
                self._loader = await kconfig.load_kube_config(
                    config_file=self.config.kubeconfig, context=self.config.context,
                    client_configuration=configuration, persist_config=False,
                )
        except ConfigException as e:
            where = (f"--in-cluster ({self.config.service_account_dir}, KUBERNETES_SERVICE_HOST/PORT)"
                     if self.config.in_cluster else f"--kubeconfig {self.config.kubeconfig}")
            raise KubeConfigError(f"{where}: {e}") from None
        except (OSError, KeyError, ValueError, TypeError, AssertionError, yaml.YAMLError) as e:
            ctx = f" (context {self.config.context!r})" if self.config.context else ""
            raise KubeConfigError(
                f"--kubeconfig {self.config.kubeconfig}{ctx}: cannot use it: {type(e).__name__}: {e}; "
                "check it with: kubectl --kubeconfig FILE config view"
            ) from None
        if self.config.master:
            configuration.host = self.config.master.rstrip("/")
        if not configuration.host or configuration.host == "http://localhost":
            raise KubeConfigError("the kubeconfig names no server; add clusters[].cluster.server or pass --master URL")
        self._configuration = configuration
        if "tokenFile" in (getattr(self._loader, "_user", None) or {}):
            # Read it ourselves from the start: the library keeps a trailing
            # newline, which aiohttp refuses in a header.
            self._read_token_file(self._loader._user["tokenFile"])
        self.server = configuration.host
        api = kclient.ApiClient(configuration)
        from kubelab import __version__

        api.user_agent = self.config.user_agent or f"kubelab/{__version__} ({self.config.purpose})"
        self.api = api

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
            self.api = None

    async def refresh_credentials(self, force: bool = False) -> None:
        """Keep rotating credentials fresh; ``force`` after a 401 (the token we hold was refused).

        An exec credential plugin runs again when its token expired; a
        kubeconfig ``tokenFile`` is re-read every minute; the in-cluster
        service-account token is re-read by the library every minute, and at
        once after a 401.
        """
        if self._incluster is not None:
            if force:
                self._incluster.token_expires_at = datetime.datetime.min  # its request hook re-reads the file
            return
        loader = self._loader
        user = (getattr(loader, "_user", None) or {}) if loader is not None else {}
        if "exec" in user:
            if force and hasattr(loader, "exec_plugin_expiry"):
                del loader.exec_plugin_expiry
            if force or hasattr(loader, "exec_plugin_expiry"):
                await loader.load_from_exec_plugin()  # a no-op until the expiry passes
                if getattr(loader, "token", None):
                    self._configuration.api_key["BearerToken"] = loader.token
        elif "tokenFile" in user and (force or self.deps.clock() - self._token_read >= TOKEN_FILE_REREAD):
            self._read_token_file(user["tokenFile"])

    def _read_token_file(self, name: Any) -> None:
        """(Re-)read the kubeconfig user's tokenFile (relative to the kubeconfig), whitespace trimmed as client-go."""
        self._token_read = self.deps.clock()
        path = os.path.join(os.path.dirname(os.path.abspath(self.config.kubeconfig or ".")), str(name))
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as e:
            self.log.warning("--kubeconfig %s: cannot read tokenFile %s: %s; keeping the last token",
                             self.config.kubeconfig, path, e)
            return
        if token:
            self._configuration.api_key["BearerToken"] = f"Bearer {token}"

    async def record_event(self, reason: str, action: str, note: str = "", type_: str = "Normal") -> bool:
        """Post an events.k8s.io/v1 Event about this node, as kube-proxy's recorder does at start.

        Returns whether the server took it; failure is logged, never raised
        (an Event is a courtesy, not something to stop for).
        """
        if not self.config.node_name:
            return False
        from kubernetes_asyncio import client as kclient

        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        controller = f"kubelab.dev/kubelab-{self.config.purpose}"
        body = {
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            # Node events live in "default", named like client-go's recorder: <object>.<hex time>.
            "metadata": {"name": f"{self.config.node_name}.{int(now * 1e9):x}", "namespace": "default"},
            "eventTime": stamp, "reportingController": controller,
            "reportingInstance": f"{controller}-{self.config.node_name}", "action": action, "reason": reason,
            "regarding": {"kind": "Node", "name": self.config.node_name, "uid": self.config.node_name},
            "note": note, "type": type_,
        }
        try:
            await self.connect()
            await self.refresh_credentials()
            resp = await kclient.EventsV1Api(self.api).create_namespaced_event(
                "default", body, _preload_content=False, _request_timeout=self.config.request_timeout)
            async with resp:
                await read_json(resp, "create events")
            return True
        except Exception as e:  # noqa: BLE001
            self.log.warning("could not record the %s event for node %s: %s", reason, self.config.node_name, e)
            return False

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """List and watch until cancelled.  Only configuration errors end it (KubeConfigError)."""
        await self.connect()
        self.log.info("watching %s for %s (%s)", self.server, self.config.purpose,
                      ", ".join(r.name for r in _resources(self.config, True)))
        tasks = []
        try:
            for res in _resources(self.config, None):
                tasks.append(asyncio.ensure_future(self._reflector(res).run()))
            if self.config.endpoint_slices:
                tasks.append(asyncio.ensure_future(self._endpoints()))
            if self.config.purpose == "proxy" and self.config.node_name:
                # kube-proxy: Recorder.Eventf(nodeRef, Normal, "Starting", "StartKubeProxy", "").
                tasks.append(asyncio.ensure_future(self.record_event("Starting", "StartKubelabProxy")))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    def _reflector(self, res: WatchedResource) -> Reflector:
        r = Reflector(self, res)
        self.reflectors[res.name] = r
        return r

    async def _endpoints(self) -> None:
        """Discover whether EndpointSlices are served, then reflect them (or core/v1 Endpoints)."""
        backoff = self._backoff()
        while self.endpoint_slices_served is None:
            try:
                self.endpoint_slices_served = await self._discover_endpoint_slices()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = backoff.next()
                if isinstance(e, APIStatusError) and e.retry_after:
                    delay = max(delay, e.retry_after)
                self.log.warning("API discovery of discovery.k8s.io/v1 failed: %s; retrying in %.1fs", e, delay)
                await self.deps.sleep(delay)
        if not self.endpoint_slices_served:
            self.log.warning("the API server does not serve discovery.k8s.io/v1 EndpointSlices; "
                             "falling back to core/v1 Endpoints")
        res = _resources(replace(self.config, services=False, pods=False, node_name=""), self.endpoint_slices_served)
        await self._reflector(res[0]).run()

    async def _discover_endpoint_slices(self) -> bool:
        from kubernetes_asyncio import client as kclient

        await self.refresh_credentials()
        resp = await kclient.DiscoveryV1Api(self.api).get_api_resources(
            _preload_content=False, _request_timeout=self.config.request_timeout)
        async with resp:
            if resp.status == 404:
                return False
            body = await read_json(resp, "GET /apis/discovery.k8s.io/v1")
        return any(r.get("name") == "endpointslices" for r in body.get("resources") or [])

    def _backoff(self) -> Backoff:
        c = self.config
        return Backoff(c.backoff_initial, c.backoff_max, c.backoff_factor, c.backoff_jitter, c.backoff_reset,
                       self.deps.clock, self.deps.rng)

    # ------------------------------------------------------------ delivery

    def deliver(self, method: str, *args: Any) -> None:
        """Call ``method`` on every handler; a handler's exception is logged, never fatal to the watch."""
        for h in self.handlers:
            fn = getattr(h, method, None)
            if fn is None:  # a handler that does not care about this kind
                continue
            try:
                fn(*args)
            except Exception:
                self.log.exception("handler %s.%s failed", type(h).__name__, method)


def _stripping(hook: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Wrap the in-cluster loader's token hook so the token loses surrounding whitespace (client-go trims it)."""
    if hook is None:
        return None

    def refresh(configuration: Any, *args: Any) -> None:
        hook(configuration, *args)
        token = configuration.api_key.get("BearerToken")
        if isinstance(token, str) and token != token.strip():
            configuration.api_key["BearerToken"] = token.strip()

    return refresh


async def read_json(resp: Any, what: str) -> dict:
    """The JSON body of a 2xx response; raise APIStatusError (with the server's Status) otherwise."""
    raw = await resp.read()
    if not 200 <= resp.status < 300:
        raise status_error(resp.status, raw, resp.headers.get("Retry-After"), what)
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIStatusError(resp.status, "BadResponse", f"the body is not JSON ({e})", what=what) from None
    if not isinstance(body, dict):
        raise APIStatusError(resp.status, "BadResponse", "the body is not a JSON object", what=what)
    return body


def status_error(code: int, raw: bytes, retry_after: str | None, what: str) -> APIStatusError:
    reason, message = "", raw[:300].decode("utf-8", "replace").strip()
    try:
        status = json.loads(raw)
        if isinstance(status, dict) and status.get("kind") == "Status":
            reason, message = status.get("reason", ""), status.get("message", "")
    except ValueError:
        pass
    after: float | None = None
    if retry_after:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    return APIStatusError(code, reason or "Unknown", message, after, what)


async def iter_lines(content: Any, max_bytes: int = MAX_EVENT_BYTES) -> AsyncIterator[bytes]:
    """Newline-delimited lines of a chunked body, of any length up to ``max_bytes``.

    A partial last line (the stream was cut mid-event) is never yielded.
    """
    buf = bytearray()
    scanned = 0
    async for chunk in content.iter_any():
        buf += chunk
        while True:
            i = buf.find(b"\n", scanned)
            if i < 0:
                scanned = len(buf)
                break
            line = bytes(buf[:i])
            del buf[: i + 1]
            scanned = 0
            if line.strip():
                yield line
        if len(buf) > max_bytes:
            raise APIStatusError(0, "BadResponse", f"a watch event is over {max_bytes} bytes")


class _Expired(Exception):
    """The resourceVersion we resume from is gone: relist."""


class Reflector:
    """Lists and watches one resource, keeps the last good object per key, delivers changes."""

    def __init__(self, source: KubeSource, res: WatchedResource) -> None:
        self.source = source
        self.res = res
        self.log = source.log
        self.store: dict[tuple[str, str], KubeObject] = {}  # last good version of each object
        self.errors: dict[str, str] = {}  # "Kind ns/name" -> the error of its current (bad) version
        self.resource_version = ""
        self.synced = False
        self.lists = 0  # complete lists done (1 = initial; more = relists after 410)
        self.watches = 0  # watch requests made
        self.backoff = source._backoff()
        self.origin = Origin(source=f"{source.server}{res.path}")
        self.field_selector = res.field_selector  # dropped if the server does not know it (optional ones only)

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    await self.list_and_replace()
                    need_list = False
                started, events = self.source.deps.clock(), await self.watch()
                if events == 0 and self.source.deps.clock() - started < 1.0:
                    # client-go's "very short watch": a server closing at once is trouble, not a timeout.
                    raise APIStatusError(0, "ShortWatch", "the watch ended at once without events", what=self._what("watch"))
            except asyncio.CancelledError:
                raise
            except _Expired as e:
                self.log.info("%s: %s; relisting", self._what("watch"), e)
                need_list = True
            except Exception as e:  # noqa: BLE001 - every failure is retried; the last state stays programmed
                if self._drop_unsupported_field_selector(e):
                    continue
                delay = self.backoff.next()
                if isinstance(e, APIStatusError):
                    if e.retry_after:
                        delay = max(delay, e.retry_after)
                    if e.code == 401:
                        await self._quietly(self.source.refresh_credentials(force=True))
                hint = ""
                if isinstance(e, APIStatusError) and e.code == 403:
                    hint = (f"; the service account needs list and watch on {self.res.name} "
                            "(see the ClusterRoles in deploy/)")
                elif isinstance(e, APIStatusError) and e.code == 401:
                    hint = "; the credentials were refused (expired token? wrong kubeconfig user?)"
                self.log.warning("%s failed: %s%s; retrying in %.1fs (the dataplane stays as programmed)",
                                 "list" if need_list else "watch of " + self.res.name, _describe(e), hint, delay)
                await self.source.deps.sleep(delay)

    def _drop_unsupported_field_selector(self, e: BaseException) -> bool:
        """After a 400 "field label not supported" for an optional field selector: go on without it."""
        if not (self.res.field_selector_optional and self.field_selector and isinstance(e, APIStatusError)
                and e.code == 400 and "field label not supported" in e.message):
            return False
        self.log.warning("%s: the API server does not support the field selector %s (Kubernetes < 1.31): "
                         "listing without it; objects it would have filtered are skipped locally",
                         self.res.name, self.field_selector)
        self.field_selector = ""
        return True

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except Exception as e:  # noqa: BLE001
            self.log.warning("refreshing credentials failed: %s", e)

    def _what(self, op: str) -> str:
        return f"{op} {self.res.name}"

    def _call(self) -> Any:
        from kubernetes_asyncio import client as kclient

        return getattr(getattr(kclient, self.res.api_class)(self.source.api), self.res.list_method)

    def _selectors(self) -> dict[str, str]:
        kw = {}
        if self.res.label_selector:
            kw["label_selector"] = self.res.label_selector
        if self.field_selector:
            kw["field_selector"] = self.field_selector
        return kw

    # ------------------------------------------------------------ list

    async def list_all(self) -> tuple[list[dict], str]:
        """Every object (all pages) and the list's resourceVersion.

        No resourceVersion is sent: a consistent read of the newest state, in
        pages.  (client-go's first list asks for resourceVersion "0", any
        cached state and unpaginated: cheaper for an old server, but possibly
        older than what this node programmed before a restart, and one
        response for 10,000 objects.  Since 1.31 servers answer consistent
        lists from their watch cache too, ConsistentListFromCache.)
        """
        import aiohttp

        items: list[dict] = []
        cont = ""
        limit = self.source.config.page_size
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.source.config.request_timeout,
                                        sock_read=self.source.config.request_timeout)
        while True:
            kw = self._selectors()
            if limit:
                kw["limit"] = limit
            if cont:
                kw["_continue"] = cont
            await self.source.refresh_credentials()
            resp = await self._call()(_preload_content=False, _request_timeout=timeout, **kw)
            try:
                async with resp:
                    body = await read_json(resp, self._what("list"))
            except APIStatusError as e:
                if e.expired and cont:
                    # The continue token outlived the server's history: start over as
                    # one unpaginated list (client-go pager's FullListIfExpired).
                    self.log.info("%s: continue token expired after %d items; listing again in one request",
                                  self._what("list"), len(items))
                    items, cont, limit = [], "", 0
                    continue
                raise
            page = body.get("items")
            if not isinstance(page, list):
                raise APIStatusError(resp.status, "BadResponse", "the list has no items array", what=self._what("list"))
            items.extend(page)
            meta = body.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    async def list_and_replace(self) -> None:
        """List everything, then deliver the difference from what we had (deletes first)."""
        items, rv = await self.list_all()
        seen: set[tuple[str, str]] = set()
        parsed: list[tuple[tuple[str, str], dict]] = []
        for raw in items:
            key = self._key(raw)
            if key is None:
                continue
            seen.add(key)
            parsed.append((key, raw))
        gone = [k for k in self.store if k not in seen]
        for key in gone:
            self._deliver_delete(key)
        for label in [lbl for lbl in self.errors if self._label_key(lbl) not in seen]:
            del self.errors[label]
        for key, raw in parsed:
            self._upsert(key, raw)
        self.resource_version = rv
        self.lists += 1
        if self.lists > 1:
            self.log.info("%s: relisted %d objects at resourceVersion %s (%d deleted meanwhile)",
                          self.res.name, len(items), rv, len(gone))
        if not self.synced:
            self.synced = True
            self.log.info("%s synced: %d objects at resourceVersion %s", self.res.name, len(self.store), rv)
            self.source.deliver(self.res.synced)

    # ------------------------------------------------------------ watch

    async def watch(self) -> int:
        """One watch request from the last resourceVersion; returns how many events it carried."""
        import aiohttp

        cfg = self.source.config
        timeout_s = int(cfg.min_watch_timeout * (1.0 + self.source.deps.rng.random()))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.request_timeout,
                                        sock_read=timeout_s + cfg.request_timeout)
        await self.source.refresh_credentials()
        self.watches += 1
        resp = await self._call()(
            watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=timeout_s, _preload_content=False, _request_timeout=timeout, **self._selectors(),
        )
        events = 0
        try:
            if not 200 <= resp.status < 300:
                err = status_error(resp.status, await resp.read(), resp.headers.get("Retry-After"), self._what("watch"))
                if err.expired:
                    # Servers without a watch cache answer a too-old resourceVersion with HTTP 410.
                    raise _Expired(err.message or "410 Gone")
                raise err
            async for line in iter_lines(resp.content):
                self._event(line)
                events += 1
        finally:
            resp.close()
        return events

    def _event(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            type_, obj = ev["type"], ev["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a JSON object")
        except (ValueError, KeyError, TypeError) as e:
            raise APIStatusError(0, "BadResponse", f"malformed watch event ({e}): {line[:200]!r}",
                                 what=self._what("watch")) from None
        if type_ == "ERROR":
            err = APIStatusError(int(obj.get("code") or 0), obj.get("reason", ""), obj.get("message", ""),
                                 what=self._what("watch"))
            if err.expired:
                raise _Expired(err.message or "410 Gone")
            raise err
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if type_ == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        key = self._key(obj)
        if key is not None:
            if type_ in ("ADDED", "MODIFIED"):
                self._upsert(key, obj)
            elif type_ == "DELETED":
                self._forget_error(key)
                self._deliver_delete(key)
            else:
                self.log.warning("%s: ignoring a watch event of unknown type %r", self._what("watch"), type_)
        # Only now is the event fully handled: a reconnect resumes after it.
        if rv:
            self.resource_version = rv

    # ------------------------------------------------------------ objects

    def _key(self, raw: dict) -> tuple[str, str] | None:
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        if not isinstance(meta, dict) or not meta.get("name"):
            self.log.error("%s: an object without metadata.name was ignored: %.200s", self.origin, json.dumps(raw))
            return None
        return (str(meta.get("namespace") or ""), str(meta["name"]))

    def _label(self, key: tuple[str, str]) -> str:
        return f"{self.res.kind} {key[0]}/{key[1]}" if key[0] else f"{self.res.kind} {key[1]}"

    def _label_key(self, label: str) -> tuple[str, str]:
        name = label.split(" ", 1)[1]
        ns, _, n = name.rpartition("/")
        return (ns, n)

    def _forget_error(self, key: tuple[str, str]) -> None:
        self.errors.pop(self._label(key), None)

    def _upsert(self, key: tuple[str, str], raw: dict) -> None:
        # Items of a list carry no kind/apiVersion on the wire; the parser wants them.
        d = dict(raw)
        d["kind"], d["apiVersion"] = self.res.kind, self.res.api_version
        label = self._label(key)
        try:
            new = self.source.deps.parse(d, self.origin)
        except _object_error_types() as e:
            first = self.errors.get(label) != str(e)
            self.errors[label] = str(e)
            if first:
                kept = "its last good version stays in force" if key in self.store else "it is ignored until fixed"
                self.log.error("%s (resourceVersion %s): %s; %s", label,
                               (raw.get("metadata") or {}).get("resourceVersion", "?"), e, kept)
            return
        if label in self.errors:
            del self.errors[label]
            self.log.info("%s is valid again", label)
        old = self.store.get(key)
        self.store[key] = new
        if old is None:
            self.source.deliver(f"on_{self.res.handler}_add", new)
        elif old != new:
            self.source.deliver(f"on_{self.res.handler}_update", old, new)

    def _deliver_delete(self, key: tuple[str, str]) -> None:
        old = self.store.pop(key, None)
        if old is not None:
            self.source.deliver(f"on_{self.res.handler}_delete", old)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text and not isinstance(e, APIStatusError) else (text or type(e).__name__)
