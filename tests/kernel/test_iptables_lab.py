"""``kubelab proxy --proxy-mode iptables`` end to end in a two-node lab, judged by real clients.

What ``test_netlab_iptables.py`` (the netlab room's) already shows -- pod to
ClusterIP spread, external client to NodePort, UDP, trace -- is not repeated.
Here: every client position (pod on the same node, pod on the other node, the
node itself, the external client) against every service address (ClusterIP,
NodePort on both nodes and on localhost, externalIP, LoadBalancer IP), a
chi-square bound on the spread, ClientIP affinity holding then expiring,
externalTrafficPolicy Local (client source kept, local endpoints only, the
pod short-circuit, healthCheckNodePort 200/503), REJECT, hairpin, endpoint
churn under a live stream, UDP after a backend replacement (conntrack
cleanup), a failing restore keeping the previous rules, and the canary
repairing flushed tables.  Clients: curl, nc, socat.

Addresses, all inside the lab's own namespaces: pods 10.244.0.0/16
(node1 10.244.0.0/24, node2 10.244.1.0/24, bridges .1), services
10.96.0.0/12, underlay 172.18.0.0/24 (node1 .10, node2 .11, external client
.254), externalIP 203.0.113.10, LoadBalancer IPs 198.51.100.10 and
198.51.100.11 (the external client routes everything off the underlay to
node1), node ports 30000-30099 and health check node ports 32100/32101.
"""

from __future__ import annotations

import collections
import math
import re
import subprocess
import threading
import time

import pytest
import yaml

from kubelab.netlab.lab import Lab
from kubelab.netlab.spec import LabSpec
from kubelab.netlab.testing import leftovers, unique_lab_name

pytestmark = pytest.mark.timeout(600)

SYNC_PERIOD = 4.0  # seconds; the lab's proxies get --sync-period 4s (canary / retry bounds below)
EXTERNAL_IP = "203.0.113.10"
LB_IP = "198.51.100.10"
LB_LOCAL_IP = "198.51.100.11"
HC_LOCAL, HC_LOCAL_N2 = 32100, 32101
AFFINITY_SECONDS = 2

_WEB_PORTS = [
    {"name": "http", "containerPort": 8080},
    {"name": "stream", "containerPort": 9100},
    {"name": "udp", "containerPort": 9001, "protocol": "UDP"},
]


def _pod(name, node, labels, ports=_WEB_PORTS, annotations=None):
    meta = {"name": name, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]}}


def _svc(name, selector, ports, **spec):
    status = spec.pop("status", None)
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"selector": selector, "ports": ports, **spec}}
    if status:
        doc["status"] = status
    return doc


HTTP = [{"name": "http", "port": 80, "targetPort": "http"}]

