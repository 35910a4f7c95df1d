"""dig against a running kubelab DNS server on loopback: every record type, UDP and TCP.

Addresses: the server listens on 127.0.0.1 (ephemeral port); a dnsmasq
upstream on 127.0.0.1 (ephemeral port) serves example.test; queries come
from 127.0.0.1, and from 127.0.0.2 as a client outside the recursion CIDRs.
Model data: 10.0.0.0/24, 172.0.0.0/24, 1234:abcd::/32, 5678:abcd::/32.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import pytest

from kubelab.dns.answer import Settings
from kubelab.dns.server import DNSConfig
from kubelab.dns.testing import ThreadedServer, fixture_cluster


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream():
    """dnsmasq as the upstream resolver, authoritative-ish for .test."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            "dnsmasq", "-k", "-C", "/dev/null", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--local=/test/", "--address=/example.test/192.0.2.80",
            "--address=/ext.interwebs.test/192.0.2.81", "--pid-file=", "--user=", "--log-facility=/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            r = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=1", "example.test"], capture_output=True, text=True)
            if "192.0.2.80" in r.stdout:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"dnsmasq did not come up: {proc.stderr.read1().decode() if proc.poll() is not None else ''}")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(upstream):
    config = DNSConfig(settings=Settings(pods="insecure"), recursion_cidrs=("127.0.0.1/32",))
    with ThreadedServer(config, *fixture_cluster(), upstreams=[("127.0.0.1", upstream)]) as s:
        yield s


def dig(server, *args, source=None):
    cmd = ["dig", "@127.0.0.1", "-p", str(server.port), "+tries=1", "+time=3", "+noall", "+answer", "+comments", *args]
    if source:
        cmd += ["-b", source]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    status = next(line.split("status: ")[1].split(",")[0] for line in r.stdout.splitlines() if "status:" in line)
    flags = next(line.split("flags: ")[1].split(";")[0].split() for line in r.stdout.splitlines() if "flags:" in line)
    answers = [" ".join(line.split()) for line in r.stdout.splitlines() if line and not line.startswith(";")]
    return status, flags, answers


