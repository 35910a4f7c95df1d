"""IPVS mode proven with real packets inside UML: schedulers, affinity, NodePort, hairpin, Local policy, draining, cleanup.

The UML root namespace is the node (it runs the IPVSProxier in the agent).
Addresses, all inside UML only:

* 10.244.0.0/24 -- pods on bridge kl-br0 (node side 10.244.0.1): servers
  kl-ipvs-p1..p3 = 10.244.0.11..13, client kl-ipvs-c = 10.244.0.101..106
* 10.96.0.0/24 -- service cluster IPs (bound to kube-ipvs0 by the proxier)
* 192.168.50.0/24 -- the external network: node 192.168.50.1, client
  namespace kl-ipvs-ext 192.168.50.2
* 10.99.0.0/24 -- a foreign virtual server the proxier must leave alone

Every pod serves TCP 8080 with socat: it answers "<pod> <peer-ip>" and then
echoes what it reads until the client closes, so one server does both
short (``nc -N``) and long-lived connections; and UDP 5353, answering each
datagram with "<pod> <peer-ip>".
"""

from __future__ import annotations

import collections
import time

import pytest

from tests.uml.ipvs_support import state, svc

PODS = {"p1": "10.244.0.11", "p2": "10.244.0.12", "p3": "10.244.0.13"}
CLIENT_IPS = [f"10.244.0.{i}" for i in range(101, 107)]
NODE_IP = "192.168.50.1"
EXT_IP = "192.168.50.2"

LAB_UP = r"""
sysctl -qw net.bridge.bridge-nf-call-iptables=1
ip link add kl-br0 type bridge
ip addr add 10.244.0.1/24 dev kl-br0
ip link set kl-br0 up
pod() {  # name ip...
  ns=kl-ipvs-$1; shift
  ip netns add $ns
  ip link add kl-v-${ns#kl-ipvs-} type veth peer name eth0 netns $ns
  ip link set kl-v-${ns#kl-ipvs-} master kl-br0 up
  # kubelet's hairpin-veth: a pod's packet that comes back to its own port (hairpin) may leave by it.
  ip link set kl-v-${ns#kl-ipvs-} type bridge_slave hairpin on
  for a in "$@"; do ip -n $ns addr add $a/24 dev eth0; done
  ip -n $ns link set eth0 up
  ip -n $ns link set lo up
  ip -n $ns route add default via 10.244.0.1
}
pod p1 10.244.0.11
pod p2 10.244.0.12
pod p3 10.244.0.13
pod c 10.244.0.101 10.244.0.102 10.244.0.103 10.244.0.104 10.244.0.105 10.244.0.106
ip netns add kl-ipvs-ext
ip link add kl-v-ext type veth peer name eth0 netns kl-ipvs-ext
ip addr add 192.168.50.1/24 dev kl-v-ext
ip link set kl-v-ext up
ip -n kl-ipvs-ext addr add 192.168.50.2/24 dev eth0
ip -n kl-ipvs-ext link set eth0 up
ip -n kl-ipvs-ext link set lo up
ip -n kl-ipvs-ext route add default via 192.168.50.1
"""

LAB_DOWN = r"""
for ns in p1 p2 p3 c ext; do ip netns delete kl-ipvs-$ns 2>/dev/null; done
ip link delete kl-br0 2>/dev/null
ipvsadm -D -t 10.99.0.1:80 2>/dev/null
iptables-legacy -t nat -X KL-FOREIGN 2>/dev/null
ipset destroy KL-FOREIGN 2>/dev/null
true
"""


