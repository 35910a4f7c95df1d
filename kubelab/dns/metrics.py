"""CoreDNS's metric names on prometheus-client, counted cheaply on the hot path.

The server counts into plain dicts and lists (a few hundred nanoseconds per
query; repeated UDP queries answered from the whole-packet cache count with
one increment on their cache entry, folded in before each scrape); :class:`DNSCollector` turns them into CoreDNS's families only when
Prometheus scrapes: ``coredns_dns_requests_total``,
``coredns_dns_responses_total``, ``coredns_dns_request_duration_seconds``
(CoreDNS's buckets: 0.25 ms doubling 16 times), ``coredns_cache_*`` and
``coredns_forward_*``.  Each server has its own ``CollectorRegistry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

SERVER = "dns://:53"
ZONE = "."
BUCKET0_NS = 250_000  # 0.25 ms, CoreDNS plugin/metrics/vars: prometheus.ExponentialBuckets(0.00025, 2, 16)
NBUCKETS = 16

# The types CoreDNS reports by name (plugin/pkg/response/typify... vars.go monitorType); others are "other".
MONITORED_TYPES = {
    1: "A", 28: "AAAA", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 33: "SRV", 2: "NS",
    35: "NAPTR", 255: "ANY", 252: "AXFR", 251: "IXFR", 43: "DS", 48: "DNSKEY", 46: "RRSIG", 47: "NSEC", 50: "NSEC3",
    64: "SVCB", 65: "HTTPS",
}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS"}
PLUGINS = ("", "kubernetes", "forward", "cache", "autopath")
P_NONE, P_KUBERNETES, P_FORWARD, P_CACHE, P_AUTOPATH = range(5)


@dataclass
class DNSCounters:
    """Raw counts the server bumps; read only by the collector."""

    # (proto "udp"/"tcp", family 1/2, qtype) -> count
    requests: dict = field(default_factory=dict)
    # (rcode, plugin index) -> count
    responses: dict = field(default_factory=dict)
    # qtype -> [bucket counts..., +Inf], and sum in nanoseconds
    durations: dict = field(default_factory=dict)
    duration_sum_ns: dict = field(default_factory=dict)
    autopath_success: int = 0
    dropped: int = 0

    def observe(self, proto: str, family: int, qtype: int, rcode: int, plugin: int, ns: int) -> None:
        k = (proto, family, qtype)
        r = self.requests
        r[k] = r.get(k, 0) + 1
        k2 = (rcode, plugin)
        s = self.responses
        s[k2] = s.get(k2, 0) + 1
        h = self.durations.get(qtype)
        if h is None:
            h = self.durations[qtype] = [0] * (NBUCKETS + 1)
            self.duration_sum_ns[qtype] = 0
        b = (ns // BUCKET0_NS).bit_length()
        h[b if b < NBUCKETS else NBUCKETS] += 1
        self.duration_sum_ns[qtype] += ns


def type_label(qtype: int) -> str:
    return MONITORED_TYPES.get(qtype, "other")


class DNSCollector:
    """A prometheus-client collector over :class:`DNSCounters` and the forwarder/cache stats."""

    def __init__(self, counters: DNSCounters, forwarder=None, ready=None, fold=None) -> None:
        self.c = counters
        self.forwarder = forwarder
        self.ready = ready
        # Called first on every scrape: moves counts kept per cache entry into ``counters``.
        self.fold = fold

    def collect(self):
        if self.fold is not None:
            self.fold()
        base = ["server", "zone", "view"]
        req = CounterMetricFamily("coredns_dns_requests", "Counter of DNS requests made per zone, protocol and family.", labels=[*base, "proto", "family", "type"])
        agg: dict = {}
        for (proto, fam, qtype), n in list(self.c.requests.items()):
            k = (proto, str(fam), type_label(qtype))
            agg[k] = agg.get(k, 0) + n
        for (proto, fam, t), n in sorted(agg.items()):
            req.add_metric([SERVER, ZONE, "", proto, fam, t], n)
        yield req
        resp = CounterMetricFamily("coredns_dns_responses", "Counter of response status codes.", labels=[*base, "rcode", "plugin"])
        for (rcode, plugin), n in sorted(self.c.responses.items()):
            resp.add_metric([SERVER, ZONE, "", RCODES.get(rcode, str(rcode)), PLUGINS[plugin]], n)
        yield resp
        hist = HistogramMetricFamily("coredns_dns_request_duration_seconds", "Histogram of the time (in seconds) each request took per zone.", labels=[*base, "type"])
        hagg: dict = {}
        for qtype, counts in list(self.c.durations.items()):
            t = type_label(qtype)
            cur = hagg.setdefault(t, [[0] * (NBUCKETS + 1), 0])
            for i, n in enumerate(counts):
                cur[0][i] += n
            cur[1] += self.c.duration_sum_ns.get(qtype, 0)
        for t, (counts, sum_ns) in sorted(hagg.items()):
            buckets = []
            acc = 0
            for i in range(NBUCKETS):
                acc += counts[i]
                buckets.append((repr(BUCKET0_NS * (1 << i) / 1e9), acc))
            acc += counts[NBUCKETS]
            buckets.append(("+Inf", acc))
            hist.add_metric([SERVER, ZONE, "", t], buckets, sum_ns / 1e9)
        yield hist
        ap = CounterMetricFamily("coredns_autopath_success", "Counter of requests that did autopath.", labels=["server"])
        ap.add_metric([SERVER], self.c.autopath_success)
        yield ap
        if self.forwarder is not None:
            cs = self.forwarder.cache.stats
            hits = CounterMetricFamily("coredns_cache_hits", "The count of cache hits.", labels=["server", "type", "zones", "view"])
            hits.add_metric([SERVER, "success", ZONE, ""], cs.hits_success)
            hits.add_metric([SERVER, "denial", ZONE, ""], cs.hits_denial)
            yield hits
            miss = CounterMetricFamily("coredns_cache_misses", "The count of cache misses.", labels=["server", "zones", "view"])
            miss.add_metric([SERVER, ZONE, ""], cs.misses)
            yield miss
            ent = GaugeMetricFamily("coredns_cache_entries", "The number of elements in the cache.", labels=["server", "type", "zones", "view"])
            ent.add_metric([SERVER, "success", ZONE, ""], len(self.forwarder.cache))
            yield ent
            fs = self.forwarder.stats
            freq = CounterMetricFamily("coredns_forward_requests", "Counter of requests made per upstream.", labels=["to"])
            freq.add_metric([",".join(f"{h}:{p}" for h, p in self.forwarder.upstreams)], fs.requests)
            yield freq
            fresp = CounterMetricFamily("coredns_forward_responses", "Counter of responses received per upstream.", labels=["rcode", "to"])
            to = ",".join(f"{h}:{p}" for h, p in self.forwarder.upstreams)
            for rc, n in sorted(fs.responses.items()):
                fresp.add_metric([RCODES.get(rc, str(rc)), to], n)
            yield fresp
        if self.ready is not None:
            g = GaugeMetricFamily("coredns_kubernetes_synced", "1 once Services and EndpointSlices had their initial sync (kubelab).")
            g.add_metric([], 1 if self.ready() else 0)
            yield g


def make_registry(counters: DNSCounters, forwarder=None, ready=None, fold=None) -> CollectorRegistry:
    """A registry of its own holding only the DNS collector (``fold``: see :class:`DNSCollector`)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DNSCollector(counters, forwarder, ready, fold))
    return reg
