"""kube-proxy's Prometheus metrics, on prometheus-client, in a registry of our own.

Names, help texts and buckets follow kubernetes ``pkg/proxy/metrics/metrics.go``
so dashboards and alerts written for kube-proxy work unchanged.  Each
:class:`ProxyMetrics` owns a fresh ``CollectorRegistry`` (never the global
default one), so tests and several proxies in one process do not collide.

Mode-specific metrics are defined here too, so a mode only uses them:
iptables (``sync_proxy_rules_iptables_*``), nftables, and the IPVS mode's
iptables-restore failures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SUBSYSTEM = "kubeproxy"


def exponential_buckets(start: float, factor: float, count: int) -> list[float]:
    """Prometheus' ExponentialBuckets."""
    return [start * factor**i for i in range(count)]


def linear_buckets(start: float, width: float, count: int) -> list[float]:
    """Prometheus' LinearBuckets."""
    return [start + width * i for i in range(count)]


# 1 ms .. 16.4 s
SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)
# 0, 0.25 s, 0.5 s, 1..59 s, 60..115 s, 2..5 min (NetworkProgrammingLatency).  The
# leading 0 is upstream's too: its merge() starts from make([]float64, 1).
NETWORK_PROGRAMMING_BUCKETS = (
    [0.0]
    + linear_buckets(0.25, 0.25, 2)
    + linear_buckets(1, 1, 59)
    + linear_buckets(60, 5, 12)
    + linear_buckets(120, 30, 7)
)


class ProxyMetrics:
    """Every kube-proxy metric kubelab exports, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, namespace="", subsystem=SUBSYSTEM, buckets=buckets, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, subsystem=SUBSYSTEM, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            # prometheus-client appends "_total" itself: pass the name without it.
            return Counter(name.removesuffix("_total"), doc, labels, subsystem=SUBSYSTEM, registry=r)

        # --- every mode
        self.sync_proxy_rules_duration = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", SYNC_BUCKETS
        )
        self.sync_full_proxy_rules_duration = hist(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs", SYNC_BUCKETS
        )
        self.sync_partial_proxy_rules_duration = hist(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_BUCKETS,
        )
        self.sync_proxy_rules_last_timestamp = gauge(
            "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced"
        )
        self.sync_proxy_rules_last_queued_timestamp = gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync of proxy rules was queued"
        )
        self.network_programming_duration = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        self.endpoint_changes_pending = gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes"
        )
        self.endpoint_changes_total = counter(
            "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes"
        )
        self.service_changes_pending = gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes"
        )
        self.service_changes_total = counter(
            "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes"
        )
        self.no_local_endpoints_total = gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ("traffic_policy",),
        )
        self.proxy_healthz_total = counter("proxy_healthz_total", "Cumulative proxy healthz HTTP status", ("code",))
        self.proxy_livez_total = counter("proxy_livez_total", "Cumulative proxy livez HTTP status", ("code",))
        # Not upstream: failed syncs of any mode, so failures show up even in
        # modes without a mode-specific failure counter (userspace).
        self.sync_proxy_rules_failures_total = counter(
            "sync_proxy_rules_failures_total", "Cumulative failed proxy rule syncs (kubelab)"
        )

        # --- iptables mode (and ipvs, which also uses iptables-restore)
        self.iptables_restore_failures_total = counter(
            "sync_proxy_rules_iptables_restore_failures_total", "Cumulative proxy iptables restore failures"
        )
        self.iptables_partial_restore_failures_total = counter(
            "sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
        )
        self.iptables_total = gauge(
            "sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy", ("table",)
        )
        self.iptables_last = gauge(
            "sync_proxy_rules_iptables_last", "Number of iptables rules written by kube-proxy in last sync", ("table",)
        )
        # --- nftables mode
        self.nftables_sync_failures_total = counter(
            "sync_proxy_rules_nftables_sync_failures_total", "Cumulative proxy nftables sync failures"
        )
        self.nftables_cleanup_failures_total = counter(
            "sync_proxy_rules_nftables_cleanup_failures_total", "Cumulative proxy nftables cleanup failures"
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type (for /metrics)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's current value by full name, e.g. ``kubeproxy_sync_proxy_rules_service_changes_total``."""
        return self.registry.get_sample_value(name, labels or {})