@pytest.fixture(scope="module")
def lab(uml):
    uml.sh(LAB_DOWN)
    uml.sh(LAB_UP, check=True)
    servers = []
    try:
        for name in PODS:
            servers.append(
                uml.popen(
                    [
                        "ip", "netns", "exec", f"kl-ipvs-{name}",
                        # -t 10: after the client's FIN, wait for the answer (socat's 0.5 s default
                        # loses it when the loaded machine is slow to start the shell).
                        "socat", "-t", "10", "TCP-LISTEN:8080,fork,reuseaddr",
                        f"SYSTEM:echo {name} $SOCAT_PEERADDR; cat",
                    ]
                )
            )
            servers.append(
                uml.popen(
                    ["ip", "netns", "exec", f"kl-ipvs-{name}", "socat", "-t", "10", "UDP-RECVFROM:5353,fork", f"SYSTEM:echo {name} $SOCAT_PEERADDR"]
                )
            )
        # Wait until each server answers directly (no timing assertion: a bounded poll).
        for name, ip in PODS.items():
            assert _retry(lambda: _nc(uml, "kl-ipvs-c", ip, 8080)[:1] == [name]), f"server in {name} did not start"
            assert _retry(lambda: _udp(uml, ip, 5353, CLIENT_IPS[-1], 39999) == name), f"UDP server in {name} did not start"
        yield uml
    finally:
        for s in servers:
            s.kill()
        uml.sh(LAB_DOWN)


@pytest.fixture
def driver(lab):
    """A fresh IPVSProxier inside UML; cleaned up (and checked clean) afterwards."""
    made = []

    def make(**config):
        config.setdefault("cluster_cidr", ("10.244.0.0/16",))
        lab.python(f"import tests.uml.ipvs_support as _s\ndrv = _s.Driver(**{config!r})")
        made.append(True)
        return Remote(lab)

    yield make
    if made:
        lab.python("drv.cleanup()")
    left = lab.run(["ipvsadm", "-Sn"]).stdout
    assert "10.96.0." not in left, f"our virtual servers survived cleanup:\n{left}"


class Remote:
    """The host's handle on the Driver in the agent's namespace."""

    def __init__(self, uml) -> None:
        self.uml = uml

    def sync(self, *services, full=True, updated=()):
        return self.uml.call("drv.sync", state(*services, full=full, updated=updated, node_ips=(NODE_IP,)))

    def graceful(self) -> int:
        return self.uml.call("drv.graceful")

    def render(self, *services) -> str:
        return self.uml.call("drv.render", state(*services, node_ips=(NODE_IP,)))

    def metric(self, name: str) -> float | None:
        return self.uml.call("drv.metric", name)


def _retry(fn, attempts: int = 50, delay: float = 0.2) -> bool:
    for _ in range(attempts):
        if fn():
            return True
        time.sleep(delay)
    return False


def _nc(uml, ns: str, ip: str, port: int, n: int = 1, src: str | None = None) -> list[str]:
    """``n`` short connections from namespace ``ns``; the pod name each one reached."""
    s = f"-s {src} " if src else ""
    script = f"for i in $(seq {n}); do nc -N -w 5 {s}{ip} {port} </dev/null || echo FAIL; done"
    out = uml.run(["ip", "netns", "exec", ns, "sh", "-c", script], timeout=120).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


UDP_CLIENT = """
import socket
from kubelab.netlab import nsutil
with nsutil.entered("kl-ipvs-c"):
    kl_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    kl_udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    kl_udp.bind((SRC, SPORT))
    kl_udp.settimeout(5)
    kl_udp.sendto(b"q\\n", (DST, DPORT))
    try:
        kl_answer = kl_udp.recv(200).decode().split()[0]
    except (OSError, IndexError):
        kl_answer = "FAIL"
finally:
    kl_udp.close()
kl_answer
"""


def _udp(uml, ip: str, port: int, src: str, sport: int) -> str:
    """One datagram from ``src:sport`` in the client namespace (the same 5-tuple every call): who answered, or FAIL.

    Sent by the agent from a socket made in the client's namespace: it returns at the first answer
    (a ``socat`` client waits its whole half-close timeout after every datagram).
    """
    return uml.python(f"SRC, SPORT, DST, DPORT = {src!r}, {sport}, {ip!r}, {port}\n" + UDP_CLIENT)


