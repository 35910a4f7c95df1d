"""musl's own resolver vs ``kubelab resolve --style musl``: the same queries, in the same order, the same verdict.

Addresses (inside a network namespace kl-dnsmusl-<pid> this test creates and
removes): kubelab dns on 10.96.0.10:53 (on lo); a dnsmasq upstream on
127.0.0.1:5300 that answers *.test names (example.test: A 192.0.2.80 and
NXDOMAIN for AAAA; dual.test: 192.0.2.81 and 2001:db8::81; other *.test
NXDOMAIN) and REFUSES everything else; a second kubelab dns on 10.96.0.11:53
for the two-nameserver case; a failing server on 10.96.0.12:53 that answers
every question SERVFAIL at once.  resolv.conf is kubelet-style
(three search domains, ndots:5, plus timeout:2 as a pod's dnsConfig would
add, to keep the failure cases short) via /etc/netns/<ns>/resolv.conf, which
``ip netns exec`` bind-mounts over /etc/resolv.conf.  The server logs every
question it receives; that log is the wire trace.

The musl side is tests/kernel/musl_getaddrinfo.c, built here with
``musl-gcc -static`` (Debian's musl-tools): getaddrinfo(name, AF_UNSPEC),
which runs musl's name_from_dns_search and its query core __res_msend_rc --
A and AAAA sent together for each candidate name, only NXDOMAIN moves the
search on, REFUSED answers ignored and SERVFAIL re-asked until the timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

NS = f"kl-dnsmusl-{os.getpid()}"
RESOLV = "nameserver 10.96.0.10\nsearch testns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2\n"
SOURCE = Path(__file__).with_name("musl_getaddrinfo.c")

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    import dns.message, dns.rcode
    from kubelab.dns.answer import Settings
    from kubelab.dns.server import DNSConfig
    from kubelab.dns.testing import ThreadedServer, fixture_cluster
    log = open(sys.argv[1], "a", buffering=1)
    def query_log_for(server):
        def query_log(ip, name_wire, qtype, tcp):
            labels, i = [], 0
            while name_wire[i]:
                labels.append(name_wire[i + 1 : i + 1 + name_wire[i]].decode("ascii", "replace"))
                i += name_wire[i] + 1
            log.write(f"{server} {'.'.join(labels)}. {qtype}\\n")
        return query_log
    def failing_server(sock, log_query):
        # A nameserver in trouble: SERVFAIL for every question, at once.
        while True:
            data, addr = sock.recvfrom(512)
            q = dns.message.from_wire(data)
            log_query(addr[0], q.question[0].name.to_wire(), q.question[0].rdtype, False)
            r = dns.message.make_response(q)
            r.set_rcode(dns.rcode.SERVFAIL)
            sock.sendto(r.to_wire(), addr)
    failing = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    failing.bind(("10.96.0.12", 53))
    threading.Thread(target=failing_server, args=(failing, query_log_for("10.96.0.12")), daemon=True).start()
    cfg = DNSConfig(settings=Settings(), recursion_cidrs=("10.96.0.0/16", "127.0.0.0/8"))
    # Two servers (two threads) so a two-nameserver resolv.conf shows who got what.
    with ThreadedServer(cfg, *fixture_cluster(), listen=[("10.96.0.10", 53)], upstreams=[("127.0.0.1", 5300)], query_log=query_log_for("10.96.0.10")), \\
         ThreadedServer(cfg, *fixture_cluster(), listen=[("10.96.0.11", 53)], upstreams=[("127.0.0.1", 5300)], query_log=query_log_for("10.96.0.11")):
        print("ready", flush=True)
        sys.stdin.read()
    """
)


def sh(*argv, check=True, timeout=60, **kw):
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def musl_gai(tmp_path_factory) -> Path:
    """tests/kernel/musl_getaddrinfo.c linked statically against musl."""
    cc = shutil.which("musl-gcc")
    assert cc, "musl-gcc not found: apt-get install musl-tools (listed in scripts/apt-packages.txt)"
    out = tmp_path_factory.mktemp("musl") / "musl_getaddrinfo"
    r = sh(cc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(SOURCE), check=False)
    assert r.returncode == 0, f"musl-gcc failed to build {SOURCE}:\n{r.stderr}"
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dns-musl-trace")
    netns_etc = Path("/etc/netns") / NS
    procs = []
    sh("ip", "netns", "add", NS)
    try:
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text(RESOLV)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "addr", "add", "10.96.0.10/32", "dev", "lo")
        sh("ip", "-n", NS, "addr", "add", "10.96.0.11/32", "dev", "lo")
        sh("ip", "-n", NS, "addr", "add", "10.96.0.12/32", "dev", "lo")
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", NS, "dnsmasq", "-k", "-C", "/dev/null", "--port=5300", "--listen-address=127.0.0.1", "--bind-interfaces",
                 "--no-resolv", "--no-hosts", "--local=/test/", "--address=/example.test/192.0.2.80",
                 "--address=/dual.test/192.0.2.81", "--address=/dual.test/2001:db8::81", "--pid-file=", "--user=", "--log-facility=/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )
        log = tmp / "queries.log"
        log.touch()
        script = tmp / "server.py"
        script.write_text(SERVER)
        srv = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, str(script), str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(srv)
        assert srv.stdout.readline().strip() == "ready"
        yield log
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        sh("ip", "netns", "del", NS, check=False)
        shutil.rmtree(netns_etc, ignore_errors=True)


