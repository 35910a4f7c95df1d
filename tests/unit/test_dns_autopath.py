"""--autopath against CoreDNS's autopath @kubernetes semantics, with dig as the client.

Addresses: the server listens on 127.0.0.1 (ephemeral port); "pods" are
loopback addresses that dig sends from with -b: 127.0.0.9 (pod testns/client),
127.0.0.10 (pod podns/foo), 127.0.0.11 (pod podns/walled, outside the
recursion CIDRs), 127.0.0.12 (no pod); a dnsmasq upstream on 127.0.0.1
(ephemeral port) serves example.test and web.corp.test.  Model data:
10.0.0.0/24, 172.0.0.0/24, 1234:abcd::/32, 5678:abcd::/32.

What CoreDNS does (plugin/autopath/autopath.go, plugin/kubernetes/autopath.go):
the client's namespace comes from the pod with the query's source IP (pods
verified); autopath applies only when the asked name is the first search
domain <ns>.svc.<zone> or under it; the walk tries base + each of
<ns>.svc.<zone>, svc.<zone>, <zone>, the server's own resolv.conf search
domains, and base itself; the first answer that is neither NXDOMAIN nor a
non-written error (SERVFAIL, REFUSED, ...) is returned with a CNAME from the
asked name to the found owner put in front (TTL of that record) and the
question kept as asked; when nothing is found the first element's reply goes
back (the client walks on itself).
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from kubelab.dns.answer import Settings
from kubelab.dns.server import DNSConfig
from kubelab.dns.testing import ThreadedServer, fixture_cluster, pod

POD_TESTNS = "127.0.0.9"
POD_PODNS = "127.0.0.10"
POD_WALLED = "127.0.0.11"
NOT_A_POD = "127.0.0.12"
SOA_TAIL = "ns.dns.cluster.local. hostmaster.cluster.local."


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream():
    """dnsmasq answering example.test and web.corp.test, NXDOMAIN for the rest of .test."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            "dnsmasq", "-k", "-C", "/dev/null", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--local=/test/", "--address=/example.test/192.0.2.80",
            "--address=/web.corp.test/192.0.2.90", "--pid-file=", "--user=", "--log-facility=/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            r = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=1", "example.test"], capture_output=True, text=True)
            if "192.0.2.80" in r.stdout:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("dnsmasq (the test upstream) did not come up")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(upstream):
    services, slices, pods = fixture_cluster()
    pods = [*pods, pod("testns", "client-lo", POD_TESTNS), pod("podns", "foo-lo", POD_PODNS), pod("podns", "walled", POD_WALLED)]
    config = DNSConfig(
        settings=Settings(pods="verified"),
        recursion_cidrs=("127.0.0.1/32", f"{POD_TESTNS}/32", f"{POD_PODNS}/32"),
        autopath=True,
        autopath_search=("corp.test.",),  # the server's own resolv.conf search list
    )
    with ThreadedServer(config, services, slices, pods, upstreams=[("127.0.0.1", upstream)]) as s:
        yield s


def dig(server, name, qtype="A", *, source, proto="+notcp"):
    cmd = ["dig", "@127.0.0.1", "-p", str(server.port), "-b", source, "+tries=1", "+time=5", "+noall", "+answer", "+authority", "+comments", proto, name, qtype]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    status = next(line.split("status: ")[1].split(",")[0] for line in r.stdout.splitlines() if "status:" in line)
    lines = [" ".join(line.split()) for line in r.stdout.splitlines() if line and not line.startswith(";")]
    # SOA serials follow the index's modification time: compare the stable part.
    lines = [line.split(SOA_TAIL)[0] + SOA_TAIL if SOA_TAIL in line else line for line in lines]
    return status, lines


SOA = f"cluster.local. 5 IN SOA {SOA_TAIL}"