def _conntrack(uml, vip: str) -> str:
    """The kernel's UDP conntrack entries towards ``vip``."""
    return uml.run(["conntrack", "-L", "-p", "udp", "--orig-dst", vip]).stdout


def _templates(uml, client: str) -> list[list[str]]:
    """IPVS persistence templates of ``client`` (``ipvsadm -Lnc`` rows whose source port is 0)."""
    rows = [line.split() for line in uml.run(["ipvsadm", "-Lnc"]).stdout.splitlines()]
    return [r for r in rows if len(r) >= 6 and r[3] == f"{client}:0"]


def _peer(uml, ns: str, ip: str, port: int) -> tuple[str, str]:
    """One connection: (pod name, source address the pod saw)."""
    res = uml.run(["ip", "netns", "exec", ns, "nc", "-N", "-w", "10", ip, str(port)], input="")
    out = res.stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else ("FAIL", res.stderr.strip())


def _eps(*names):
    return [(PODS[n], 8080) for n in names]


def _ipvsadm(uml) -> str:
    return uml.run(["ipvsadm", "-Sn"]).stdout


# -- schedulers ----------------------------------------------------------------


def test_rr_spreads_exactly_round_robin(lab, driver):
    d = driver()
    d.sync(svc("web", "10.96.0.10", 80, _eps("p1", "p2", "p3")))
    got = _nc(lab, "kl-ipvs-c", "10.96.0.10", 80, n=12)
    assert collections.Counter(got) == {"p1": 4, "p2": 4, "p3": 4}, got
    # Exactly round robin: every window of three consecutive connections hits all three.
    for i in range(len(got) - 2):
        assert len(set(got[i : i + 3])) == 3, got


def test_lc_sends_new_connections_to_the_idle_backend(lab, driver):
    """Two connections held open land on two backends; new ones all go to the third (per-Service annotation)."""
    d = driver()
    d.sync(svc("lc", "10.96.0.11", 80, _eps("p1", "p2", "p3"), annotations={"ipvs.kubelab.dev/scheduler": "lc"}))
    assert "-A -t 10.96.0.11:80 -s lc" in _ipvsadm(lab)
    holders = [
        lab.popen(["ip", "netns", "exec", "kl-ipvs-c", "sh", "-c", "sleep 60 | nc 10.96.0.11 80"]) for _ in range(2)
    ]
    try:
        assert _retry(lambda: all(h.stdout.strip() for h in holders)), "long-lived connections got no answer"
        busy = {h.stdout.split()[0] for h in holders}
        assert len(busy) == 2, busy
        (idle,) = set(PODS) - busy
        got = _nc(lab, "kl-ipvs-c", "10.96.0.11", 80, n=5)
        assert got == [idle] * 5, (busy, got)
    finally:
        for h in holders:
            h.kill()


def test_sh_keeps_clients_and_removing_a_backend_moves_only_its_clients(lab, driver):
    d = driver()
    ann = {"ipvs.kubelab.dev/scheduler": "sh"}
    d.sync(svc("sh", "10.96.0.12", 80, _eps("p1", "p2", "p3"), annotations=ann))
    before = {}
    for src in CLIENT_IPS:
        got = _nc(lab, "kl-ipvs-c", "10.96.0.12", 80, n=3, src=src)
        assert len(set(got)) == 1, (src, got)  # each client IP always on the same backend
        before[src] = got[0]
    assert len(set(before.values())) >= 2, before  # several client IPs spread
    victim = collections.Counter(before.values()).most_common(1)[0][0]
    keep = [n for n in PODS if n != victim]
    d.sync(svc("sh", "10.96.0.12", 80, _eps(*keep), annotations=ann), full=False, updated=("default/sh",))
    after = {src: _nc(lab, "kl-ipvs-c", "10.96.0.12", 80, n=2, src=src) for src in CLIENT_IPS}
    for src, got in after.items():
        assert len(set(got)) == 1 and got[0] != "FAIL", (src, got)
        if before[src] == victim:
            assert got[0] != victim, (src, before[src], got)
        else:
            assert got[0] == before[src], (src, before[src], got)