CASES = [
    ("A", ["svc1.testns.svc.cluster.local", "A"], "NOERROR", ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"]),
    ("AAAA", ["svc6.testns.svc.cluster.local", "AAAA"], "NOERROR", ["svc6.testns.svc.cluster.local. 5 IN AAAA 1234:abcd::1"]),
    ("SRV", ["_http._tcp.svc1.testns.svc.cluster.local", "SRV"], "NOERROR", ["_http._tcp.svc1.testns.svc.cluster.local. 5 IN SRV 0 100 80 svc1.testns.svc.cluster.local."]),
    ("PTR", ["-x", "10.0.0.1"], "NOERROR", ["1.0.0.10.in-addr.arpa. 5 IN PTR svc1.testns.svc.cluster.local."]),
    ("PTR-v6", ["-x", "1234:abcd::1"], "NOERROR", ["1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa. 5 IN PTR svc6.testns.svc.cluster.local."]),
    ("TXT", ["dns-version.cluster.local", "TXT"], "NOERROR", ['dns-version.cluster.local. 28800 IN TXT "1.1.0"']),
    ("CNAME", ["external.testns.svc.cluster.local", "CNAME"], "NOERROR", ["external.testns.svc.cluster.local. 5 IN CNAME ext.interwebs.test."]),
    ("SOA", ["cluster.local", "SOA"], "NOERROR", None),
    ("headless-A", ["hdls1.testns.svc.cluster.local", "A"], "NOERROR", [f"hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.{i}" for i in (2, 3, 4, 5)]),
    ("endpoint-A", ["dup-name.hdls1.testns.svc.cluster.local"], "NOERROR", ["dup-name.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.4", "dup-name.hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.5"]),
    (
        "SRV-headless-per-endpoint",
        ["_http._tcp.hdls1.testns.svc.cluster.local", "SRV"],
        "NOERROR",
        [
            f"_http._tcp.hdls1.testns.svc.cluster.local. 5 IN SRV 0 16 80 {h}.hdls1.testns.svc.cluster.local."
            for h in ("172-0-0-2", "172-0-0-3", "dup-name", "5678-abcd--1", "5678-abcd--2")
        ],
    ),
    ("AAAA-endpoint-dashed-v6", ["5678-abcd--1.hdls1.testns.svc.cluster.local", "AAAA"], "NOERROR", ["5678-abcd--1.hdls1.testns.svc.cluster.local. 5 IN AAAA 5678:abcd::1"]),
    ("PTR-headless-endpoint", ["-x", "172.0.0.2"], "NOERROR", ["2.0.0.172.in-addr.arpa. 5 IN PTR 172-0-0-2.hdls1.testns.svc.cluster.local."]),
    ("PTR-endpoint-hostname", ["-x", "172.0.0.4"], "NOERROR", ["4.0.0.172.in-addr.arpa. 5 IN PTR dup-name.hdls1.testns.svc.cluster.local."]),
    ("wildcard-nxdomain", ["*.testns.svc.cluster.local", "A"], "NXDOMAIN", []),
    ("MX-nodata", ["svc1.testns.svc.cluster.local", "MX"], "NOERROR", []),
    ("pod-insecure", ["1-2-3-4.testns.pod.cluster.local"], "NOERROR", ["1-2-3-4.testns.pod.cluster.local. 5 IN A 1.2.3.4"]),
    ("nxdomain", ["nope.testns.svc.cluster.local"], "NXDOMAIN", []),
    ("nodata", ["svc1.testns.svc.cluster.local", "AAAA"], "NOERROR", []),
    (
        "externalname-chased-upstream",
        ["external.testns.svc.cluster.local", "A"],
        "NOERROR",
        ["external.testns.svc.cluster.local. 5 IN CNAME ext.interwebs.test.", "ext.interwebs.test. 0 IN A 192.0.2.81"],
    ),
    ("forwarded", ["example.test", "A"], "NOERROR", ["example.test. 0 IN A 192.0.2.80"]),
    ("forwarded-nxdomain", ["nothere.test", "A"], "NXDOMAIN", []),
]


@pytest.mark.parametrize("proto", ["+notcp", "+tcp"])
@pytest.mark.parametrize("args,status,answers", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_dig(server, proto, args, status, answers):
    got_status, flags, got = dig(server, proto, *args)
    assert got_status == status
    if answers is not None:
        # dnsmasq answers its --address names with TTL 0; the cache serves what it got.
        assert got == answers
    else:
        assert len(got) == 1 and got[0].startswith("cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. ")


def test_aa_on_cluster_answers_ra_on_forwarded(server):
    _, flags, _ = dig(server, "svc1.testns.svc.cluster.local")
    assert "aa" in flags and "ra" not in flags
    _, flags, _ = dig(server, "example.test")
    assert "ra" in flags


def test_outside_client_refused_recursion_but_gets_cluster_names(server):
    status, _, _ = dig(server, "example.test", source="127.0.0.2")
    assert status == "REFUSED"
    status, _, answers = dig(server, "svc1.testns.svc.cluster.local", source="127.0.0.2")
    assert status == "NOERROR" and answers == ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"]
    # ExternalName: the CNAME, but no recursion behind it for this client.
    status, _, answers = dig(server, "external.testns.svc.cluster.local", source="127.0.0.2")
    assert status == "NOERROR" and answers == ["external.testns.svc.cluster.local. 5 IN CNAME ext.interwebs.test."]


def test_udp_truncates_and_tcp_carries_everything(server):
    r = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(server.port), "+noedns", "+ignore", "+tries=1", "_http._tcp.hdls1.testns.svc.cluster.local", "SRV"],
        capture_output=True, text=True, timeout=30,
    )
    assert " tc" in r.stdout.split("flags:")[1].split(";")[0]
    _, flags, answers = dig(server, "+tcp", "+noedns", "_http._tcp.hdls1.testns.svc.cluster.local", "SRV")
    assert "tc" not in flags and len(answers) == 5


def test_forward_cache_hits_count(server):
    before = server.call(lambda d: d.forwarder.cache.stats.hits_success)
    dig(server, "example.test")
    dig(server, "EXAMPLE.test")
    after = server.call(lambda d: d.forwarder.cache.stats.hits_success)
    assert after >= before + 1


def test_metrics_and_health(upstream):
    """The CLI's HTTP side: /health, /ready, /metrics with CoreDNS names (served by the real aiohttp app)."""
    import asyncio
    import logging

    from kubelab.dns import cli as dns_cli
    from kubelab.dns.metrics import make_registry

    config = DNSConfig(settings=Settings())
    with ThreadedServer(config, *fixture_cluster(), sync=False) as s:
        port = _free_port_tcp()
        registry = make_registry(s.dns.counters, s.dns.forwarder, lambda: s.dns.ready, s.dns.fold_counts)
        runner = asyncio.run_coroutine_threadsafe(dns_cli._http(f"127.0.0.1:{port}", s.dns, registry, logging.getLogger("t")), s.loop).result(30)
        try:
            assert _get(port, "/health") == (200, "OK")
            assert _get(port, "/ready")[0] == 503
            dig(s, "svc1.testns.svc.cluster.local")  # SERVFAIL before sync? no: the name exists -> answered
            s.call(lambda d: (d.on_services_synced(), d.on_endpoint_slices_synced()))
            assert _get(port, "/ready") == (200, "OK")
            dig(s, "nope.testns.svc.cluster.local")
            dig(s, "+tcp", "svc1.testns.svc.cluster.local", "SRV")
            _, text = _get(port, "/metrics")
            assert 'coredns_dns_requests_total{family="1",proto="udp",server="dns://:53",type="A",view="",zone="."}' in text
            assert 'coredns_dns_requests_total{family="1",proto="tcp",server="dns://:53",type="SRV",view="",zone="."} 1.0' in text
            assert 'coredns_dns_responses_total{plugin="kubernetes",rcode="NXDOMAIN",server="dns://:53",view="",zone="."} 1.0' in text
            assert "coredns_dns_request_duration_seconds_bucket" in text
            assert "coredns_cache_hits_total" in text
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), s.loop).result(30)


