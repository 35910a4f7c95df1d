"""The userspace mode end to end: a netlab lab, the real proxier, real clients.

One lab for the module (one node ``node1``, pods ``web-1``/``web-2`` with
netlab's built-in echo servers, a ``dns-1`` pod running dnsmasq, a
``tester`` pod, and the lab's external client), with the userspace proxier
(:mod:`kubelab.modes.userspace.standalone`) running in node1's namespace on
uvloop, writing its iptables rules there.  Clients: curl, nc, dig, iperf3,
wrk, from a pod, the node itself and the external client.

Addresses: pods 10.244.0.0/24 (lab podCIDR 10.244.0.0/16), services
10.96.0.0/16, underlay 172.18.0.0/24 (node1 172.18.0.10, client
172.18.0.254; the lab's defaults), NodePorts 30080 (TCP), 30201 (TCP),
30053 (UDP), externalIP 192.0.2.10 (TEST-NET-1, routed
to node1 by the pods' and the client's default routes), LoadBalancer IP
192.0.2.20 (likewise), a silent endpoint
10.244.0.200 (nothing has it).  Nothing outside the lab's namespaces.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time

import pytest

from kubelab.netlab.lab import Lab, LabSpec

pytestmark = pytest.mark.timeout(180)

WEB_IP = "10.96.0.20"
STICKY_IP = "10.96.0.21"
SHORT_STICKY_IP = "10.96.0.25"
RETRY_IP = "10.96.0.22"
GRACE_IP = "10.96.0.23"
GONE_IP = "10.96.0.24"
UDP_IP = "10.96.0.30"
DNS_IP = "10.96.0.53"
PERF_IP = "10.96.0.40"
EXTERNAL_IP = "192.0.2.10"
LB_IP = "192.0.2.20"
NODE_PORT = 30080
DNS_NODE_PORT = 30053
PERF_NODE_PORT = 30201
SILENT = "10.244.0.200"


def _pod(name: str, ports: list[dict] | None = None, command: list[str] | None = None) -> dict:
    container: dict = {"name": "c", "ports": ports or []}
    if command:
        container["command"] = command
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name.rstrip("-0123456789")}},
        "spec": {"nodeName": "node1", "containers": [container]},
    }


WEB_PORTS = [{"name": "http", "containerPort": 8080}, {"name": "udp", "containerPort": 9001, "protocol": "UDP"}]
DNSMASQ = [
    "dnsmasq", "-k", "-C", "/dev/null", "--pid-file=", "-p", "5353", "--listen-address=$(POD_IP)",
    "--bind-interfaces", "--no-resolv", "--address=/svc.test/10.1.2.3", "--log-facility=/dev/null",
]


class Proxier:
    """The standalone userspace proxier in a namespace, spoken to with JSON lines."""

    def __init__(self, netns: str, node_ip: str, log_path, *extra: str):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "kubelab.modes.userspace.standalone",
             "--node-ip", node_ip, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
        )
        hello = self._read()
        assert hello.get("ready"), hello
        self.pid = hello["pid"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"proxier exited ({self.proc.poll()}); log:\n{self.tail()}")
        return json.loads(line)

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        resp = self._read()
        assert resp["ok"], f"{resp.get('error')}\nlog:\n{self.tail()}"
        return resp

    def sync(self, services: list[dict]) -> dict:
        return self.request(cmd="sync", services=services)["ports"]

    def stats(self) -> dict:
        return self.request(cmd="stats")

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-30:])

    def close(self, cleanup: bool = True) -> None:
        try:
            if self.proc.poll() is None:
                if cleanup:
                    self.request(cmd="cleanup")
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


@pytest.fixture(scope="module")
def lab():
    spec = LabSpec.from_dict(
        {"nodes": ["node1"], "proxyMode": "none"},
        [_pod("web-1", WEB_PORTS), _pod("web-2", WEB_PORTS), _pod("tester"),
         _pod("perf-1", [{"name": "iperf", "containerPort": 5201}], ["iperf3", "-s", "-p", "5201"]),
         _pod("dns-1", [{"name": "dns", "containerPort": 5353, "protocol": "UDP"}], DNSMASQ)],
        name=f"tus{os.getpid() % 100000}",
    )
    with Lab.up(spec) as lab:
        yield lab


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory):
    """The proxier in node1 with every service of this module synced."""
    p = Proxier(lab.netns("node1"), lab.node_ip("node1"), tmp_path_factory.mktemp("us") / "proxier.log", "--grace", "1")
    web = [f"{lab.pod_ip('web-1')}:8080", f"{lab.pod_ip('web-2')}:8080"]
    e = {
        "lab": lab,
        "proxier": p,
        "web": web,
        "services": {
            "web": dict(name="web", port_name="http", cluster_ip=WEB_IP, port=80, node_port=NODE_PORT,
                        external_ips=[EXTERNAL_IP], lb_ips=[LB_IP], endpoints=web),
            "perf": dict(name="perf", cluster_ip=PERF_IP, port=5201, node_port=PERF_NODE_PORT, endpoints=[f"{lab.pod_ip('perf-1')}:5201"]),
            "sticky": dict(name="sticky", cluster_ip=STICKY_IP, port=80, affinity="ClientIP", timeout=60, endpoints=web),
            "short-sticky": dict(name="short-sticky", cluster_ip=SHORT_STICKY_IP, port=80, affinity="ClientIP",
                                 timeout=2, endpoints=web),
            "retry": dict(name="retry", cluster_ip=RETRY_IP, port=80,
                          endpoints=[f"{lab.pod_ip('web-1')}:8081", f"{SILENT}:8080", web[1]]),
            "grace": dict(name="grace", cluster_ip=GRACE_IP, port=80, endpoints=web),
            "gone": dict(name="gone", cluster_ip=GONE_IP, port=80, endpoints=web),
            "udp": dict(name="udp", protocol="UDP", cluster_ip=UDP_IP, port=9001,
                        endpoints=[f"{lab.pod_ip('web-1')}:9001", f"{lab.pod_ip('web-2')}:9001"]),
            "dns": dict(name="dns", namespace="kube-system", port_name="dns", protocol="UDP", cluster_ip=DNS_IP, port=53,
                        node_port=DNS_NODE_PORT,
                        endpoints=[f"{lab.pod_ip('web-1')}:5353", f"{lab.pod_ip('dns-1')}:5353"]),
        },
    }
    p.sync(list(e["services"].values()))
    try:
        yield e
    finally:
        p.close()
        left = lab.exec("node1", ["iptables-save"], check=False).stdout
        assert "KUBE-PORTALS" not in left and "KUBE-NODEPORT" not in left, left


def curl(lab, where: str, url: str, n: int = 1) -> list[str]:
    """Bodies of ``n`` sequential requests (each a new connection)."""
    script = f'for i in $(seq {n}); do curl -sS -m 5 {url}; done'
    r = lab.exec(where, ["sh", "-c", script], timeout=60, check=False)
    assert r.returncode == 0, f"curl from {where} to {url}: {r.stderr}"
    return [line for line in r.stdout.splitlines() if line.startswith("pod=")]


def pods_of(lines: list[str]) -> collections.Counter:
    return collections.Counter(re.match(r"pod=(\S+)", line).group(1) for line in lines)


@pytest.mark.parametrize(
    "source,target",
    [
        ("default/tester", f"http://{WEB_IP}/"),
        ("node1", f"http://{WEB_IP}/"),
        ("client", "http://NODE:30080/"),
        ("default/tester", "http://NODE:30080/"),
        ("node1", "http://NODE:30080/"),
        ("node1", "http://127.0.0.1:30080/"),
        ("client", f"http://{EXTERNAL_IP}/"),
        ("default/tester", f"http://{EXTERNAL_IP}/"),
        ("node1", f"http://{EXTERNAL_IP}/"),
        ("client", f"http://{LB_IP}/"),
        ("default/tester", f"http://{LB_IP}/"),
        ("node1", f"http://{LB_IP}/"),
    ],
    ids=["pod-clusterip", "node-clusterip", "external-nodeport", "pod-nodeport", "node-nodeport",
         "node-localhost-nodeport", "external-externalip", "pod-externalip", "node-externalip", "external-lb", "pod-lb", "node-lb"],
)
def test_tcp_portals_round_robin(env, source, target):
    lab = env["lab"]
    url = target.replace("NODE", lab.node_ip("node1"))
    got = pods_of(curl(lab, source, url, n=4))
    # Two endpoints, strict round-robin: four new connections, two each.
    assert got == {"web-1": 2, "web-2": 2}


@pytest.mark.parametrize("source", ["default/tester", "client"], ids=["pod", "external"])
def test_client_ip_affinity(env, source):
    lab = env["lab"]
    got = pods_of(curl(lab, source, f"http://{STICKY_IP}/", n=6))
    assert len(got) == 1 and sum(got.values()) == 6, got


def test_client_ip_affinity_ends_after_its_timeout(env):
    lab = env["lab"]
    first = pods_of(curl(lab, "default/tester", f"http://{SHORT_STICKY_IP}/", n=3))
    assert len(first) == 1 and sum(first.values()) == 3, first
    # Unused for longer than timeoutSeconds (2 s), the record is gone: the
    # next connection is balanced again, and round-robin (only this client
    # uses the service) moves it to the other pod, where it sticks anew.
    time.sleep(3.5)
    second = pods_of(curl(lab, "default/tester", f"http://{SHORT_STICKY_IP}/", n=3))
    assert len(second) == 1 and sum(second.values()) == 3 and set(second) != set(first), (first, second)


def test_retry_past_refusing_and_silent_endpoints(env):
    lab, p = env["lab"], env["proxier"]
    before = p.stats()["stats"]["dial_failures"]
    got = pods_of(curl(lab, "default/tester", f"http://{RETRY_IP}/", n=12))
    # Every request answered (curl -sS fails the script on any error), all by the live pod.
    assert got == {"web-2": 12}
    # Both dead endpoints were tried and quarantined: one refused, the
    # other did not answer within its dial timeout (250 ms on a first try,
    # 500 ms on a second: kube-proxy's growing timeouts).
    assert p.stats()["stats"]["dial_failures"] - before >= 2
    log = p.log_path.read_text()
    assert f"dial to endpoint {lab.pod_ip('web-1')}:8081 failed (Connection refused)" in log, p.tail()
    assert re.search(rf"dial to endpoint {re.escape(SILENT)}:8080 failed \(no answer within 0\.(25|5) s\)", log), p.tail()


@pytest.mark.parametrize("size", [11, 5_000_000], ids=["small", "5MB"])
def test_half_close_request_then_full_reply(env, size):
    lab = env["lab"]
    # nc -N: send everything, FIN (half-close), then read the echo until the pod closes.
    r = lab.exec("default/tester", ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x | nc -N {WEB_IP} 80 | tail -c +1 | wc -c; "
                                    f"printf 'hello world' | nc -N {WEB_IP} 80"], timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    count, *rest = r.stdout.splitlines()
    line_len = len("pod=web-1 client=10.244.0.1:65535\n")
    assert size <= int(count) <= size + line_len
    assert rest[0].startswith("pod=web-") and rest[1] == "hello world"


@pytest.mark.parametrize(
    "source,via",
    [("default/tester", "clusterip"), ("node1", "clusterip"), ("client", "externalip"),
     ("default/tester", "nodeport"), ("node1", "nodeport"), ("client", "nodeport")],
    ids=["pod-clusterip", "node-clusterip", "external-externalip", "pod-nodeport", "node-nodeport", "external-nodeport"],
)
def test_udp_dns_through_the_proxy_with_a_dead_endpoint(env, source, via):
    lab = env["lab"]
    target = {"clusterip": f"@{DNS_IP}", "externalip": f"@{EXTERNAL_IP}",
              "nodeport": f"@{lab.node_ip('node1')} -p {DNS_NODE_PORT}"}[via]
    if via == "externalip":
        # The client reaches the DNS service through an externalIP of its own.
        svc = dict(env["services"]["dns"], external_ips=[EXTERNAL_IP])
        env["proxier"].sync([*(s for k, s in env["services"].items() if k != "dns"), svc])
    # web-1 has nothing on UDP 5353: its ICMP port-unreachable makes the
    # proxier replay the query to the next endpoint; dig tries only once.
    script = f"for i in 1 2 3 4 5 6; do dig +short +tries=1 +time=3 {target} svc.test A; done"
    r = lab.exec(source, ["sh", "-c", script], timeout=60, check=False)
    assert r.stdout.split() == ["10.1.2.3"] * 6, r.stdout + r.stderr


def test_udp_round_robin_and_replies_from_the_service_address(env):
    lab = env["lab"]
    # Each nc is a new client port, so a new session; nc -u connects its
    # socket, so it only accepts replies whose source is UDP_IP:9001.
    script = f"for i in 1 2 3 4; do echo ping | nc -u -w 1 {UDP_IP} 9001 | head -1; done"
    r = lab.exec("default/tester", ["sh", "-c", script], timeout=60, check=False)
    assert pods_of(r.stdout.splitlines()) == {"web-1": 2, "web-2": 2}, r.stdout + r.stderr


def test_removed_endpoint_closes_its_connections_after_grace(env):
    lab, p = env["lab"], env["proxier"]
    svc = env["services"]["grace"]
    # The echo pod answers once it has the first bytes: say hello, then keep
    # nc's stdin open so only the proxier can end the connection.
    long = lab.popen("default/tester", ["nc", GRACE_IP, "80"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        long.stdin.write("hello\n")
        long.stdin.flush()
        first = long.stdout.readline()
        victim = re.match(r"pod=(\S+)", first).group(1)
        keep = [e for e in env["web"] if not e.startswith(lab.pod_ip(victim) + ":")]
        before = p.stats()["stats"]["grace_closed"]
        p.sync([*(s for k, s in env["services"].items() if k != "grace"), dict(svc, endpoints=keep)])
        # New connections go only to the endpoint that stayed ...
        survivor = "web-2" if victim == "web-1" else "web-1"
        assert pods_of(curl(lab, "default/tester", f"http://{GRACE_IP}/", n=3)) == {survivor: 3}
        # ... and the established one is closed once the 1 s grace period ends.
        long.wait(timeout=30)
        assert p.stats()["stats"]["grace_closed"] == before + 1
    finally:
        if long.poll() is None:
            long.kill()
        long.wait()
        long.stdin.close()
        p.sync(list(env["services"].values()))


def test_removed_service_closes_listener_and_rules(env):
    lab, p = env["lab"], env["proxier"]
    ports = p.sync(list(env["services"].values()))
    listener = ports["default/gone"]
    assert pods_of(curl(lab, "default/tester", f"http://{GONE_IP}/"))
    p.sync([s for k, s in env["services"].items() if k != "gone"])
    try:
        rules = lab.exec("node1", ["iptables-save", "-t", "nat"]).stdout
        assert '"default/gone"' not in rules and '"default/web:http"' in rules
        ss = lab.exec("node1", ["ss", "-Hltn", f"sport = :{listener}"]).stdout
        assert ss.strip() == ""
        r = lab.exec("default/tester", ["curl", "-sS", "-m", "2", f"http://{GONE_IP}/"], check=False)
        assert r.returncode != 0
    finally:
        p.sync(list(env["services"].values()))


def test_rules_layout_in_the_kernel(env):
    lab = env["lab"]
    nat = lab.exec("node1", ["iptables", "-t", "nat", "-S"]).stdout
    pre = [line for line in nat.splitlines() if line.startswith("-A PREROUTING")]
    out = [line for line in nat.splitlines() if line.startswith("-A OUTPUT")]
    # Portals first, NodePorts last, in both chains.
    assert pre[0].endswith("-j KUBE-PORTALS-CONTAINER") and pre[-1].endswith("-j KUBE-NODEPORT-CONTAINER")
    assert out[0].endswith("-j KUBE-PORTALS-HOST") and out[-1].endswith("-j KUBE-NODEPORT-HOST")
    assert sum(line.endswith("-j KUBE-PORTALS-CONTAINER") for line in pre) == 1  # jumps are not duplicated by re-syncs
    filt = lab.exec("node1", ["iptables", "-S", "KUBE-NODEPORT-NON-LOCAL"]).stdout
    assert "--state NEW -j ACCEPT" in filt


@pytest.mark.parametrize(
    "source,reverse",
    [("default/tester", False), ("default/tester", True), ("node1", False), ("client", True)],
    ids=["pod-upload", "pod-download", "node-upload", "external-nodeport-download"],
)
def test_iperf3_through_the_proxy(env, source, reverse):
    lab = env["lab"]
    target = ["-c", PERF_IP, "-p", "5201"] if source != "client" else ["-c", lab.node_ip("node1"), "-p", str(PERF_NODE_PORT)]
    argv = ["iperf3", *target, "-t", "2", "-J", *(["-R"] if reverse else [])]
    r = lab.exec(source, argv, timeout=60, check=False)
    result = json.loads(r.stdout)
    assert "error" not in result, result.get("error")
    # Control and data connections both went through the relay.  iperf3's
    # sender counts bytes still in flight when the test ends, the receiver
    # does not: they differ by at most what the four socket buffers and the
    # relay's pipe on the way can hold (tcp_wmem/tcp_rmem maxima are 4 and
    # 6 MiB; exact byte counts are checked by the half-close test).
    sent, received = result["end"]["sum_sent"]["bytes"], result["end"]["sum_received"]["bytes"]
    assert received > 0 and 0 <= sent - received <= 64 << 20, (sent, received)


@pytest.mark.parametrize("source", ["default/tester", "node1", "client"], ids=["pod", "node", "external-nodeport"])
def test_wrk_short_connections_without_errors(env, source):
    lab = env["lab"]
    url = f"http://{WEB_IP}/" if source != "client" else f"http://{lab.node_ip('node1')}:{NODE_PORT}/"
    r = lab.exec(source, ["wrk", "-t1", "-c8", "-d2s", "-H", "Connection: close", url], timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+ requests in", r.stdout), r.stdout
    assert "Socket errors" not in r.stdout and "Non-2xx" not in r.stdout, r.stdout