def test_every_kernel_scheduler_is_programmed(lab, driver):
    from kubelab.modes.ipvs.render import SCHEDULERS

    d = driver()
    services = [
        svc(f"s-{name}", f"10.96.0.{100 + i}", 80, _eps("p1"), annotations={"ipvs.kubelab.dev/scheduler": name})
        for i, name in enumerate(SCHEDULERS)
    ]
    d.sync(*services)
    text = _ipvsadm(lab)
    for i, name in enumerate(SCHEDULERS):
        assert f"-A -t 10.96.0.{100 + i}:80 -s {name}" in text, (name, text)
    # And each one really forwards.
    for i, name in enumerate(SCHEDULERS):
        assert _nc(lab, "kl-ipvs-c", f"10.96.0.{100 + i}", 80) == ["p1"], name


def test_client_ip_affinity_is_a_persistent_virtual_server_with_its_timeout(lab, driver):
    d = driver()
    d.sync(svc("aff", "10.96.0.13", 80, _eps("p1", "p2", "p3"), session_affinity="ClientIP", sticky_max_age_seconds=3))
    assert "-A -t 10.96.0.13:80 -s rr -p 3" in _ipvsadm(lab)
    first = _nc(lab, "kl-ipvs-c", "10.96.0.13", 80, n=6, src=CLIENT_IPS[0])
    assert len(set(first)) == 1, first  # rr alone would spread these
    second = _nc(lab, "kl-ipvs-c", "10.96.0.13", 80, n=3, src=CLIENT_IPS[1])
    assert len(set(second)) == 1 and second[0] != first[0], (first, second)  # another client: next backend
    # The kernel keeps one persistence template for the first client, pointing at its backend.
    # (A template with controlled connections is re-armed for 60 s at a time until they are gone.)
    templates = [
        line.split() for line in lab.run(["ipvsadm", "-Lnc"]).stdout.splitlines() if f"{CLIENT_IPS[0]}:0 " in line + " "
    ]
    assert [t[4:] for t in templates] == [["10.96.0.13:80", f"{PODS[first[0]]}:8080"]], templates


def test_client_ip_affinity_ends_after_its_timeout(lab, driver):
    """UDP (its IPVS connections can be made to expire in 1 s; TCP ones linger 2 min in TIME_WAIT)."""
    d = driver(ipvs_udp_timeout=1.0)
    try:
        eps = [(ip, 5353) for ip in PODS.values()]
        d.sync(svc("aff-udp", "10.96.0.21", 53, eps, protocol="UDP", session_affinity="ClientIP", sticky_max_age_seconds=4))
        assert "-A -u 10.96.0.21:53 -s rr -p 4" in _ipvsadm(lab)
        client = CLIENT_IPS[2]
        # Three flows (three source ports) within the timeout: one backend (rr alone would spread them).
        got = [_udp(lab, "10.96.0.21", 53, client, sport) for sport in (41001, 41002, 41003)]
        assert len(set(got)) == 1 and got[0] != "FAIL", got
        assert [t[5] for t in _templates(lab, client)] == [f"{PODS[got[0]]}:5353"]
        # Once the flows have expired and the template's timeout has passed, the template is gone ...
        assert _retry(lambda: not _templates(lab, client), attempts=400, delay=0.25), lab.run(["ipvsadm", "-Lnc"]).stdout
        # ... and the client is scheduled afresh: rr moves on to the next backend.
        again = _udp(lab, "10.96.0.21", 53, client, 41004)
        assert again not in ("FAIL", got[0]), (got, again, lab.run(["ipvsadm", "-Lnc"]).stdout)
    finally:
        lab.run(["ipvsadm", "--set", "0", "0", "300"])  # the kernel's default UDP timeout back