def _udp_ask(port: int, wire_query: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(10)
        c.sendto(wire_query, ("127.0.0.1", port))
        return c.recv(65535)


@pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "recvfrom"])
@pytest.mark.parametrize("edns", [False, True], ids=["plain", "edns"])
def test_repeated_identical_udp_queries(edns, batched):
    """The whole-packet UDP cache: same bytes but the ID -> same answer with that ID, counted once each, dropped on change."""
    import dns.message

    from kubelab.dns.metrics import make_registry
    from kubelab.dns.testing import svc

    config = DNSConfig(settings=Settings())
    with ThreadedServer(config, *fixture_cluster(), batched=batched) as s:
        q = dns.message.make_query("Svc1.testns.svc.cluster.local", "A", use_edns=0 if edns else False)
        answers = []
        for qid in (1, 2, 0xBEEF, 2):
            q.id = qid
            r = dns.message.from_wire(_udp_ask(s.port, q.to_wire()))
            assert r.id == qid
            assert r.question[0].name.to_text() == "Svc1.testns.svc.cluster.local."  # the asker's case
            answers.append([rr.to_text() for rr in r.answer])
        assert answers == [["Svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"]] * 4
        assert s.call(lambda d: sum(len(c.entries) for c in d.exact_caches)) == 1
        text = make_registry(s.dns.counters, fold=s.dns.fold_counts)
        from prometheus_client import generate_latest

        out = s.call(lambda d: generate_latest(text).decode())
        assert 'coredns_dns_requests_total{family="1",proto="udp",server="dns://:53",type="A",view="",zone="."} 4.0' in out
        assert 'coredns_dns_responses_total{plugin="kubernetes",rcode="NOERROR",server="dns://:53",view="",zone="."} 4.0' in out
        assert 'coredns_dns_request_duration_seconds_count{server="dns://:53",type="A",view="",zone="."} 4.0' in out
        # An update drops the cached packet: the very same bytes now get the new address.
        s.call(lambda d: d.on_service_update(svc("testns", "svc1", ("10.0.0.1",)), svc("testns", "svc1", ("10.0.0.99",))))
        r = dns.message.from_wire(_udp_ask(s.port, q.to_wire()))
        assert [rr.to_text() for rr in r.answer] == ["Svc1.testns.svc.cluster.local. 5 IN A 10.0.0.99"]


def _free_port_tcp() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "recvfrom"])
def test_garbage_burst_over_udp_then_still_serving(batched):
    """Random and truncated datagrams in bursts (so they land in shared batches) never stop the server."""
    import random

    import dns.message

    rnd = random.Random(7)
    good = [dns.message.make_query(n, t, use_edns=e).to_wire() for n, t, e in (
        ("svc1.testns.svc.cluster.local", "A", False), ("hdls1.testns.svc.cluster.local", "SRV", 0), ("nope.testns.svc.cluster.local", "AAAA", 0),
    )]
    packets = []
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            packets.append(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 80))))
        elif kind == 1:
            g = rnd.choice(good)
            packets.append(g[: rnd.randrange(0, len(g))])
        else:
            g = bytearray(rnd.choice(good))
            for _ in range(rnd.randrange(1, 4)):
                g[rnd.randrange(len(g))] = rnd.getrandbits(8)
            packets.append(bytes(g))
    with ThreadedServer(DNSConfig(settings=Settings()), *fixture_cluster(), batched=batched) as s:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            for p in packets:
                c.sendto(p, ("127.0.0.1", s.port))
        q = dns.message.make_query("svc1.testns.svc.cluster.local", "A")
        r = dns.message.from_wire(_udp_ask(s.port, q.to_wire()))
        assert r.id == q.id and [rr.to_text() for rr in r.answer] == ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"]
