"""The trace analysis (pure): grouping sightings into packets, naming each translation and where it happened.

Addresses (made-up sightings, no kernel): pods 10.244.0.0/24 (node1) and
10.244.1.0/24 (node2), service 10.96.0.20, underlay 172.18.0.0/24 (node1
.10, external client .254).
"""

from __future__ import annotations

import pytest

from kubelab.netlab.trace import (
    CapturePoint,
    FlowTuple,
    Observation,
    TraceResult,
    Translation,
    analyze,
    client_argv,
    flow_pairs,
    format_trace,
    write_pcap,
)
from kubelab.netlab.trace_cli import default_pcap_path, split_target

CLIENT = "10.244.0.5"
BACKEND = "10.244.1.7"
VIP = "10.96.0.20"
NODE1 = "172.18.0.10"
EXTERNAL = "172.18.0.254"


def point(where: str, ifname: str = "eth0", note: str = "") -> CapturePoint:
    return CapturePoint(where, f"kl-t.{where}", ifname, note)


def hop(t: float, where: str, out: bool, src: str, sport: int, dst: str, dport: int, ident, ifname="eth0") -> Observation:
    return Observation(t, point(where, ifname), out, FlowTuple("TCP", src, sport, dst, dport), ident, "S")


def pod_to_service_dnat():
    """client pod on node1 -> VIP; node1 DNATs to a pod on node2; the reply comes back un-DNATed."""
    req, rep = ("TCP", 1, 100, 0, 2, 0), ("TCP", 2, 500, 101, 18, 0)
    return [
        hop(1.0, "client", True, CLIENT, 41000, VIP, 80, req),
        hop(1.1, "node1", False, CLIENT, 41000, VIP, 80, req, "vpaaaa"),
        hop(1.2, "node1", True, CLIENT, 41000, BACKEND, 8080, req),
        hop(1.3, "node2", False, CLIENT, 41000, BACKEND, 8080, req),
        hop(1.4, "web-2", False, CLIENT, 41000, BACKEND, 8080, req),
        hop(2.0, "web-2", True, BACKEND, 8080, CLIENT, 41000, rep),
        hop(2.1, "node2", True, BACKEND, 8080, CLIENT, 41000, rep),
        hop(2.2, "node1", False, BACKEND, 8080, CLIENT, 41000, rep),
        hop(2.3, "node1", True, VIP, 80, CLIENT, 41000, rep, "vpaaaa"),
        hop(2.4, "client", False, VIP, 80, CLIENT, 41000, rep),
    ]


def external_masqueraded():
    """external client -> node1 (DNAT + SNAT to node1's IP) -> web-2 on node2; reply un-SNATed and un-DNATed."""
    req, rep = ("TCP", 7, 1, 0, 2, 0), ("TCP", 8, 9, 2, 18, 0)
    return [
        hop(1.0, "external", True, EXTERNAL, 41000, VIP, 80, req),
        hop(1.1, "node1", False, EXTERNAL, 41000, VIP, 80, req),
        hop(1.2, "node1", True, NODE1, 41000, BACKEND, 8080, req),
        hop(1.3, "web-2", False, NODE1, 41000, BACKEND, 8080, req),
        hop(2.0, "web-2", True, BACKEND, 8080, NODE1, 41000, rep),
        hop(2.1, "node1", False, BACKEND, 8080, NODE1, 41000, rep),
        hop(2.2, "node1", True, VIP, 80, EXTERNAL, 41000, rep),
        hop(2.3, "external", False, VIP, 80, EXTERNAL, 41000, rep),
    ]


def pod_to_pod_direct():
    req = ("TCP", 3, 5, 0, 2, 0)
    return [
        hop(1.0, "client", True, CLIENT, 41000, BACKEND, 8080, req),
        hop(1.2, "node1", True, CLIENT, 41000, BACKEND, 8080, req),
        hop(1.4, "web-2", False, CLIENT, 41000, BACKEND, 8080, req),
    ]