MANIFESTS = [
    # web-1 on node1, web-2 and web-3 on node2; the clients on either node.
    _pod("web-1", "node1", {"app": "web", "solo": "yes"}),
    _pod("web-2", "node2", {"app": "web", "side": "node2"}),
    _pod("web-3", "node2", {"app": "web", "side": "node2"}),
    _pod("client1", "node1", {"app": "client"}, ports=[]),
    _pod("client2", "node2", {"app": "client"}, ports=[]),
    # Cluster policy, every address kind: ClusterIP, NodePort, externalIP, LB IP.
    _svc("web", {"app": "web"}, HTTP, type="LoadBalancer", externalIPs=[EXTERNAL_IP],
         status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
    # externalTrafficPolicy Local: node1 has one local endpoint, node2 two.
    _svc("local", {"app": "web"}, HTTP, type="LoadBalancer", externalTrafficPolicy="Local",
         healthCheckNodePort=HC_LOCAL, status={"loadBalancer": {"ingress": [{"ip": LB_LOCAL_IP}]}}),
    # ... and one whose endpoints are all on node2 (node1's health check says 503).
    _svc("local-n2", {"side": "node2"}, HTTP, type="LoadBalancer", externalTrafficPolicy="Local",
         healthCheckNodePort=HC_LOCAL_N2),
    _svc("sticky", {"app": "web"}, HTTP, sessionAffinity="ClientIP",
         sessionAffinityConfig={"clientIP": {"timeoutSeconds": AFFINITY_SECONDS}}),
    _svc("solo", {"solo": "yes"}, HTTP),
    _svc("empty", {"app": "nothing-has-this"}, HTTP, type="NodePort"),
    # Churn and UDP replacement have pods of their own, so the other tests keep theirs.
    _pod("stream-1", "node1", {"app": "stream"}, annotations={"kubelab.dev/stream-interval-ms": "50"}),
    _pod("stream-2", "node2", {"app": "stream"}, annotations={"kubelab.dev/stream-interval-ms": "50"}),
    _svc("stream", {"app": "stream"}, [{"name": "stream", "port": 9100, "targetPort": "stream"}]),
    _pod("udp-1", "node2", {"app": "udp"}),
    _svc("udp", {"app": "udp"}, [{"name": "udp", "port": 53, "targetPort": 9001, "protocol": "UDP"}]),
]

SETTINGS = {
    "proxyMode": "iptables",
    "kernel": "host",
    "nodes": ["node1", "node2"],
    "nodePortRange": "30000-30099",
    "dns": {"enabled": False},
    "proxyArgs": ["--sync-period", f"{SYNC_PERIOD:g}s", "--min-sync-period", "200ms"],
}


@pytest.fixture(scope="module")
def lab():
    spec = LabSpec.from_dict(SETTINGS, MANIFESTS, source="test_iptables_lab", name=unique_lab_name("tipt"))
    lab = Lab.up(spec)
    try:
        lab.wait_synced(timeout=120)
        yield lab
    finally:
        lab.down()
        assert leftovers(lab.name) == []


# ---------------------------------------------------------------- helpers


def curl_many(lab, source, url, n, max_time=5):
    """``n`` sequential curl requests from ``source``; returns [(pod, client address seen)]."""
    script = f'for i in $(seq {n}); do curl -sS --max-time {max_time} "{url}" || echo "curl-failed rc=$?"; done'
    r = lab.exec(source, ["sh", "-c", script], timeout=30 + n * (max_time + 1))
    out = []
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"pod=(\S+) client=(\S+):\d+", line.strip())
        assert m, f"{source} -> {url}: {line!r}\n{r.stderr}\n{lab.log_tail()}"
        out.append((m.group(1), m.group(2)))
    assert len(out) == n, (source, url, r.stdout, r.stderr)
    return out


def node_addresses(lab):
    """Every address a node may masquerade to: its underlay IP and its pod bridge (.1)."""
    addrs = set()
    for i, node in enumerate(lab.nodes):
        addrs.add(lab.node_ip(node))
        addrs.add(f"10.244.{i}.1")
    return addrs


