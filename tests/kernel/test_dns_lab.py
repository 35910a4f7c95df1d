"""kubelab dns as the kube-dns pod of a netlab lab (iptables mode): real pods resolve and connect by name.

Addresses (the lab's, from examples/labs/basic.yaml): pods 10.244.0.0/16,
services 10.96.0.0/12 with kube-dns at 10.96.0.10, node underlay
172.18.0.0/24.  Names: web.default.svc.cluster.local and the 'example.test'
name that is not in the cluster (and has no upstream: the lab has none).

What is checked, with the pod's kubelet-style resolv.conf (nameserver
10.96.0.10, search default.svc.cluster.local svc.cluster.local
cluster.local, ndots:5):

* ``getent ahosts web`` (glibc's own resolver) answers with web's cluster IP;
* ``curl http://web/`` resolves through the kube-dns ClusterIP (iptables
  DNAT to the DNS pod) and reaches a web backend;
* ``dig`` at the cluster IP sees the same record, over UDP and TCP;
* a Service added to the running lab becomes resolvable by its short name;
* the queries glibc sends from the pod (``getent ahosts NAME``, captured on
  the pod's eth0 with scapy) are exactly, and in order, the queries
  ``kubelab resolve --style glibc`` sends from the same pod.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from kubelab.netlab.lab import Lab, LabSpec
from kubelab.netlab.testing import leftovers, unique_lab_name

EXAMPLE = "examples/labs/basic.yaml"
DEADLINE = 90.0  # other rooms share the two cores: be patient, never assert on time


@pytest.fixture(scope="module")
def lab():
    name = unique_lab_name("dns")
    spec = LabSpec.from_file(EXAMPLE, name=name, proxyMode="iptables")
    try:
        with Lab.up(spec) as lab:
            lab.wait_synced(timeout=120)
            yield lab
    finally:
        assert leftovers(name) == []


def retry(fn, what: str):
    """Run ``fn`` until it returns something true (DNS pod may still be loading); fail naming ``what``."""
    end = time.monotonic() + DEADLINE
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}; last: {last!r}")


def test_pod_resolv_conf_points_at_kube_dns(lab):
    conf = lab.exec("client", ["cat", "/etc/resolv.conf"], timeout=10).stdout.split("\n")
    conf = [line.split() for line in conf if line.strip()]
    assert ["nameserver", "10.96.0.10"] in conf
    assert ["search", "default.svc.cluster.local", "svc.cluster.local", "cluster.local"] in conf
    assert ["options", "ndots:5"] in conf


def test_getent_ahosts_web_is_the_cluster_ip(lab):
    web_ip = lab.service_ip("default/web")

    def ask():
        r = lab.exec("client", ["getent", "ahosts", "web"], timeout=30, check=False)
        return r.stdout if r.returncode == 0 else None

    out = retry(ask, "getent ahosts web")
    assert {line.split()[0] for line in out.splitlines()} == {web_ip}
    assert "web.default.svc.cluster.local" in out  # the canonical name glibc found by the search path


@pytest.mark.parametrize("url", ["http://web/", "http://web.default/", "http://web.default.svc.cluster.local./"], ids=["short", "svc.ns", "fqdn"])
def test_curl_by_name_reaches_a_backend(lab, url):
    def fetch():
        r = lab.exec("client", ["curl", "-sS", "--max-time", "10", "-w", "\\n%{remote_ip}\\n", url], timeout=30, check=False)
        return r.stdout if r.returncode == 0 else None

    out = retry(fetch, f"curl {url}")
    lines = out.strip().splitlines()
    assert lines[-1] == lab.service_ip("default/web")  # curl connected to the cluster IP it resolved
    # The lab's web workload answers "pod=<its name> client=<peer>".
    assert lines[0].split()[0] in {"pod=web-1", "pod=web-2", "pod=web-3"}, lines


@pytest.mark.parametrize("proto", ["+notcp", "+tcp"])
def test_dig_at_the_kube_dns_cluster_ip(lab, proto):
    r = lab.exec("client", ["dig", "+tries=2", "+time=5", "+short", proto, "@10.96.0.10", "web.default.svc.cluster.local"], timeout=30)
    assert r.stdout.split() == [lab.service_ip("default/web")]


# Runs inside the pod's namespace: prints one JSON line per DNS query leaving eth0, "ready" first.
SNIFFER = textwrap.dedent(
    """
    import json, sys
    from scapy.layers.dns import DNS
    from scapy.layers.inet import UDP
    from scapy.sendrecv import AsyncSniffer
    def show(p):
        if DNS in p and p[DNS].qr == 0 and p[DNS].qd is not None:
            q = p[DNS].qd[0] if hasattr(p[DNS].qd, "__getitem__") else p[DNS].qd
            print(json.dumps([q.qname.decode(), q.qtype]), flush=True)
    s = AsyncSniffer(iface="eth0", filter="udp dst port 53", prn=show, store=False, started_callback=lambda: print("ready", flush=True))
    s.start()
    sys.stdin.read()
    s.stop()
    """
)
QTYPES = {1: "A", 28: "AAAA"}


def sniffed(lab, argv) -> tuple[list[tuple[str, str]], subprocess.CompletedProcess]:
    """(queries the pod sent while ``argv`` ran in it, its result)."""
    sniffer = subprocess.Popen(lab.exec_argv("client", [sys.executable, "-c", SNIFFER]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout.readline().strip() == "ready"
        r = lab.exec("client", argv, timeout=60, check=False)
        # One marker query after the command: everything before it in the capture belongs to the command.
        lab.exec("client", ["dig", "+tries=1", "+time=2", "@10.96.0.10", "end.marker.invalid."], timeout=30, check=False)
        queries = []
        for line in sniffer.stdout:
            name, qtype = json.loads(line)
            if name == "end.marker.invalid.":
                break
            queries.append((name, QTYPES.get(qtype, str(qtype))))
        return queries, r
    finally:
        sniffer.stdin.close()
        sniffer.terminate()
        sniffer.wait(30)


# Short names, svc.ns, FQDNs with and without the trailing dot, external names (no upstream in the lab: SERVFAIL).
GLIBC_NAMES = [
    ("short", "web"),
    ("short-missing", "nope"),
    ("svc-dot-ns", "web.default"),
    ("svc-ns-svc", "kube-dns.kube-system.svc"),
    ("fqdn-no-dot", "web.default.svc.cluster.local"),
    ("fqdn-dot", "web.default.svc.cluster.local."),
    ("external", "example.test"),
    ("external-dot", "example.test."),
]


@pytest.mark.parametrize("name", [n for _, n in GLIBC_NAMES], ids=[i for i, _ in GLIBC_NAMES])
def test_glibc_wire_queries_equal_kubelab_resolve(lab, name):
    retry(lambda: lab.exec("client", ["getent", "ahosts", "web"], timeout=30, check=False).returncode == 0, "DNS up")
    glibc, r = sniffed(lab, ["getent", "ahosts", name])
    assert glibc, f"getent sent nothing for {name}: {r.stderr}"
    ours, r2 = sniffed(lab, [sys.executable, "-m", "kubelab", "resolve", name, "--style", "glibc", "--json"])
    report = json.loads(r2.stdout)
    assert ours == [(q["name"], q["type"]) for q in report["queries"]], "kubelab resolve printed what it sent"
    assert ours == glibc
    assert (r.returncode == 0) == (report["status"] == "ok")


def test_new_service_resolvable_by_short_name(lab):
    lab.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late", "namespace": "default"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}])
    lab.wait_synced(timeout=120)
    ip = lab.service_ip("default/late")

    def ask():
        r = lab.exec("client", ["getent", "ahosts", "late"], timeout=30, check=False)
        return r.stdout if r.returncode == 0 else None

    out = retry(ask, "getent ahosts late")
    assert {line.split()[0] for line in out.splitlines()} == {ip}