def shuffled_pod_to_service():
    """Same sightings delivered out of order (one sniffer, many sockets): time decides."""
    obs = pod_to_service_dnat()
    return obs[5:] + obs[:5][::-1]


CASES = [
    pytest.param(
        pod_to_service_dnat, FlowTuple("TCP", CLIENT, 41000, VIP, 80), [False, True],
        [Translation("DNAT", "node1", f"{VIP}:80", f"{BACKEND}:8080"),
         Translation("un-DNAT", "node1", f"{BACKEND}:8080", f"{VIP}:80")],
        id="pod-to-clusterip-dnat-in-node",
    ),
    pytest.param(
        external_masqueraded, FlowTuple("TCP", EXTERNAL, 41000, VIP, 80), [False, True],
        [Translation("DNAT", "node1", f"{VIP}:80", f"{BACKEND}:8080"),
         Translation("SNAT", "node1", f"{EXTERNAL}:41000", f"{NODE1}:41000"),
         Translation("un-SNAT", "node1", f"{NODE1}:41000", f"{EXTERNAL}:41000"),
         Translation("un-DNAT", "node1", f"{BACKEND}:8080", f"{VIP}:80")],
        id="external-masqueraded-dnat-snat",
    ),
    pytest.param(
        pod_to_pod_direct, FlowTuple("TCP", CLIENT, 41000, BACKEND, 8080), [False], [], id="pod-to-pod-no-nat",
    ),
    pytest.param(
        shuffled_pod_to_service, FlowTuple("TCP", CLIENT, 41000, VIP, 80), [False, True],
        [Translation("DNAT", "node1", f"{VIP}:80", f"{BACKEND}:8080"),
         Translation("un-DNAT", "node1", f"{BACKEND}:8080", f"{VIP}:80")],
        id="out-of-order-sightings",
    ),
]


@pytest.mark.parametrize("make,client,replies,translations", CASES)
def test_analyze(make, client, replies, translations):
    packets = analyze(make(), client)
    assert [p.reply for p in packets] == replies
    assert [t for p in packets for t in p.translations] == translations
    for p in packets:
        times = [o.time for o in p.observations]
        assert times == sorted(times)


def test_rewrite_after_egress_belongs_to_the_next_namespace():
    # Seen leaving the pod, then leaving node1 rewritten: node1 did it, not the pod.
    req = ("TCP", 1, 1, 0, 2, 0)
    obs = [hop(1.0, "client", True, CLIENT, 41000, VIP, 80, req), hop(1.1, "node1", True, CLIENT, 41000, BACKEND, 8080, req)]
    (packet,) = analyze(obs, FlowTuple("TCP", CLIENT, 41000, VIP, 80))
    assert packet.translations == [Translation("DNAT", "node1", f"{VIP}:80", f"{BACKEND}:8080")]


def result_of(make, client) -> TraceResult:
    obs = make()
    return TraceResult(
        lab="t", source="client", source_ip=client.src, service="default/web", target=client,
        points=sorted({o.point for o in obs}, key=lambda p: p.label), observations=obs, packets=analyze(obs, client),
        client_output="HTTP/1.1 200 OK\r\n", backends={BACKEND: "default/web-2"},
    )


def test_format_names_each_translation_on_the_hop_that_shows_it():
    text = format_trace(result_of(pod_to_service_dnat, FlowTuple("TCP", CLIENT, 41000, VIP, 80)))
    lines = text.splitlines()
    dnat = [line for line in lines if "[DNAT at node1]" in line]
    assert len(dnat) == 1 and f"{CLIENT}:41000 -> {BACKEND}:8080" in dnat[0] and "node1/eth0 out" in dnat[0]
    undnat = [line for line in lines if "[un-DNAT at node1]" in line]
    assert len(undnat) == 1 and f"{VIP}:80 -> {CLIENT}:41000" in undnat[0]
    # The first and last sighting of each packet are always listed; unchanged middles are not.
    assert sum("node2/eth0" in line for line in lines) == 0
    assert any(line.strip().startswith("1 ") and "client/eth0 out" in line for line in lines)
    assert f"no SNAT: the backend saw the client's own address {CLIENT}" in text
    assert "answered by: default/web-2" in text
    assert "client got: HTTP/1.1 200 OK" in text
    verbose = format_trace(result_of(pod_to_service_dnat, FlowTuple("TCP", CLIENT, 41000, VIP, 80)), verbose=True)
    assert sum("node2/eth0" in line for line in verbose.splitlines()) == 2