def chi_square_bound(categories: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of the chi-square distribution with ``categories - 1`` degrees of freedom.

    Exact for 2 degrees of freedom (the survival function is exp(-x/2));
    otherwise the Wilson-Hilferty approximation.  Used instead of scipy
    (not a dependency) for one number.
    """
    k = categories - 1
    if k == 2:
        return -2.0 * math.log(alpha)
    # Wilson-Hilferty: z from the normal upper quantile (bisection on erfc).
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    z = lo
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def chi_square(counts, categories):
    n = sum(counts.get(c, 0) for c in categories)
    expected = n / len(categories)
    return sum((counts.get(c, 0) - expected) ** 2 / expected for c in categories)


def metric(lab, node, name):
    """One kubeproxy_* metric value of ``node``'s proxy (its metrics server on 127.0.0.1:10249)."""
    r = lab.exec(node, ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:10249/metrics"], timeout=15)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} within {timeout:.0f}s (last: {last!r})")


# ---------------------------------------------------------------- every client x every address

WEB = {"web-1", "web-2", "web-3"}

# (source, destination, what the backend sees: "self" = the client's own address, "node" = a node address)
ADDRESS_CASES = [
    ("client1", "cluster-ip", "self"),
    ("client2", "cluster-ip", "self"),
    ("node1", "cluster-ip", "node"),
    ("external", "cluster-ip", "node"),
    ("client1", "node-port-node1", "node"),
    ("client1", "node-port-node2", "node"),
    ("client2", "node-port-node1", "node"),
    ("node1", "node-port-node1", "node"),
    ("node1", "node-port-node2", "node"),
    ("node2", "node-port-localhost", "node"),
    ("external", "node-port-node1", "node"),
    ("external", "node-port-node2", "node"),
    ("client1", "external-ip", "node"),
    ("client2", "external-ip", "node"),
    ("node2", "external-ip", "node"),
    ("external", "external-ip", "node"),
    ("client1", "lb-ip", "node"),
    ("node1", "lb-ip", "node"),
    ("external", "lb-ip", "node"),
]


def url_of(lab, dest, svc="default/web"):
    np_ = lab.node_port(svc, port=80)
    return {
        "cluster-ip": f"http://{lab.service_ip(svc)}/",
        "node-port-node1": f"http://{lab.node_ip('node1')}:{np_}/",
        "node-port-node2": f"http://{lab.node_ip('node2')}:{np_}/",
        "node-port-localhost": f"http://127.0.0.1:{np_}/",
        "external-ip": f"http://{EXTERNAL_IP}/",
        "lb-ip": f"http://{LB_IP}/",
    }[dest]


@pytest.mark.parametrize("source,dest,seen", [pytest.param(*c, id=f"{c[0]}-to-{c[1]}") for c in ADDRESS_CASES])
def test_every_client_reaches_every_service_address(lab, source, dest, seen):
    answers = curl_many(lab, source, url_of(lab, dest), 15)
    pods = collections.Counter(p for p, _ in answers)
    # 15 picks over 3 endpoints all landing on one: (1/3)^14 per case -- a bug, not luck.
    assert set(pods) <= WEB and len(pods) >= 2, pods
    sources = {s for _, s in answers}
    if seen == "self":
        assert sources == {lab.address(source)}, sources
    else:
        # Masqueraded (or the node's own address): never the client's, always one of a node.
        assert sources <= node_addresses(lab), sources
        if source not in lab.nodes:
            assert lab.address(source) not in sources


# Chi-square over many connections: a goodness-of-fit test of the statistic rules' probabilities.
SPREAD_CASES = [
    pytest.param("client2", "cluster-ip", id="pod-clusterip"),
    pytest.param("external", "node-port-node2", id="external-nodeport"),
]


@pytest.mark.parametrize("source,dest", SPREAD_CASES)
def test_spread_within_chi_square_bound(lab, source, dest):
    n = 300
    counts = collections.Counter(p for p, _ in curl_many(lab, source, url_of(lab, dest), n, max_time=5))
    stat = chi_square(counts, sorted(WEB))
    # alpha 1e-4: a correct 1/3,1/2,1 ladder fails once in 10,000 runs; a wrong one
    # (e.g. 1/2 for every rule: 50/25/25 %) gives ~37 at n=300 and fails every time.
    bound = chi_square_bound(3, 1e-4)
    assert set(counts) == WEB and stat < bound, (counts, stat, bound)


# ---------------------------------------------------------------- session affinity


def test_client_ip_affinity_holds_then_expires(lab):
    url = f"http://{lab.service_ip('default/sticky')}/"
    first = curl_many(lab, "client1", url, 12)
    assert len({p for p, _ in first}) == 1, f"affinity must pin one endpoint: {first}"
    pinned = first[0][0]
    # After timeoutSeconds of silence the recent entry is stale: the next connection
    # is a fresh random pick.  Each round keeps the old pod with probability 1/3.
    for _ in range(10):
        time.sleep(AFFINITY_SECONDS + 1)
        (pod, _), = curl_many(lab, "client1", url, 1)
        if pod != pinned:
            break
    else:
        raise AssertionError(f"affinity never expired: always {pinned}")
    # ... and the new pick sticks again.
    again = curl_many(lab, "client1", url, 6)
    assert {p for p, _ in again} == {pod}, again


# ---------------------------------------------------------------- externalTrafficPolicy Local

LOCAL_CASES = [
    # (source, destination, endpoints allowed, must see every allowed one)
    pytest.param("external", "node-port-node1", {"web-1"}, id="external-nodeport-node1-only-local"),
    pytest.param("external", "node-port-node2", {"web-2", "web-3"}, id="external-nodeport-node2-only-local"),
    pytest.param("external", "lb-ip", {"web-1"}, id="external-lb-ip-via-node1-only-local"),
]


@pytest.mark.parametrize("source,dest,allowed", LOCAL_CASES)
def test_external_policy_local_keeps_client_ip_and_uses_local_endpoints(lab, source, dest, allowed):
    url = url_of(lab, dest, "default/local").replace(LB_IP, LB_LOCAL_IP)
    answers = curl_many(lab, source, url, 15)
    pods = {p for p, _ in answers}
    assert pods == allowed, answers
    assert {s for _, s in answers} == {lab.client_ip}, "the client's source address must be preserved"


def test_external_policy_local_short_circuits_pod_traffic(lab):
    # A pod on node1 sending to the LB IP is "internal" traffic (KUBE-EXT's -s pod CIDR
    # rule jumps to KUBE-SVC): every endpoint, not only node1's web-1.
    answers = curl_many(lab, "client1", f"http://{LB_LOCAL_IP}/", 30)
    pods = {p for p, _ in answers}
    assert pods <= WEB and pods & {"web-2", "web-3"}, answers


def _health(lab, node, port):
    r = lab.exec("external", ["curl", "-sS", "-i", "--max-time", "5", f"http://{lab.node_ip(node)}:{port}/"], timeout=15)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split()[1])
    headers = dict(line.split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
    return status, headers, body


HEALTH_CASES = [
    # (node, health check port, status, localEndpoints)
    pytest.param("node1", HC_LOCAL, 200, 1, id="node1-one-local"),
    pytest.param("node2", HC_LOCAL, 200, 2, id="node2-two-local"),
    pytest.param("node1", HC_LOCAL_N2, 503, 0, id="node1-none-local"),
    pytest.param("node2", HC_LOCAL_N2, 200, 2, id="node2-all-local"),
]


@pytest.mark.parametrize("node,port,status,count", HEALTH_CASES)
def test_health_check_node_port_answers_as_kube_proxy(lab, node, port, status, count):
    got, headers, body = _health(lab, node, port)
    assert got == status, body
    assert f'"localEndpoints": {count}' in body, body
    assert '"namespace": "default"' in body, body
    # kube-proxy sends exactly "application/json"; aiohttp appends "; charset=utf-8".
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert headers.get("X-Content-Type-Options") == "nosniff", headers
    assert headers.get("X-Load-Balancing-Endpoint-Weight") == str(count), headers


def test_external_policy_local_without_local_endpoints_drops(lab):
    # node1 has no endpoint of local-n2: its NodePort DROPs (a timeout, not a refusal).
    url = f"http://{lab.node_ip('node1')}:{lab.node_port('default/local-n2', port=80)}/"
    r = lab.exec("external", ["curl", "-sS", "--max-time", "2", url], timeout=15)
    assert r.returncode == 28, r  # curl: operation timed out
    ok = curl_many(lab, "external", url.replace(lab.node_ip("node1"), lab.node_ip("node2")), 4)
    assert {p for p, _ in ok} <= {"web-2", "web-3"}


# ---------------------------------------------------------------- REJECT, hairpin

REJECT_CASES = [
    pytest.param("client1", "cluster-ip", id="pod-clusterip"),
    pytest.param("node2", "cluster-ip", id="node-clusterip"),
    pytest.param("external", "node-port-node1", id="external-nodeport"),
]


@pytest.mark.parametrize("source,dest", REJECT_CASES)
def test_no_endpoints_is_refused_at_once(lab, source, dest):
    url = url_of(lab, dest, "default/empty")
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1) if url.count(":") == 2 else (url[7:-1], "80")
    # Timed inside the client's namespace, so `ip netns exec` start-up on a busy box does not count.
    script = f"t0=$(date +%s.%N); nc -v -z -w 5 {host} {port}; rc=$?; t1=$(date +%s.%N); echo \"rc=$rc $t0 $t1\""
    r = lab.exec(source, ["sh", "-c", script], timeout=20)
    m = re.search(r"rc=(\d+) (\S+) (\S+)", r.stdout)
    assert m, r
    # The REJECT's ICMP port-unreachable: "Connection refused", not a timeout or "No route".
    assert m.group(1) != "0" and "refused" in r.stderr.lower(), r
    # ... at once: a correctness bound telling REJECT from a dropped SYN (whose first
    # retransmission alone comes after 1 s).
    elapsed = float(m.group(3)) - float(m.group(2))
    assert elapsed < 1.0, elapsed