def trace(log: Path, argv, *, resolv_conf: Path | None = None) -> tuple[list[tuple[str, str, str]], subprocess.CompletedProcess]:
    """Run argv in the namespace; return the (server, name, type) questions received meanwhile, and the process.

    With ``resolv_conf``, argv runs in a mount namespace of its own where
    that file is bind-mounted over /etc/resolv.conf (the netns one stays).
    """
    start = log.stat().st_size
    if resolv_conf is not None:
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf), *argv]
    r = sh("ip", "netns", "exec", NS, *argv, check=False)
    # The client has exited, so every query is in the servers' sockets;
    # wait until their threads have logged them all (the log stops growing).
    size, deadline = -1, time.monotonic() + 5
    while time.monotonic() < deadline and log.stat().st_size != size:
        size = log.stat().st_size
        time.sleep(0.1)
    with log.open() as f:
        f.seek(start)
        lines = f.read().splitlines()
    names = {1: "A", 28: "AAAA"}
    out = []
    for line in lines:
        server, name, qtype = line.split(" ")
        out.append((server, name, names.get(int(qtype), qtype)))
    return out, r


def musl_version() -> tuple[int, ...]:
    """The installed musl's version: its dynamic loader prints it when run bare."""
    loaders = sorted(Path("/lib").glob("ld-musl-*.so.1"))
    assert loaders, "no /lib/ld-musl-*.so.1: apt-get install musl-tools"
    r = sh(str(loaders[0]), check=False)
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("Version "):
            return tuple(int(x) for x in line.split()[1].split("."))
    raise AssertionError(f"{loaders[0]} printed no version: {r.stderr!r}")


# (id, name, the getaddrinfo status of musl >= 1.2.4, which kubelab reports).
# The status is asserted for both sides, so a walk that sends the right
# queries but draws the wrong verdict fails.
NAMES = [
    ("short-found-first", "svc1", "ok"),
    ("short-aaaa-only", "svc6", "ok"),
    ("short-dual-stack", "svc-dual-stack", "ok"),
    ("short-headless", "hdls1", "ok"),
    # Every search domain NXDOMAIN, then the name as is is REFUSED upstream:
    # musl ignores REFUSED, resends once per timeout/attempts, then EAI_AGAIN.
    ("short-missing-as-is-refused", "nope", "EAI_AGAIN"),
    # testns.svc.cluster.local exists (NOERROR, no records): musl stops there.
    ("short-nodata-stops-walk", "testns", "EAI_NODATA"),
    ("svc-dot-ns", "svc1.testns", "ok"),
    ("svc-ns-svc", "hdls1.testns.svc", "ok"),
    ("fqdn-no-trailing-dot", "svc1.testns.svc.cluster.local", "ok"),
    ("fqdn-trailing-dot", "svc1.testns.svc.cluster.local.", "ok"),
    ("fqdn-missing", "nope.testns.svc.cluster.local", "EAI_NONAME"),
    ("external", "dual.test", "ok"),
    ("external-trailing-dot", "dual.test.", "ok"),
    # A has an address but AAAA is NXDOMAIN: musl judges A then AAAA and the
    # NXDOMAIN wins (glibc's getent says ok for the same answers).
    ("external-aaaa-nxdomain-wins", "example.test", "EAI_NONAME"),
    ("external-missing", "nothere.test", "EAI_NONAME"),
    ("many-dots-as-is-only", "a.b.c.d.e.dual.test", "ok"),
    ("many-dots-missing", "a.b.c.d.e.nothere.test", "EAI_NONAME"),
    ("externalname-cname", "external-to-service", "ok"),
]


