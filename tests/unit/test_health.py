"""Proxier health (/healthz, /livez), service health check node ports, the metrics server.

Real HTTP over loopback: servers bind 127.0.0.1 on free ports (port 0), a
real aiohttp client asks.  Addresses: 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket

import aiohttp
import pytest

from kubelab.model import Node, ObjectMeta, Origin, Taint
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.health import MetricsServer, ProxierHealthServer, ServiceHealthServer, go_time, split_host_port
from kubelab.proxy.objects import parse_object
from kubelab.proxy.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_BUCKETS, ProxyMetrics


def arun(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        return asyncio.run(fn(*a, **kw))

    return wrapper


async def get(url):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, dict(r.headers), await r.text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "addr,expected",
    [("0.0.0.0:10256", ("0.0.0.0", 10256)), (":10249", ("0.0.0.0", 10249)), ("[::1]:80", ("::1", 80)),
     ("127.0.0.1:0", ("127.0.0.1", 0))],
    ids=["v4", "empty-host", "v6", "port-0"],
)
def test_split_host_port(addr, expected):
    assert split_host_port(addr) == expected


@pytest.mark.parametrize(
    "addr,msg",
    [("10256", "expected HOST:PORT"), ("1.2.3.4:http", "is not a number"), ("1.2.3.4:70000", "out of range"),
     ("[::1]80", r"expected \[IPv6\]:PORT")],
    ids=["no-colon", "name", "range", "v6-no-port"],
)
def test_split_host_port_errors(addr, msg):
    with pytest.raises(ValueError, match=msg) as e:
        split_host_port(addr, "--healthz-bind-address")
    assert "--healthz-bind-address" in str(e.value)


@pytest.mark.parametrize(
    "ts,text",
    [((1700000000.0,), "2023-11-14 22:13:20 +0000 UTC"), ((1700000000.25,), "2023-11-14 22:13:20.25 +0000 UTC"),
     # what kube-proxy's /healthz shows (cilium/cilium#11733): Go appends time.Now()'s monotonic reading
     ((1591228793.688063, 202.63179766), "2020-06-03 23:59:53.688063 +0000 UTC m=+202.631797660"),
     ((1700000000.0, 0.5), "2023-11-14 22:13:20 +0000 UTC m=+0.500000000"),
     ((0.0,), "0001-01-01 00:00:00 +0000 UTC"), ((0.0, 5.0), "0001-01-01 00:00:00 +0000 UTC")],
    ids=["whole", "fraction", "monotonic", "monotonic-whole", "zero-time", "zero-time-no-monotonic"],
)
def test_go_time(ts, text):
    assert go_time(*ts) == text


@arun
async def test_proxier_health_rule_and_body():
    now = [1700000000.0]
    mono = [2.5]

    def tick(seconds):
        now[0] += seconds
        mono[0] += seconds

    m = ProxyMetrics()
    hs = ProxierHealthServer("127.0.0.1:0", health_timeout=60.0, metrics=m, clock=lambda: now[0],
                             monotonic=lambda: mono[0])
    await hs.start()
    base = f"http://127.0.0.1:{hs.port}"
    try:
        # Starting up: healthy, and lastUpdated reads "now" while healthy.
        status, headers, body = await get(base + "/healthz")
        assert status == 200
        assert headers["Content-Type"] == "application/json" and headers["X-Content-Type-Options"] == "nosniff"
        # byte for byte kube-proxy's Fprintf format (its odd spacing included)
        assert body == ('{"lastUpdated": "2023-11-14 22:13:20 +0000 UTC m=+2.500000000",'
                        '"currentTime": "2023-11-14 22:13:20 +0000 UTC m=+2.500000000", "nodeEligible": true}')
        # Queued but never synced, and late: lastUpdated is Go's zero time.
        hs.queued_update()
        tick(60.0)
        status, _, body = await get(base + "/livez")
        assert status == 503 and json.loads(body) == {
            "lastUpdated": "0001-01-01 00:00:00 +0000 UTC", "currentTime": "2023-11-14 22:14:20 +0000 UTC m=+62.500000000"}
        now[0], mono[0] = 1700000000.0, 2.5
        hs.updated()
        hs.queued_update()
        tick(59.0)
        assert (await get(base + "/healthz"))[0] == 200
        hs.queued_update()  # does not move the oldest pending time
        tick(1.0)
        status, _, body = await get(base + "/healthz")
        assert status == 503
        assert json.loads(body) == {"lastUpdated": "2023-11-14 22:13:20 +0000 UTC m=+2.500000000",
                                    "currentTime": "2023-11-14 22:14:20 +0000 UTC m=+62.500000000",
                                    "nodeEligible": True}
        status, _, body = await get(base + "/livez")
        assert status == 503 and set(json.loads(body)) == {"lastUpdated", "currentTime"}
        hs.updated()
        assert (await get(base + "/livez"))[0] == 200
        # A node being deleted fails /healthz but not /livez.
        hs.sync_node(Node(meta=ObjectMeta(name="n", namespace="", deletion_timestamp="2024-01-01T00:00:00Z")))
        status, _, body = await get(base + "/healthz")
        assert status == 503 and json.loads(body)["nodeEligible"] is False
        assert (await get(base + "/livez"))[0] == 200
        # The cluster autoscaler's taint (parsed from a real Node manifest) does the same; untainted is eligible again.
        tainted = parse_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}, "spec": {"taints": [
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1714644000", "effect": "NoSchedule"}]}}, Origin("n.yaml", 1))
        hs.sync_node(tainted)
        assert not hs.node_eligible
        hs.sync_node(Node(meta=ObjectMeta(name="n", namespace=""), taints=(Taint("other", "", "NoSchedule"),)))
        assert hs.node_eligible
        hs.sync_node(tainted)
        assert m.value("kubeproxy_proxy_healthz_total", {"code": "503"}) == 2
        assert m.value("kubeproxy_proxy_healthz_total", {"code": "200"}) == 2
        assert m.value("kubeproxy_proxy_livez_total", {"code": "503"}) == 2
    finally:
        await hs.stop()


@arun
async def test_bind_failure_names_the_flag():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        hs = ProxierHealthServer(f"127.0.0.1:{port}", 60.0)
        with pytest.raises(OSError, match=f"failed to start proxier healthz on 127.0.0.1:{port}"):
            await hs.start()


@arun
async def test_service_health_server():
    proxier = ProxierHealthServer("127.0.0.1:0", 60.0)
    shs = ServiceHealthServer("node-1", ["127.0.0.1"], proxier)
    p1, p2 = free_port(), free_port()
    try:
        await shs.sync_services({"default/web": p1, "kube-system/lb": p2})
        shs.sync_endpoints({"default/web": 2})
        status, headers, body = await get(f"http://127.0.0.1:{p1}/")
        assert status == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "2"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert json.loads(body) == {
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": True,
        }
        status, headers, body = await get(f"http://127.0.0.1:{p2}/healthz")
        assert status == 503 and json.loads(body)["localEndpoints"] == 0
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
        # An unhealthy proxier makes every service unhealthy.
        proxier.queued_update()
        proxier.oldest_pending_queued -= 120
        status, _, body = await get(f"http://127.0.0.1:{p1}/")
        assert status == 503 and json.loads(body)["serviceProxyHealthy"] is False
        proxier.updated()
        # Closing: the port stops answering.
        await shs.sync_services({"default/web": p1})
        assert set(shs.services) == {"default/web"}
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(f"http://127.0.0.1:{p2}/")
        # A port already taken is logged and skipped, not raised.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            busy = s.getsockname()[1]
            await shs.sync_services({"default/web": p1, "default/busy": busy})
            assert set(shs.services) == {"default/web"}
    finally:
        await shs.stop()


@arun
async def test_metrics_server_serves_kube_proxy_names():
    m = ProxyMetrics()
    m.service_changes_total.inc(3)
    m.iptables_total.labels(table="nat").set(42)
    ms = MetricsServer("127.0.0.1:0", m, "iptables", ProxyConfig())
    await ms.start()
    base = f"http://127.0.0.1:{ms.port}"
    try:
        status, headers, body = await get(base + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "kubeproxy_sync_proxy_rules_service_changes_total 3.0",
            'kubeproxy_sync_proxy_rules_iptables_total{table="nat"} 42.0',
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        ]:
            assert name in body, name
        status, _, body = await get(base + "/healthz")
        assert (status, body) == (200, "ok")
        assert (await get(base + "/proxyMode"))[2] == "iptables"
        status, _, body = await get(base + "/configz")
        assert json.loads(body)["kubeproxy.config.k8s.io"]["metrics_bind_address"] == "127.0.0.1:10249"
    finally:
        await ms.stop()


def test_buckets_match_kube_proxy():
    assert SYNC_BUCKETS[0] == 0.001 and len(SYNC_BUCKETS) == 15 and SYNC_BUCKETS[-1] == pytest.approx(16.384)
    # upstream's merge() starts from a zero-filled slice of length 1: a le="0" bucket first
    assert NETWORK_PROGRAMMING_BUCKETS[:4] == [0, 0.25, 0.5, 1]
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 1 + 2 + 59 + 12 + 7 and NETWORK_PROGRAMMING_BUCKETS[-1] == 300
    body = ProxyMetrics().exposition()[0].decode()
    assert 'kubeproxy_network_programming_duration_seconds_bucket{le="0.0"} 0.0' in body


def test_registries_are_independent():
    a, b = ProxyMetrics(), ProxyMetrics()
    a.service_changes_total.inc()
    assert b.value("kubeproxy_sync_proxy_rules_service_changes_total") == 0