def test_hairpin_pod_reaches_itself_through_its_service(lab):
    answers = curl_many(lab, "web-1", f"http://{lab.service_ip('default/solo')}/", 5)
    assert {p for p, _ in answers} == {"web-1"}
    # The loop back to the originator is masqueraded (KUBE-SEP's -s <ep> -j KUBE-MARK-MASQ),
    # else web-1 would answer itself directly and drop the reply.
    assert {s for _, s in answers} == {"10.244.0.1"}, answers


# ---------------------------------------------------------------- churn, UDP replacement


def test_endpoint_churn_drops_no_established_connection(lab):
    """A long-lived stream survives endpoints being added and removed around it (and a full resync)."""
    ip = lab.service_ip("default/stream")
    proc = lab.popen("client1", ["nc", ip, "9100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def reader():
        for line in proc.stdout:
            lines.append(line.strip())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(lines) >= 3, 20, "the stream started")
        serving = re.match(r"pod=(\S+) ", lines[0]).group(1)
        other = ({"stream-1", "stream-2"} - {serving}).pop()
        # Add one endpoint, then take the other existing one away (partial syncs rewrite
        # the service's chains and delete a KUBE-SEP chain under the live connection).
        lab.apply([_pod("stream-3", "node1", {"app": "stream"})])
        lab.wait_synced(timeout=60)
        lab.delete(f"pod/{other}", grace=0)
        lab.wait_synced(timeout=60)
        # ... and let a periodic full sync pass as well.
        mark = len(lines)
        wait_for(lambda: len(lines) >= mark + int((SYNC_PERIOD + 1) * 1000 / 50), 60, "the stream kept flowing")
        assert proc.poll() is None, f"the stream connection ended: {proc.stderr.read() if proc.stderr else ''}"
        seqs = [int(m.group(1)) for line in lines[1:] if (m := re.match(r"seq=(\d+) pod=(\S+)", line))]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap in the stream"
        assert all(line.endswith(f"pod={serving}") for line in lines[1:]), lines[-3:]
        # New connections use the new endpoint set.
        answers = lab.exec("client2", ["sh", "-c", f"for i in $(seq 12); do nc -w 2 {ip} 9100 </dev/null | head -1; done"],
                           timeout=90).stdout
        picked = set(re.findall(r"pod=(\S+) ", answers))
        assert picked and picked <= {serving, "stream-3"}, answers
    finally:
        proc.kill()
        proc.wait()
        t.join(5)


def _udp(lab, ip, sourceport=40053, tries=3):
    """One datagram from client1 to ip:53 from a fixed source port (so always the same conntrack entry)."""
    for _ in range(tries):
        r = lab.exec("client1", ["socat", "-t2", "-T2", "-", f"UDP:{ip}:53,sourceport={sourceport}"], input="q\n", timeout=15)
        m = re.match(r"pod=(\S+) ", r.stdout)
        if m:
            return m.group(1)
    return None


def test_udp_recovers_after_its_backend_is_replaced(lab):
    ip = lab.service_ip("default/udp")
    assert _udp(lab, ip) == "udp-1"
    lab.apply([_pod("udp-2", "node1", {"app": "udp"})])
    lab.wait_synced(timeout=60)
    # The flow is pinned by its conntrack entry while udp-1 lives.
    assert _udp(lab, ip) == "udp-1"
    lab.delete("pod/udp-1", grace=0)
    lab.wait_synced(timeout=60)
    # Without kube-proxy's conntrack cleanup the entry (refreshed by every datagram)
    # would keep sending this flow to udp-1's dead address.
    assert _udp(lab, ip) == "udp-2"


# ---------------------------------------------------------------- faults


def _backend(lab, node):
    for backend in ("nft", "legacy"):
        r = lab.exec(node, [f"iptables-{backend}-save", "-t", "nat"], timeout=30)
        if "KUBE-SERVICES" in r.stdout:
            return backend
    raise AssertionError(f"no KUBE-SERVICES in {node} on either backend")


def _answers(lab, source, ip, port=80):
    r = lab.exec(source, ["curl", "-sS", "--max-time", "2", f"http://{ip}:{port}/"], timeout=15)
    return r.stdout.split()[0].removeprefix("pod=") if r.returncode == 0 and r.stdout.startswith("pod=") else None


def test_failed_restore_keeps_previous_rules_then_full_sync_repairs(lab):
    """A foreign rule jumping to one of our chains makes the restore that deletes it fail.

    kube-proxy's restore would fail the same way: the transaction is atomic, so
    nothing of that sync is applied -- neither the deletion nor an unrelated
    new Service -- until the reference is gone and a (full) retry succeeds.
    """
    from kubelab.modes.iptables.chains import service_chain_names

    lab.apply([_svc("doomed", {"solo": "yes"}, HTTP)])
    lab.wait_synced(timeout=60)
    doomed = lab.service_ip("default/doomed")
    assert _answers(lab, "client1", doomed) == "web-1"
    svc_chain = service_chain_names("default/doomed:http", "tcp")[0]
    tool = f"iptables-{_backend(lab, 'node1')}"
    lab.exec("node1", [tool, "-t", "nat", "-N", "KL-FOREIGN"], check=True)
    lab.exec("node1", [tool, "-t", "nat", "-A", "KL-FOREIGN", "-j", svc_chain], check=True)
    try:
        failures = metric(lab, "node1", "kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
        lab.delete("service/doomed")
        lab.apply([_svc("later", {"solo": "yes"}, HTTP)])
        wait_for(lambda: metric(lab, "node1", "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") > failures,
                 60, "node1's restore failed")
        later = lab.service_ip("default/later")
        # node2 has no foreign rule: it synced both changes.
        wait_for(lambda: _answers(lab, "client2", later) == "web-1", 60, "node2 programmed the new service")
        assert _answers(lab, "client2", doomed) is None
        # node1 keeps the previous rules: the deleted service still answers, the new one does not.
        assert _answers(lab, "client1", doomed) == "web-1"
        assert _answers(lab, "client1", later) is None
        # Still failing on retries (each a full sync) while the reference exists.
        n = metric(lab, "node1", "kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
        wait_for(lambda: metric(lab, "node1", "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") > n,
                 3 * SYNC_PERIOD + 30, "a retry")
        assert _answers(lab, "client1", doomed) == "web-1"
    finally:
        lab.exec("node1", [tool, "-t", "nat", "-F", "KL-FOREIGN"])
        lab.exec("node1", [tool, "-t", "nat", "-X", "KL-FOREIGN"])
    full_before = metric(lab, "node1", "kubeproxy_sync_full_proxy_rules_duration_seconds_count")
    # The next retry (a full sync, within one back-off of at most --sync-period) succeeds.
    wait_for(lambda: _answers(lab, "client1", later) == "web-1", 3 * SYNC_PERIOD + 30, "node1 recovered")
    assert _answers(lab, "client1", doomed) is None
    assert metric(lab, "node1", "kubeproxy_sync_full_proxy_rules_duration_seconds_count") > full_before
    saved = lab.exec("node1", [f"{tool}-save", "-t", "nat"], timeout=30).stdout
    assert svc_chain not in saved, "the stale chain is deleted once nothing references it"
    lab.delete("service/later")


def test_flushed_tables_are_repaired_within_a_sync_period(lab):
    """Someone flushes and deletes every chain in node1 (``iptables -F; iptables -X`` in all tables)."""
    web = lab.service_ip("default/web")
    assert _answers(lab, "client1", web) in WEB
    tool = f"iptables-{_backend(lab, 'node1')}"
    script = "; ".join(f"{tool} -t {t} -F; {tool} -t {t} -X" for t in ("mangle", "nat", "filter"))
    t0 = time.monotonic()
    lab.exec("node1", ["sh", "-c", script], timeout=30)
    # The canary monitor (or the periodic full sync, whichever comes first) rewrites everything.
    wait_for(lambda: _answers(lab, "client1", web) in WEB, 3 * SYNC_PERIOD + 30, "the rules were repaired")
    elapsed = time.monotonic() - t0
    saved = lab.exec("node1", [f"{tool}-save"], timeout=30).stdout
    for line in ("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                 ":KUBE-PROXY-CANARY - [0:0]", "-A KUBE-POSTROUTING"):
        assert line in saved, (line, saved)
    # Every kind of address works again, from outside too.
    assert {p for p, _ in curl_many(lab, "external", url_of(lab, "node-port-node1"), 6)} <= WEB
    print(f"repaired {elapsed:.1f}s after the flush (sync-period {SYNC_PERIOD:g}s)")