@pytest.mark.parametrize(("name", "status"), [(n, s) for _, n, s in NAMES], ids=[i for i, _, _ in NAMES])
def test_musl_queries_equal_kubelab_resolve(lab, musl_gai, name, status):
    musl, r = trace(lab, [str(musl_gai), name])
    assert r.returncode in (0, 1), f"{musl_gai} {name}: {r.stdout}{r.stderr}"
    assert musl, f"musl sent nothing for {name}: {r.stdout}{r.stderr}"
    assert {s for s, _, _ in musl} == {"10.96.0.10"}
    musl = [(n, t) for _, n, t in musl]
    musl_status = r.stdout.splitlines()[0].removeprefix("status ")
    ours, r2 = trace(lab, [sys.executable, "-m", "kubelab", "resolve", name, "--style", "musl", "--json"])
    ours = [(n, t) for _, n, t in ours]
    assert r2.returncode in (0, 1), r2.stderr
    report = json.loads(r2.stdout)
    reported = [(q["name"], q["type"]) for q in report["queries"]]
    assert ours == reported, "kubelab resolve printed what it sent"
    assert ours == musl
    expect_musl = status
    if status == "EAI_NODATA" and musl_version() < (1, 2, 4):
        # musl commit 85050ac5 (1.2.4) split EAI_NODATA from EAI_NONAME.
        expect_musl = "EAI_NONAME"
    assert musl_status == expect_musl, f"real musl said {musl_status} for {name}"
    assert report["status"] == status
    assert (r.returncode == 0) == (r2.returncode == 0)


TWO_NAMESERVERS = RESOLV.replace("nameserver 10.96.0.10\n", "nameserver 10.96.0.10\nnameserver 10.96.0.11\n")


@pytest.mark.parametrize(
    ("name", "status"),
    [("svc1.testns", "ok"), ("nope", "EAI_AGAIN")],
    ids=["found-on-second-search-domain", "refused-resent-to-both"],
)
def test_musl_asks_every_nameserver_at_once(lab, musl_gai, tmp_path, name, status):
    """musl sends each query to all nameservers in parallel (glibc tries them in turn)."""
    conf = tmp_path / "resolv.conf"
    conf.write_text(TWO_NAMESERVERS)
    musl, r = trace(lab, [str(musl_gai), name], resolv_conf=conf)
    ours, r2 = trace(lab, [sys.executable, "-m", "kubelab", "resolve", name, "--style", "musl", "--json"], resolv_conf=conf)
    report = json.loads(r2.stdout)
    reported = [(q["server"], q["name"], q["type"]) for q in report["queries"]]
    # Each server sees the whole walk; the two servers' threads interleave
    # their log lines in no fixed order, so compare per server.
    for server in ("10.96.0.10", "10.96.0.11"):
        seen_musl = [(n, t) for s, n, t in musl if s == server]
        seen_ours = [(n, t) for s, n, t in ours if s == server]
        assert seen_musl, f"musl asked {server} nothing"
        assert [(n, t) for s, n, t in reported if s == server] == seen_ours, f"kubelab resolve printed what it sent to {server}"
        assert seen_ours == seen_musl, server
    # And in one stream, every query went to both servers before the next one.
    assert [(n, t) for s, n, t in reported][::2] == [(n, t) for s, n, t in reported][1::2]
    assert r.stdout.splitlines()[0] == f"status {status}"
    assert report["status"] == status


FAILING = RESOLV.replace("nameserver 10.96.0.10\n", "nameserver 10.96.0.12\n")


@pytest.mark.parametrize("name", ["svc1", "svc1.testns.svc.cluster.local."], ids=["short-stops-at-first-domain", "fqdn"])
def test_musl_reasks_servfail_until_timeout(lab, musl_gai, tmp_path, name):
    """SERVFAIL is never accepted: re-asked at once (2 x queries per interval), resent each interval, then EAI_AGAIN."""
    conf = tmp_path / "resolv.conf"
    conf.write_text(FAILING)
    musl, r = trace(lab, [str(musl_gai), name], resolv_conf=conf)
    ours, r2 = trace(lab, [sys.executable, "-m", "kubelab", "resolve", name, "--style", "musl", "--json"], resolv_conf=conf)
    report = json.loads(r2.stdout)
    assert [(q["server"], q["name"], q["type"]) for q in report["queries"]] == ours, "kubelab resolve printed what it sent"
    assert ours == musl
    # timeout:2 attempts:2 -> two intervals, each: A+AAAA, then 4 immediate re-asks.
    first = (name if name.endswith(".") else f"{name}.testns.svc.cluster.local.")
    assert [(n, t) for _, n, t in musl] == [(first, "A"), (first, "AAAA")] * 6
    assert r.stdout.splitlines()[0] == "status EAI_AGAIN"
    assert report["status"] == "EAI_AGAIN"