# -- NodePort, Local policy, hairpin --------------------------------------------


def test_nodeport_from_the_external_client_is_masqueraded(lab, driver):
    d = driver()
    d.sync(svc("np", "10.96.0.14", 80, _eps("p1", "p2"), node_port=30080))
    assert f"-A -t {NODE_IP}:30080 -s rr" in _ipvsadm(lab)
    seen = [_peer(lab, "kl-ipvs-ext", NODE_IP, 30080) for _ in range(4)]
    assert {p for p, _ in seen} == {"p1", "p2"}, seen
    # Cluster policy: the pod sees the node, not the client.
    assert all(src != EXT_IP for _, src in seen), seen


def test_external_traffic_policy_local_uses_local_endpoints_and_keeps_the_client_ip(lab, driver):
    from kubelab.model import Endpoint

    d = driver()
    eps = [Endpoint(PODS["p1"], 8080, is_local=True), Endpoint(PODS["p2"], 8080, is_local=False)]
    d.sync(svc("loc", "10.96.0.15", 80, eps, node_port=30081, external_policy_local=True))
    seen = [_peer(lab, "kl-ipvs-ext", NODE_IP, 30081) for _ in range(4)]
    assert seen == [("p1", EXT_IP)] * 4, seen
    # The cluster IP still uses every endpoint.
    assert set(_nc(lab, "kl-ipvs-c", "10.96.0.15", 80, n=4)) == {"p1", "p2"}


def test_hairpin_a_pod_reaches_itself_through_its_service(lab, driver):
    d = driver()
    d.sync(svc("hair", "10.96.0.16", 80, _eps("p1")))
    name, src = _peer(lab, "kl-ipvs-p1", "10.96.0.16", 80)
    assert name == "p1"
    # KUBE-LOOP-BACK masquerades it, else the reply would go pod-to-pod and be dropped.
    assert src == "10.244.0.1", src


# -- reconcile, graceful termination, ownership ----------------------------------


def test_full_sync_repairs_what_was_changed_behind_our_back(lab, driver):
    """Scheduler, flags, persistence, weight and an extra real server are put back; a Service edit updates them in place."""
    d = driver()
    sticky = svc(
        "fix", "10.96.0.17", 80, _eps("p1", "p2"),
        annotations={"ipvs.kubelab.dev/scheduler": "sh"}, session_affinity="ClientIP", sticky_max_age_seconds=600,
    )

    def block() -> list[str]:
        return sorted(line for line in _ipvsadm(lab).splitlines() if "10.96.0.17:80" in line)

    d.sync(sticky)
    want = block()
    head = next(line for line in want if line.startswith("-A"))
    assert "-s sh" in head and "sh-fallback" in head and "-p 600" in head, want
    lab.sh(
        "ipvsadm -E -t 10.96.0.17:80 -s wlc\n"  # no -p, no -b: scheduler, flags and persistence all change
        "ipvsadm -e -t 10.96.0.17:80 -r 10.244.0.11:8080 -m -w 5\n"
        "ipvsadm -a -t 10.96.0.17:80 -r 10.244.0.13:8080 -m -w 1\n",
        check=True,
    )
    assert "-A -t 10.96.0.17:80 -s wlc" in block()
    d.sync(sticky)
    assert block() == want
    # The Service drops its annotation and affinity: a partial sync sets the virtual server, no delete + add.
    lab.python("import socket\nkl_keep = socket.create_connection(('10.96.0.17', 80), timeout=10)\nkl_keep.recv(100)")
    d.sync(svc("fix", "10.96.0.17", 80, _eps("p1", "p2")), full=False, updated=("default/fix",))
    assert block() == sorted(
        [
            "-A -t 10.96.0.17:80 -s rr",
            "-a -t 10.96.0.17:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.17:80 -r 10.244.0.12:8080 -m -w 1",
        ]
    )
    # The connection made before the edit is still there (a delete + add would have dropped it).
    assert lab.python("kl_keep.sendall(b'still\\n')\nkl_keep.recv(100).decode()") == "still\n"
    lab.python("kl_keep.close()")


