"""Cluster DNS answers, table-driven, against a fixture cluster (no sockets).

Addresses: fixture cluster IPs 10.0.0.0/24, 1234:abcd::/32, 10::/16;
endpoints 172.0.0.0/24, 5678:abcd::/32; pods 10.240.0.0/24 (all model data,
nothing is configured on any interface).

Expected answers are written as zone-file lines, the way CoreDNS's
plugin/kubernetes handler tests write them; each case was checked against
CoreDNS's code paths (handler.go, kubernetes.go, backend_lookup.go).
"""

from __future__ import annotations

import asyncio
import logging

import dns.flags
import dns.message
import dns.rcode
import pytest

from kubelab.dns.answer import Settings, rr_lines
from kubelab.dns.server import ClusterDNS, DNSConfig
from kubelab.dns.testing import feed, fixture_cluster

SERIAL = 1499347823
SOA = f"cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {SERIAL} 7200 1800 86400 5"


def make(pods="disabled", synced=True, ttl=5, **kw) -> ClusterDNS:
    d = ClusterDNS(DNSConfig(settings=Settings(pods=pods, ttl=ttl, **kw)), logging.getLogger("test"))
    feed(d, *fixture_cluster(), sync=synced)
    d.index.modified = SERIAL
    d._gen = -1
    return d


def ask(d: ClusterDNS, name: str, qtype: str, client: str = "10.240.0.9"):
    q = dns.message.make_query(name, qtype, use_edns=0, payload=4096)
    data = q.to_wire()
    out = d.answer_fast(data, client, False)
    if out is False:
        out, *_ = asyncio.run(d.answer_slow(data, client, False))
    else:
        out = out[0]
    m = dns.message.from_wire(out)
    return m, rr_lines(out)