def test_format_masquerade_and_limit():
    text = format_trace(result_of(external_masqueraded, FlowTuple("TCP", EXTERNAL, 41000, VIP, 80)), limit=1)
    assert "[DNAT at node1, SNAT at node1]" in text
    assert "1 more packets" in text
    assert "SNAT     at node1      172.18.0.254:41000 -> 172.18.0.10:41000" in text
    assert "no SNAT" not in text


def test_pcap_has_one_interface_per_capture_point(tmp_path):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapNgReader

    obs = []
    for o in pod_to_service_dnat():
        t = o.tuple
        raw = bytes(Ether() / IP(src=t.src, dst=t.dst) / TCP(sport=t.sport, dport=t.dport))
        obs.append(Observation(o.time, o.point, o.outgoing, t, o.ident, o.summary, raw))
    result = result_of(lambda: obs, FlowTuple("TCP", CLIENT, 41000, VIP, 80))
    path = tmp_path / "t.pcapng"
    assert write_pcap(result, path) == len(obs)
    read = list(PcapNgReader(str(path)))
    assert [p[IP].dst for p in read] == [o.tuple.dst for o in obs]
    assert [p.sniffed_on for p in read] == [o.point.label for o in obs]
    assert read[0].comments == [b"netns kl-t.client iface eth0"]
    assert [p.direction for p in read] == [2 if o.outgoing else 1 for o in obs]


@pytest.mark.parametrize(
    "proto,port,argv0,has",
    [
        pytest.param("TCP", 80, "nc", ["-N", "-p", "41000"], id="tcp-nc"),
        pytest.param("UDP", 9001, "nc", ["-u", "-p", "41000"], id="udp-nc"),
        pytest.param("UDP", 53, "dig", ["0.0.0.0#41000", "kube-dns.kube-system.svc.cluster.local"], id="dns-udp-dig"),
        pytest.param("TCP", 53, "dig", ["+tcp"], id="dns-tcp-dig"),
    ],
)
def test_client_argv(proto, port, argv0, has):
    argv = client_argv(proto, VIP, port, 41000, 5)
    assert argv[0] == argv0 and all(h in argv for h in has)


@pytest.mark.parametrize(
    "text,expect",
    [
        pytest.param("web", ("web", None), id="name"),
        pytest.param("web:80", ("web", "80"), id="name-port"),
        pytest.param("kube-system/kube-dns:dns-tcp", ("kube-system/kube-dns", "dns-tcp"), id="ns-name-portname"),
    ],
)
def test_split_target(text, expect):
    assert split_target(text) == expect


@pytest.mark.parametrize("text", [pytest.param("web:", id="empty-port"), pytest.param(":80", id="empty-name")])
def test_split_target_errors(text):
    with pytest.raises(ValueError, match="SERVICE:PORT"):
        split_target(text)


def test_flow_pairs_follow_a_masquerade_that_changed_the_port():
    ct = ("tcp      6 119 TIME_WAIT src=172.18.0.254 dst=10.96.0.20 sport=41000 dport=80 "
          "src=10.244.0.3 dst=10.244.0.1 sport=8080 dport=56751 [ASSURED] mark=0 use=1")
    pairs = flow_pairs(FlowTuple("TCP", EXTERNAL, 41000, VIP, 80), [ct])
    assert ("TCP", frozenset({("10.244.0.3", 8080), ("10.244.0.1", 56751)})) in pairs
    assert ("TCP", frozenset({(EXTERNAL, 41000), (VIP, 80)})) in pairs
    assert len(pairs) == 2


def test_default_pcap_path_names_the_lab_and_utc_time():
    assert default_pcap_path("basic", 0.0) == "trace-basic-19700101-000000.pcapng"