def test_graceful_termination_drains_without_resetting_established_connections(lab, driver):
    draining = "kubeproxy_sync_proxy_rules_ipvs_graceful_termination_real_servers"
    d = driver(ipvs_graceful_termination_timeout=600.0)
    d.sync(svc("drain", "10.96.0.18", 80, _eps("p1", "p2")))
    # A long-lived connection from the node itself (the agent), so we can talk on it later.
    lab.python(
        "import socket, struct\n"
        "kl_conn = socket.create_connection(('10.96.0.18', 80), timeout=10)\n"
        "kl_first = kl_conn.recv(100).decode().split()[0]"
    )
    victim = lab.python("kl_first")
    other = "p2" if victim == "p1" else "p1"
    d.sync(svc("drain", "10.96.0.18", 80, _eps(other)), full=False, updated=("default/drain",))
    assert f"-a -t 10.96.0.18:80 -r {PODS[victim]}:8080 -m -w 0" in _ipvsadm(lab)
    assert d.graceful() == 1  # kept: its connection is open
    assert d.metric(draining) == 1
    assert _nc(lab, "kl-ipvs-c", "10.96.0.18", 80, n=4) == [other] * 4
    # The established connection still works: the echo comes back, no reset.
    echoed = lab.python("kl_conn.sendall(b'ping\\n')\nkl_conn.recv(100).decode()")
    assert echoed == "ping\n"
    # Its connections gone, it is deleted -- long before the 600 s timeout.  (Closed with a
    # reset: IPVS forgets a reset connection after 10 s, one in TIME_WAIT only after 2 min.)
    lab.python("kl_conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\nkl_conn.close()")
    assert _retry(lambda: d.graceful() == 0, attempts=150), "draining real server was never deleted"
    assert PODS[victim] not in _ipvsadm(lab)
    assert d.metric(draining) == 0
    # A connection that stays open holds a removed real server only until the timeout.
    lab.python("kl_conn = socket.create_connection(('10.96.0.18', 80), timeout=10)\nkl_conn.recv(100)")
    d.sync(svc("drain", "10.96.0.18", 80, []), full=False, updated=("default/drain",))
    assert f"-a -t 10.96.0.18:80 -r {PODS[other]}:8080 -m -w 0" in _ipvsadm(lab)
    assert d.graceful() == 1
    lab.call("drv.advance", 601.0)
    assert d.graceful() == 0
    assert PODS[other] not in _ipvsadm(lab)
    lab.python("kl_conn.close()")


def test_udp_real_server_goes_at_once_with_its_conntrack_entries(lab, driver):
    d = driver()
    d.sync(svc("dns", "10.96.0.19", 53, [(PODS["p1"], 5353), (PODS["p2"], 5353)], protocol="UDP"))
    client, sport = CLIENT_IPS[1], 40001
    first = _udp(lab, "10.96.0.19", 53, client, sport)
    assert first in ("p1", "p2"), first
    assert _udp(lab, "10.96.0.19", 53, client, sport) == first  # the same flow stays on its backend
    assert f"src={PODS[first]} " in _conntrack(lab, "10.96.0.19")
    other = "p2" if first == "p1" else "p1"
    d.sync(svc("dns", "10.96.0.19", 53, [(PODS[other], 5353)], protocol="UDP"), full=False, updated=("default/dns",))
    text = _ipvsadm(lab)
    assert f"{PODS[first]}:5353" not in text and f"{PODS[other]}:5353" in text, text  # deleted, not drained
    assert f"src={PODS[first]} " not in _conntrack(lab, "10.96.0.19")
    # The flow's next datagram is scheduled anew; with its old conntrack entry left, IPVS
    # (expire_nodest_conn) would drop it.
    assert _udp(lab, "10.96.0.19", 53, client, sport) == other