# (id, qname, qtype, rcode, answer lines, authority lines, additional lines)
CASES = [
    ("a-clusterip", "svc1.testns.svc.cluster.local.", "A", "NOERROR", ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"], [], []),
    ("a-no-ready-endpoints-still-answers", "svcempty.testns.svc.cluster.local.", "A", "NOERROR", ["svcempty.testns.svc.cluster.local. 5 IN A 10.0.0.2"], [], []),
    ("aaaa-on-v4-service-nodata", "svc1.testns.svc.cluster.local.", "AAAA", "NOERROR", [], [SOA], []),
    ("aaaa-v6", "svc6.testns.svc.cluster.local.", "AAAA", "NOERROR", ["svc6.testns.svc.cluster.local. 5 IN AAAA 1234:abcd::1"], [], []),
    ("a-dual-stack", "svc-dual-stack.testns.svc.cluster.local.", "A", "NOERROR", ["svc-dual-stack.testns.svc.cluster.local. 5 IN A 10.0.0.3"], [], []),
    ("aaaa-dual-stack", "svc-dual-stack.testns.svc.cluster.local.", "AAAA", "NOERROR", ["svc-dual-stack.testns.svc.cluster.local. 5 IN AAAA 10::3"], [], []),
    (
        "srv-dual-stack-weight-50",
        "svc-dual-stack.testns.svc.cluster.local.",
        "SRV",
        "NOERROR",
        ["svc-dual-stack.testns.svc.cluster.local. 5 IN SRV 0 50 80 svc-dual-stack.testns.svc.cluster.local."],
        [],
        ["svc-dual-stack.testns.svc.cluster.local. 5 IN A 10.0.0.3", "svc-dual-stack.testns.svc.cluster.local. 5 IN AAAA 10::3"],
    ),
    ("a-missing-service", "svc0.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-missing-namespace", "svc0.svc-nons.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-namespace-name-nodata", "testns.svc.cluster.local.", "A", "NOERROR", [], [SOA], []),
    ("a-missing-namespace-name", "nons.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-svc-apex-nodata", "svc.cluster.local.", "A", "NOERROR", [], [SOA], []),
    ("a-pod-apex-nodata", "pod.cluster.local.", "A", "NOERROR", [], [SOA], []),
    ("a-zone-apex-nodata", "cluster.local.", "A", "NOERROR", [], [SOA], []),
    ("a-not-svc-or-pod", "foo.bar.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-too-long", "a.b.c.svc1.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("txt-dns-version", "dns-version.cluster.local.", "TXT", "NOERROR", ['dns-version.cluster.local. 28800 IN TXT "1.1.0"'], [], []),
    ("txt-existing-name-nodata", "svc1.testns.svc.cluster.local.", "TXT", "NOERROR", [], [SOA], []),
    ("txt-missing-nxdomain", "svc0.svc-nons.svc.cluster.local.", "TXT", "NXDOMAIN", [], [SOA], []),
    ("txt-namespace-name-nxdomain", "testns.svc.cluster.local.", "TXT", "NXDOMAIN", [], [SOA], []),
    ("soa-apex", "cluster.local.", "SOA", "NOERROR", [SOA], [], []),
    ("soa-below-apex-nodata", "svc1.testns.svc.cluster.local.", "SOA", "NOERROR", [], [SOA], []),
    ("soa-missing-name-still-nodata", "nothere.testns.svc.cluster.local.", "SOA", "NOERROR", [], [SOA], []),
    ("ns-below-apex-nodata", "svc.cluster.local.", "NS", "NOERROR", [], [SOA], []),
    ("ns-missing-nxdomain", "foo.svc.cluster.local.", "NS", "NXDOMAIN", [], [SOA], []),
    ("mx-existing-nodata", "svc1.testns.svc.cluster.local.", "MX", "NOERROR", [], [SOA], []),
    ("https-existing-nodata", "svc1.testns.svc.cluster.local.", "HTTPS", "NOERROR", [], [SOA], []),
    ("https-missing-nxdomain", "svc9.testns.svc.cluster.local.", "HTTPS", "NXDOMAIN", [], [SOA], []),
    (
        "srv-service",
        "svc1.testns.svc.cluster.local.",
        "SRV",
        "NOERROR",
        ["svc1.testns.svc.cluster.local. 5 IN SRV 0 100 80 svc1.testns.svc.cluster.local."],
        [],
        ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    (
        "srv-named-port",
        "_http._tcp.svc1.testns.svc.cluster.local.",
        "SRV",
        "NOERROR",
        ["_http._tcp.svc1.testns.svc.cluster.local. 5 IN SRV 0 100 80 svc1.testns.svc.cluster.local."],
        [],
        ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    ("srv-wrong-protocol", "_http._udp.svc1.testns.svc.cluster.local.", "SRV", "NXDOMAIN", [], [SOA], []),
    ("srv-unknown-port", "_nope._tcp.svc1.testns.svc.cluster.local.", "SRV", "NXDOMAIN", [], [SOA], []),
    (
        "srv-all-ports-weights",
        "multiport.testns.svc.cluster.local.",
        "SRV",
        "NOERROR",
        [
            "multiport.testns.svc.cluster.local. 5 IN SRV 0 25 80 multiport.testns.svc.cluster.local.",
            "multiport.testns.svc.cluster.local. 5 IN SRV 0 25 443 multiport.testns.svc.cluster.local.",
            "multiport.testns.svc.cluster.local. 5 IN SRV 0 25 53 multiport.testns.svc.cluster.local.",
            "multiport.testns.svc.cluster.local. 5 IN SRV 0 25 8080 multiport.testns.svc.cluster.local.",
        ],
        [],
        ["multiport.testns.svc.cluster.local. 5 IN A 10.0.0.4"],
    ),
    (
        "srv-udp-port",
        "_dns._udp.multiport.testns.svc.cluster.local.",
        "SRV",
        "NOERROR",
        ["_dns._udp.multiport.testns.svc.cluster.local. 5 IN SRV 0 100 53 multiport.testns.svc.cluster.local."],
        [],
        ["multiport.testns.svc.cluster.local. 5 IN A 10.0.0.4"],
    ),
    ("a-port-protocol-without-underscores", "http.tcp.svc1.testns.svc.cluster.local.", "A", "NOERROR", ["http.tcp.svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"], [], []),
    ("a-service-without-ports-nxdomain", "noports.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    (
        "a-headless",
        "hdls1.testns.svc.cluster.local.",
        "A",
        "NOERROR",
        [f"hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.{i}" for i in (2, 3, 4, 5)],
        [],
        [],
    ),
    (
        "aaaa-headless",
        "hdls1.testns.svc.cluster.local.",
        "AAAA",
        "NOERROR",
        ["hdls1.testns.svc.cluster.local. 5 IN AAAA 5678:abcd::1", "hdls1.testns.svc.cluster.local. 5 IN AAAA 5678:abcd::2"],
        [],
        [],
    ),
    (
        "srv-headless-one-per-endpoint",
        "_http._tcp.hdls1.testns.svc.cluster.local.",
        "SRV",
        "NOERROR",
        [
            "_http._tcp.hdls1.testns.svc.cluster.local. 5 IN SRV 0 16 80 172-0-0-2.hdls1.testns.svc.cluster.local.",
            "_http._tcp.hdls1.testns.svc.cluster.local. 5 IN SRV 0 16 80 172-0-0-3.hdls1.testns.svc.cluster.local.",
            "_http._tcp.hdls1.testns.svc.cluster.local. 5 IN SRV 0 16 80 dup-name.hdls1.testns.svc.cluster.local.",
            "_http._tcp.hdls1.testns.svc.cluster.local. 5 IN SRV 0 16 80 5678-abcd--1.hdls1.testns.svc.cluster.local.",
            "_http._tcp.hdls1.testns.svc.cluster.local. 5 IN SRV 0 16 80 5678-abcd--2.hdls1.testns.svc.cluster.local.",
        ],
        [],
        [
            "172-0-0-2.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.2",
            "172-0-0-3.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.3",
            "dup-name.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.4",
            "dup-name.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.5",
            "5678-abcd--1.hdls1.testns.svc.cluster.local. 5 IN AAAA 5678:abcd::1",
            "5678-abcd--2.hdls1.testns.svc.cluster.local. 5 IN AAAA 5678:abcd::2",
        ],
    ),
    ("a-endpoint-by-ip-name", "172-0-0-2.hdls1.testns.svc.cluster.local.", "A", "NOERROR", ["172-0-0-2.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.2"], [], []),
    (
        "a-endpoint-by-hostname-two-ips",
        "dup-name.hdls1.testns.svc.cluster.local.",
        "A",
        "NOERROR",
        ["dup-name.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.4", "dup-name.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.5"],
        [],
        [],
    ),
    ("aaaa-endpoint-v6-name", "5678-abcd--2.hdls1.testns.svc.cluster.local.", "AAAA", "NOERROR", ["5678-abcd--2.hdls1.testns.svc.cluster.local. 5 IN AAAA 5678:abcd::2"], [], []),
    ("a-not-ready-endpoint-nxdomain", "172-0-0-6.hdls1.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-headless-no-ready-nxdomain", "hdlsempty.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-bogus-endpoint", "bogusendpoint.hdls1.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("a-endpoint-of-clusterip-service", "ep1a.svc1.testns.svc.cluster.local.", "A", "NOERROR", ["ep1a.svc1.testns.svc.cluster.local. 5 IN A 172.0.0.1"], [], []),
    ("a-headless-portless", "hdlsprtls.testns.svc.cluster.local.", "A", "NOERROR", ["hdlsprtls.testns.svc.cluster.local. 5 IN A 172.0.0.20"], [], []),
    ("srv-headless-portless-nodata", "hdlsprtls.testns.svc.cluster.local.", "SRV", "NOERROR", [], [SOA], []),
    ("cname-externalname", "external.testns.svc.cluster.local.", "CNAME", "NOERROR", ["external.testns.svc.cluster.local. 5 IN CNAME ext.interwebs.test."], [], []),
    ("cname-clusterip-nodata", "svc1.testns.svc.cluster.local.", "CNAME", "NOERROR", [], [SOA], []),
    (
        "a-externalname-to-service",
        "external-to-service.testns.svc.cluster.local.",
        "A",
        "NOERROR",
        ["external-to-service.testns.svc.cluster.local. 5 IN CNAME svc1.testns.svc.cluster.local.", "svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
        [],
        [],
    ),
    ("srv-externalname-nodata", "external.testns.svc.cluster.local.", "SRV", "NOERROR", [], [SOA], []),
    ("a-externalname-subdomain-nxdomain", "endpoint.external.testns.svc.cluster.local.", "CNAME", "NXDOMAIN", [], [SOA], []),
    ("a-externalname-ip-nxdomain", "external-ip.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("ptr-cluster-ip", "1.0.0.10.in-addr.arpa.", "PTR", "NOERROR", ["1.0.0.10.in-addr.arpa. 5 IN PTR svc1.testns.svc.cluster.local."], [], []),
    (
        "ptr-cluster-ipv6",
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa.",
        "PTR",
        "NOERROR",
        ["1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa. 5 IN PTR svc6.testns.svc.cluster.local."],
        [],
        [],
    ),
    ("ptr-headless-endpoint", "4.0.0.172.in-addr.arpa.", "PTR", "NOERROR", ["4.0.0.172.in-addr.arpa. 5 IN PTR dup-name.hdls1.testns.svc.cluster.local."], [], []),
    ("ptr-clusterip-endpoint", "1.0.0.172.in-addr.arpa.", "PTR", "NOERROR", ["1.0.0.172.in-addr.arpa. 5 IN PTR ep1a.svc1.testns.svc.cluster.local."], [], []),
    ("ptr-in-zone-name-nodata", "svc1.testns.svc.cluster.local.", "PTR", "NOERROR", [], [SOA], []),
    ("case-insensitive", "SVC1.TestNS.Svc.Cluster.Local.", "A", "NOERROR", ["SVC1.TestNS.Svc.Cluster.Local. 5 IN A 10.0.0.1"], [], []),
    ("pods-disabled-nxdomain", "10-240-0-1.podns.pod.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    # Wildcards ("*" or "any" for a label) were removed from CoreDNS's kubernetes
    # plugin in 1.9.0 (coredns/coredns#5019): they are plain labels that match nothing.
    ("wildcard-service-nxdomain", "*.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("wildcard-any-service-nxdomain", "any.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("wildcard-namespace-nxdomain", "svc1.*.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("wildcard-endpoint-nxdomain", "*.hdls1.testns.svc.cluster.local.", "A", "NXDOMAIN", [], [SOA], []),
    ("wildcard-srv-port-nxdomain", "_*._tcp.svc1.testns.svc.cluster.local.", "SRV", "NXDOMAIN", [], [SOA], []),
]


@pytest.mark.parametrize("qname,qtype,rcode,answer,authority,additional", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_answers(qname, qtype, rcode, answer, authority, additional):
    d = make()
    m, lines = ask(d, qname, qtype)
    assert dns.rcode.to_text(m.rcode()) == rcode
    assert m.flags & dns.flags.AA
    assert not m.flags & dns.flags.RA  # authoritative answers: no recursion available, as CoreDNS
    assert lines["answer"] == answer
    assert lines["authority"] == authority
    assert lines["additional"] == additional
    # The second ask is answered from the prebuilt template and must be identical.
    m2, lines2 = ask(d, qname, qtype)
    assert lines2 == lines and m2.rcode() == m.rcode()


POD_CASES = [
    ("insecure-a", "insecure", "1-2-3-4.podns.pod.cluster.local.", "A", "NOERROR", ["1-2-3-4.podns.pod.cluster.local. 5 IN A 1.2.3.4"]),
    ("insecure-aaaa-v6-name", "insecure", "fd00--1.podns.pod.cluster.local.", "AAAA", "NOERROR", ["fd00--1.podns.pod.cluster.local. 5 IN AAAA fd00::1"]),
    ("insecure-not-an-ip", "insecure", "foo.podns.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("insecure-missing-namespace", "insecure", "1-2-3-4.nons.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("insecure-namespace-nodata", "insecure", "podns.pod.cluster.local.", "A", "NOERROR", []),
    ("verified-existing", "verified", "10-240-0-1.podns.pod.cluster.local.", "A", "NOERROR", ["10-240-0-1.podns.pod.cluster.local. 5 IN A 10.240.0.1"]),
    ("verified-wrong-namespace", "verified", "10-240-0-1.testns.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("verified-unknown-ip", "verified", "1-2-3-4.podns.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("verified-deleting-pod", "verified", "10-240-0-2.podns.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("disabled", "disabled", "10-240-0-1.podns.pod.cluster.local.", "A", "NXDOMAIN", []),
]


@pytest.mark.parametrize("mode,qname,qtype,rcode,answer", [c[1:] for c in POD_CASES], ids=[c[0] for c in POD_CASES])
def test_pod_records(mode, qname, qtype, rcode, answer):
    m, lines = ask(make(pods=mode), qname, qtype)
    assert dns.rcode.to_text(m.rcode()) == rcode
    assert lines["answer"] == answer
    if not answer:
        assert lines["authority"] == [SOA]


def test_servfail_until_synced_then_nxdomain():
    d = make(synced=False)
    m, lines = ask(d, "svc0.testns.svc.cluster.local.", "A")
    assert m.rcode() == dns.rcode.SERVFAIL and lines["authority"] == [SOA]
    d.on_services_synced()
    m, _ = ask(d, "svc0.testns.svc.cluster.local.", "A")
    assert m.rcode() == dns.rcode.SERVFAIL  # endpoints not synced yet
    d.on_endpoint_slices_synced()
    d.index.modified = SERIAL
    m, lines = ask(d, "svc0.testns.svc.cluster.local.", "A")
    assert m.rcode() == dns.rcode.NXDOMAIN and lines["authority"] == [SOA]


def test_ttl_flag_applies_to_records_and_soa():
    d = make(ttl=30)
    _, lines = ask(d, "svc1.testns.svc.cluster.local.", "A")
    assert lines["answer"] == ["svc1.testns.svc.cluster.local. 30 IN A 10.0.0.1"]
    _, lines = ask(d, "svc1.testns.svc.cluster.local.", "AAAA")
    assert lines["authority"] == [f"cluster.local. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {SERIAL} 7200 1800 86400 30"]


def test_ns_records_name_the_dns_service_when_we_are_its_endpoint():
    d = make(local_ips=("172.0.0.100",))
    _, lines = ask(d, "cluster.local.", "NS")
    assert lines["answer"] == ["cluster.local. 5 IN NS kube-dns.kube-system.svc.cluster.local."]
    assert lines["additional"] == ["kube-dns.kube-system.svc.cluster.local. 5 IN A 10.0.0.10"]
    d2 = make(local_ips=("192.0.2.53",))
    _, lines = ask(d2, "ns.dns.cluster.local.", "A")
    assert lines["answer"] == ["ns.dns.cluster.local. 5 IN A 192.0.2.53"]


def test_changes_replace_prebuilt_answers():
    from kubelab.dns.testing import eps, svc

    d = make()
    _, lines = ask(d, "svc1.testns.svc.cluster.local.", "A")
    assert lines["answer"] == ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"]
    old = svc("testns", "svc1", ("10.0.0.1",))
    d.on_service_update(old, svc("testns", "svc1", ("10.0.0.99",)))
    _, lines = ask(d, "svc1.testns.svc.cluster.local.", "A")
    assert lines["answer"] == ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.99"]
    d.on_service_delete(svc("testns", "svc1", ("10.0.0.99",)))
    m, _ = ask(d, "svc1.testns.svc.cluster.local.", "A")
    assert m.rcode() == dns.rcode.NXDOMAIN
    d.on_endpoint_slice_delete(eps("testns", "hdls1", [], name="hdls1-abc12"))
    _, lines = ask(d, "hdls1.testns.svc.cluster.local.", "A")
    assert lines["answer"] == []
    _, lines = ask(d, "hdls1.testns.svc.cluster.local.", "AAAA")
    assert len(lines["answer"]) == 2


def test_axfr_refused():
    m, _ = ask(make(), "cluster.local.", "AXFR")
    assert m.rcode() == dns.rcode.REFUSED


def _headless_with_pods(publish_not_ready: bool) -> ClusterDNS:
    """A headless Service whose slices come from the lab's endpoints controller (kube-controller-manager's rules)."""
    from kubelab.model import ObjectMeta, Pod, Service, ServicePortSpec
    from kubelab.netlab.endpoints import service_endpoint_slices

    svc_ = Service(
        meta=ObjectMeta(name="db", namespace="testns"),
        cluster_ips=("None",),
        ports=(ServicePortSpec(port=5432, name="pg"),),
        selector={"app": "db"},
        publish_not_ready_addresses=publish_not_ready,
    )
    pods = [
        Pod(meta=ObjectMeta(name="db-0", namespace="testns", labels={"app": "db"}), hostname="db-0", subdomain="db", pod_ips=("10.240.1.1",)),
        Pod(meta=ObjectMeta(name="db-1", namespace="testns", labels={"app": "db"}), hostname="db-1", subdomain="db", pod_ips=("10.240.1.2",), ready=False),
        Pod(meta=ObjectMeta(name="db-x", namespace="testns", labels={"app": "db"}), pod_ips=("10.240.1.3",)),  # no hostname: the dashed-IP name
    ]
    d = ClusterDNS(DNSConfig(settings=Settings()), logging.getLogger("test"))
    d.on_service_add(svc_)
    for sl in service_endpoint_slices(svc_, pods, {}):
        d.on_endpoint_slice_add(sl)
    d.on_services_synced()
    d.on_endpoint_slices_synced()
    d.index.modified = SERIAL
    return d


@pytest.mark.parametrize("publish_not_ready", [False, True], ids=["ready-only", "publishNotReadyAddresses"])
def test_headless_ready_endpoints_unless_publish_not_ready(publish_not_ready):
    d = _headless_with_pods(publish_not_ready)
    ips = ["10.240.1.1", "10.240.1.3"] + (["10.240.1.2"] if publish_not_ready else [])
    _, lines = ask(d, "db.testns.svc.cluster.local.", "A")
    assert sorted(lines["answer"]) == sorted(f"db.testns.svc.cluster.local. 5 IN A {ip}" for ip in ips)
    _, lines = ask(d, "_pg._tcp.db.testns.svc.cluster.local.", "SRV")
    names = ["db-0", "10-240-1-3"] + (["db-1"] if publish_not_ready else [])
    w = 100 // len(names)
    assert sorted(lines["answer"]) == sorted(f"_pg._tcp.db.testns.svc.cluster.local. 5 IN SRV 0 {w} 5432 {n}.db.testns.svc.cluster.local." for n in names)
    m, lines = ask(d, "db-1.db.testns.svc.cluster.local.", "A")
    if publish_not_ready:
        assert lines["answer"] == ["db-1.db.testns.svc.cluster.local. 5 IN A 10.240.1.2"]
    else:
        assert dns.rcode.to_text(m.rcode()) == "NXDOMAIN" and lines["authority"] == [SOA]
    _, lines = ask(d, "1.1.240.10.in-addr.arpa.", "PTR")
    assert lines["answer"] == ["1.1.240.10.in-addr.arpa. 5 IN PTR db-0.db.testns.svc.cluster.local."]
    _, lines = ask(d, "3.1.240.10.in-addr.arpa.", "PTR")
    assert lines["answer"] == ["3.1.240.10.in-addr.arpa. 5 IN PTR 10-240-1-3.db.testns.svc.cluster.local."]
