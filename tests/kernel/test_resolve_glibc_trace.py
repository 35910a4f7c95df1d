"""glibc's own resolver vs ``kubelab resolve --style glibc``: the same queries, in the same order.

Addresses (inside a network namespace kl-dns-<pid> this test creates and
removes): kubelab dns on 10.96.0.10:53 (on lo), fd00:96::a/128 on lo so
that getaddrinfo's AI_ADDRCONFIG asks AAAA too, a dnsmasq upstream on
127.0.0.1:5300 for *.test names.  resolv.conf is kubelet-style (ndots:5,
three search domains) via /etc/netns/<ns>/resolv.conf, which
``ip netns exec`` bind-mounts over /etc/resolv.conf.  The server logs every
question it receives; that log is the wire trace.
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

NS = f"kl-dns-{os.getpid()}"
RESOLV = "nameserver 10.96.0.10\nsearch testns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"

SERVER = textwrap.dedent(
    """
    import sys, time
    from kubelab.dns.answer import Settings
    from kubelab.dns.server import DNSConfig
    from kubelab.dns.testing import ThreadedServer, fixture_cluster
    log = open(sys.argv[1], "a", buffering=1)
    def query_log(ip, name_wire, qtype, tcp):
        labels, i = [], 0
        while name_wire[i]:
            labels.append(name_wire[i + 1 : i + 1 + name_wire[i]].decode("ascii", "replace"))
            i += name_wire[i] + 1
        log.write(f"{'.'.join(labels)}. {qtype}\\n")
    cfg = DNSConfig(settings=Settings(), recursion_cidrs=("10.96.0.0/16", "127.0.0.0/8", "fd00::/8"))
    with ThreadedServer(cfg, *fixture_cluster(), listen=[("10.96.0.10", 53)], upstreams=[("127.0.0.1", 5300)], query_log=query_log):
        print("ready", flush=True)
        sys.stdin.read()
    """
)


def sh(*argv, check=True, **kw):
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dns-trace")
    netns_etc = Path("/etc/netns") / NS
    procs = []
    sh("ip", "netns", "add", NS)
    try:
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text(RESOLV)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "addr", "add", "10.96.0.10/32", "dev", "lo")
        sh("ip", "-n", NS, "addr", "add", "fd00:96::a/128", "dev", "lo", "nodad")
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", NS, "dnsmasq", "-k", "-C", "/dev/null", "--port=5300", "--listen-address=127.0.0.1", "--bind-interfaces",
                 "--no-resolv", "--no-hosts", "--local=/test/", "--address=/example.test/192.0.2.80", "--pid-file=", "--user=", "--log-facility=/dev/null"],
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
        sh("ip", "netns", "del", NS, check=False)
        shutil.rmtree(netns_etc, ignore_errors=True)


def trace(log: Path, argv) -> tuple[list[tuple[str, str]], subprocess.CompletedProcess]:
    start = log.stat().st_size
    r = sh("ip", "netns", "exec", NS, *argv, check=False)
    time.sleep(0.05)
    with log.open() as f:
        f.seek(start)
        lines = f.read().splitlines()
    names = {1: "A", 28: "AAAA"}
    out = []
    for line in lines:
        name, qtype = line.rsplit(" ", 1)
        out.append((name, names.get(int(qtype), qtype)))
    return out, r


NAMES = [
    ("short-found-first", "svc1"),
    ("short-aaaa-only", "svc6"),
    ("short-missing", "nope"),
    ("svc-dot-ns", "svc1.testns"),
    ("svc-ns-svc", "hdls1.testns.svc"),
    ("fqdn-no-trailing-dot", "svc1.testns.svc.cluster.local"),
    ("fqdn-trailing-dot", "svc1.testns.svc.cluster.local."),
    ("external", "example.test"),
    ("external-trailing-dot", "example.test."),
    ("external-missing", "nothere.test"),
    ("many-dots-as-is-first", "a.b.c.d.e.example.test"),
    ("externalname-cname", "external-to-service"),
]


@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_glibc_queries_equal_kubelab_resolve(lab, name):
    glibc, r = trace(lab, ["getent", "ahosts", name])
    assert glibc, f"getent sent nothing for {name}: {r.stderr}"
    ours, r2 = trace(lab, [sys.executable, "-m", "kubelab", "resolve", name, "--style", "glibc", "--json"])
    report = json.loads(r2.stdout)
    reported = [(q["name"], q["type"]) for q in report["queries"]]
    assert ours == reported, "kubelab resolve printed what it sent"
    assert ours == glibc
    # Same verdict: getent exits 0 exactly when the walk found addresses.
    assert (r.returncode == 0) == (report["status"] == "ok")
