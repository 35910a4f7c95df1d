"""Packet-flow tests: trace packets through the rules the proxier leaves in the (fake) tables.

Re-expresses kube-proxy's flow tests (pkg/proxy/iptables/proxier_test.go:
TestTracePacket idea, TestNoEndpointsReject, TestClusterIPGeneral,
TestLoadBalancer, TestNodePorts, TestHealthCheckNodePort,
TestExternalTrafficPolicyLocal/Cluster, TestInternalTrafficPolicy,
TestTerminatingEndpointsTrafficPolicyLocal/Cluster,
TestInternalExternalMasquerade) as kubelab objects; each case names a
source, destination and port and expects the endpoints reached (or
ACCEPT/DROP/REJECT) and whether the packet is masqueraded.

Addresses: pods 10.0.0.0/8 (client pod 10.0.0.2, endpoints 10.180.0.0/16 and
10.0.1.0/24), cluster IPs 172.30.0.0/16, node IPs 192.168.0.2 (primary),
192.168.1.2 (alt), 192.168.99.11 (external IP), LB IPs 1.2.3.4, 5.6.7.8,
9.10.11.12, external clients 203.0.113.2 (allowed) and 203.0.113.130
(blocked by 203.0.113.0/25); IPv6 2001:db8::/32 and fd00::/8.  No packets are sent.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kubelab.model import NodeInfo
from kubelab.modes.iptables.render import LocalDetector, RenderConfig, Renderer
from kubelab.modes.iptables.testing import StateBuilder, ep, make_service, make_slice
from kubelab.modes.iptables.tracer import Tracer, parse_dump

from test_iptables_golden import NODE, fake_proxier, sync

NODE_IP, NODE_IP_ALT, EXT_IP = "192.168.0.2", "192.168.1.2", "192.168.99.11"
NODE_IPS = {NODE_IP, NODE_IP_ALT, EXT_IP, "2001:db8::1", "2001:db8:1::2"}
EXT, EXT_BLOCKED, POD = "203.0.113.2", "203.0.113.130", "10.0.0.2"
H = "test-hostname"


def tracer_for(*objects, **proxier_kw) -> Tracer:
    p, ipt, _ = fake_proxier(**proxier_kw)
    sync(p, StateBuilder(NODE).add(*objects).state(full_sync=True))
    return Tracer(ipt.tables.dump, NODE_IPS)


def check(tracer: Tracer, src, dst, port, output, masq=False, proto="tcp"):
    t = tracer.trace(src, proto, dst, port)
    assert (t.output, t.masquerade) == (output, masq), "\n".join(t.matches)


# ---------------------------------------------------------------- no endpoints

NO_EP = tracer_for(
    make_service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], type="LoadBalancer",
                 external_ips=[EXT_IP], lb_ips=["1.2.3.4"]),
)


@pytest.mark.parametrize(
    "src,dst,port",
    [(POD, "172.30.0.41", 80), (EXT, EXT_IP, 80), (POD, NODE_IP, 3001), (EXT, NODE_IP, 3001), (POD, "1.2.3.4", 80),
     (EXT, "1.2.3.4", 80)],
    ids=["pod-clusterip", "ext-externalip", "pod-nodeport", "ext-nodeport", "pod-lb", "ext-lb"],
)
def test_no_endpoints_reject(src, dst, port):
    check(NO_EP, src, dst, port, "REJECT")


# ---------------------------------------------------------------- cluster IP

CIP = tracer_for(
    make_service("ns1", "svc1", "172.30.0.41", [("http", 80, "TCP")]),
    make_service("ns2", "svc2", "172.30.0.42", [("http", 80, "TCP"), ("https", 443, "TCP", 0, 8443),
                                                ("dns-udp", 53, "UDP"), ("dns-tcp", 53, "TCP", 0, 5353),
                                                ("dns-sctp", 53, "SCTP")]),
    make_slice("ns1", "svc1", [ep("10.180.0.1", H)], [("http", 80, "TCP")]),
    make_slice("ns2", "svc2", [ep("10.180.0.1", H), ep("10.180.2.1", "host2")],
               [("http", 80, "TCP"), ("https", 8443, "TCP"), ("dns-udp", 53, "UDP"), ("dns-tcp", 5353, "TCP"),
                ("dns-sctp", 53, "SCTP")]),
)


@pytest.mark.parametrize(
    "src,dst,port,proto,output,masq",
    [
        ("10.180.0.2", "172.30.0.41", 80, "tcp", "10.180.0.1:80", False),
        ("10.180.0.1", "172.30.0.41", 80, "tcp", "10.180.0.1:80", True),
        ("10.180.0.2", "172.30.0.42", 80, "tcp", "10.180.0.1:80, 10.180.2.1:80", False),
        ("10.180.0.2", "172.30.0.42", 443, "tcp", "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("10.180.0.2", "172.30.0.42", 53, "tcp", "10.180.0.1:5353, 10.180.2.1:5353", False),
        ("10.180.0.2", "172.30.0.42", 53, "udp", "10.180.0.1:53, 10.180.2.1:53", False),
        ("10.180.0.2", "172.30.0.42", 53, "sctp", "10.180.0.1:53, 10.180.2.1:53", False),
        ("10.180.0.2", "172.30.0.42", 80, "udp", "", False),
        ("10.180.0.2", "172.30.0.41", 443, "tcp", "", False),
    ],
    ids=["simple", "hairpin", "multi-endpoint", "target-port", "tcp-53", "udp-53", "sctp-53", "tcp-only-port",
         "other-service-port"],
)
def test_cluster_ip_general(src, dst, port, proto, output, masq):
    check(CIP, src, dst, port, output, masq, proto)


# ---------------------------------------------------------------- load balancer + source ranges

LB = tracer_for(
    make_service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], type="LoadBalancer",
                 lb_ips=["1.2.3.4", "5.6.7.8"], source_ranges=["192.168.0.0/24", " 203.0.113.0/25"]),
    make_slice("ns1", "svc1", ["10.180.0.1"]),
)


@pytest.mark.parametrize(
    "src,dst,port,output,masq",
    [
        (POD, "172.30.0.41", 80, "10.180.0.1:80", False),
        (EXT, NODE_IP, 3001, "10.180.0.1:80", True),
        (EXT_BLOCKED, NODE_IP, 3001, "10.180.0.1:80", True),
        (EXT, "1.2.3.4", 80, "10.180.0.1:80", True),
        (EXT, "5.6.7.8", 80, "10.180.0.1:80", True),
        (EXT_BLOCKED, "1.2.3.4", 80, "DROP", False),
        (EXT_BLOCKED, "5.6.7.8", 80, "DROP", False),
        (POD, "1.2.3.4", 80, "DROP", False),
        (NODE_IP, "1.2.3.4", 80, "10.180.0.1:80", True),
        ("1.2.3.4", "1.2.3.4", 80, "10.180.0.1:80", True),
        ("5.6.7.8", "5.6.7.8", 80, "10.180.0.1:80", True),
    ],
    ids=["pod-clusterip", "ext-nodeport", "nodeport-bypasses-ranges", "ext-lb1", "ext-lb2", "blocked-lb1",
         "blocked-lb2", "pod-lb-blocked", "node-lb-allowed", "lb1-snat-allowed", "lb2-snat-allowed"],
)
def test_load_balancer(src, dst, port, output, masq):
    check(LB, src, dst, port, output, masq)


# ---------------------------------------------------------------- NodePorts

NP_OUT = "10.180.0.1:80, 10.180.2.1:80"
NP_OBJECTS = (
    make_service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], type="NodePort"),
    make_slice("ns1", "svc1", ["10.180.0.1", ep("10.180.2.1", H)]),
)


@pytest.mark.parametrize(
    "localhost,addresses,alt_allowed,firewall",
    [
        (True, (), True, True),
        (False, (), True, False),
        (False, ("192.168.0.0/24", "127.0.0.1/32"), False, False),
        (False, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), True, False),
    ],
    ids=["localhost-enabled", "localhost-disabled", "localhost-disabled-loopback-listed", "multiple-addresses"],
)
def test_node_ports_ipv4(localhost, addresses, alt_allowed, firewall):
    p, ipt, _ = fake_proxier(iptables_localhost_nodeports=localhost, nodeport_addresses=addresses)
    p._interface_addresses = lambda: ["127.0.0.1", NODE_IP, NODE_IP_ALT, EXT_IP, "2001:db8::1"]
    sync(p, StateBuilder(NODE).add(*NP_OBJECTS).state(full_sync=True))
    tr = Tracer(ipt.tables.dump, NODE_IPS)
    check(tr, POD, "172.30.0.41", 80, NP_OUT, False)
    check(tr, EXT, NODE_IP, 3001, NP_OUT, True)
    check(tr, NODE_IP, NODE_IP, 3001, NP_OUT, True)
    check(tr, "127.0.0.1", "127.0.0.1", 3001, NP_OUT if localhost else "", localhost)
    check(tr, EXT, NODE_IP_ALT, 3001, NP_OUT if alt_allowed else "", alt_allowed)
    rules = [r.raw for r in (ipt.tables.dump.chain("filter", "KUBE-FIREWALL") or type("c", (), {"rules": []})).rules]
    assert bool(rules) == firewall
    assert p.sysctl.values.get("net/ipv4/conf/all/route_localnet") == (1 if localhost else None)


@pytest.mark.parametrize("addresses,alt_allowed", [((), True), (("192.168.0.0/24", "2001:db8::/64"), False)],
                         ids=["all", "cidrs"])
def test_node_ports_ipv6(addresses, alt_allowed):
    """IPv6 through the renderer alone (the proxier programs IPv4): no localhost NodePorts on IPv6."""
    b = StateBuilder(NODE, ip_family=6).add(
        make_service("ns1", "svc1", "fd00:172:30::41", [("p80", 80, "TCP", 3001)], type="NodePort"),
        make_slice("ns1", "svc1", ["fd00:10:180::1", ep("fd00:10:180::2:1", H)], address_type="IPv6"),
    )
    s = b.state(full_sync=True)
    match_all = not addresses
    cfg = RenderConfig(ip_family=6, masquerade_mark="0x4000", local_detector=LocalDetector.by_cidr("fd00:10::/64"),
                       localhost_nodeports=False, nodeport_match_all=match_all,
                       nodeport_ips=() if match_all else ("2001:db8::1",))
    text = Renderer(cfg).render(s.service_map, s.endpoints_map, s.node).text
    tr = Tracer(parse_dump(text), NODE_IPS)
    out = "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80"
    check(tr, "fd00:10::2", "fd00:172:30::41", 80, out, False)
    check(tr, "2600:5200::1", "2001:db8::1", 3001, out, True)
    check(tr, "::1", "::1", 3001, "")
    check(tr, "2600:5200::1", "2001:db8:1::2", 3001, out if alt_allowed else "", alt_allowed)
    assert "KUBE-FIREWALL" not in text


def test_health_check_node_port_accepted_then_removed():
    p, ipt, _ = fake_proxier(nodeport_addresses=("127.0.0.0/8",))
    p._interface_addresses = lambda: ["127.0.0.1"]
    svc = make_service("ns1", "svc1", "172.30.0.42", [("p80", 80, "TCP", 3001)], type="LoadBalancer", etp="Local",
                       health_check_node_port=30000)
    b = StateBuilder(NODE).add(svc)
    sync(p, b.state(full_sync=True))
    check(Tracer(ipt.tables.dump, NODE_IPS), "1.2.3.4", NODE_IP, 30000, "ACCEPT")
    b.delete(svc)
    sync(p, b.state())
    check(Tracer(ipt.tables.dump, NODE_IPS), "1.2.3.4", NODE_IP, 30000, "")


# ---------------------------------------------------------------- external traffic policy

def _etp(policy):
    return tracer_for(
        make_service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001, 80)], type="LoadBalancer", etp=policy,
                     external_ips=[EXT_IP], lb_ips=["1.2.3.4"], health_check_node_port=30000 if policy == "Local" else 0),
        make_slice("ns1", "svc1", ["10.180.0.1", ep("10.180.2.1", H)]),
    )


BOTH, LOCAL = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"


@pytest.mark.parametrize(
    "policy,src,dst,port,output,masq",
    [
        ("Local", POD, "172.30.0.41", 80, BOTH, False),
        ("Local", POD, EXT_IP, 80, BOTH, False),
        ("Local", EXT, EXT_IP, 80, LOCAL, False),
        ("Local", POD, "1.2.3.4", 80, BOTH, False),
        ("Local", EXT, "1.2.3.4", 80, LOCAL, False),
        ("Local", POD, NODE_IP, 3001, BOTH, False),
        ("Local", EXT, NODE_IP, 3001, LOCAL, False),
        ("Cluster", POD, "172.30.0.41", 80, BOTH, False),
        ("Cluster", POD, EXT_IP, 80, BOTH, True),
        ("Cluster", EXT, EXT_IP, 80, BOTH, True),
        ("Cluster", POD, "1.2.3.4", 80, BOTH, True),
        ("Cluster", EXT, "1.2.3.4", 80, BOTH, True),
        ("Cluster", POD, NODE_IP, 3001, BOTH, True),
        ("Cluster", EXT, NODE_IP, 3001, BOTH, True),
    ],
    ids=lambda v: str(v),
)
def test_external_traffic_policy(policy, src, dst, port, output, masq):
    check(_etp(policy), src, dst, port, output, masq)


# ---------------------------------------------------------------- internal traffic policy

@pytest.mark.parametrize(
    "itp,nodes,output",
    [
        ("Cluster", (H, "host1", "host2"), "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80"),
        ("Local", (H, "host1", "host2"), "10.0.1.1:80"),
        ("Local", (H, H, "host2"), "10.0.1.1:80, 10.0.1.2:80"),
        ("Local", ("host0", "host1", "host2"), "DROP"),
    ],
    ids=["cluster", "local-one", "local-many", "local-none"],
)
def test_internal_traffic_policy(itp, nodes, output):
    p, ipt, _ = fake_proxier()
    slice_ = make_slice("ns1", "svc1", [ep(f"10.0.1.{i + 1}", n, ready=True) for i, n in enumerate(nodes)], [("", 80, "TCP")])
    b = StateBuilder(NODE).add(make_service("ns1", "svc1", "172.30.1.1", [("", 80, "TCP")], itp=itp), slice_)
    sync(p, b.state(full_sync=True))
    check(Tracer(ipt.tables.dump, NODE_IPS), POD, "172.30.1.1", 80, output)
    b.delete(slice_)
    sync(p, b.state())
    check(Tracer(ipt.tables.dump, NODE_IPS), POD, "172.30.1.1", 80, "REJECT")



BOTH_LOCAL = tracer_for(
    make_service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], type="LoadBalancer", etp="Local",
                 itp="Local", external_ips=[EXT_IP], lb_ips=["1.2.3.4"], health_check_node_port=30000),
    make_slice("ns1", "svc1", ["10.180.0.1", ep("10.180.2.1", H)]),
)


@pytest.mark.parametrize(
    "src,dst,port,output,masq",
    [
        (POD, "172.30.0.41", 80, "10.180.2.1:80", False),
        (POD, EXT_IP, 80, "10.180.0.1:80, 10.180.2.1:80", False),
        (POD, "1.2.3.4", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        (EXT, EXT_IP, 80, "10.180.2.1:80", False),
        (EXT, NODE_IP, 3001, "10.180.2.1:80", False),
    ],
    ids=["pod-clusterip-local-only", "pod-externalip-short-circuit", "pod-lb-short-circuit", "ext-externalip-local",
         "ext-nodeport-local"],
)
def test_both_policies_local(src, dst, port, output, masq):
    """internalTrafficPolicy and externalTrafficPolicy Local together: pod -> external IP traffic still
    short-circuits to all endpoints (kube-proxy's UsesClusterEndpoints: any externally accessible port)."""
    check(BOTH_LOCAL, src, dst, port, output, masq)


# ---------------------------------------------------------------- terminating endpoints

def _cond(ready, serving, terminating):
    return {"ready": ready, "serving": serving, "terminating": terminating}


READY, TERM_SERVING, TERM_DEAD = _cond(True, True, False), _cond(False, True, True), _cond(False, False, True)
TERMINATING_CASES = [
    ("ready-exist",
     [("10.0.1.1", H, READY), ("10.0.1.2", H, READY), ("10.0.1.3", H, TERM_SERVING), ("10.0.1.4", H, TERM_DEAD),
      ("10.0.1.5", "host-1", READY)],
     {"Local": ("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", "10.0.1.1:80, 10.0.1.2:80", False),
      "Cluster": None}),
    ("only-terminating",
     [("10.0.1.2", H, TERM_SERVING), ("10.0.1.3", H, TERM_SERVING), ("10.0.1.4", H, TERM_DEAD),
      ("10.0.1.5", "host-1", READY)],
     {"Local": ("10.0.1.5:80", "10.0.1.2:80, 10.0.1.3:80", False)}),
    ("terminating-remote",
     [("10.0.1.5", "host-1", TERM_SERVING)],
     {"Local": ("10.0.1.5:80", "DROP", False), "Cluster": ("10.0.1.5:80", "10.0.1.5:80", True)}),
    ("none-usable",
     [("10.0.1.5", H, TERM_DEAD), ("10.0.1.5", "host-1", TERM_DEAD)],
     {"Local": ("REJECT", "REJECT", False), "Cluster": ("REJECT", "REJECT", False)}),
    ("cluster-ready-exist",
     [("10.0.1.1", H, READY), ("10.0.1.2", H, READY), ("10.0.1.3", "another-host", TERM_SERVING),
      ("10.0.1.4", "another-host", TERM_DEAD), ("10.0.1.5", "another-host", READY)],
     {"Cluster": ("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", True)}),
    ("cluster-only-terminating",
     [("10.0.1.2", H, TERM_SERVING), ("10.0.1.3", H, TERM_SERVING), ("10.0.1.4", "another-host", TERM_DEAD),
      ("10.0.1.5", "another-host", TERM_SERVING)],
     {"Cluster": ("10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", True)}),
]


@pytest.mark.parametrize(
    "policy,endpoints,expect",
    [(pol, eps, exp[pol]) for _, eps, exp in TERMINATING_CASES for pol in ("Local", "Cluster") if exp.get(pol)],
    ids=[f"{name}-{pol}" for name, _, exp in TERMINATING_CASES for pol in ("Local", "Cluster") if exp.get(pol)],
)
def test_terminating_endpoints(policy, endpoints, expect):
    cluster_out, lb_out, lb_masq = expect
    p, ipt, _ = fake_proxier()
    svc = make_service("ns1", "svc1", "172.30.1.1", [("", 80, "TCP", 0, 80)], type="LoadBalancer", etp=policy,
                       lb_ips=["1.2.3.4"], health_check_node_port=30000)
    slice_ = make_slice("ns1", "svc1", [ep(ip, node, **c) for ip, node, c in endpoints], [("", 80, "TCP")])
    b = StateBuilder(NODE).add(svc, slice_)
    sync(p, b.state(full_sync=True))
    tr = Tracer(ipt.tables.dump, NODE_IPS)
    check(tr, POD, "172.30.1.1", 80, cluster_out)
    check(tr, EXT, "1.2.3.4", 80, lb_out, lb_masq)
    b.delete(slice_)
    sync(p, b.state())
    tr = Tracer(ipt.tables.dump, NODE_IPS)
    check(tr, POD, "172.30.1.1", 80, "REJECT")
    check(tr, EXT, "1.2.3.4", 80, "REJECT")


# ---------------------------------------------------------------- internal/external masquerade

IEM_OBJECTS = (
    make_service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], type="LoadBalancer",
                 health_check_node_port=30001, lb_ips=["1.2.3.4"]),
    make_service("ns2", "svc2", "172.30.0.42", [("p80", 80, "TCP", 3002)], type="LoadBalancer",
                 health_check_node_port=30002, etp="Local", lb_ips=["5.6.7.8"]),
    make_service("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP", 3003)], type="LoadBalancer",
                 health_check_node_port=30003, itp="Local", lb_ips=["9.10.11.12"]),
    make_slice("ns1", "svc1", [ep("10.180.0.1", H), ep("10.180.1.1", "remote")]),
    make_slice("ns2", "svc2", [ep("10.180.0.2", H), ep("10.180.1.2", "remote")]),
    make_slice("ns3", "svc3", [ep("10.180.0.3", H), ep("10.180.1.3", "remote")]),
)
S1, S2, S3 = "10.180.0.1:80, 10.180.1.1:80", "10.180.0.2:80, 10.180.1.2:80", "10.180.0.3:80, 10.180.1.3:80"
IEM_FLOWS = [
    ("pod to ClusterIP", POD, "172.30.0.41", 80, S1, False),
    ("pod to NodePort", POD, NODE_IP, 3001, S1, True),
    ("pod to LB", POD, "1.2.3.4", 80, S1, True),
    ("node to ClusterIP", NODE_IP, "172.30.0.41", 80, S1, True),
    ("node to NodePort", NODE_IP, NODE_IP, 3001, S1, True),
    ("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, S1, True),
    ("node to LB", NODE_IP, "1.2.3.4", 80, S1, True),
    ("external to ClusterIP", EXT, "172.30.0.41", 80, S1, True),
    ("external to NodePort", EXT, NODE_IP, 3001, S1, True),
    ("external to LB", EXT, "1.2.3.4", 80, S1, True),
    ("pod to ClusterIP with eTP:Local", POD, "172.30.0.42", 80, S2, False),
    ("pod to NodePort with eTP:Local", POD, NODE_IP, 3002, S2, False),
    ("pod to LB with eTP:Local", POD, "5.6.7.8", 80, S2, False),
    ("node to ClusterIP with eTP:Local", NODE_IP, "172.30.0.42", 80, S2, True),
    ("node to NodePort with eTP:Local", NODE_IP, NODE_IP, 3001, S1, True),
    ("localhost to NodePort with eTP:Local", "127.0.0.1", "127.0.0.1", 3002, S2, True),
    ("node to LB with eTP:Local", NODE_IP, "5.6.7.8", 80, S2, True),
    ("external to ClusterIP with eTP:Local", EXT, "172.30.0.42", 80, S2, True),
    ("external to NodePort with eTP:Local", EXT, NODE_IP, 3002, "10.180.0.2:80", False),
    ("external to LB with eTP:Local", EXT, "5.6.7.8", 80, "10.180.0.2:80", False),
    ("pod to ClusterIP with iTP:Local", POD, "172.30.0.43", 80, "10.180.0.3:80", False),
    ("pod to NodePort with iTP:Local", POD, NODE_IP, 3003, S3, True),
    ("pod to LB with iTP:Local", POD, "9.10.11.12", 80, S3, True),
    ("node to ClusterIP with iTP:Local", NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("node to NodePort with iTP:Local", NODE_IP, NODE_IP, 3003, S3, True),
    ("localhost to NodePort with iTP:Local", "127.0.0.1", "127.0.0.1", 3003, S3, True),
    ("node to LB with iTP:Local", NODE_IP, "9.10.11.12", 80, S3, True),
    ("external to ClusterIP with iTP:Local", EXT, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("external to NodePort with iTP:Local", EXT, NODE_IP, 3003, S3, True),
    ("external to LB with iTP:Local", EXT, "9.10.11.12", 80, S3, True),
]
IEM_OVERRIDES = {
    "base": {},
    "no-local-detector": {
        **{n: (None, False) for n in ("node to ClusterIP", "node to ClusterIP with eTP:Local", "node to ClusterIP with iTP:Local",
                                     "external to ClusterIP", "external to ClusterIP with eTP:Local",
                                     "external to ClusterIP with iTP:Local")},
        "pod to NodePort with eTP:Local": ("10.180.0.2:80", None),
        "pod to LB with eTP:Local": ("10.180.0.2:80", None),
    },
    "masquerade-all": {n: (None, True) for n in ("pod to ClusterIP", "pod to ClusterIP with eTP:Local", "pod to ClusterIP with iTP:Local")},
    "masquerade-all-no-local-detector": {
        **{n: (None, True) for n in ("pod to ClusterIP", "pod to ClusterIP with eTP:Local", "pod to ClusterIP with iTP:Local")},
        "pod to NodePort with eTP:Local": ("10.180.0.2:80", None),
        "pod to LB with eTP:Local": ("10.180.0.2:80", None),
    },
}
IEM_TRACERS: dict[str, Tracer] = {}


def _iem_tracer(variant: str) -> Tracer:
    if variant not in IEM_TRACERS:
        p, ipt, _ = fake_proxier(masquerade_all=variant.startswith("masquerade-all"))
        if "no-local-detector" in variant:
            p.render_config = replace(p.render_config, local_detector=LocalDetector())
        sync(p, StateBuilder(NODE).add(*IEM_OBJECTS).state(full_sync=True))
        IEM_TRACERS[variant] = Tracer(ipt.tables.dump, NODE_IPS)
    return IEM_TRACERS[variant]


@pytest.mark.parametrize("variant", list(IEM_OVERRIDES))
@pytest.mark.parametrize("name,src,dst,port,output,masq", IEM_FLOWS, ids=[f[0] for f in IEM_FLOWS])
def test_internal_external_masquerade(variant, name, src, dst, port, output, masq):
    out_o, masq_o = IEM_OVERRIDES[variant].get(name, (None, None))
    check(_iem_tracer(variant), src, dst, port, out_o or output, masq if masq_o is None else masq_o)


def test_overrides_name_real_flows():
    names = {f[0] for f in IEM_FLOWS}
    for overrides in IEM_OVERRIDES.values():
        assert set(overrides) <= names
