"""kube-proxy's HTTP servers: proxier health, per-service health check node ports, metrics.

* :class:`ProxierHealthServer` -- ``/healthz`` and ``/livez`` on
  ``--healthz-bind-address`` (default ``0.0.0.0:10256``), as kubernetes
  ``pkg/proxy/healthcheck/proxier_health.go``: healthy unless a sync was queued
  and has not completed within the health timeout (2 x ``--sync-period``);
  ``/healthz`` also fails while this node is being deleted or carries the
  cluster autoscaler's ``ToBeDeletedByClusterAutoscaler`` taint.
* :class:`ServiceHealthServer` -- one listener per ``healthCheckNodePort`` of
  LoadBalancer services with ``externalTrafficPolicy: Local``, answering 200
  with the number of local endpoints, 503 with none, so cloud load balancers
  only send to nodes that have endpoints (``service_health.go``).  Modes own
  when to call it; the controller does not.
* :class:`MetricsServer` -- ``/metrics`` (Prometheus), ``/healthz`` (plain
  ``ok``), ``/proxyMode`` and ``/configz`` on ``--metrics-bind-address``
  (default ``127.0.0.1:10249``), like kube-proxy's ``serveMetrics``.

All are aiohttp servers; constructors bind nothing, ``start()`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

log = logging.getLogger("kubelab.proxy.health")

TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def split_host_port(address: str, what: str = "address") -> tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" -> (host, port); raises ValueError naming ``what``."""
    text = address.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{what} {address!r}: expected [IPv6]:PORT, e.g. [::]:10256")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{what} {address!r}: expected HOST:PORT, e.g. 0.0.0.0:10256")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{what} {address!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{what} {address!r}: port {number} is out of range 0-65535")
    return host or "0.0.0.0", number


# Go's zero time.Time, which kube-proxy prints for lastUpdated before its first sync.
GO_ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"
# Where this process's monotonic clock starts: Go prints time.Now()'s monotonic
# reading as "m=+<seconds since the process started>".
PROCESS_START_MONOTONIC = time.monotonic()


def process_monotonic() -> float:
    """Seconds since this process started (monotonic), as Go's ``m=+...`` suffix counts them."""
    return time.monotonic() - PROCESS_START_MONOTONIC


def go_time(ts: float, mono: float | None = None) -> str:
    """A Unix time printed as Go's ``time.Time.String()`` in UTC (kube-proxy's JSON uses it).

    e.g. ``2024-05-01 12:00:00.123456789 +0000 UTC m=+202.631797660``:
    fractional seconds with trailing zeros removed, no fraction at all for
    whole seconds; ``mono`` (seconds since process start) adds the monotonic
    reading Go appends to every ``time.Now()``.  ``ts <= 0`` is Go's zero time.
    """
    if ts <= 0:
        return GO_ZERO_TIME
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    base = dt.strftime("%Y-%m-%d %H:%M:%S")
    text = f"{base}.{frac} +0000 UTC" if frac else f"{base} +0000 UTC"
    if mono is not None:
        text += f" m={'-' if mono < 0 else '+'}{abs(mono):.9f}"
    return text


async def _start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound


class ProxierHealthServer:
    """kube-proxy's proxier health: ``/healthz`` and ``/livez`` with its JSON body and rule."""

    def __init__(
        self,
        bind_address: str,
        health_timeout: float,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = process_monotonic,
    ) -> None:
        self.bind_address = bind_address
        self.health_timeout = health_timeout
        self.metrics = metrics
        self.clock = clock
        # Seconds since process start, for the "m=+..." Go prints; None leaves it out.
        self.monotonic = monotonic
        self.last_updated = 0.0  # 0 = never: printed as Go's zero time
        self.last_updated_mono: float | None = None
        self.oldest_pending_queued = 0.0  # 0 = nothing pending
        self.node_eligible = True  # until a Node event says otherwise
        self.port = 0  # the bound port once started
        self._runner: web.AppRunner | None = None

    # --- what the sync loop calls

    def queued_update(self) -> None:
        """A change arrived that needs a sync; starts the health timeout unless one is running."""
        if not self.oldest_pending_queued:
            self.oldest_pending_queued = self.clock()

    def updated(self) -> None:
        """A sync succeeded: nothing is pending any more."""
        self.oldest_pending_queued = 0.0
        self.last_updated = self.clock()
        self.last_updated_mono = self._mono()

    def sync_node(self, node: Any) -> None:
        """This node's Node object: being deleted or tainted for deletion makes /healthz fail."""
        deleting = bool(getattr(getattr(node, "meta", None), "deletion_timestamp", None))
        taints = getattr(node, "taints", ()) or ()
        tainted = any(getattr(t, "key", t) == TO_BE_DELETED_TAINT for t in taints)
        self.node_eligible = not (deleting or tainted)

    def is_healthy(self) -> bool:
        return self._health()[0]

    def _mono(self) -> float | None:
        return self.monotonic() if self.monotonic is not None else None

    def _times(self, healthy: bool, last: float, now: float) -> tuple[str, str]:
        """lastUpdated and currentTime as kube-proxy prints them."""
        now_mono = self._mono()
        current = go_time(now, now_mono)
        # kube-proxy reports lastUpdated = now while healthy, for compatibility
        # with releases where it meant "the sync loop ran recently".
        if healthy:
            return current, current
        return go_time(last, self.last_updated_mono if last > 0 else None), current

    def _health(self) -> tuple[bool, float, float]:
        now = self.clock()
        if not self.oldest_pending_queued:
            healthy = True  # starting up, or fully synced
        else:
            healthy = now - self.oldest_pending_queued < self.health_timeout
        return healthy, self.last_updated, now

    # --- HTTP

    def _respond(self, healthy: bool, body: str, counter: Any) -> web.Response:
        status = 200 if healthy else 503
        if counter is not None:
            counter.labels(code=str(status)).inc()
        # Headers set directly: aiohttp's content_type= would add "; charset=utf-8",
        # which kube-proxy does not send.
        return web.Response(
            status=status,
            body=body.encode(),
            headers={"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"},
        )

    async def handle_healthz(self, request: web.Request) -> web.Response:
        healthy, last, now = self._health()
        healthy = healthy and self.node_eligible
        last_text, now_text = self._times(healthy, last, now)
        eligible = "true" if self.node_eligible else "false"
        body = f'{{"lastUpdated": {json.dumps(last_text)},"currentTime": {json.dumps(now_text)}, "nodeEligible": {eligible}}}'
        return self._respond(healthy, body, self.metrics and self.metrics.proxy_healthz_total)

    async def handle_livez(self, request: web.Request) -> web.Response:
        healthy, last, now = self._health()
        last_text, now_text = self._times(healthy, last, now)
        body = f'{{"lastUpdated": {json.dumps(last_text)},"currentTime": {json.dumps(now_text)}}}'
        return self._respond(healthy, body, self.metrics and self.metrics.proxy_livez_total)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/livez", self.handle_livez)
        return app

    async def start(self) -> None:
        host, port = split_host_port(self.bind_address, "--healthz-bind-address")
        try:
            self._runner, self.port = await _start_site(self.app(), host, port)
        except OSError as e:
            raise OSError(e.errno, f"failed to start proxier healthz on {self.bind_address}: {e.strerror}") from e
        log.info("serving /healthz and /livez on %s:%d", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclasses.dataclass
class _HealthCheck:
    port: int
    runners: list[web.AppRunner]
    endpoints: int = 0


class ServiceHealthServer:
    """Health check node ports for ``externalTrafficPolicy: Local`` load balancers.

    ``node_ips``: addresses to listen on (the ``--nodeport-addresses`` match);
    empty means all addresses.  ``proxier_health`` (optional) makes every
    service unhealthy while the proxy itself is, as upstream does.
    """

    def __init__(
        self, node_name: str, node_ips: Iterable[str] = (), proxier_health: ProxierHealthServer | None = None
    ) -> None:
        self.node_name = node_name
        self.node_ips = tuple(node_ips) or ("0.0.0.0",)
        self.proxier_health = proxier_health
        self.services: dict[str, _HealthCheck] = {}

    async def sync_services(self, new_services: Mapping[str, int]) -> None:
        """Make exactly these ``{"ns/name": port}`` listeners open; failures are logged, not raised."""
        for key in list(self.services):
            hc = self.services[key]
            if new_services.get(key) != hc.port:
                log.info("closing health check for %s on port %d", key, hc.port)
                await self._close(hc)
                del self.services[key]
        for key, port in new_services.items():
            if key in self.services:
                continue
            hc = _HealthCheck(port=port, runners=[])
            try:
                for ip in self.node_ips:
                    runner, _ = await _start_site(self._app(key), ip, port)
                    hc.runners.append(runner)
            except OSError as e:
                await self._close(hc)
                log.error("node %s failed to start health check %r on port %d: %s", self.node_name, key, port, e)
                continue
            log.info("opened health check for %s on port %d", key, port)
            self.services[key] = hc

    def sync_endpoints(self, new_endpoints: Mapping[str, int]) -> None:
        """``{"ns/name": local ready endpoints}``; services not named get 0."""
        for key, hc in self.services.items():
            hc.endpoints = new_endpoints.get(key, 0)

    async def stop(self) -> None:
        for hc in self.services.values():
            await self._close(hc)
        self.services.clear()

    @staticmethod
    async def _close(hc: _HealthCheck) -> None:
        for runner in hc.runners:
            await runner.cleanup()
        hc.runners.clear()

    def _app(self, key: str) -> web.Application:
        namespace, _, name = key.partition("/")

        async def handle(request: web.Request) -> web.Response:
            hc = self.services.get(key)
            count = hc.endpoints if hc is not None else 0
            healthy = self.proxier_health.is_healthy() if self.proxier_health is not None else True
            status = 200 if count and healthy else 503
            body = (
                "{\n"
                "\t\"service\": {\n"
                f"\t\t\"namespace\": {json.dumps(namespace)},\n"
                f"\t\t\"name\": {json.dumps(name)}\n"
                "\t},\n"
                f"\t\"localEndpoints\": {count},\n"
                f"\t\"serviceProxyHealthy\": {'true' if healthy else 'false'}\n"
                "}"
            )
            return web.Response(
                status=status,
                text=body,
                content_type="application/json",
                headers={"X-Content-Type-Options": "nosniff", "X-Load-Balancing-Endpoint-Weight": str(count)},
            )

        app = web.Application()
        # Any path: load balancers probe "/" or a configured path.
        app.router.add_route("GET", "/{tail:.*}", handle)
        return app


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/proxyMode`` and ``/configz`` on ``--metrics-bind-address``."""

    def __init__(self, bind_address: str, metrics: Any, proxy_mode: str, config: Any = None) -> None:
        self.bind_address = bind_address
        self.metrics = metrics
        self.proxy_mode = proxy_mode
        self.config = config
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", content_type="text/plain")

    async def handle_proxy_mode(self, request: web.Request) -> web.Response:
        return web.Response(text=self.proxy_mode, content_type="text/plain")

    async def handle_configz(self, request: web.Request) -> web.Response:
        data = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
        return web.json_response({"kubeproxy.config.k8s.io": data})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/proxyMode", self.handle_proxy_mode)
        app.router.add_get("/configz", self.handle_configz)
        return app

    async def start(self) -> None:
        host, port = split_host_port(self.bind_address, "--metrics-bind-address")
        try:
            self._runner, self.port = await _start_site(self.app(), host, port)
        except OSError as e:
            raise OSError(e.errno, f"failed to start metrics server on {self.bind_address}: {e.strerror}") from e
        log.info("serving /metrics on %s:%d", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
