"""The iptables mode against the real kernel, with real packets, on both backends (nft and legacy).

Topology (all namespaces created here, prefix kl-ipt-<pid>-, removed at teardown):

    client ns  192.168.50.2/24  --veth--  192.168.50.1/24  node ns  10.244.1.1/24  --veth--  pod ns 10.244.1.2/24, 10.244.1.3/24

The proxier programs the *node* namespace (through ``ip netns exec``);
servers in the pod namespace (socat) answer with their own address and the
peer address they saw, so a client sees which endpoint it reached and whether
it was masqueraded.  Cluster CIDR 10.244.0.0/16, service IPs 172.30.0.0/16,
node IP 192.168.50.1, external client 192.168.50.2.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import time

import pytest

from kubelab.model import NodeInfo
from kubelab.modes.iptables.proxier import IPTablesProxier, SyncError
from kubelab.modes.iptables.testing import StateBuilder, ep, make_service, make_slice
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.kernel.exec import Runner
from kubelab.proxy.metrics import ProxyMetrics
from kubelab.proxy.provider import ModeDeps

_seq = itertools.count()
NODE_IP, CLIENT_IP, POD1, POD2 = "192.168.50.1", "192.168.50.2", "10.244.1.2", "10.244.1.3"
HOST = "node-a"


def sh(*argv, check=True, timeout=20, input=None):
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout, input=input)


def in_ns(ns, *argv, check=True, timeout=20):
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)


@pytest.fixture
def topo():
    base = f"kl-ipt-{os.getpid()}-{next(_seq)}"
    node, pod, client = f"{base}-n", f"{base}-p", f"{base}-c"
    procs: list[subprocess.Popen] = []
    try:
        for ns in (node, pod, client):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "kliptp0", "netns", node, "type", "veth", "peer", "name", "eth0", "netns", pod)
        sh("ip", "link", "add", "kliptc0", "netns", node, "type", "veth", "peer", "name", "eth0", "netns", client)
        for ns, dev, addrs in ((node, "kliptp0", ["10.244.1.1/24"]), (node, "kliptc0", [f"{NODE_IP}/24"]),
                               (pod, "eth0", [f"{POD1}/24", f"{POD2}/24"]), (client, "eth0", [f"{CLIENT_IP}/24"])):
            for a in addrs:
                in_ns(ns, "ip", "addr", "add", a, "dev", dev)
            in_ns(ns, "ip", "link", "set", dev, "up")
        in_ns(pod, "ip", "route", "add", "default", "via", "10.244.1.1")
        # Removing POD1 (the primary address) must keep POD2: promote it instead of flushing it.
        in_ns(pod, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")
        in_ns(client, "ip", "route", "add", "default", "via", NODE_IP)
        in_ns(node, "ip", "route", "add", "default", "via", CLIENT_IP)
        in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # The node's default route leads back out the client's link, so forwarding a
        # service packet would first send an ICMP redirect, whose per-peer rate limit
        # then swallows REJECT's port-unreachable.  Real nodes route elsewhere.
        for dev in ("all", "default", "kliptc0"):
            in_ns(node, "sysctl", "-qw", f"net.ipv4.conf.{dev}.send_redirects=0")
        # Servers: reply with "<local addr> <peer addr>".
        for cmd in (
            ["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo $SOCAT_SOCKADDR $SOCAT_PEERADDR"],
            # One UDP server per address (a wildcard UDP socket cannot tell which address was asked).
            ["socat", f"UDP-RECVFROM:5353,bind={POD1},fork,reuseaddr", f"SYSTEM:echo {POD1}"],
            ["socat", f"UDP-RECVFROM:5353,bind={POD2},fork,reuseaddr", f"SYSTEM:echo {POD2}"],
        ):
            procs.append(subprocess.Popen(["ip", "netns", "exec", pod, *cmd], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        deadline = time.time() + 10
        while time.time() < deadline:
            tcp, udp = in_ns(pod, "ss", "-ltn").stdout, in_ns(pod, "ss", "-lun").stdout
            if "8080" in tcp and udp.count(":5353") >= 2:
                break
            time.sleep(0.05)
        yield {"node": node, "pod": pod, "client": client}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in (node, pod, client):
            sh("ip", "netns", "pids", ns, check=False)
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", ns, check=False)


def make_proxier(ns, backend, **config):
    cfg = ProxyConfig(cluster_cidr=("10.244.0.0/16",), sync_period=config.pop("sync_period", 30.0), **config)
    deps = ModeDeps(config=cfg, node=NodeInfo(name=HOST, ips=(NODE_IP,)), logger=logging.getLogger("kl-ipt"),
                    metrics=ProxyMetrics(), run=Runner(ns), extra={"iptables_backend": backend})
    return IPTablesProxier(deps)


def objects():
    return [
        make_service("ns1", "web", "172.30.0.10", [("http", 80, "TCP", 30080)], type="NodePort"),
        make_service("ns1", "local", "172.30.0.11", [("http", 80, "TCP", 30081)], type="NodePort", etp="Local"),
        make_service("ns1", "empty", "172.30.0.12", [("http", 80, "TCP")]),
        make_service("ns1", "dns", "172.30.0.13", [("dns", 53, "UDP")]),
        make_slice("ns1", "web", [ep(POD1, "node-b")], [("http", 8080, "TCP")]),
        make_slice("ns1", "local", [ep(POD1, HOST)], [("http", 8080, "TCP")]),
        make_slice("ns1", "dns", [ep(POD1, HOST)], [("dns", 5353, "UDP")]),
    ]


def curl(ns, url, timeout=5):
    """Connect with nc to the host:port of ``url`` and read the server's line.

    nc rather than curl because the socat echo server does not speak HTTP:
    answering before reading a request would reset the connection.
    """
    hostport = url.split("//", 1)[1].rstrip("/")
    host, _, port = hostport.partition(":")
    r = in_ns(ns, "nc", "-w", str(timeout), "-N", host, port or "80", check=False, timeout=timeout + 5)
    out = (r.stdout + r.stderr).strip()
    return (r.returncode if out or r.returncode else 1), out


BACKENDS = ["nft", "legacy"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_services_real_packets(topo, backend):
    p = make_proxier(topo["node"], backend)
    b = StateBuilder(NodeInfo(name=HOST, ips=(NODE_IP,))).add(*objects())
    try:
        asyncio.run(p.sync_proxy_rules(b.state(full_sync=True)))
        cases = [
            # (client ns, url, expected output prefix, expected peer seen by the backend or None)
            ("client", "http://172.30.0.10/", POD1, NODE_IP.replace("192.168.50.1", "10.244.1.1")),  # ClusterIP from outside: masqueraded
            ("client", f"http://{NODE_IP}:30080/", POD1, "10.244.1.1"),  # NodePort, eTP Cluster: masqueraded
            ("client", f"http://{NODE_IP}:30081/", POD1, CLIENT_IP),  # NodePort, eTP Local: client IP preserved
            ("pod", "http://172.30.0.10/", POD1, "10.244.1.1"),  # hairpin: a pod reaching itself is masqueraded
            ("node", "http://172.30.0.10/", POD1, None),  # the node itself
        ]
        for ns, url, want, peer in cases:
            rc, out = curl(topo[ns], url)
            assert rc == 0, (ns, url, out)
            local, seen = out.split()[:2]
            assert local == want, (url, out)
            if peer is not None:
                assert seen == peer, (ns, url, out)

        # No endpoints: REJECT, so the client hears "connection refused" at once.
        t0 = time.monotonic()
        r = in_ns(topo["client"], "nc", "-v", "-z", "-w", "5", "172.30.0.12", "80", check=False, timeout=10)
        assert r.returncode != 0 and "refused" in (r.stdout + r.stderr).lower(), r.stderr
        assert time.monotonic() - t0 < 4  # generous; a DROP would hit the 5 s timeout

        # UDP to the ClusterIP from a fixed source port.
        def udp(tries=3):
            # Same source port every time: the same conntrack entry.  A loaded box may
            # lose a reply (the server forks per datagram), so ask up to 3 times.
            out = ""
            for _ in range(tries):
                r = subprocess.run(
                    ["ip", "netns", "exec", topo["client"], "socat", "-t3", "-T3", "-", "UDP:172.30.0.13:53,sourceport=40053"],
                    input="q\n", capture_output=True, text=True, timeout=15)
                out = r.stdout.strip()
                if out:
                    break
            return out

        assert udp() == POD1
        # Replace the backend: the old address disappears, a new one serves.
        in_ns(topo["pod"], "ip", "addr", "del", f"{POD1}/24", "dev", "eth0")
        b.add(make_slice("ns1", "dns", [ep(POD2, HOST)], [("dns", 5353, "UDP")]))
        state = b.state()
        assert state.deleted_udp_endpoints, "the tracker reports the stale UDP endpoint"
        asyncio.run(p.sync_proxy_rules(state))
        assert udp() == POD2, "the stale conntrack entry was not removed: the UDP client is stuck on the dead backend"
    finally:
        p.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_restore_keeps_previous_rules(topo, backend):
    from dataclasses import replace

    p = make_proxier(topo["node"], backend)
    b = StateBuilder(NodeInfo(name=HOST, ips=(NODE_IP,))).add(*objects())
    try:
        asyncio.run(p.sync_proxy_rules(b.state(full_sync=True)))
        good = p.render_config
        # Inject a rule iptables-restore refuses: the changed service's masquerade
        # rule gets a source match with an impossible prefix length.
        from kubelab.modes.iptables.render import LocalDetector

        p.render_config = replace(good, local_detector=LocalDetector(("-s", "10.244.0.0/99"), ("!", "-s", "10.244.0.0/99")))
        b.add(make_slice("ns1", "web", [ep(POD2, "node-b")], [("http", 8080, "TCP")]))
        with pytest.raises(SyncError, match="previous rules stay in force"):
            asyncio.run(p.sync_proxy_rules(b.state()))
        assert p.metrics.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1
        assert p.metrics.value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total") == 1
        rc, out = curl(topo["client"], "http://172.30.0.10/")
        assert rc == 0 and out.startswith(POD1), "the previous rules must stay in force"
        # The retry is a full sync and succeeds.
        p.render_config = good
        asyncio.run(p.sync_proxy_rules(b.state()))
        assert p.stats.full_syncs == 2
        rc, out = curl(topo["client"], "http://172.30.0.10/")
        assert rc == 0 and out.startswith(POD2), out
    finally:
        p.cleanup()


def test_restore_blocked_by_the_xtables_lock_keeps_previous_rules(topo, tmp_path):
    """Another program holds the xtables lock past ``-w 5``: the restore gives up, nothing changes, the retry is full.

    Legacy backend only: iptables-nft takes no lock (nf_tables transactions
    need none) and ignores ``-w``.  The lock is a file of this test's own
    (XTABLES_LOCKFILE), never the host's /run/xtables.lock.
    """
    import fcntl

    lockfile = tmp_path / "xtables.lock"
    lockfile.touch()
    cfg = ProxyConfig(cluster_cidr=("10.244.0.0/16",))
    deps = ModeDeps(config=cfg, node=NodeInfo(name=HOST, ips=(NODE_IP,)), logger=logging.getLogger("kl-ipt"),
                    metrics=ProxyMetrics(), run=Runner(topo["node"], env={"XTABLES_LOCKFILE": str(lockfile)}),
                    extra={"iptables_backend": "legacy"})
    p = IPTablesProxier(deps)
    b = StateBuilder(NodeInfo(name=HOST, ips=(NODE_IP,))).add(*objects())
    try:
        asyncio.run(p.sync_proxy_rules(b.state(full_sync=True)))
        b.add(make_slice("ns1", "web", [ep(POD2, "node-b")], [("http", 8080, "TCP")]))
        with open(lockfile) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(SyncError, match="previous rules stay in force") as info:
                asyncio.run(p.sync_proxy_rules(b.state(full_sync=False)))
            assert "xtables lock" in str(info.value), info.value
            # Packets need no lock: the previous rules answer while it is held.
            rc, out = curl(topo["client"], "http://172.30.0.10/")
            assert rc == 0 and out.startswith(POD1), out
        assert p.metrics.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1
        assert p.metrics.value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total") == 1
        # Lock released: the retry (even when the controller asks for a partial one) is full.
        asyncio.run(p.sync_proxy_rules(b.state(full_sync=False)))
        assert p.stats.full_syncs == 2
        rc, out = curl(topo["client"], "http://172.30.0.10/")
        assert rc == 0 and out.startswith(POD2), out
    finally:
        p.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flushed_tables_are_repaired_by_the_canary_monitor(topo, backend):
    p = make_proxier(topo["node"], backend, sync_period=0.5)
    b = StateBuilder(NodeInfo(name=HOST, ips=(NODE_IP,))).add(*objects())
    tool = f"iptables-{backend}"

    async def scenario():
        await p.start()
        try:
            await p.sync_proxy_rules(b.state(full_sync=True))
            # What an admin's "iptables -F; iptables -X" does, in one go (the monitor may
            # already be repairing while later tables are flushed: errors are fine).
            script = "; ".join(f"{tool} -t {t} -F; {tool} -t {t} -X" for t in ("mangle", "nat", "filter"))
            await asyncio.to_thread(in_ns, topo["node"], "sh", "-c", script, check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rc, out = await asyncio.to_thread(curl, topo["client"], "http://172.30.0.10/", 2)
                if rc == 0 and p.stats.full_syncs >= 2:
                    return out
                await asyncio.sleep(0.2)
            raise AssertionError("the canary monitor did not repair the flushed rules")
        finally:
            await p.stop()

    try:
        out = asyncio.run(scenario())
        assert out.startswith(POD1)
    finally:
        p.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_removes_ours_and_keeps_foreign_rules(topo, backend):
    p = make_proxier(topo["node"], backend)
    tool = f"iptables-{backend}"
    in_ns(topo["node"], tool, "-t", "nat", "-N", "FOREIGN")
    in_ns(topo["node"], tool, "-t", "nat", "-A", "FOREIGN", "-s", "1.1.1.1", "-j", "RETURN")
    in_ns(topo["node"], tool, "-t", "filter", "-A", "INPUT", "-s", "1.1.1.1", "-j", "ACCEPT")
    asyncio.run(p.sync_proxy_rules(StateBuilder(NodeInfo(name=HOST, ips=(NODE_IP,))).add(*objects()).state(full_sync=True)))
    before = in_ns(topo["node"], f"{tool}-save").stdout
    assert "KUBE-SVC-" in before and "KUBE-PROXY-CANARY" in before
    p.cleanup()
    after = in_ns(topo["node"], f"{tool}-save").stdout
    assert "KUBE-" not in after, after
    assert "-A FOREIGN -s 1.1.1.1/32 -j RETURN" in after
    assert "-A INPUT -s 1.1.1.1/32 -j ACCEPT" in after


# (what the command does with its input, expected status, expected in stdout, expected in stderr)
STREAM_CASES = [
    pytest.param("wc -l", 0, "3000", "", id="reads-every-chunk"),
    pytest.param("head -c 10 >/dev/null; echo gave up >&2; exit 3", 3, "", "gave up", id="tool-exits-early"),
    pytest.param("readlink /proc/self/ns/net; cat >/dev/null", 0, "net:[", "", id="runs-in-the-namespace"),
]


@pytest.mark.parametrize("script,rc,out,err", STREAM_CASES)
def test_runner_streams_into_a_namespace(topo, script, rc, out, err):
    """Runner(netns) enters with setns (no `ip netns exec`) and Runner.stream pipes generated input."""
    host_ns = os.readlink("/proc/self/ns/net")
    r = Runner(topo["node"])
    chunks = (f"line {i}\n" * 100 for i in range(30))
    got_rc, got_out, got_err = r.stream(["sh", "-c", script], chunks, timeout=30)
    assert (got_rc, out in got_out, err in got_err) == (rc, True, True), (got_rc, got_out, got_err)
    if "readlink" in script:
        assert got_out.strip() != host_ns, "the child must run in the node namespace"
    # This thread is back in the host namespace afterwards.
    assert os.readlink("/proc/self/ns/net") == host_ns
    # Plain calls see the namespace's own links (the node has its two veths).
    links = r(["ip", "-o", "link"])[1]
    assert "kliptp0" in links and "kliptc0" in links