def test_dry_run_is_what_the_kernel_holds_in_ipvsadm_form(lab, driver):
    d = driver()
    services = [
        svc("web", "10.96.0.22", 80, _eps("p1", "p2", "p3"), node_port=30083),
        svc(
            "sticky", "10.96.0.23", 80, _eps("p1", "p2"),
            annotations={"ipvs.kubelab.dev/scheduler": "sh"}, session_affinity="ClientIP", sticky_max_age_seconds=1800,
        ),
        svc("maglev", "10.96.0.24", 80, _eps("p2", "p3"), annotations={"ipvs.kubelab.dev/scheduler": "mh"}),
        svc("dns", "10.96.0.25", 53, [(PODS["p1"], 5353)], protocol="UDP"),
    ]
    d.sync(*services)
    dry = d.render(*services)
    section = dry.split("# IPVS virtual servers (ipvsadm -Sn)\n", 1)[1].split("\n#", 1)[0]
    kernel = _ipvsadm(lab).splitlines()
    assert sorted(section.splitlines()) == sorted(kernel), (section, kernel)
    assert any("-s mh -b mh-port" in line for line in kernel) and any("-s sh -p 1800 -b sh-fallback" in line for line in kernel)
    # The mode's gauges count what the kernel holds.
    assert d.metric("kubeproxy_sync_proxy_rules_ipvs_virtual_servers") == sum(line.startswith("-A") for line in kernel)
    assert d.metric("kubeproxy_sync_proxy_rules_ipvs_real_servers") == sum(line.startswith("-a") for line in kernel)


def test_foreign_state_survives_syncs_and_cleanup(lab, driver):
    lab.sh(
        "ipvsadm -A -t 10.99.0.1:80 -s wrr\n"
        "ipvsadm -a -t 10.99.0.1:80 -r 10.244.0.13:8080 -m -w 3\n"
        "iptables-legacy -t nat -N KL-FOREIGN\n"
        "ipset create KL-FOREIGN hash:ip\n",
        check=True,
    )
    d = driver()
    d.sync(svc("mine", "10.96.0.20", 80, _eps("p1"), node_port=30082))
    d.sync(svc("mine", "10.96.0.20", 80, _eps("p2")), full=True)
    text = _ipvsadm(lab)
    assert "-A -t 10.99.0.1:80 -s wrr" in text and "-a -t 10.99.0.1:80 -r 10.244.0.13:8080 -m -w 3" in text
    assert f"{NODE_IP}:30082" not in text  # our stale NodePort server was removed
    # What a user runs: `kubelab proxy --proxy-mode ipvs --cleanup`, in the node's namespace.
    r = lab.run(["python3", "-m", "kubelab", "proxy", "--proxy-mode", "ipvs", "--cleanup"], timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    text = _ipvsadm(lab)
    assert text.strip().splitlines() == ["-A -t 10.99.0.1:80 -s wrr", "-a -t 10.99.0.1:80 -r 10.244.0.13:8080 -m -w 3"]
    assert lab.run(["ip", "link", "show", "kube-ipvs0"]).returncode != 0
    saved = lab.run(["iptables-legacy-save"]).stdout
    assert "KUBE-" not in saved and "KL-FOREIGN" in saved
    sets = lab.run(["ipset", "list", "-n"]).stdout.split()
    assert sets == ["KL-FOREIGN"], sets
    lab.sh("ipvsadm -D -t 10.99.0.1:80; iptables-legacy -t nat -X KL-FOREIGN; ipset destroy KL-FOREIGN")
    lab.python("import tests.uml.ipvs_support as _s\ndrv = _s.Driver(cluster_cidr=('10.244.0.0/16',))")