# (id, client IP, asked name, qtype, rcode, answer + authority as zone-file lines)
CASES = [
    (
        "first-element-found-no-cname",
        POD_TESTNS, "svc1.testns.svc.cluster.local.", "A", "NOERROR",
        ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    (
        "svc.ns-found-at-svc.zone",
        POD_PODNS, "svc1.testns.podns.svc.cluster.local.", "A", "NOERROR",
        ["svc1.testns.podns.svc.cluster.local. 5 IN CNAME svc1.testns.svc.cluster.local.", "svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    (
        "short-name-in-own-namespace",
        POD_TESTNS, "svc1.testns.svc.cluster.local.", "A", "NOERROR",
        ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    (
        "found-at-zone",
        POD_PODNS, "svc1.testns.svc.podns.svc.cluster.local.", "A", "NOERROR",
        ["svc1.testns.svc.podns.svc.cluster.local. 5 IN CNAME svc1.testns.svc.cluster.local.", "svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    (
        "headless-all-endpoints-behind-one-cname",
        POD_PODNS, "hdls1.testns.podns.svc.cluster.local.", "A", "NOERROR",
        ["hdls1.testns.podns.svc.cluster.local. 5 IN CNAME hdls1.testns.svc.cluster.local."]
        + [f"hdls1.testns.svc.cluster.local. 5 IN A 172.0.0.{i}" for i in (2, 3, 4, 5)],
    ),
    (
        "srv-walked-too",
        POD_PODNS, "_http._tcp.svc1.testns.podns.svc.cluster.local.", "SRV", "NOERROR",
        [
            "_http._tcp.svc1.testns.podns.svc.cluster.local. 5 IN CNAME _http._tcp.svc1.testns.svc.cluster.local.",
            "_http._tcp.svc1.testns.svc.cluster.local. 5 IN SRV 0 100 80 svc1.testns.svc.cluster.local.",
        ],
    ),
    (
        # NODATA is not NXDOMAIN: the walk stops there; no record to CNAME to, only the SOA.
        "nodata-stops-the-walk",
        POD_PODNS, "svc1.testns.podns.svc.cluster.local.", "AAAA", "NOERROR",
        [SOA],
    ),
    (
        "external-name-found-upstream",
        POD_PODNS, "example.test.podns.svc.cluster.local.", "A", "NOERROR",
        ["example.test.podns.svc.cluster.local. 0 IN CNAME example.test.", "example.test. 0 IN A 192.0.2.80"],
    ),
    (
        "server-search-domain",
        POD_PODNS, "web.podns.svc.cluster.local.", "A", "NOERROR",
        ["web.podns.svc.cluster.local. 0 IN CNAME web.corp.test.", "web.corp.test. 0 IN A 192.0.2.90"],
    ),
    (
        # Nothing anywhere: the first element's own reply, so the client walks on.
        "nothing-found-first-reply",
        POD_PODNS, "nothere.podns.svc.cluster.local.", "A", "NXDOMAIN",
        [SOA],
    ),
    (
        # Upstream elements are REFUSED for this client: not written, so the walk moves on and ends at the first reply.
        "no-recursion-walks-on",
        POD_WALLED, "example.test.podns.svc.cluster.local.", "A", "NXDOMAIN",
        [SOA],
    ),
    (
        "cluster-names-still-found-without-recursion",
        POD_WALLED, "svc1.testns.podns.svc.cluster.local.", "A", "NOERROR",
        ["svc1.testns.podns.svc.cluster.local. 5 IN CNAME svc1.testns.svc.cluster.local.", "svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
    (
        "not-a-pod-no-autopath",
        NOT_A_POD, "svc1.testns.podns.svc.cluster.local.", "A", "NXDOMAIN",
        [SOA],
    ),
    (
        # firstInSearchPath: the name must be under the client's own <ns>.svc.<zone>.
        "other-namespace-suffix-no-autopath",
        POD_TESTNS, "svc1.testns.podns.svc.cluster.local.", "A", "NXDOMAIN",
        [SOA],
    ),
    (
        "outside-the-zone-no-autopath",
        POD_PODNS, "example.test.", "A", "NOERROR",
        ["example.test. 0 IN A 192.0.2.80"],
    ),
    (
        "case-of-the-asked-name-echoed",
        POD_PODNS, "Svc1.TestNS.PodNS.svc.cluster.local.", "A", "NOERROR",
        ["Svc1.TestNS.PodNS.svc.cluster.local. 5 IN CNAME svc1.testns.svc.cluster.local.", "svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"],
    ),
]


@pytest.mark.parametrize("proto", ["+notcp", "+tcp"])
@pytest.mark.parametrize("client,name,qtype,rcode,lines", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_autopath(server, proto, client, name, qtype, rcode, lines):
    got_rcode, got = dig(server, name, qtype, source=client, proto=proto)
    assert (got_rcode, got) == (rcode, lines)


def test_autopath_counter_and_repeat(server):
    """coredns_autopath_success counts found walks; asking again (served from the prebuilt answer) gives the same bytes."""
    before = server.call(lambda d: d.counters.autopath_success)
    first = dig(server, "svc1.testns.podns.svc.cluster.local.", source=POD_PODNS)
    again = dig(server, "svc1.testns.podns.svc.cluster.local.", source=POD_PODNS)
    assert first == again and first[0] == "NOERROR"
    assert server.call(lambda d: d.counters.autopath_success) >= before + 1


def test_autopath_follows_pod_changes(server):
    """The namespace comes from the pod that has the IP now: move it and the walk follows."""
    moved = pod("testns", "foo-lo-moved", POD_PODNS)
    old = pod("podns", "foo-lo", POD_PODNS)
    try:
        server.call(lambda d: (d.on_pod_delete(old), d.on_pod_add(moved)))
        # The old namespace's suffix no longer triggers autopath for this client...
        assert dig(server, "svc1.testns.podns.svc.cluster.local.", source=POD_PODNS) == ("NXDOMAIN", [SOA])
        # ...the new one does.
        rcode, lines = dig(server, "kube-dns.kube-system.testns.svc.cluster.local.", source=POD_PODNS)
        assert rcode == "NOERROR" and lines == [
            "kube-dns.kube-system.testns.svc.cluster.local. 5 IN CNAME kube-dns.kube-system.svc.cluster.local.",
            "kube-dns.kube-system.svc.cluster.local. 5 IN A 10.0.0.10",
        ]
    finally:
        server.call(lambda d: (d.on_pod_delete(moved), d.on_pod_add(old)))
